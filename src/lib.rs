//! veil: privacy-preserving SQL over public data, "usable but not visible"
//! (数据可用不可见).
//!
//! This crate is the `veil` binary's thin layer: wiring, I/O and presentation.
//! The engine lives in `veil-engine`, the policy language in `veil-policy`.
//!
//! - [`server`]: Arrow Flight SQL over gRPC (`veil serve`);
//! - [`api`]: veil's own `veil.v1` gRPC service;
//! - [`client`]: the Flight SQL and `veil.v1` client used by the CLI;
//! - [`operator`], [`session`], [`output`], [`shell`]: the operator's CLI
//!   (login, catalog, grants, query, shell) and its output formats;
//! - [`generate`]: the bundled Beijing example data;
//! - [`demo`]: the guided tour.

pub mod api;
pub mod client;
pub mod demo;
pub mod generate;
pub mod operator;
pub mod output;
pub mod server;
pub mod session;
pub mod shell;

/// Exit codes of the `veil` command.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Refused: the server refused the query (policy, budget, SQL), a
    /// policy file has problems, or an audit log fails verification.
    pub const REFUSED: u8 = 1;
    /// A usage or local error: bad arguments, unreadable files, not logged in.
    pub const USAGE: u8 = 2;
    /// The server cannot be reached or failed internally.
    pub const UNAVAILABLE: u8 = 3;
    /// The credentials were not accepted (log in again).
    pub const UNAUTHENTICATED: u8 = 4;

    /// The exit code of a failed call.
    pub fn of(code: tonic::Code) -> u8 {
        use tonic::Code as C;
        match code {
            C::Unauthenticated => UNAUTHENTICATED,
            C::Unavailable | C::Internal | C::Unknown | C::DeadlineExceeded | C::Cancelled => {
                UNAVAILABLE
            }
            _ => REFUSED,
        }
    }

    /// What `--help` says about exit codes.
    pub const HELP: &str = "Exit codes: 0 success · 1 refused (policy, budget or SQL; policy problems; audit tampering) · 2 usage or local error · 3 server unreachable or failed · 4 not authenticated";
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use veil_engine::audit_log::{AuditLog, Cadence};
use veil_engine::catalog::Catalog;
use veil_engine::ledger::Ledger;
use veil_engine::{Engine, Executor};
use veil_policy::Policy;
use veil_sandbox::pool::{Pool, PoolConfig};
use veil_sandbox::{Level, Limits};

/// Replaces the default panic message (which can quote values being
/// processed) with the panic's location only.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown location".to_owned());
        eprintln!(
            "veil: internal panic at {location}; its message is withheld because it may contain data"
        );
    }));
}

/// Where an engine's queries run.
#[derive(Debug, Clone)]
pub enum Execution {
    /// Confined `veil worker` processes: what `veil serve` uses.
    Sandboxed(SandboxOptions),
    /// The broker's own process, unconfined: benchmark baselines only.
    InProcess,
}

/// How `veil serve` runs its workers.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The `veil` binary that serves as worker (normally this one).
    pub program: PathBuf,
    /// Each worker's resource limits.
    pub limits: Limits,
    /// Workers kept ready.
    pub workers: usize,
    /// Wall-clock limit of one query's execution, enforced with SIGKILL.
    pub deadline: Duration,
    /// The weakest confinement accepted.
    pub min_level: Level,
}

impl SandboxOptions {
    /// Defaults: two ready workers, default limits, a 60 s deadline, level
    /// `strict`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        SandboxOptions {
            program: program.into(),
            limits: Limits::default(),
            workers: 2,
            deadline: Duration::from_secs(60),
            min_level: Level::Strict,
        }
    }

    /// Defaults, with this executable as the worker program.
    pub fn this_program() -> Result<Self> {
        Ok(SandboxOptions::new(
            std::env::current_exe().context("locating the veil binary for workers")?,
        ))
    }
}

/// Loads the policy, the catalog, the ledger and the audit log, and starts
/// the executors.
pub fn open_engine(
    policy: &Path,
    data: &Path,
    state: &Path,
    execution: &Execution,
) -> Result<Arc<Engine>> {
    let policy = Policy::load(policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    let catalog = Catalog::open(&policy, data)?;
    let ledger = Ledger::open(state)?;
    let audit = AuditLog::open(state, Cadence::default())?;
    let executor = match execution {
        Execution::InProcess => Executor::InProcess,
        Execution::Sandboxed(o) => {
            let pool = Pool::start(PoolConfig {
                program: o.program.clone(),
                subcommand: vec!["worker".into()],
                data_dir: catalog.data_dir().to_owned(),
                limits: o.limits,
                size: o.workers.max(1),
                deadline: o.deadline,
                min_level: o.min_level,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(
                level = %pool.report().level,
                workers = o.workers,
                "executors confined"
            );
            Executor::Sandboxed(pool)
        }
    };
    Ok(Arc::new(Engine::new(
        Arc::new(policy),
        catalog,
        ledger,
        audit,
        executor,
    )))
}

/// Watches a policy file and reloads the engine's policy when it changes.
///
/// A change is applied atomically once the file parses and validates; a
/// broken edit keeps the running policy and logs every diagnostic. Polling
/// (every 250 ms, on the file's content) needs no platform file-watch API and
/// sees edits made by any editor or deployment tool.
pub fn watch_policy(engine: Arc<Engine>, path: std::path::PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            ticker.tick().await;
            let Ok(now) = std::fs::read(&path) else {
                continue;
            };
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
            match Policy::load(&path) {
                Ok(policy) if policy.hash == engine.policy().hash => {}
                Ok(policy) => {
                    let (id, version, hash) = (
                        policy.id.clone(),
                        policy.version.clone(),
                        policy.hash.clone(),
                    );
                    match engine.reload(policy) {
                        Ok(()) => {
                            tracing::info!(policy = %id, version = %version, hash = %hash, "policy reloaded")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the new policy's data could not be opened; keeping the running policy")
                        }
                    }
                }
                Err(e) => tracing::error!(
                    "the edited policy is invalid; keeping the running policy (sha256 {})\n{}",
                    engine.policy().hash,
                    e.render(false)
                ),
            }
        }
    })
}

/// A server running in this process.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// `http://addr` (`https://` with TLS), for clients.
    pub fn endpoint(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle
            .await
            .context("server task")?
            .context("server")?;
        Ok(())
    }
}

/// TLS for `veil serve`: the server's certificate chain and key (PEM), and
/// optionally the CA whose client certificates are accepted (mTLS; a
/// certificate's subject names its operator, see [`server::Shared::operator`]).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
    /// CA of client certificates, PEM.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Reads the PEM files.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls> {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        Ok(ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }
}

/// Serves Flight SQL and `veil.v1` on `listen` (port 0 picks a free port).
pub async fn start(engine: Arc<Engine>, listen: SocketAddr) -> Result<Running> {
    start_with_tls(engine, listen, None).await
}

/// [`start`], over TLS when `tls` is given.
pub async fn start_with_tls(
    engine: Arc<Engine>,
    listen: SocketAddr,
    tls: Option<ServerTls>,
) -> Result<Running> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let shared = server::Shared::new(engine);
    let (tx, rx) = oneshot::channel::<()>();
    // Health (`grpc.health.v1`) and reflection need no credentials: they
    // show only that the server is up and the shape of its API.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<arrow_flight::flight_service_server::FlightServiceServer<server::VeilFlightSql>>()
        .await;
    health
        .set_serving::<veil_proto::v1::veil_server::VeilServer<api::VeilApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(veil_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(&t.cert_pem, &t.key_pem));
        if let Some(ca) = &t.client_ca_pem {
            // A client certificate is optional (tokens still work over
            // TLS) but, when presented, must chain to this CA.
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        builder = builder
            .tls_config(config)
            .context("the TLS certificate or key cannot be used")?;
    }
    let router = builder
        .add_service(server::VeilFlightSql::new(shared.clone()).into_service())
        .add_service(api::VeilApi::service(shared))
        .add_service(health_service)
        .add_service(reflection);
    let handle = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(
                // Small responses must not wait for Nagle's algorithm and
                // delayed ACKs (about 40 ms per round trip on loopback).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .await
    });
    Ok(Running {
        addr,
        tls: tls.is_some(),
        shutdown: Some(tx),
        handle,
    })
}
