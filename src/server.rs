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

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket,
};
use base64::Engine as _;
use base64::prelude::{BASE64_STANDARD, BASE64_STANDARD_NO_PAD};
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

    /// The operator a request is authenticated as.
    pub fn operator(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing `authorization: Bearer <token>`; log in with a Handshake first",
                )
            })?;
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
}

/// The gRPC header carrying a client-chosen request id (idempotent retries).
pub const REQUEST_ID_HEADER: &str = "x-veil-request-id";

impl VeilFlightSql {
    /// A service over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        VeilFlightSql {
            shared,
            results: Mutex::new(HashMap::new()),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self).max_decoding_message_size(16 * 1024 * 1024)
    }

    fn operator(&self, metadata: &MetadataMap) -> Result<String, Status> {
        self.shared.operator(metadata)
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
        _ => {
            tracing::error!(error = %message, "internal error");
            Status::internal("[INTERNAL] veil failed to answer; the server log has the details")
        }
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
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let operator = self.operator(request.metadata())?;
        let now = chrono::Utc::now().fixed_offset();
        // A client-chosen request id makes a retry return the same answer
        // without a new charge.
        let request_id = match request.metadata().get(REQUEST_ID_HEADER) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::invalid_argument("the request id header is not ASCII"))?
                    .to_owned(),
            ),
            None => None,
        };
        // On its own task: a panic while answering fails this call only.
        let engine = self.shared.engine.clone();
        let op = operator.clone();
        let answer = tokio::spawn(async move {
            engine
                .run_request(&op, &query.query, now, request_id.as_deref())
                .await
        })
        .await
        .map_err(|_| {
            Status::internal("[INTERNAL] veil failed to answer; the server log has the details")
        })?
        .map_err(|e| status_of(&e))?;
        let schema = answer.schema.clone();
        let rows: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
        let handle = self.store(operator, answer)?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        };
        let endpoint = FlightEndpoint::new().with_ticket(Ticket {
            ticket: ticket.as_any().encode_to_vec().into(),
        });
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(format!("schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(request.into_inner())
            .with_total_records(rows as i64)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<
        Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>,
        Status,
    > {
        let operator = self.operator(request.metadata())?;
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
