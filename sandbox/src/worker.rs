//! The executor's side: `veil worker`, a fork server, and the workers it
//! forks.
//!
//! The broker's [`crate::pool`] starts one `veil worker` with an empty
//! environment and a socketpair, its control channel, as standard input and
//! output. The server closes whatever else it inherited, arms its
//! parent-death signal and warms up once: it builds what every job needs
//! and runs a small plan through the whole path, reading no data. Then,
//! for each request on the control channel, it forks one worker and sends
//! the broker its end of a new socketpair to the worker and a pidfd of the
//! worker (to kill it with: a pidfd, unlike a process id, never names
//! another process).
//!
//! Each worker confines itself ([`crate::confine`]) before it opens
//! anything, sends the [`Report`](crate::Report) of what it achieved, waits
//! for exactly one [`Job`], answers it and exits: no state carries from one
//! query to the next, and nothing flows back into the server. A fork starts
//! a worker with the server's warm code and memory, where a new program
//! would be loaded, relocated and faulted in page by page first: that was
//! most of a worker's CPU time. The server first moves its own code onto
//! huge pages, since a fork copies the page tables of anonymous memory but
//! not of file mappings: without that, each worker still faulted in, page
//! by page, the code it ran.
//!
//! The server keeps a copy of each worker's socket. Once it has reaped the
//! worker it writes a [`FromWorker::Exited`] there, so that a broker still
//! waiting for an answer from a worker that died learns how it ended.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{PidfdFlags, WaitId, WaitIdOptions};

use crate::sys::Forked;
use crate::{FromWorker, Job, Limits, read_frame, recv_json, send_json, write_frame};

/// A worker's command line (after `veil worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The only directory the workers may read.
    pub data_dir: PathBuf,
    /// Each worker's resource limits.
    pub limits: Limits,
    /// The broker's process id (checked after the parent-death signal is
    /// armed).
    pub parent: u32,
}

impl WorkerArgs {
    /// The arguments that `veil worker` parses back into these.
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            "--data".into(),
            self.data_dir.clone().into_os_string(),
            "--memory-bytes".into(),
            self.limits.memory_bytes.to_string().into(),
            "--cpu-seconds".into(),
            self.limits.cpu_seconds.to_string().into(),
            "--max-files".into(),
            self.limits.max_files.to_string().into(),
            "--parent".into(),
            self.parent.to_string().into(),
        ]
    }
}

/// What a job handler returns: the result body, or a data-independent
/// failure kind.
pub type JobResult = Result<Vec<u8>, String>;

/// The control channel's answer to a fork request: one byte, with the
/// broker's end of the worker's socket and the worker's pidfd attached.
pub(crate) const FORKED: u8 = 1;
/// The answer when no worker could be forked: one byte, nothing attached.
pub(crate) const NOT_FORKED: u8 = 0;

/// A fork request whose worker may spend time before its report making its
/// query faster (no query is waiting for it).
pub(crate) const FORK_AND_REHEARSE: &[u8] = b"fork+rehearse";
/// A fork request whose worker is awaited: it reports as soon as it can.
pub(crate) const FORK: &[u8] = b"fork";

/// Runs the fork server: `warm` once, then one worker per request on the
/// control channel until the broker closes it.
///
/// `warm` runs before any fork and must leave the process with a single
/// thread (the server refuses to fork otherwise); it reads no data. In
/// each forked worker, after confinement and before the report, `prepare`
/// builds what needs threads (a runtime), so that it is off the query's
/// path; its flag says whether the broker asked the worker to rehearse (no
/// query is waiting for it, so time spent now is not spent on the query's
/// path). `execute` then gets what it prepared, the job and its body (the
/// plan).
pub fn serve<S, T>(
    args: &WorkerArgs,
    warm: impl FnOnce() -> S,
    prepare: impl Fn(&S, bool) -> T,
    execute: impl Fn(T, &Job, Vec<u8>) -> JobResult,
) -> ExitCode {
    // Nothing before this: no logging, no runtime, no files.
    if crate::confine::prelude(args.parent).is_err() {
        return ExitCode::FAILURE;
    }
    // Before anything runs that a worker will run again (see
    // `sys::code_on_huge_pages`); a failure only makes workers slower.
    let code_on_huge_pages = crate::sys::code_on_huge_pages().map_err(|e| e.to_string());
    let warmed = warm();
    // The control channel, read and written unbuffered: a worker inherits
    // the server's memory, and must not find control bytes in a buffer.
    let Ok(control) = rustix::io::dup(rustix::stdio::stdin()) else {
        return ExitCode::FAILURE;
    };
    let control = UnixStream::from(control);
    let server = ForkServer {
        pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
        code_on_huge_pages,
    };
    let mut live: Vec<Live> = Vec::new();
    loop {
        let mut fds: Vec<PollFd<'_>> = std::iter::once(control.as_fd())
            .chain(live.iter().map(|l| l.pidfd.as_fd()))
            .map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return ExitCode::FAILURE,
        }
        let requested = !fds[0].revents().is_empty();
        let ended: Vec<usize> = (1..fds.len())
            .filter(|&i| !fds[i].revents().is_empty())
            .map(|i| i - 1)
            .collect();
        drop(fds);
        // Descending, so that each removal leaves the others' places.
        for i in ended.into_iter().rev() {
            live.swap_remove(i).reap();
        }
        if !requested {
            continue;
        }
        let Ok(request) = read_frame(&mut &control) else {
            // The broker let go (it shuts down): the workers die with this
            // process (their parent-death signal).
            return ExitCode::SUCCESS;
        };
        let rehearse = request == FORK_AND_REHEARSE;
        let (ours, theirs) = match rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(pair) => pair,
            Err(_) => {
                answer(&control, NOT_FORKED, &[]);
                continue;
            }
        };
        match crate::sys::fork() {
            Ok(Forked::Child) => {
                let code = worker(theirs, args, &server, &warmed, rehearse, &prepare, &execute);
                // Never back into the server's frames: their descriptors
                // are closed in this process and must not be dropped.
                std::process::exit(code)
            }
            Ok(Forked::Parent(pid)) => {
                let Ok(pidfd) = rustix::process::pidfd_open(pid, PidfdFlags::empty()) else {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                    answer(&control, NOT_FORKED, &[]);
                    continue;
                };
                answer(&control, FORKED, &[ours.as_fd(), pidfd.as_fd()]);
                live.push(Live {
                    pidfd,
                    socket: theirs,
                });
            }
            Err(_) => answer(&control, NOT_FORKED, &[]),
        }
    }
}

/// One byte on the control channel, with `fds` attached.
fn answer(control: &UnixStream, byte: u8, fds: &[std::os::fd::BorrowedFd<'_>]) {
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        ancillary.push(SendAncillaryMessage::ScmRights(fds));
    }
    // A failed answer leaves the broker waiting on a closed or broken
    // channel: it notices, and starts another server.
    let _ = rustix::net::sendmsg(
        control,
        &[std::io::IoSlice::new(&[byte])],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    );
}

/// A forked worker that has not been reaped yet.
struct Live {
    pidfd: OwnedFd,
    /// The server's copy of the worker's end of its socket.
    socket: OwnedFd,
}

impl Live {
    /// Reaps the ended worker and tells the broker how it ended, without
    /// ever blocking (a broker that stopped reading gets nothing).
    fn reap(self) {
        let how =
            match rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), WaitIdOptions::EXITED)
            {
                Ok(Some(status)) => describe(
                    status.exit_status(),
                    status.terminating_signal(),
                    status.dumped(),
                ),
                _ => "exit status unknown".to_owned(),
            };
        let mut frame = Vec::new();
        if let Ok(bytes) = serde_json::to_vec(&FromWorker::Exited { how })
            && write_frame(&mut frame, &bytes).is_ok()
        {
            let _ = rustix::net::send(
                &self.socket,
                &frame,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            );
        }
    }
}

/// How a process ended, for logs.
pub(crate) fn describe(code: Option<i32>, signal: Option<i32>, core_dumped: bool) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) if core_dumped => format!("killed by signal {signal}, core dumped"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended in an unknown way".to_owned(),
    }
}

/// What a worker learns from the fork server that forked it.
struct ForkServer {
    /// Its process id.
    pid: u32,
    /// What [`crate::sys::code_on_huge_pages`] achieved, for the report.
    code_on_huge_pages: Result<u64, String>,
}

/// A forked worker: its socket becomes standard input and output, then it
/// confines itself, prepares, reports, answers one job and returns its
/// exit code.
fn worker<S, T>(
    socket: OwnedFd,
    args: &WorkerArgs,
    server: &ForkServer,
    warmed: &S,
    rehearse: bool,
    prepare: &impl Fn(&S, bool) -> T,
    execute: &impl Fn(T, &Job, Vec<u8>) -> JobResult,
) -> i32 {
    let moved =
        rustix::stdio::dup2_stdin(&socket).and_then(|()| rustix::stdio::dup2_stdout(&socket));
    drop(socket);
    if moved.is_err() {
        return 1;
    }
    let report = crate::confine::confine(
        &args.data_dir,
        &args.limits,
        server.pid,
        server.code_on_huge_pages.clone(),
    );
    let prepared = prepare(warmed, rehearse);
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    if send_json(&mut output, &FromWorker::Hello(report)).is_err() {
        return 1;
    }
    let Ok(job) = recv_json::<Job>(&mut input) else {
        // The broker let this worker go (it shuts down, or refused the
        // level): nothing to do.
        return 0;
    };
    let Ok(body) = read_frame(&mut input) else {
        return 1;
    };
    #[cfg(feature = "test-hooks")]
    let result = match job.spec.strip_prefix("probe:") {
        Some(what) => Ok(probe::run(what, args.parent)),
        None => execute(prepared, &job, body),
    };
    #[cfg(not(feature = "test-hooks"))]
    let result = execute(prepared, &job, body);
    let sent = match result {
        Ok(bytes) => send_json(&mut output, &FromWorker::Done)
            .and_then(|()| write_frame(&mut output, &bytes)),
        Err(kind) => send_json(&mut output, &FromWorker::Failed { kind }),
    };
    i32::from(sent.is_err())
}

/// Forbidden actions for the confinement tests, run after confinement in
/// place of a job whose spec is `probe:<name>[:<argument>]`. Each answers
/// `denied: …` or `allowed: …`, or kills the worker trying. Compiled only
/// into test builds.
#[cfg(feature = "test-hooks")]
mod probe {
    use std::io::Write;

    #[allow(
        clippy::disallowed_methods,
        reason = "probes try to start processes, and must be refused"
    )]
    pub(super) fn run(what: &str, parent: u32) -> Vec<u8> {
        let (name, arg) = what.split_once(':').unwrap_or((what, ""));
        let outcome: std::io::Result<String> = match name {
            "read" => std::fs::read(arg).map(|b| format!("read {} bytes", b.len())),
            "write" => std::fs::File::create(arg)
                .and_then(|mut f| f.write_all(b"escaped"))
                .map(|()| "wrote a file".to_owned()),
            "tcp" => std::net::TcpStream::connect(arg).map(|_| "connected".to_owned()),
            "udp" => std::net::UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.send_to(b"escaped", arg))
                .map(|n| format!("sent {n} bytes")),
            "exec" => std::process::Command::new(arg)
                .status()
                .map(|s| format!("ran, {s}")),
            // Creating a child needs `clone` without CLONE_THREAD; the exec
            // that would follow is of a file that does not exist, so an
            // ENOENT here means the child was created.
            "fork" => std::process::Command::new("/nonexistent/veil-probe")
                .spawn()
                .map(|_| "created a child".to_owned()),
            "env" => {
                let own = std::env::var_os(arg).is_some();
                let parents = std::fs::read(format!("/proc/{parent}/environ"));
                match (own, parents) {
                    (true, _) => Ok("the variable is in the worker's environment".to_owned()),
                    (false, Ok(b)) => Ok(format!(
                        "read {} bytes of the broker's environment",
                        b.len()
                    )),
                    (false, Err(e)) => Err(e),
                }
            }
            "memory" => {
                let n: usize = arg.parse().unwrap_or(usize::MAX / 2);
                let v = vec![1u8; n];
                Ok(format!(
                    "allocated {} bytes",
                    std::hint::black_box(&v).len()
                ))
            }
            "cpu" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "core" => std::process::abort(),
            "stack" => Ok(format!("recursed {}", recurse(0))),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(arg.parse().unwrap_or(3600)));
                Ok("slept".to_owned())
            }
            other => Ok(format!("unknown probe {other}")),
        };
        match outcome {
            Ok(s) => format!("allowed: {s}"),
            Err(e) => format!("denied: {e} (errno {})", e.raw_os_error().unwrap_or(0)),
        }
        .into_bytes()
    }

    #[allow(unconditional_recursion)]
    fn recurse(depth: u64) -> u64 {
        let pad = std::hint::black_box([depth; 64]);
        recurse(depth + 1) + pad[0]
    }
}
