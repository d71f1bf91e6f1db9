//! The real `veil serve` killed with SIGKILL at random points, and run out of
//! disk: every answer a client received has a durable charge, what was spent
//! after dispatch never decreases, the audit log stays verifiable, and a
//! server that cannot write stops admitting queries and says why.

#![allow(clippy::disallowed_methods)] // tests drive the binary as a user would

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tonic::Code;
use veil::client::Client;
use veil_engine::ledger::{ChargeState, Ledger};
use veil_engine::meta;

use crate::support::*;

const COUNT: &str = "SELECT COUNT(*) AS n FROM hrss.social_insurance";

struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `veil serve` (under `sh -c "<prefix> exec veil serve …"` when a
/// shell prefix is given) and waits until it accepts connections.
async fn serve(dir: &Path, prefix: Option<&str>) -> Server {
    serve_with(dir, prefix, None).await.0
}

/// [`serve`], set to stop at a crash point: the receiver fires when the
/// server has reached it (and waits there for its SIGKILL).
async fn serve_with(
    dir: &Path,
    prefix: Option<&str>,
    crash_at: Option<&str>,
) -> (Server, std::sync::mpsc::Receiver<()>) {
    let arg = |p: PathBuf| p.to_str().expect("utf8").to_owned();
    let args = vec![
        "serve".to_owned(),
        "--policy".to_owned(),
        arg(dir.join("policy.toml")),
        "--data".to_owned(),
        arg(dir.join("data")),
        "--state".to_owned(),
        arg(dir.join("state")),
        // The server picks its port and logs it: a port picked here and
        // released could be taken by another test's server meanwhile.
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    let mut command = match prefix {
        None => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_veil"));
            c.args(&args);
            c
        }
        Some(prefix) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{prefix} exec \"$0\" \"$@\""))
                .arg(env!("CARGO_BIN_EXE_veil"))
                .args(&args);
            c
        }
    };
    if let Some(point) = crash_at {
        command.env("VEIL_TEST_CRASH_AT", point);
    }
    let mut child = command
        .env("VEIL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn veil serve");
    let (reached, on_reach) = std::sync::mpsc::channel();
    let (listening, on_listen) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("VEIL_TEST_CRASH_POINT") {
                let _ = reached.send(());
            } else if line.contains("serving Arrow Flight SQL")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let digits: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                let _ = listening.send(digits.parse::<u16>().expect("port"));
            }
        }
    });
    let mut port = None;
    for _ in 0..400 {
        port = port.or_else(|| on_listen.try_recv().ok());
        if let Some(port) = port
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            let server = Server {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            return (server, on_reach);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("veil serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("veil serve did not listen");
}

/// A state directory beside example data, with a budget that never runs out.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    veil::generate::generate(
        &dir.path().join("data"),
        SCALE,
        veil::generate::DEFAULT_SEED,
    )
    .expect("generate");
    let policy = example_policy_with_ndrc_budget("100000.0");
    std::fs::write(dir.path().join("policy.toml"), policy).expect("policy");
    dir
}

/// Queries until the server stops answering; returns the request ids of
/// the answers received.
async fn query_until_down(endpoint: String, client_no: usize) -> Vec<String> {
    let mut received = Vec::new();
    let Ok(mut client) = Client::connect(&endpoint).await else {
        return received;
    };
    client.with_bearer("demo-token-op-ndrc");
    for n in 0.. {
        client.with_request_id(&format!("c{client_no}-{n}-{}", std::process::id()));
        match client.query(COUNT).await {
            Ok(answer) => received.push(answer.schema.metadata()[meta::REQUEST].clone()),
            Err(e)
                if e.code == Code::Unavailable
                    || e.code == Code::Unknown
                    || e.code == Code::Cancelled =>
            {
                break;
            }
            Err(e) => panic!("unexpected refusal: {e:?}"),
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_points_the_server_keeps_every_charge() {
    let dir = workspace();
    let state = dir.path().join("state");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261127);
    let (mut spent_before, mut gap_before) = (0u64, 0u64);
    let (mut received_all, mut in_flight) = (Vec::new(), 0usize);
    for point in 0..200 {
        let server = serve(dir.path(), None).await;
        let clients: Vec<_> = (0..3)
            .map(|c| tokio::spawn(query_until_down(server.endpoint.clone(), c + 3 * point)))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
        drop(server); // SIGKILL, then reaped
        for c in clients {
            received_all.extend(c.await.expect("client"));
        }
        // What the next start sees: every answer received was released,
        // nothing dispatched was given back, and the log verifies.
        veil_engine::audit_log::verify(&state).expect("the audit log survives a kill");
        let ledger = Ledger::open(&state).expect("the ledger survives a kill");
        for id in &received_all {
            assert_eq!(
                ledger.state(id).expect("state"),
                Some(ChargeState::Released),
                "kill {point}: an answer without a durable release"
            );
        }
        let spent = ledger
            .usage("grant:G-2026-002", "epsilon", None, 0)
            .expect("usage")
            .spent
            .micro();
        assert!(
            spent >= spent_before,
            "kill {point}: spent went from {spent_before} to {spent}"
        );
        let answered = 500_000 * received_all.len() as u64;
        assert!(spent >= answered);
        // Charged but never answered: killed between dispatch and response.
        in_flight += usize::from(spent - answered > gap_before);
        gap_before = spent - answered;
        spent_before = spent;
    }
    eprintln!(
        "200 kills: {} answers received, {} kills left a charge without an answer",
        received_all.len(),
        in_flight
    );
    assert!(!received_all.is_empty());
}

/// SIGKILL at each step of a request, then a retry under the same request
/// id on the restarted server: one charge in every case, and the retry gets
/// what the step allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_a_retry_under_the_same_id_costs_nothing_more() {
    for point in [
        "after_reserve",
        "after_dispatch",
        "before_response",
        "after_response",
    ] {
        let dir = workspace();
        let crash_at = (point != "after_response").then_some(point);
        let (server, reached) = serve_with(dir.path(), None, crash_at).await;
        let mut client = Client::connect(&server.endpoint).await.expect("connect");
        client.with_bearer("demo-token-op-ndrc");
        client.with_request_id("the-request");
        let first = tokio::spawn(async move { client.query(COUNT).await });
        let first = if crash_at.is_some() {
            tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(60)))
                .await
                .expect("wait")
                .expect("the crash point is reached");
            drop(server); // SIGKILL
            assert!(first.await.expect("client").is_err(), "{point}: no answer");
            None
        } else {
            let answer = first.await.expect("client").expect("answered");
            drop(server); // SIGKILL after the response
            Some(answer)
        };
        let server = serve(dir.path(), None).await;
        let mut client = Client::connect(&server.endpoint).await.expect("connect");
        client.with_bearer("demo-token-op-ndrc");
        client.with_request_id("the-request");
        let retry = client.query(COUNT).await;
        match point {
            // Never dispatched: aborted at restart, so the retry runs afresh.
            "after_reserve" => assert!(retry.is_ok(), "{point}: {retry:?}"),
            // Data may have been read: the charge stands, nothing to replay.
            "after_dispatch" => {
                let e = retry.expect_err(point);
                assert_eq!(e.code, Code::Unavailable, "{point}: {}", e.message);
                assert!(e.message.contains("interrupted"), "{}", e.message);
            }
            // Released before the kill: the retry gets the recorded answer.
            _ => {
                let retry = retry.expect(point);
                if let Some(first) = first {
                    let columns = |f: &veil::client::Fetched| -> Vec<_> {
                        f.batches.iter().map(|b| b.columns().to_vec()).collect()
                    };
                    assert_eq!(columns(&first), columns(&retry), "{point}: the same answer");
                }
            }
        }
        let state = dir.path().join("state");
        let spent = veil_engine::ledger::LedgerView::open(&state)
            .expect("view")
            .usage("grant:G-2026-002", "epsilon", None, 0)
            .expect("usage")
            .spent
            .micro();
        assert_eq!(spent, 500_000, "{point}: exactly one charge");
        veil_engine::audit_log::verify(&state).expect("the log verifies");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_admission_and_says_why() {
    let dir = workspace();
    // Create the state files, then serve with a file size limit (1 MiB in
    // dash's 512-byte blocks): the ledger's write-ahead log soon hits it.
    drop(serve(dir.path(), None).await);
    let server = serve(dir.path(), Some("trap '' XFSZ; ulimit -f 2048;")).await;
    let mut client = Client::connect(&server.endpoint).await.expect("connect");
    client.with_bearer("demo-token-op-ndrc");
    let mut received = Vec::new();
    let refusal = loop {
        client.with_request_id(&format!("q{}", received.len()));
        match client.query(COUNT).await {
            Ok(answer) => received.push(answer.schema.metadata()[meta::REQUEST].clone()),
            Err(e) => break e,
        }
        assert!(
            received.len() < 2_000,
            "the file size limit was never reached"
        );
    };
    assert_eq!(refusal.code, Code::Unavailable, "{}", refusal.message);
    assert!(
        refusal
            .message
            .contains("no query is admitted until it is fixed"),
        "{}",
        refusal.message
    );
    // Fail closed: the next query is refused too, for the same reason.
    client.with_request_id("after-the-failure");
    let again = client.query(COUNT).await.expect_err("still refused");
    assert_eq!(again.code, Code::Unavailable, "{}", again.message);
    drop(server);
    // On a healthy disk, every answer received has its release.
    let ledger = Ledger::open(&dir.path().join("state")).expect("reopen");
    for id in &received {
        assert_eq!(
            ledger.state(id).expect("state"),
            Some(ChargeState::Released)
        );
    }
    veil_engine::audit_log::verify(&dir.path().join("state")).expect("log intact");
    eprintln!(
        "{} answers before the disk filled: {}",
        received.len(),
        refusal.message
    );
}
