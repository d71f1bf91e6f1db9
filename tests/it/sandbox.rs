//! The executor sandbox (THREATS.md G): probes of every forbidden action
//! from inside a confined worker, and robustness of the real server when
//! workers die.
//!
//! Probes use the test-only worker entry point (`probe:<name>` jobs,
//! compiled into test builds only): each runs after the worker's full
//! confinement, exactly where a query's plan would run. On a kernel that
//! cannot confine workers at level `strict`, these tests print
//! `SKIPPED: …` with the worker's report and return; `.ci/run` prints the
//! level this machine reaches (`veil doctor`).

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use veil_sandbox::pool::{Failure, Pool, PoolConfig};
use veil_sandbox::{Job, Level, Limits};

use crate::support::{Fixture, assert_refused, example_policy};

fn pool(data: &Path, limits: Limits, deadline: Duration) -> Option<Pool> {
    let pool = Pool::start(PoolConfig {
        program: env!("CARGO_BIN_EXE_veil").into(),
        subcommand: vec!["worker".into()],
        data_dir: data.canonicalize().expect("data dir"),
        limits,
        size: 1,
        deadline,
        min_level: Level::None,
    })
    .expect("pool");
    if pool.report().level < Level::Strict {
        // Written to the real standard error, past the test harness's
        // capture of `eprintln!`, so that a skip is seen even when the test
        // passes.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: workers reach sandbox level `{}` on this kernel, not `strict`:\n{}",
            pool.report().level,
            pool.report().explain()
        );
        return None;
    }
    Some(pool)
}

async fn probe(pool: &Pool, what: &str) -> Result<String, Failure> {
    let job = Job {
        request: "probe".into(),
        spec: format!("probe:{what}"),
    };
    pool.run(&job, vec![])
        .await
        .map(|b| String::from_utf8(b).expect("utf-8"))
}

fn assert_denied(outcome: Result<String, Failure>, what: &str) -> String {
    let answer = outcome.unwrap_or_else(|f| panic!("{what}: the worker failed: {f}"));
    assert!(answer.starts_with("denied"), "{what}: {answer}");
    answer
}

struct Probes {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn dirs() -> Probes {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::write(data.join("inside.txt"), "readable").expect("inside");
    std::fs::write(outside.join("secret.txt"), "not for workers").expect("secret");
    Probes {
        _dir: dir,
        data,
        outside,
    }
}

#[tokio::test]
async fn a_confined_worker_reads_only_the_data_directory() {
    let d = dirs();
    let Some(pool) = pool(&d.data, Limits::default(), Duration::from_secs(20)) else {
        return;
    };
    // The positive control: the data directory is readable.
    let inside = d.data.canonicalize().expect("canonical").join("inside.txt");
    assert_eq!(
        probe(&pool, &format!("read:{}", inside.display()))
            .await
            .expect("read inside"),
        "allowed: read 8 bytes"
    );
    for path in [
        "/etc/passwd".to_owned(),
        d.outside.join("secret.txt").display().to_string(),
        "/proc/self/environ".to_owned(),
    ] {
        assert_denied(probe(&pool, &format!("read:{path}")).await, &path);
    }
    // Writing is refused everywhere, the data directory included (spilling
    // is disabled, so no worker has a writable directory).
    for dir in [&d.outside, &d.data, &std::env::temp_dir()] {
        let target = dir.join("escaped.txt");
        assert_denied(
            probe(&pool, &format!("write:{}", target.display())).await,
            "write",
        );
        assert!(!target.exists(), "{} was created", target.display());
    }
}

#[tokio::test]
async fn a_confined_worker_cannot_reach_the_network() {
    let d = dirs();
    let Some(pool) = pool(&d.data, Limits::default(), Duration::from_secs(20)) else {
        return;
    };
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    udp.set_nonblocking(true).expect("nonblocking");
    let tcp_addr = tcp.local_addr().expect("addr");
    let udp_addr = udp.local_addr().expect("addr");
    let answer = assert_denied(probe(&pool, &format!("tcp:{tcp_addr}")).await, "tcp");
    // Refused by seccomp (no socket at all), not by a timeout.
    assert!(answer.contains("errno 1)"), "{answer}");
    assert_denied(probe(&pool, &format!("udp:{udp_addr}")).await, "udp");
    // Whatever the worker said, nothing arrived.
    assert_eq!(
        tcp.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the loopback listener received a connection"
    );
    let mut buf = [0u8; 64];
    assert_eq!(
        udp.recv_from(&mut buf).map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the UDP socket received a datagram"
    );
}

#[tokio::test]
async fn a_confined_worker_cannot_start_processes_or_read_the_brokers_environment() {
    let d = dirs();
    let Some(pool) = pool(&d.data, Limits::default(), Duration::from_secs(20)) else {
        return;
    };
    assert_denied(probe(&pool, "exec:/bin/sh").await, "exec");
    // A child process (clone without CLONE_THREAD) is refused by seccomp
    // before any exec is attempted.
    let fork = assert_denied(probe(&pool, "fork").await, "fork");
    assert!(fork.contains("errno 1)"), "{fork}");
    // The test process (the broker here) has a rich environment; the
    // worker sees none of it, in its own environment or through /proc.
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
    assert_denied(probe(&pool, "env:CARGO_PKG_NAME").await, "env");
}

#[tokio::test]
async fn memory_cpu_and_crashes_kill_only_the_worker() {
    let d = dirs();
    let limits = Limits {
        memory_bytes: 512 << 20,
        cpu_seconds: 1,
        max_files: 64,
    };
    let deadline = Duration::from_secs(20);
    let Some(pool) = pool(&d.data, limits, deadline) else {
        return;
    };
    // More memory than the address-space limit: the allocation fails and
    // the worker dies.
    let r = probe(&pool, &format!("memory:{}", 1u64 << 30)).await;
    assert!(matches!(r, Err(Failure::Died(_))), "memory: {r:?}");
    // A spin loop meets RLIMIT_CPU long before the deadline.
    let started = Instant::now();
    let r = probe(&pool, "cpu").await;
    assert!(matches!(r, Err(Failure::Died(_))), "cpu: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Abort and stack overflow: dead workers, and no core file anywhere.
    let core_before = Path::new("/core").exists();
    for what in ["core", "stack"] {
        match probe(&pool, what).await {
            Err(Failure::Died(how)) => assert!(!how.contains("core dumped"), "{what}: {how}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(
        Path::new("/core").exists(),
        core_before,
        "a core file appeared"
    );
    // The pool goes on with fresh workers.
    assert!(
        probe(&pool, "read:/etc/passwd")
            .await
            .expect("a fresh worker")
            .starts_with("denied")
    );
}

#[tokio::test]
async fn the_deadline_kills_the_worker() {
    let d = dirs();
    let deadline = Duration::from_millis(800);
    let Some(pool) = pool(&d.data, Limits::default(), deadline) else {
        return;
    };
    let started = Instant::now();
    let r = probe(&pool, "sleep:3600").await;
    let took = started.elapsed();
    assert_eq!(r, Err(Failure::Deadline(deadline)));
    assert!(took < deadline + Duration::from_millis(200), "{took:?}");
}

/// A server whose executors have a short deadline and a small memory
/// limit, for queries meant to overrun them.
async fn tight_server(deadline: Duration, memory_bytes: u64) -> Fixture {
    let mut o = veil::SandboxOptions::new(env!("CARGO_BIN_EXE_veil"));
    o.min_level = Level::None;
    o.deadline = deadline;
    o.limits.memory_bytes = memory_bytes;
    Fixture::with_execution(&example_policy(), |_| {}, &veil::Execution::Sandboxed(o)).await
}

const DP_QUERY: &str = "SELECT district, COUNT(*) FROM pop.residents GROUP BY district";

/// Four copies of the public enterprise register: 400⁴ rows to filter (a
/// plain COUNT(*) of a cross join is answered from statistics).
const ENDLESS: &str = "SELECT COUNT(*) FROM samr.enterprises a, samr.enterprises b, \
                       samr.enterprises c, samr.enterprises d \
                       WHERE a.established_year + b.established_year > c.established_year + d.established_year";

#[tokio::test]
async fn a_query_past_its_deadline_fails_uniformly_and_the_server_goes_on() {
    let deadline = Duration::from_secs(2);
    let f = tight_server(deadline, 1 << 30).await;
    let started = Instant::now();
    let e = assert_refused(
        f.query("op-ndrc", ENDLESS).await,
        Code::Internal,
        &["EXECUTION_FAILED"],
    );
    let took = started.elapsed();
    assert!(took >= deadline, "{took:?}: finished before its deadline");
    assert!(took < deadline + Duration::from_millis(200), "{took:?}");
    assert!(!e.message.contains("deadline"), "{}", e.message);
    still_serving(&f).await;
}

#[tokio::test]
async fn a_cross_join_that_exhausts_memory_fails_uniformly_and_the_server_goes_on() {
    // A long deadline: what stops this query is the memory limit.
    let deadline = Duration::from_secs(60);
    let f = tight_server(deadline, 768 << 20).await;
    let started = Instant::now();
    // 400³ distinct groups of three texts to hold in a hash table.
    assert_refused(
        f.query(
            "op-ndrc",
            "SELECT a.uscc, b.uscc, c.uscc, COUNT(*) FROM samr.enterprises a, \
             samr.enterprises b, samr.enterprises c GROUP BY a.uscc, b.uscc, c.uscc",
        )
        .await,
        Code::Internal,
        &["EXECUTION_FAILED"],
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    still_serving(&f).await;
}

/// Queries that arrive together on a one-worker pool wait for workers, so
/// the workers started meanwhile skip their rehearsal: each query still
/// gets its own worker and a full answer.
#[tokio::test]
async fn queries_that_wait_for_workers_are_each_answered_in_full() {
    let f = tight_server(Duration::from_secs(60), 1 << 30).await;
    let mut queries = Vec::new();
    for _ in 0..6 {
        let mut client = f.client("op-univ-07").await;
        queries.push(tokio::spawn(async move { client.query(DP_QUERY).await }));
    }
    let mut answers = Vec::new();
    for q in queries {
        let fetched = q.await.expect("query task").expect("answered");
        answers.push(crate::support::column_strings(&fetched, "district"));
    }
    assert!(!answers[0].is_empty());
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(f.charges(), 6);
}

/// The server answers a DP query, and it is the only charge: the failed
/// public query cost nothing.
async fn still_serving(f: &Fixture) {
    f.query("op-univ-07", DP_QUERY)
        .await
        .expect("still serving");
    assert_eq!(f.charges(), 1);
}

#[tokio::test]
async fn a_worker_killed_from_outside_fails_its_query_and_nothing_else() {
    let f = tight_server(Duration::from_secs(30), 1 << 30).await;
    let mut client = f.client("op-ndrc").await;
    let query = tokio::spawn(async move { client.query(ENDLESS).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed = kill_workers(&f.data());
    assert!(killed > 0, "no worker to kill");
    let started = Instant::now();
    let r = query.await.expect("query task");
    assert_refused(r, Code::Internal, &["EXECUTION_FAILED"]);
    assert!(started.elapsed() < Duration::from_millis(200));
    f.query("op-univ-07", DP_QUERY)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn a_private_query_whose_worker_overflows_its_stack_keeps_its_charge() {
    let f = Fixture::start().await;
    let veil_engine::Executor::Sandboxed(pool) = f.engine.executor() else {
        panic!("the test server runs in process");
    };
    // The next workers overflow their stack where the plan would run.
    pool.replace_jobs_with_probe_for_tests(Some("stack"));
    let e = assert_refused(
        f.query("op-univ-07", DP_QUERY).await,
        Code::Internal,
        &["EXECUTION_FAILED"],
    );
    assert_eq!(f.charges(), 1);
    assert_eq!(f.spent("G-2026-031", "epsilon"), 500_000);
    let request = e
        .message
        .rsplit("request ")
        .next()
        .expect("request id")
        .trim_end_matches(')');
    assert_eq!(
        f.engine.ledger().state(request).expect("ledger"),
        Some(veil_engine::ledger::ChargeState::FailedAfterDispatch)
    );
    // Healthy workers again: the server answers, and charges once more.
    pool.replace_jobs_with_probe_for_tests(None);
    f.query("op-univ-07", DP_QUERY)
        .await
        .expect("still serving");
    assert_eq!(f.spent("G-2026-031", "epsilon"), 1_000_000);
}

#[tokio::test]
async fn a_dp_query_cancelled_after_dispatch_keeps_its_charge_and_is_audited() {
    let f = Fixture::start().await;
    let veil_engine::Executor::Sandboxed(pool) = f.engine.executor() else {
        panic!("the test server runs in process");
    };
    // The next workers sleep where the plan would run: the query is
    // charged and dispatched, then its client gives up.
    pool.replace_jobs_with_probe_for_tests(Some("sleep"));
    let mut client = f.client("op-univ-07").await;
    let r = tokio::time::timeout(Duration::from_millis(700), client.query(DP_QUERY)).await;
    assert!(r.is_err(), "the query should still have been running");
    let state = f.dir.path().join("state");
    let gave_up = Instant::now();
    let entry = loop {
        let entries = veil_engine::audit_log::entries(&state).expect("entries");
        if let Some((e, _)) = entries.into_iter().last() {
            break e;
        }
        assert!(gave_up.elapsed() < Duration::from_secs(2), "never audited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entry.entry.rule.as_deref(), Some("EXECUTION_FAILED"));
    assert!(entry.entry.cost > 0.0, "the audit entry shows the charge");
    assert_eq!(
        f.engine
            .ledger()
            .state(&entry.entry.request)
            .expect("ledger"),
        Some(veil_engine::ledger::ChargeState::FailedAfterDispatch)
    );
    assert_eq!(
        f.spent("G-2026-031", "epsilon"),
        500_000,
        "the charge stands"
    );
    pool.replace_jobs_with_probe_for_tests(None);
    f.query("op-univ-07", DP_QUERY)
        .await
        .expect("still serving");
}

/// Every live worker forked for a pool of this process that reads `data`
/// (other tests' servers run in the same process under `cargo test`): pid
/// and CPU time used so far, in clock ticks. Workers are the children of a
/// fork server ([`servers`]).
fn workers(data: &Path) -> Vec<(i32, u64)> {
    let servers = servers(data);
    veil_workers(data)
        .into_iter()
        .filter(|(_, parent, _)| servers.contains(parent))
        .map(|(pid, _, utime)| (pid, utime))
        .collect()
}

/// The fork servers of pools of this process that read `data`: its
/// `veil worker` children.
fn servers(data: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    veil_workers(data)
        .into_iter()
        .filter(|(_, parent, _)| *parent == me)
        .map(|(pid, _, _)| pid)
        .collect()
}

/// Every live process run as `veil worker --data <data>` (fork servers and
/// the workers they forked): pid, parent's pid and user CPU time in clock
/// ticks.
fn veil_workers(data: &Path) -> Vec<(i32, i32, u64)> {
    let data = data.canonicalize().expect("data dir");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let mut stat = String::new();
        let mut cmdline = Vec::new();
        let ok = std::fs::File::open(entry.path().join("stat"))
            .and_then(|mut f| f.read_to_string(&mut stat))
            .and_then(|_| std::fs::File::open(entry.path().join("cmdline")))
            .and_then(|mut f| f.read_to_end(&mut cmdline));
        if ok.is_err() {
            continue;
        }
        // After the parenthesised command name: state (field 3), parent's
        // pid (4), …, user CPU time (14).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_worker = args.get(1) == Some(&&b"worker"[..])
            && args
                .windows(2)
                .any(|w| w[0] == b"--data" && w[1] == data.as_os_str().as_encoded_bytes());
        let parent = fields.get(1).and_then(|p| p.parse::<i32>().ok());
        if let (true, false, Some(parent)) = (is_worker, fields.first() == Some(&"Z"), parent) {
            let utime = fields.get(11).and_then(|t| t.parse().ok()).unwrap_or(0);
            found.push((pid, parent, utime));
        }
    }
    found
}

/// SIGKILLs every worker of [`workers`]; returns how many.
fn kill_workers(data: &Path) -> usize {
    kill(workers(data).into_iter().map(|(pid, _)| pid))
}

/// SIGKILLs each process; returns how many.
fn kill(pids: impl IntoIterator<Item = i32>) -> usize {
    pids.into_iter()
        .map(|pid| {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).expect("pid"),
                rustix::process::Signal::KILL,
            );
        })
        .count()
}

#[tokio::test]
async fn a_fork_server_that_dies_takes_its_workers_and_is_replaced() {
    let d = dirs();
    let Some(pool) = pool(&d.data, Limits::default(), Duration::from_secs(20)) else {
        return;
    };
    // The pool starts once its first worker has reported: that worker is
    // confined, its parent-death signal armed.
    let [(ready, _)] = workers(&d.data)[..] else {
        panic!("one ready worker expected");
    };
    assert_eq!(kill(servers(&d.data)), 1, "one fork server per pool");
    // The worker dies with its server. It has exited once all its threads
    // have (its leader turns zombie earlier): what its pidfd reports, and
    // what the pool checks before it hands a worker out. Whoever inherits
    // it may also have reaped it already.
    let exited = |pid: i32| {
        let pid = rustix::process::Pid::from_raw(pid).expect("pid");
        match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Err(_) => true,
            Ok(pidfd) => {
                let mut fds = [rustix::event::PollFd::new(
                    &pidfd,
                    rustix::event::PollFlags::IN,
                )];
                let now = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
            }
        }
    };
    let started = Instant::now();
    while !exited(ready) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a worker outlived its server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next job skips the dead worker and gets one from a new server,
    // without a failure in between; and again.
    assert_denied(probe(&pool, "read:/etc/passwd").await, "after");
    assert_denied(probe(&pool, "read:/etc/passwd").await, "and after");
    assert_eq!(servers(&d.data).len(), 1);
}

#[tokio::test]
async fn a_client_that_gives_up_stops_its_query_and_the_query_is_audited() {
    let f = tight_server(Duration::from_secs(30), 1 << 30).await;
    let mut client = f.client("op-ndrc").await;
    // The client gives up after 700 ms: its call is dropped mid-query.
    let r = tokio::time::timeout(Duration::from_millis(700), client.query(ENDLESS)).await;
    assert!(r.is_err(), "the query should still have been running");
    let gave_up = Instant::now();
    // The worker that was computing (the only one with CPU time to speak
    // of; ready workers wait) is killed, and the query gets its entry.
    let state = f.dir.path().join("state");
    loop {
        let busy = workers(&f.data())
            .into_iter()
            .filter(|(_, t)| *t > 20)
            .count();
        let audited = veil_engine::audit_log::entries(&state)
            .expect("entries")
            .iter()
            .any(|(e, _)| e.entry.rule.as_deref() == Some("EXECUTION_FAILED"));
        if busy == 0 && audited {
            break;
        }
        assert!(
            gave_up.elapsed() < Duration::from_secs(2),
            "busy workers {busy}, audited {audited}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serving(&f).await;
}

#[tokio::test]
async fn pathological_query_texts_are_refused_before_any_worker_or_charge() {
    let f = Fixture::start().await;
    let flat_or = format!(
        "SELECT COUNT(*) FROM pop.residents WHERE {}",
        (0..100_000)
            .map(|i| format!("birth_year = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    let deep = format!(
        "SELECT COUNT(*) FROM pop.residents WHERE birth_year > {}0{}",
        "(1 + ".repeat(5_000),
        ")".repeat(5_000)
    );
    for sql in [&flat_or, &deep] {
        let started = Instant::now();
        assert_refused(
            f.query("op-univ-07", sql).await,
            Code::InvalidArgument,
            &["QUERY_TOO_COMPLEX"],
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert_eq!(f.charges(), 0);
    f.query("op-univ-07", DP_QUERY)
        .await
        .expect("still serving");
}

#[test]
fn veil_doctor_reports_every_step_and_the_level() {
    let (code, out, err) = crate::support::veil_cli(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sandbox level: "), "{out}");
    for step in [
        "clean environment",
        "inherited descriptors closed",
        "PR_SET_PDEATHSIG",
        "PR_SET_NO_NEW_PRIVS",
        "PR_SET_DUMPABLE=0",
        "rlimits",
        "Landlock",
        "seccomp-BPF",
        "self-test: list /",
        "self-test: open a UDP socket",
        "self-test: run /bin/sh",
        "code on huge pages",
    ] {
        assert!(out.contains(step), "`{step}` missing from:\n{out}");
    }
}

/// The fork server moves its code onto huge pages wherever the kernel
/// offers transparent huge pages to a process that asks (`madvise` or
/// `always`), and the workers it forks from that code still run jobs.
#[tokio::test]
async fn workers_are_forked_with_their_code_on_huge_pages_where_the_kernel_offers_them() {
    let d = dirs();
    let pool = Pool::start(PoolConfig {
        program: env!("CARGO_BIN_EXE_veil").into(),
        subcommand: vec!["worker".into()],
        data_dir: d.data.canonicalize().expect("data dir"),
        limits: Limits::default(),
        size: 1,
        deadline: Duration::from_secs(30),
        min_level: Level::None,
    })
    .expect("pool");
    let offered = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|modes| !modes.contains("[never]"));
    match pool.report().code_on_huge_pages.clone() {
        Ok(bytes) => assert!(offered && bytes >= 2 << 20, "{bytes} bytes on huge pages"),
        Err(why) if !offered => assert!(why.contains("are off"), "{why}"),
        // The machine, not the code: no free huge page right now, or a
        // policy that refuses executable anonymous memory.
        Err(why) if why.contains("small pages") || why.contains("denied") => {
            let _ = writeln!(std::io::stderr(), "SKIPPED (huge pages): {why}");
        }
        Err(why) => panic!("the code did not move: {why}"),
    }
    let answer = probe(&pool, "nothing").await.expect("the worker answered");
    assert_eq!(answer, "allowed: unknown probe nothing");
}

#[tokio::test]
async fn a_program_that_is_not_a_worker_is_refused_at_start() {
    let d = dirs();
    let refused = Pool::start(PoolConfig {
        program: "/bin/true".into(),
        subcommand: vec![],
        data_dir: d.data.canonicalize().expect("data dir"),
        limits: Limits::default(),
        size: 1,
        deadline: Duration::from_secs(5),
        min_level: Level::None,
    })
    .expect_err("/bin/true reports nothing");
    assert!(
        refused.contains("did not report its confinement"),
        "{refused}"
    );
}

#[tokio::test]
async fn the_level_is_recorded_in_each_audit_entry_and_reported_by_the_server() {
    let f = Fixture::start().await;
    let level = f.engine.executor().level();
    assert_ne!(level, "in-process");
    f.query("op-univ-07", DP_QUERY).await.expect("released");
    let entries = veil_engine::audit_log::entries(&f.dir.path().join("state")).expect("entries");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0.entry.sandbox, level);
    let info = veil::client::server_info(&veil::client::Target::new(
        &f.server.endpoint(),
        "demo-token-op-univ-07",
    ))
    .await
    .expect("server info");
    assert_eq!(info.sandbox_level, level);
}
