//! `veil serve`: Arrow Flight SQL over gRPC.
//!
//! Authentication: a Flight `Handshake` with basic credentials (operator id,
//! token) returns a session bearer token; every other call carries
//! `authorization: Bearer <token>` (a session token or the operator's token).
//!
//! A statement is answered in `GetFlightInfo`: the query is checked, charged,
//! executed and released there, so the schema promised in the `FlightInfo`
//! (with its accuracy and budget metadata) is exactly the streamed one. The
//! ticket is a one-time handle to that release.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    SupportedSqlGrammar, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    Ticket,
};
use base64::Engine as _;
use base64::prelude::{BASE64_STANDARD, BASE64_STANDARD_NO_PAD};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use veil_engine::{Answer, Engine, EngineError, Rule};

/// How long a handshake session token stays valid.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long an unread result is kept.
const RESULT_TTL: Duration = Duration::from_secs(600);
/// Most unread results kept at once.
const MAX_PENDING: usize = 1024;
/// How long an unused prepared statement is kept.
const PREPARED_TTL: Duration = Duration::from_secs(3600);
/// Most prepared statements kept at once.
const MAX_PREPARED: usize = 4096;
/// Most prepared statements one operator keeps open.
const MAX_PREPARED_PER_OPERATOR: usize = 256;
/// The response header of a handshake that tells when its token expires.
pub const TOKEN_EXPIRES_HEADER: &str = "x-veil-token-expires";
/// The only table type veil lists.
const TABLE_TYPE: &str = "TABLE";

/// What both gRPC services share: the engine and the login sessions.
pub struct Shared {
    engine: Arc<Engine>,
    sessions: Mutex<HashMap<String, (String, Instant)>>,
}

impl Shared {
    /// Shared state over an engine.
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        Arc::new(Shared {
            engine,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The operator a request is authenticated as: by its bearer token, or
    /// by its client certificate's subject (mTLS); when both are present
    /// they must name the same operator.
    pub fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let from_cert = match request.peer_certs() {
            Some(certs) if !certs.is_empty() => Some(self.certificate_operator(&certs[0])?),
            _ => None,
        };
        let from_token = match request.metadata().get("authorization") {
            Some(_) => Some(self.token_operator(request.metadata())?),
            None => None,
        };
        match (from_cert, from_token) {
            (Some(a), Some(b)) if a != b => Err(Status::unauthenticated(
                "the client certificate and the bearer token belong to different operators",
            )),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>`; log in with a Handshake first, or connect with a client certificate",
            )),
        }
    }

    /// The operator a verified client certificate belongs to.
    fn certificate_operator(&self, der: &[u8]) -> Result<String, Status> {
        let unreadable = || Status::unauthenticated("the client certificate cannot be read");
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| unreadable())?;
        let registry = x509_parser::objects::oid_registry();
        let attributes = cert
            .subject()
            .iter_attributes()
            .map(|a| {
                let name = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                    .map(|n| n.to_ascii_uppercase())
                    .unwrap_or_else(|_| a.attr_type().to_id_string());
                a.as_str().map(|v| (name, v.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unreadable())?;
        let subject = cert.subject().to_string();
        self.engine
            .policy()
            .operator_by_subject(&attributes)
            .map(|op| op.id.clone())
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "no operator has the client certificate subject `{subject}`; the policy maps subjects with `mtls = {{ subject = \"…\" }}`"
                ))
            })
    }

    /// The operator of the request's bearer token.
    fn token_operator(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("the authorization header is not ASCII"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        if let Some((op, expires)) = self
            .sessions
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .get(token)
            && *expires > Instant::now()
        {
            return Ok(op.clone());
        }
        self.engine
            .policy()
            .authenticate(None, token)
            .map(|op| op.id.clone())
            .ok_or_else(|| Status::unauthenticated("unknown or expired token"))
    }
}

/// The Flight SQL service.
pub struct VeilFlightSql {
    shared: Arc<Shared>,
    results: Mutex<HashMap<Vec<u8>, (String, Answer, Instant)>>,
    prepared: Mutex<HashMap<Vec<u8>, Prepared>>,
}

/// A prepared statement: its text, and the parameters last bound to it.
/// Nothing is planned or charged until it is executed.
struct Prepared {
    operator: String,
    sql: String,
    params: Vec<ScalarValue>,
    used: Instant,
}

/// Aborts a spawned task when dropped: a client that cancels its call stops
/// the work (and the worker) behind it; a charge already made stands.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The gRPC header carrying a client-chosen request id (idempotent retries).
pub const REQUEST_ID_HEADER: &str = "x-veil-request-id";

impl VeilFlightSql {
    /// A service over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        VeilFlightSql {
            shared,
            results: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self).max_decoding_message_size(16 * 1024 * 1024)
    }

    fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        self.shared.operator(request)
    }

    fn store(&self, operator: String, answer: Answer) -> Result<Vec<u8>, Status> {
        let handle = answer.request_id.clone().into_bytes();
        let mut results = self.results.lock().map_err(|_| Status::internal("lock"))?;
        let now = Instant::now();
        results.retain(|_, (_, _, t)| now.duration_since(*t) < RESULT_TTL);
        if results.len() >= MAX_PENDING
            && let Some(oldest) = results
                .iter()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(k, _)| k.clone())
        {
            results.remove(&oldest);
        }
        results.insert(handle.clone(), (operator, answer, now));
        Ok(handle)
    }

    /// Answers a statement: checks, charges, executes and releases it, keeps
    /// the answer under a one-time ticket and returns its `FlightInfo`.
    async fn answer(
        &self,
        operator: String,
        sql: String,
        metadata: &MetadataMap,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let now = chrono::Utc::now().fixed_offset();
        // A client-chosen request id makes a retry return the same answer
        // without a new charge.
        let request_id = match metadata.get(REQUEST_ID_HEADER) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::invalid_argument("the request id header is not ASCII"))?
                    .to_owned(),
            ),
            None => None,
        };
        // On its own task, so that a panic while answering fails this call
        // only; aborted if the client goes away.
        let engine = self.shared.engine.clone();
        let op = operator.clone();
        let task = AbortOnDrop(tokio::spawn(async move {
            engine
                .run_request(&op, &sql, now, request_id.as_deref())
                .await
        }));
        let answer = task
            .await
            .map_err(|_| internal_status("a query task failed"))?
            .map_err(|e| status_of(&e))?;
        let schema = answer.schema.clone();
        let rows: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
        let handle = self.store(operator, answer)?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        };
        let info = flight_info(&schema, ticket.as_any().encode_to_vec(), descriptor)?
            .with_total_records(rows as i64);
        Ok(Response::new(info))
    }

    /// The prepared statement behind a handle, if `operator` created it.
    fn with_prepared<T>(
        &self,
        operator: &str,
        handle: &[u8],
        f: impl FnOnce(&mut Prepared) -> T,
    ) -> Result<T, Status> {
        let mut prepared = self.prepared.lock().map_err(|_| Status::internal("lock"))?;
        match prepared.get_mut(handle) {
            Some(p) if p.operator == operator => {
                p.used = Instant::now();
                Ok(f(p))
            }
            _ => Err(Status::not_found(
                "no such prepared statement: it was closed, expired after an hour unused, or belongs to another operator",
            )),
        }
    }

    /// The `FlightInfo` of a catalog listing: its ticket is the command.
    fn listing_info(
        &self,
        request: Request<FlightDescriptor>,
        schema: &datafusion::arrow::datatypes::Schema,
        ticket: Vec<u8>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.operator(&request)?;
        Ok(Response::new(flight_info(
            schema,
            ticket,
            request.into_inner(),
        )?))
    }

    /// The tables the caller may see, as Flight SQL lists them.
    fn listing<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Vec<veil_engine::listing::ListedTable>, Status> {
        let operator = self.operator(request)?;
        self.shared
            .engine
            .listing(&operator, chrono::Utc::now().fixed_offset())
            .map_err(|e| status_of(&e))
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// An internal failure: logged with an incident id, and only that id goes
/// to the client (the details may name files or depend on data).
fn internal_status(detail: &str) -> Status {
    let incident = veil_engine::mechanisms::request_id().unwrap_or_else(|_| "unknown".into());
    tracing::error!(incident = %incident, error = %detail, "internal error");
    Status::internal(format!(
        "[INTERNAL] veil failed to answer; quote incident {incident} to the operator of this server"
    ))
}

/// A `FlightInfo` with one endpoint whose ticket is `ticket`.
fn flight_info(
    schema: &datafusion::arrow::datatypes::Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket {
        ticket: ticket.into(),
    });
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| internal_status(&format!("schema: {e}")))?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor)
        .with_ordered(true))
}

/// Streams one batch (a metadata listing).
fn stream_batch(
    schema: SchemaRef,
    batch: Result<RecordBatch, impl std::fmt::Display>,
) -> Result<
    Response<<VeilFlightSql as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
    Status,
> {
    let batch = batch.map_err(|e| internal_status(&format!("listing: {e}")))?;
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async { Ok(batch) }))
        .map_err(|e| Status::internal(format!("encoding: {e}")));
    Ok(Response::new(stream.boxed()))
}

/// What `GetSqlInfo` reports: a read-only SQL server of the minimum grammar.
fn sql_info() -> Result<SqlInfoData, Status> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "veil");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(SqlInfo::SqlAllTablesAreSelectable, false);
    b.append(SqlInfo::SqlSupportsColumnAliasing, true);
    b.append(SqlInfo::SqlSelectForUpdateSupported, false);
    b.append(SqlInfo::SqlStoredProceduresSupported, false);
    b.append(SqlInfo::SqlTransactionsSupported, false);
    b.append(SqlInfo::SqlBatchUpdatesSupported, false);
    b.append(SqlInfo::SqlSavepointsSupported, false);
    b.append(
        SqlInfo::SqlMaxStatementLength,
        veil_engine::gate::MAX_QUERY_BYTES as i64,
    );
    b.append(
        SqlInfo::SqlSupportedGrammar,
        1i32 << SupportedSqlGrammar::SqlMinimumGrammar as i32,
    );
    b.append(
        SqlInfo::SqlAnsi92SupportedLevel,
        // Bit 0: ANSI-92 entry SQL (`SupportedAnsi92SqlGrammarLevel`,
        // which arrow-flight does not re-export).
        1i32,
    );
    b.append(SqlInfo::SqlCatalogTerm, "catalog");
    b.append(SqlInfo::SqlSchemaTerm, "agency");
    b.build()
        .map_err(|e| internal_status(&format!("sql info: {e}")))
}

/// The parameter values of a bound batch: exactly one row.
fn parameter_row(batches: &[RecordBatch]) -> Result<Vec<ScalarValue>, Status> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows != 1 {
        return Err(Status::invalid_argument(format!(
            "bind exactly one row of parameters to a query; got {rows}"
        )));
    }
    let Some(batch) = batches.iter().find(|b| b.num_rows() == 1) else {
        return Err(Status::invalid_argument("no parameter row"));
    };
    batch
        .columns()
        .iter()
        .map(|c| {
            ScalarValue::try_from_array(c, 0)
                .map_err(|e| Status::invalid_argument(format!("a parameter cannot be read: {e}")))
        })
        .collect()
}

/// Maps an engine error to a gRPC status with a human message.
pub fn status_of(e: &EngineError) -> Status {
    let message = e.to_string();
    match e {
        EngineError::Rejected { rule, .. } => match rule {
            Rule::ProjectPrivateColumn
            | Rule::GroupByIdentifier
            | Rule::ColumnUseNotGranted
            | Rule::ColumnNotGranted
            | Rule::AggregateNotAllowed
            | Rule::JoinNotAllowed => Status::permission_denied(message),
            _ => Status::invalid_argument(message),
        },
        EngineError::NoGrant(_) => Status::permission_denied(message),
        EngineError::BudgetExhausted { .. } => Status::resource_exhausted(message),
        EngineError::ExecutionFailed { .. } => Status::internal(message),
        EngineError::Unavailable(_) => Status::unavailable(message),
        _ => internal_status(&message),
    }
}

type HandshakeStream = Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FlightSqlService for VeilFlightSql {
    type FlightService = VeilFlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<HandshakeStream>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated("handshake needs `authorization: Basic <operator:token>`")
            })?;
        let encoded = header
            .strip_prefix("Basic ")
            .ok_or_else(|| Status::unauthenticated("handshake needs basic credentials"))?;
        // Clients differ on padding (Go's driver omits it): accept both.
        let decoded = BASE64_STANDARD
            .decode(encoded.trim())
            .or_else(|_| BASE64_STANDARD_NO_PAD.decode(encoded.trim().trim_end_matches('=')))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Status::unauthenticated("credentials are not valid base64 UTF-8"))?;
        let (user, secret) = decoded
            .split_once(':')
            .ok_or_else(|| Status::unauthenticated("credentials must be operator:token"))?;
        let operator = self
            .shared
            .engine
            .policy()
            .authenticate(Some(user), secret)
            .map(|op| op.id.clone())
            .ok_or_else(|| Status::unauthenticated("unknown operator or wrong token"))?;
        let token = veil_engine::mechanisms::request_id().map_err(|e| status_of(&e))?
            + &veil_engine::mechanisms::request_id().map_err(|e| status_of(&e))?;
        {
            let mut sessions = self
                .shared
                .sessions
                .lock()
                .map_err(|_| Status::internal("lock"))?;
            let now = Instant::now();
            sessions.retain(|_, (_, t)| *t > now);
            sessions.insert(token.clone(), (operator.clone(), now + SESSION_TTL));
        }
        tracing::info!(operator = %operator, "handshake");
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<HandshakeStream> = Response::new(Box::pin(output));
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("token header"))?;
        response.metadata_mut().insert("authorization", value);
        let expires = (chrono::Utc::now()
            + chrono::Duration::from_std(SESSION_TTL).unwrap_or_default())
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if let Ok(v) = expires.parse() {
            response.metadata_mut().insert(TOKEN_EXPIRES_HEADER, v);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let operator = self.operator(&request)?;
        let (metadata, _, descriptor) = request.into_parts();
        self.answer(operator, query.query, &metadata, descriptor)
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let operator = self.operator(&request)?;
        let (sql, params) =
            self.with_prepared(&operator, &query.prepared_statement_handle, |p| {
                (p.sql.clone(), p.params.clone())
            })?;
        let sql = veil_engine::gate::bind(&sql, &params).map_err(|e| status_of(&e))?;
        let (metadata, _, descriptor) = request.into_parts();
        self.answer(operator, sql, &metadata, descriptor).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let operator = self.operator(&request)?;
        veil_engine::gate::check_size(&query.query).map_err(|e| status_of(&e))?;
        // Without parameters the statement is planned now, as a dry run (no
        // data, no charge), to promise the answer's columns. A refusal waits
        // for execution, where it is audited like any refused query; so
        // does everything about a statement with parameters.
        let described = if veil_engine::gate::parameter_count(&query.query) == 0 {
            self.shared
                .engine
                .describe(&operator, &query.query, chrono::Utc::now().fixed_offset())
                .await
                .ok()
        } else {
            None
        };
        let dataset_schema = if let Some(schema) = described {
            let options = datafusion::arrow::ipc::writer::IpcWriteOptions::default();
            let arrow_flight::IpcMessage(bytes) = arrow_flight::SchemaAsIpc::new(&schema, &options)
                .try_into()
                .map_err(|e: datafusion::arrow::error::ArrowError| {
                    internal_status(&format!("schema: {e}"))
                })?;
            bytes
        } else {
            Default::default()
        };
        let handle = veil_engine::mechanisms::request_id()
            .map_err(|e| status_of(&e))?
            .into_bytes();
        let mut prepared = self.prepared.lock().map_err(|_| Status::internal("lock"))?;
        let now = Instant::now();
        prepared.retain(|_, p| now.duration_since(p.used) < PREPARED_TTL);
        if prepared.values().filter(|p| p.operator == operator).count() >= MAX_PREPARED_PER_OPERATOR
            || prepared.len() >= MAX_PREPARED
        {
            return Err(Status::resource_exhausted(format!(
                "too many open prepared statements (at most {MAX_PREPARED_PER_OPERATOR} per operator); close the ones you no longer use"
            )));
        }
        prepared.insert(
            handle.clone(),
            Prepared {
                operator,
                sql: query.query,
                params: Vec::new(),
                used: now,
            },
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let operator = self.operator(&request)?;
        // Check the handle before reading the parameters.
        self.with_prepared(&operator, &query.prepared_statement_handle, |_| ())?;
        // Read no further than a second row: parameters are one row.
        let mut stream = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        );
        let mut batches: Vec<RecordBatch> = Vec::new();
        while let Some(batch) = stream
            .try_next()
            .await
            .map_err(|e| Status::invalid_argument(format!("the parameters cannot be read: {e}")))?
        {
            batches.push(batch);
            if batches.iter().map(|b| b.num_rows()).sum::<usize>() > 1 {
                break;
            }
        }
        let params = parameter_row(&batches)?;
        self.with_prepared(&operator, &query.prepared_statement_handle, |p| {
            p.params = params;
        })?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let operator = self.operator(&request)?;
        self.with_prepared(&operator, &query.prepared_statement_handle, |_| ())?;
        self.prepared
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .remove(query.prepared_statement_handle.as_ref());
        Ok(())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder(&sql_info()?).schema(), ticket)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        self.operator(&request)?;
        let data = sql_info()?;
        let builder = query.into_builder(&data);
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), ticket)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        let listing = self.listing(&request)?;
        let mut builder = query.into_builder();
        let mut catalogs: Vec<&str> = listing.iter().map(|t| t.catalog.as_str()).collect();
        catalogs.dedup();
        for c in catalogs {
            builder.append(c);
        }
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), ticket)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        let listing = self.listing(&request)?;
        let mut builder = query.into_builder();
        let mut schemas: Vec<(&str, &str)> = listing
            .iter()
            .map(|t| (t.catalog.as_str(), t.schema.as_str()))
            .collect();
        schemas.dedup();
        for (c, s) in schemas {
            builder.append(c, s);
        }
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), ticket)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        let listing = self.listing(&request)?;
        let mut builder = query.into_builder();
        for t in &listing {
            builder
                .append(&t.catalog, &t.schema, &t.table, TABLE_TYPE, &t.columns)
                .map_err(|e| internal_status(&format!("listing: {e}")))?;
        }
        stream_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = query.as_any().encode_to_vec();
        self.listing_info(request, &query.into_builder().schema(), ticket)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        self.operator(&request)?;
        let mut builder = query.into_builder();
        builder.append(TABLE_TYPE);
        stream_batch(builder.schema(), builder.build())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        let operator = self.operator(&request)?;
        let handle = ticket.statement_handle.to_vec();
        let answer = {
            let mut results = self.results.lock().map_err(|_| Status::internal("lock"))?;
            match results.get(&handle) {
                Some((owner, _, _)) if *owner == operator => {
                    results.remove(&handle).map(|(_, a, _)| a)
                }
                _ => None,
            }
        }
        .ok_or_else(|| {
            Status::not_found("no such result: tickets are single-use and expire after 10 minutes")
        })?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(answer.schema.clone())
            .build(futures::stream::iter(answer.batches.into_iter().map(Ok)))
            .map_err(|e| Status::internal(format!("encoding: {e}")));
        Ok(Response::new(stream.boxed()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Decodes a Flight SQL statement ticket's handle (for tests and tools).
pub fn ticket_handle(ticket: &Ticket) -> Option<Vec<u8>> {
    let any = arrow_flight::sql::Any::decode(ticket.ticket.clone()).ok()?;
    let t: TicketStatementQuery = any.unpack().ok()??;
    Some(t.statement_handle.to_vec())
}
