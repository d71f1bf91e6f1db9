//! The executor's side: `veil worker`.
//!
//! A worker is spawned by the broker's [`crate::pool`] with an empty
//! environment and a socketpair as standard input and output. It confines
//! itself ([`crate::confine`]) before it opens anything, sends the
//! [`Report`](crate::Report) of what it achieved, waits for exactly one
//! [`Job`], answers it and exits: no state carries from one query to the
//! next.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{FromWorker, Job, Limits, read_frame, recv_json, send_json, write_frame};

/// A worker's command line (after `veil worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The only directory the worker may read.
    pub data_dir: PathBuf,
    /// Its resource limits.
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

/// Runs a worker: confine, `prepare`, report, answer one job with
/// `execute`, exit.
///
/// `prepare` runs after confinement and before the report, while the
/// worker waits in the pool: whatever it sets up (a runtime, a session,
/// warmed code paths) is off the query's path. `execute` gets what it
/// prepared, the job and its body (the plan).
pub fn run<T>(
    args: &WorkerArgs,
    prepare: impl FnOnce() -> T,
    execute: impl FnOnce(T, &Job, Vec<u8>) -> JobResult,
) -> ExitCode {
    let report = crate::confine::confine(&args.data_dir, &args.limits, args.parent);
    let prepared = prepare();
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    if send_json(&mut output, &FromWorker::Hello(report)).is_err() {
        return ExitCode::FAILURE;
    }
    let Ok(job) = recv_json::<Job>(&mut input) else {
        // The broker let this worker go (it shuts down, or refused the
        // level): nothing to do.
        return ExitCode::SUCCESS;
    };
    let Ok(body) = read_frame(&mut input) else {
        return ExitCode::FAILURE;
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
    if sent.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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
