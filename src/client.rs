//! The client side of the Flight SQL path, shared by `veil query` and `veil demo`.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow};
use arrow_flight::FlightInfo;
use arrow_flight::error::FlightError;
use arrow_flight::sql::CommandGetTables;
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Schema, SchemaRef, UInt32Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};

/// A connected, authenticated client.
pub struct Client {
    inner: FlightSqlServiceClient<Channel>,
}

/// A query's answer as the client sees it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Schema promised by `GetFlightInfo`.
    pub promised: SchemaRef,
    /// Schema of the stream.
    pub schema: SchemaRef,
    /// Rows.
    pub batches: Vec<RecordBatch>,
}

/// A failed call: the gRPC code and the server's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    /// gRPC status code.
    pub code: tonic::Code,
    /// Server message.
    pub message: String,
}

fn call_error(e: FlightError) -> CallError {
    match e {
        FlightError::Tonic(status) => CallError {
            code: status.code(),
            message: status.message().to_owned(),
        },
        other => CallError {
            code: tonic::Code::Unknown,
            message: other.to_string(),
        },
    }
}

/// TLS settings of a client (PEM): the CA that signed the server's
/// certificate, and a client certificate and key for mTLS.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificate, PEM.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Where to connect and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server endpoint (`http://…`, or `https://…` with TLS).
    pub endpoint: String,
    /// Bearer token; empty when a client certificate authenticates.
    pub token: String,
    /// TLS settings, for `https://` endpoints.
    pub tls: Option<Tls>,
}

impl Target {
    /// A plain-text endpoint with a bearer token.
    pub fn new(endpoint: &str, token: &str) -> Target {
        Target {
            endpoint: endpoint.to_owned(),
            token: token.to_owned(),
            tls: None,
        }
    }
}

/// A gRPC channel to `endpoint`, over TLS when `tls` is given.
pub async fn channel(endpoint: &str, tls: Option<&Tls>) -> Result<Channel> {
    let mut ep = Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("bad endpoint {endpoint}"))?;
    if let Some(t) = tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &t.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &t.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(config).context("TLS settings")?;
    }
    ep.connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

impl Client {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:50051`).
    pub async fn connect(endpoint: &str) -> Result<Client> {
        Client::connect_with(endpoint, None).await
    }

    /// Connects to `endpoint`, over TLS when `tls` is given.
    pub async fn connect_with(endpoint: &str, tls: Option<&Tls>) -> Result<Client> {
        Ok(Client {
            inner: FlightSqlServiceClient::new(channel(endpoint, tls).await?),
        })
    }

    /// Connects to a target and authenticates with its bearer token, if any.
    pub async fn connect_target(target: &Target) -> Result<Client> {
        let mut c = Client::connect_with(&target.endpoint, target.tls.as_ref()).await?;
        if !target.token.is_empty() {
            c.with_bearer(&target.token);
        }
        Ok(c)
    }

    /// Logs in with a Flight handshake (basic credentials → bearer token).
    ///
    /// Done by hand rather than with `FlightSqlServiceClient::handshake`,
    /// which folds the server's status code into a text error.
    ///
    /// Returns when the session token expires (RFC 3339), if the server said.
    pub async fn login(
        &mut self,
        operator: &str,
        token: &str,
    ) -> Result<Option<String>, CallError> {
        use base64::Engine as _;
        let credentials = base64::prelude::BASE64_STANDARD.encode(format!("{operator}:{token}"));
        let mut request = tonic::Request::new(futures::stream::iter(vec![
            arrow_flight::HandshakeRequest::default(),
        ]));
        let value = format!("Basic {credentials}")
            .parse()
            .map_err(|_| CallError {
                code: tonic::Code::InvalidArgument,
                message: "credentials are not a valid header".into(),
            })?;
        request.metadata_mut().insert("authorization", value);
        let response = self
            .inner
            .inner_mut()
            .handshake(request)
            .await
            .map_err(|s| call_error(FlightError::Tonic(Box::new(s))))?;
        let bearer = response
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| CallError {
                code: tonic::Code::Unauthenticated,
                message: "the server returned no bearer token".into(),
            })?
            .to_owned();
        let expires = response
            .metadata()
            .get(crate::server::TOKEN_EXPIRES_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.inner.set_token(bearer);
        Ok(expires)
    }

    /// The bearer token in use (after [`Client::login`], the session token).
    pub fn token(&self) -> Option<&str> {
        self.inner.token().map(String::as_str)
    }

    /// Uses a bearer token directly, without a handshake.
    pub fn with_bearer(&mut self, token: &str) {
        self.inner.set_token(token.to_owned());
    }

    /// Sends `id` as the request id of the following statements: a retry
    /// with the same id and statement returns the recorded answer without a
    /// new charge.
    pub fn with_request_id(&mut self, id: &str) {
        self.inner
            .set_header(crate::server::REQUEST_ID_HEADER, id.to_owned());
    }

    /// Runs a statement: `GetFlightInfo` then `DoGet` on every endpoint.
    pub async fn query(&mut self, sql: &str) -> Result<Fetched, CallError> {
        self.query_with_progress(sql, &mut |_, _| {}).await
    }

    /// Runs a statement, calling `progress(rows so far, rows in all)` as
    /// batches arrive.
    pub async fn query_with_progress(
        &mut self,
        sql: &str,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<Fetched, CallError> {
        let info = self
            .inner
            .execute(sql.to_owned(), None)
            .await
            .map_err(call_error)?;
        self.fetch_with_progress(info, progress).await
    }

    /// Runs a prepared statement with one row of parameters (`?` or `$1`,
    /// `$2`, … in `sql`), then closes it.
    pub async fn query_prepared(
        &mut self,
        sql: &str,
        params: Option<RecordBatch>,
    ) -> Result<Fetched, CallError> {
        let mut prepared = self
            .inner
            .prepare(sql.to_owned(), None)
            .await
            .map_err(call_error)?;
        if let Some(p) = params {
            prepared.set_parameters(p).map_err(call_error)?;
        }
        let info = prepared.execute().await.map_err(call_error);
        let fetched = match info {
            Ok(info) => self.fetch(info).await,
            Err(e) => Err(e),
        };
        prepared.close().await.map_err(call_error)?;
        fetched
    }

    /// The columns a prepared statement promises (empty while it has
    /// unbound parameters); the statement is closed again.
    pub async fn prepared_schema(&mut self, sql: &str) -> Result<Schema, CallError> {
        let prepared = self
            .inner
            .prepare(sql.to_owned(), None)
            .await
            .map_err(call_error)?;
        let schema = prepared.dataset_schema().map_err(call_error)?.clone();
        prepared.close().await.map_err(call_error)?;
        Ok(schema)
    }

    /// The tables the caller may query (Flight SQL `GetTables` with their
    /// schemas): dataset id and granted columns, with veil's metadata.
    pub async fn tables(&mut self) -> Result<Vec<(String, Schema)>, CallError> {
        let info = self
            .inner
            .get_tables(CommandGetTables {
                include_schema: true,
                ..Default::default()
            })
            .await
            .map_err(call_error)?;
        let fetched = self.fetch(info).await?;
        let mut out = Vec::new();
        for b in &fetched.batches {
            let text = |name: &str| {
                b.column_by_name(name)
                    .and_then(|c| c.as_string_opt::<i32>().cloned())
                    .ok_or_else(|| CallError {
                        code: tonic::Code::Internal,
                        message: format!("GetTables without `{name}`"),
                    })
            };
            let (schemas, tables) = (text("db_schema_name")?, text("table_name")?);
            let ipc = b
                .column_by_name("table_schema")
                .and_then(|c| c.as_binary_opt::<i32>().cloned())
                .ok_or_else(|| CallError {
                    code: tonic::Code::Internal,
                    message: "GetTables without schemas".into(),
                })?;
            for i in 0..b.num_rows() {
                let schema =
                    datafusion::arrow::ipc::convert::try_schema_from_ipc_buffer(ipc.value(i))
                        .map_err(|e| call_error(FlightError::Arrow(e)))?;
                out.push((format!("{}.{}", schemas.value(i), tables.value(i)), schema));
            }
        }
        Ok(out)
    }

    /// Flight SQL `GetCatalogs`.
    pub async fn catalogs(&mut self) -> Result<Vec<String>, CallError> {
        let info = self.inner.get_catalogs().await.map_err(call_error)?;
        Ok(strings(&self.fetch(info).await?, "catalog_name"))
    }

    /// Flight SQL `GetDbSchemas` (every schema of every catalog).
    pub async fn db_schemas(&mut self) -> Result<Vec<String>, CallError> {
        let info = self
            .inner
            .get_db_schemas(Default::default())
            .await
            .map_err(call_error)?;
        Ok(strings(&self.fetch(info).await?, "db_schema_name"))
    }

    /// Flight SQL `GetTableTypes`.
    pub async fn table_types(&mut self) -> Result<Vec<String>, CallError> {
        let info = self.inner.get_table_types().await.map_err(call_error)?;
        Ok(strings(&self.fetch(info).await?, "table_type"))
    }

    /// Flight SQL `GetSqlInfo` (every item the server has), by the items'
    /// protocol names, e.g. `FLIGHT_SQL_SERVER_NAME`.
    pub async fn sql_info(&mut self) -> Result<HashMap<String, String>, CallError> {
        let info = self
            .inner
            .get_sql_info(Vec::new())
            .await
            .map_err(call_error)?;
        let fetched = self.fetch(info).await?;
        let mut out = HashMap::new();
        let options = FormatOptions::default();
        for b in &fetched.batches {
            let (Some(ids), Some(values)) = (
                b.column_by_name("info_name")
                    .and_then(|c| c.as_primitive_opt::<UInt32Type>()),
                b.column_by_name("value").and_then(|c| c.as_union_opt()),
            ) else {
                continue;
            };
            for i in 0..b.num_rows() {
                let name = arrow_flight::sql::SqlInfo::try_from(ids.value(i) as i32)
                    .map(|s| s.as_str_name().to_owned())
                    .unwrap_or_else(|_| ids.value(i).to_string());
                let v = values.value(i);
                if let Ok(f) = ArrayFormatter::try_new(v.as_ref(), &options) {
                    out.insert(name, f.value(0).to_string());
                }
            }
        }
        Ok(out)
    }

    /// Reads every endpoint of a `FlightInfo`.
    async fn fetch(&mut self, info: FlightInfo) -> Result<Fetched, CallError> {
        self.fetch_with_progress(info, &mut |_, _| {}).await
    }

    async fn fetch_with_progress(
        &mut self,
        info: FlightInfo,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<Fetched, CallError> {
        let total = u64::try_from(info.total_records).ok();
        let mut rows = 0u64;
        let promised = std::sync::Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|e| call_error(FlightError::Arrow(e)))?,
        );
        let mut batches = Vec::new();
        let mut schema = promised.clone();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| CallError {
                code: tonic::Code::Internal,
                message: "endpoint without ticket".into(),
            })?;
            let mut stream = self.inner.do_get(ticket).await.map_err(call_error)?;
            while let Some(batch) = stream.try_next().await.map_err(call_error)? {
                rows += batch.num_rows() as u64;
                progress(rows, total);
                batches.push(batch);
            }
            if let Some(s) = stream.schema() {
                schema = s.clone();
            }
        }
        Ok(Fetched {
            promised,
            schema,
            batches,
        })
    }
}

/// Every value of a text column of an answer.
fn strings(f: &Fetched, column: &str) -> Vec<String> {
    f.batches
        .iter()
        .filter_map(|b| b.column_by_name(column)?.as_string_opt::<i32>().cloned())
        .flat_map(|a| a.iter().flatten().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// A connection error as an anyhow error with the server's words.
pub fn explain(e: CallError) -> anyhow::Error {
    anyhow!("{} ({:?})", e.message, e.code)
}

/// A `veil.v1.Veil` client that sends the target's bearer token on every call.
async fn veil_client(
    target: &Target,
) -> Result<
    veil_proto::v1::veil_client::VeilClient<
        tonic::service::interceptor::InterceptedService<
            Channel,
            impl tonic::service::Interceptor + use<>,
        >,
    >,
> {
    let channel = channel(&target.endpoint, target.tls.as_ref()).await?;
    let value: Option<tonic::metadata::MetadataValue<_>> = if target.token.is_empty() {
        None
    } else {
        Some(format!("Bearer {}", target.token).parse()?)
    };
    Ok(veil_proto::v1::veil_client::VeilClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            if let Some(v) = &value {
                req.metadata_mut().insert("authorization", v.clone());
            }
            Ok(req)
        },
    ))
}

/// Calls `veil.v1.Veil/GetBudget` with a bearer token.
pub async fn budget(target: &Target) -> Result<veil_proto::v1::GetBudgetResponse, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .get_budget(veil_proto::v1::GetBudgetRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Calls `veil.v1.Veil/ListGrants`.
pub async fn grants(target: &Target) -> Result<veil_proto::v1::ListGrantsResponse, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .list_grants(veil_proto::v1::ListGrantsRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Calls `veil.v1.Veil/GetAuditReceipt` for one of the caller's entries.
pub async fn audit_receipt(
    target: &Target,
    index: u64,
) -> Result<veil_proto::v1::AuditReceipt, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .get_audit_receipt(veil_proto::v1::GetAuditReceiptRequest { index })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Calls `veil.v1.Veil/ProveInclusion` for one of the caller's entries.
pub async fn prove_inclusion(
    target: &Target,
    index: u64,
) -> Result<veil_proto::v1::InclusionProof, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .prove_inclusion(veil_proto::v1::ProveInclusionRequest { index })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

fn unavailable(e: anyhow::Error) -> CallError {
    CallError {
        code: tonic::Code::Unavailable,
        message: e.to_string(),
    }
}

fn status_error(s: tonic::Status) -> CallError {
    CallError {
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// Calls `veil.v1.Veil/GetServerInfo`.
pub async fn server_info(target: &Target) -> Result<veil_proto::v1::ServerInfo, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .get_server_info(veil_proto::v1::GetServerInfoRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}

/// Calls `veil.v1.Veil/EstimateCost`: a dry run of `sql`.
pub async fn estimate(
    target: &Target,
    sql: &str,
) -> Result<veil_proto::v1::CostEstimate, CallError> {
    let mut client = veil_client(target).await.map_err(unavailable)?;
    client
        .estimate_cost(veil_proto::v1::EstimateCostRequest {
            sql: sql.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(status_error)
}
