//! The broker's side: a pool of confined workers, forked ahead of time by
//! a `veil worker` fork server ([`crate::worker`]), each used for exactly
//! one job.
//!
//! A dedicated spawner thread keeps `size` workers ready. It starts the
//! fork server and is its parent for as long as the pool lives, so the
//! server's parent-death signal (which the kernel ties to the spawning
//! *thread*) fires exactly when the pool goes away, and the workers' (tied
//! to the server) with it. It asks for a replacement only when a used
//! worker has exited (one permit per worker slot), so that starting the
//! next worker does not compete for the CPU with the query that is still
//! running on the last one; if the server dies, it starts another. A new
//! worker rehearses (runs a small plan once, to fault in what a query needs)
//! only when no query is waiting for a worker: a query that waits would
//! wait for the rehearsal too, and under load the rehearsal's CPU is taken
//! from the queries. A query
//! takes a ready worker, sends it the job, and waits for the answer up to
//! the deadline; then the worker is killed through its pidfd (a no-op if it
//! already exited). Whatever happens to the worker (a crash, a stack
//! overflow, an allocation beyond its address-space limit, the CPU limit,
//! the deadline, an outside kill) the broker sees one [`Failure`] and goes
//! on.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

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

/// A confined worker, waiting for its one job. Dropping it, however its
/// job ended (even when the query's future is cancelled), kills it, waits
/// until it has exited, and frees its slot.
struct Worker {
    pidfd: OwnedFd,
    stream: Option<UnixStream>,
    report: Report,
    permits: Arc<Permits>,
}

fn kill(pidfd: &OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
}

/// Whether the process has exited, waiting up to `timeout`.
fn exited_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let timeout = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// How long a killed process may take to exit before its slot is freed
/// anyway: exit after SIGKILL takes moments; the bound only guards the slot
/// against a process the kernel cannot finish.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for Worker {
    fn drop(&mut self) {
        kill(&self.pidfd);
        exited_within(&self.pidfd, EXIT_TIMEOUT);
        self.permits.give();
    }
}

type Ready = Result<Worker, String>;

/// Worker slots the spawner may fill; closed when the pool is dropped.
#[derive(Default)]
struct Permits {
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl Permits {
    fn give(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += 1;
            self.freed.notify_one();
        }
    }

    /// Waits for a permit; `false` once the pool is closed.
    fn take(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        loop {
            if s.1 {
                return false;
            }
            if s.0 > 0 {
                s.0 -= 1;
                return true;
            }
            s = match self.freed.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
            self.freed.notify_all();
        }
    }
}

/// The number of queries waiting for a worker, read by the spawner.
#[derive(Default)]
struct Waiting(AtomicUsize);

/// One waiting query, counted until dropped.
struct Wait<'a>(&'a Waiting);

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waiting {
    /// Counts one waiting query until the guard is dropped.
    fn enter(&self) -> Wait<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Wait(self)
    }

    /// Whether no query is waiting.
    fn none(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

/// A pool of ready workers.
pub struct Pool {
    config: Arc<PoolConfig>,
    ready: Arc<Mutex<mpsc::Receiver<Ready>>>,
    first: Mutex<Option<Worker>>,
    permits: Arc<Permits>,
    waiting: Arc<Waiting>,
    report: Report,
    /// Test builds only: a probe that replaces every job's spec.
    #[cfg(feature = "test-hooks")]
    probe: Mutex<Option<String>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.permits.close();
    }
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
        let (tx, rx) = mpsc::sync_channel::<Ready>(config.size);
        let permits = Arc::new(Permits::default());
        for _ in 0..config.size.max(1) {
            permits.give();
        }
        let waiting = Arc::new(Waiting::default());
        let spawner_config = config.clone();
        let spawner_permits = permits.clone();
        let spawner_waiting = waiting.clone();
        std::thread::Builder::new()
            .name("veil-worker-spawner".into())
            .spawn(move || {
                let mut server = None;
                while spawner_permits.take() {
                    let rehearse = spawner_waiting.none();
                    let worker = spawn(&mut server, &spawner_config, &spawner_permits, rehearse);
                    let failed = worker.is_err();
                    if tx.send(worker).is_err() {
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
            drop(first);
            permits.close();
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
            permits,
            waiting,
            report,
            #[cfg(feature = "test-hooks")]
            probe: Mutex::new(None),
        })
    }

    /// What the first worker achieved.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Test hook: from now on, workers run `probe` (see
    /// [`crate::worker`]) instead of the jobs they are sent, until `None`.
    /// Compiled only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn replace_jobs_with_probe_for_tests(&self, probe: Option<&str>) {
        if let Ok(mut p) = self.probe.lock() {
            *p = probe.map(str::to_owned);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Runs one job on a fresh worker: the job header, then `body`.
    pub async fn run(&self, job: &Job, body: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let mut worker = self.take().await?;
        let stream = worker
            .stream
            .take()
            .ok_or_else(|| Failure::Unavailable("a worker without its socket".into()))?;
        let deadline = self.config.deadline;
        #[allow(unused_mut)]
        let mut job = job.clone();
        #[cfg(feature = "test-hooks")]
        if let Some(p) = self.probe.lock().ok().and_then(|p| p.clone()) {
            job.spec = format!("probe:{p}");
        }
        let exchange = tokio::task::spawn_blocking(move || exchange(stream, &job, &body));
        let outcome = tokio::time::timeout(deadline, exchange).await;
        // One job per worker: kill it (nothing happens if it already
        // exited). The kill also ends a timed-out exchange, whose read then
        // sees how the worker ended. Tearing a process down takes a moment:
        // the answer does not wait for it.
        kill(&worker.pidfd);
        tokio::task::spawn_blocking(move || drop(worker));
        match outcome {
            Err(_) => Err(Failure::Deadline(deadline)),
            Ok(Err(_)) => Err(Failure::Died("the exchange task panicked".into())),
            Ok(Ok(Ok(Reply::Done(bytes)))) => Ok(bytes),
            Ok(Ok(Ok(Reply::Failed(kind)))) => Err(Failure::Failed(kind)),
            Ok(Ok(Ok(Reply::Exited(how)))) => Err(Failure::Died(how)),
            Ok(Ok(Err(wire))) => Err(Failure::Died(wire.to_string())),
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
        let permits = self.permits.clone();
        let waiting = self.waiting.clone();
        tokio::task::spawn_blocking(move || {
            let _waiting = waiting.enter();
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
                let worker = match worker {
                    Ok(w) => w,
                    Err(why) => {
                        // A failed spawn used a slot too: free it for
                        // the next attempt.
                        permits.give();
                        return Err(Failure::Unavailable(why));
                    }
                };
                if worker.report.level < min {
                    let level = worker.report.level;
                    return Err(Failure::Unavailable(format!(
                        "an executor reached sandbox level `{level}`, below the required `{min}`"
                    )));
                }
                // A worker that died while waiting (killed from outside)
                // never saw a job: take the next one.
                if !exited_within(&worker.pidfd, Duration::ZERO) {
                    return Ok(worker);
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
    /// The worker died; how, as the fork server saw it.
    Exited(String),
}

fn exchange(mut stream: UnixStream, job: &Job, body: &[u8]) -> Result<Reply, crate::WireError> {
    send_json(&mut stream, job)?;
    write_frame(&mut stream, body)?;
    match recv_json::<FromWorker>(&mut stream)? {
        FromWorker::Done => Ok(Reply::Done(read_frame(&mut stream)?)),
        FromWorker::Failed { kind } => Ok(Reply::Failed(kind)),
        FromWorker::Exited { how } => Ok(Reply::Exited(how)),
        FromWorker::Hello(_) => Err(crate::WireError::Malformed),
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    crate::worker::describe(status.code(), status.signal(), status.core_dumped())
}

/// The fork server, owned by the spawner thread.
struct Server {
    process: Child,
    control: UnixStream,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Server {
    /// Starts `veil worker`. It reports nothing itself: its first worker's
    /// report says how it went.
    #[allow(
        clippy::disallowed_methods,
        reason = "the one place veil starts a process: the workers' fork server"
    )]
    fn start(config: &PoolConfig) -> Result<Server, String> {
        let fail = |e: std::io::Error| format!("cannot start the fork server: {e}");
        let (ours, theirs) = UnixStream::pair().map_err(fail)?;
        let theirs_out = theirs.try_clone().map_err(fail)?;
        let args = WorkerArgs {
            data_dir: config.data_dir.clone(),
            limits: config.limits,
            parent: std::process::id(),
        };
        let process = Command::new(&config.program)
            .args(&config.subcommand)
            .args(args.to_args())
            .env_clear()
            .envs(crate::confine::WORKER_ENV.iter().copied())
            .current_dir("/")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(theirs_out)))
            // A worker's messages could quote data: they are not kept.
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", config.program.display()))?;
        // A server that stops answering is replaced, not waited for.
        ours.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(fail)?;
        Ok(Server {
            process,
            control: ours,
        })
    }

    /// Asks for one worker: the broker's end of its socket and its pidfd.
    fn fork(&mut self, rehearse: bool) -> Result<(UnixStream, OwnedFd), String> {
        let request = if rehearse {
            crate::worker::FORK_AND_REHEARSE
        } else {
            crate::worker::FORK
        };
        if write_frame(&mut self.control, request).is_err() {
            return Err(self.broken("is gone"));
        }
        let mut byte = [0u8; 1];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let Ok(got) = rustix::net::recvmsg(
            &self.control,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        ) else {
            return Err(self.broken("did not answer"));
        };
        let mut fds: Vec<OwnedFd> = ancillary
            .drain()
            .filter_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            .collect();
        match (got.bytes, byte[0], fds.pop(), fds.pop(), fds.is_empty()) {
            (1, crate::worker::FORKED, Some(pidfd), Some(socket), true) => {
                Ok((UnixStream::from(socket), pidfd))
            }
            (1, crate::worker::NOT_FORKED, None, None, _) => {
                Err("the fork server could not fork".to_owned())
            }
            (0, ..) => Err(self.broken("closed its channel")),
            _ => Err(self.broken("broke the protocol")),
        }
    }

    /// Why the server failed, with its exit status if it has exited.
    fn broken(&mut self, what: &str) -> String {
        let status = match self.process.try_wait() {
            Ok(Some(status)) => describe(status),
            _ => "still running".to_owned(),
        };
        format!("the fork server {what} ({status})")
    }
}

/// Forks one worker and waits for its report. A server that fails (it
/// died, with or without the worker it was forking, or broke the protocol)
/// is replaced at once and asked again, so that no query sees its end; only
/// a new server's failure is reported. A worker holds its slot (`permits`)
/// until it is dropped.
fn spawn(
    server: &mut Option<Server>,
    config: &PoolConfig,
    permits: &Arc<Permits>,
    rehearse: bool,
) -> Ready {
    if let Some(running) = server.as_mut() {
        match worker(running, permits, rehearse) {
            Ok(w) => return Ok(w),
            Err(_) => *server = None,
        }
    }
    let fresh = server.insert(Server::start(config)?);
    worker(fresh, permits, rehearse).inspect_err(|_| *server = None)
}

/// Has `server` fork one worker (rehearsing or not) and waits for its
/// report.
fn worker(server: &mut Server, permits: &Arc<Permits>, rehearse: bool) -> Ready {
    let (stream, pidfd) = server
        .fork(rehearse)
        .map_err(|e| format!("a worker did not report its confinement ({e})"))?;
    let hello = stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())
        .and_then(|()| recv_json::<FromWorker>(&mut &stream).map_err(|e| e.to_string()))
        .and_then(|hello| {
            stream.set_read_timeout(None).map_err(|e| e.to_string())?;
            Ok(hello)
        });
    match hello {
        Ok(FromWorker::Hello(report)) => Ok(Worker {
            pidfd,
            stream: Some(stream),
            report,
            permits: permits.clone(),
        }),
        other => {
            kill(&pidfd);
            exited_within(&pidfd, EXIT_TIMEOUT);
            Err(format!(
                "a worker did not report its confinement ({})",
                match other {
                    Err(e) => e,
                    Ok(FromWorker::Exited { how }) => how,
                    Ok(_) => "unexpected message".to_owned(),
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_counts_as_waiting_until_its_guard_is_dropped_on_any_thread() {
        let waiting = Arc::new(Waiting::default());
        assert!(waiting.none());
        let (entered, leave) = (
            Arc::new(std::sync::Barrier::new(3)),
            Arc::new(std::sync::Barrier::new(3)),
        );
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (waiting, entered, leave) = (waiting.clone(), entered.clone(), leave.clone());
                std::thread::spawn(move || {
                    let _wait = waiting.enter();
                    entered.wait();
                    leave.wait();
                })
            })
            .collect();
        entered.wait();
        assert!(!waiting.none());
        assert_eq!(waiting.0.load(Ordering::SeqCst), 2);
        leave.wait();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(waiting.none());
    }
}
