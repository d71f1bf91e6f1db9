//! The broker's side: a pool of pre-spawned, confined `veil worker`
//! processes, each used for exactly one job.
//!
//! A dedicated spawner thread keeps `size` workers ready. It is the parent
//! of every worker and lives as long as the pool, so the workers'
//! parent-death signal (which the kernel ties to the spawning *thread*)
//! fires exactly when the pool goes away. A query takes a ready worker,
//! sends it the job, and waits for the answer up to the deadline; then the
//! worker is killed (a no-op if it already exited) and reaped. Whatever
//! happens to the worker (a crash, a stack overflow, an allocation beyond
//! its address-space limit, the CPU limit, the deadline, an outside kill)
//! the broker sees one [`Failure`] and goes on.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::worker::WorkerArgs;
use crate::{
    FromWorker, Job, Level, Limits, Report, read_frame, recv_json, send_json, write_frame,
};

/// How long a new worker may take to confine itself and report.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a query waits for a ready worker.
const TAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start and limit workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The `veil` binary.
    pub program: PathBuf,
    /// Arguments before the worker's own (`["worker"]`).
    pub subcommand: Vec<OsString>,
    /// The data directory (canonical).
    pub data_dir: PathBuf,
    /// Each worker's resource limits.
    pub limits: Limits,
    /// Workers kept ready.
    pub size: usize,
    /// Wall-clock limit of one job, enforced with SIGKILL.
    pub deadline: Duration,
    /// The weakest confinement the broker accepts.
    pub min_level: Level,
}

/// Why a job produced no result. The broker maps every variant to the same
/// uniform error; the variants exist for its (data-independent) logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// No worker could be had.
    #[error("no executor is available: {0}")]
    Unavailable(String),
    /// The worker died or broke the protocol.
    #[error("the executor died ({0})")]
    Died(String),
    /// The worker passed the deadline and was killed.
    #[error("the executor passed its deadline of {0:?} and was killed")]
    Deadline(Duration),
    /// The worker reported a failure of the job.
    #[error("the job failed ({0})")]
    Failed(String),
}

/// A confined worker, waiting for its one job.
struct Worker {
    child: Child,
    stream: UnixStream,
    report: Report,
}

impl Worker {
    fn discard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ready = Result<Worker, String>;

/// A pool of ready workers.
pub struct Pool {
    config: Arc<PoolConfig>,
    ready: Arc<Mutex<mpsc::Receiver<Ready>>>,
    first: Mutex<Option<Worker>>,
    report: Report,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("level", &self.report.level)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts the spawner and waits for the first worker's report. Refuses
    /// (with the report's explanation) when the first worker is confined
    /// below `config.min_level`.
    pub fn start(config: PoolConfig) -> Result<Pool, String> {
        let config = Arc::new(config);
        let (tx, rx) = mpsc::sync_channel::<Ready>(config.size.saturating_sub(1));
        let spawner_config = config.clone();
        std::thread::Builder::new()
            .name("veil-worker-spawner".into())
            .spawn(move || {
                loop {
                    let worker = spawn(&spawner_config);
                    let failed = worker.is_err();
                    if let Err(mpsc::SendError(unsent)) = tx.send(worker) {
                        if let Ok(w) = unsent {
                            w.discard();
                        }
                        break;
                    }
                    if failed {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            })
            .map_err(|e| format!("cannot start the worker spawner: {e}"))?;
        let first = rx
            .recv_timeout(HELLO_TIMEOUT)
            .map_err(|_| "the first worker did not start".to_owned())??;
        let report = first.report.clone();
        if report.level < config.min_level {
            first.discard();
            return Err(format!(
                "executors reach sandbox level `{}`, below the required `{}`.\n{}\
                 Run `veil doctor` for details; to accept a weaker sandbox, pass --min-sandbox {}.",
                report.level,
                config.min_level,
                report.explain(),
                report.level
            ));
        }
        Ok(Pool {
            config,
            ready: Arc::new(Mutex::new(rx)),
            first: Mutex::new(Some(first)),
            report,
        })
    }

    /// What the first worker achieved.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Runs one job on a fresh worker: the job header, then `body`.
    pub async fn run(&self, job: &Job, body: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let Worker {
            mut child,
            stream,
            report: _,
        } = self.take().await?;
        let deadline = self.config.deadline;
        let job = job.clone();
        let exchange = tokio::task::spawn_blocking(move || exchange(stream, &job, &body));
        let outcome = tokio::time::timeout(deadline, exchange).await;
        // One job per worker: kill it (nothing happens if it already
        // exited) and reap it. The kill also ends a timed-out exchange,
        // whose read then sees the socket close.
        let _ = child.kill();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        match outcome {
            Err(_) => Err(Failure::Deadline(deadline)),
            Ok(Err(_)) => Err(Failure::Died("the exchange task panicked".into())),
            Ok(Ok(Ok(Reply::Done(bytes)))) => Ok(bytes),
            Ok(Ok(Ok(Reply::Failed(kind)))) => Err(Failure::Failed(kind)),
            Ok(Ok(Err(wire))) => Err(Failure::Died(format!(
                "{wire}; {}",
                status.map_or_else(|| "exit status unknown".to_owned(), describe)
            ))),
        }
    }

    async fn take(&self) -> Result<Worker, Failure> {
        let first = self
            .first
            .lock()
            .map_err(|_| Failure::Unavailable("pool lock poisoned".into()))?
            .take();
        let ready = self.ready.clone();
        let min = self.config.min_level;
        tokio::task::spawn_blocking(move || {
            let mut next = first.map(Ok);
            loop {
                let worker = match next.take() {
                    Some(w) => w,
                    None => ready
                        .lock()
                        .map_err(|_| Failure::Unavailable("pool lock poisoned".into()))?
                        .recv_timeout(TAKE_TIMEOUT)
                        .map_err(|_| {
                            Failure::Unavailable(format!(
                                "no executor became ready within {TAKE_TIMEOUT:?}"
                            ))
                        })?,
                };
                let mut worker = worker.map_err(Failure::Unavailable)?;
                if worker.report.level < min {
                    let level = worker.report.level;
                    worker.discard();
                    return Err(Failure::Unavailable(format!(
                        "an executor reached sandbox level `{level}`, below the required `{min}`"
                    )));
                }
                // A worker that died while waiting (killed from outside)
                // never saw a job: take the next one.
                match worker.child.try_wait() {
                    Ok(None) => return Ok(worker),
                    _ => worker.discard(),
                }
            }
        })
        .await
        .map_err(|_| Failure::Unavailable("the pool task panicked".into()))?
    }
}

enum Reply {
    Done(Vec<u8>),
    Failed(String),
}

fn exchange(mut stream: UnixStream, job: &Job, body: &[u8]) -> Result<Reply, crate::WireError> {
    send_json(&mut stream, job)?;
    write_frame(&mut stream, body)?;
    match recv_json::<FromWorker>(&mut stream)? {
        FromWorker::Done => Ok(Reply::Done(read_frame(&mut stream)?)),
        FromWorker::Failed { kind } => Ok(Reply::Failed(kind)),
        FromWorker::Hello(_) => Err(crate::WireError::Malformed),
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) if status.core_dumped() => {
            format!("killed by signal {signal}, core dumped")
        }
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Spawns one worker and waits for its report.
#[allow(
    clippy::disallowed_methods,
    reason = "the one place veil starts processes: its workers"
)]
fn spawn(config: &PoolConfig) -> Ready {
    let fail = |e: std::io::Error| format!("cannot start a worker: {e}");
    let (ours, theirs) = UnixStream::pair().map_err(fail)?;
    let theirs_out = theirs.try_clone().map_err(fail)?;
    let args = WorkerArgs {
        data_dir: config.data_dir.clone(),
        limits: config.limits,
        parent: std::process::id(),
    };
    let mut child = Command::new(&config.program)
        .args(&config.subcommand)
        .args(args.to_args())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs_out)))
        // A worker's messages could quote data: they are not kept.
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", config.program.display()))?;
    let hello = ours
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())
        .and_then(|()| recv_json::<FromWorker>(&mut &ours).map_err(|e| e.to_string()));
    match hello {
        Ok(FromWorker::Hello(report)) => {
            ours.set_read_timeout(None).map_err(fail)?;
            Ok(Worker {
                child,
                stream: ours,
                report,
            })
        }
        other => {
            let _ = child.kill();
            let status = child.wait().map(describe).unwrap_or_default();
            Err(format!(
                "a worker did not report its confinement ({}; {status})",
                match other {
                    Err(e) => e,
                    Ok(_) => "unexpected message".to_owned(),
                }
            ))
        }
    }
}
