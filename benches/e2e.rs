//! End to end: a small DP query from the CLI's client library (`veil::client`)
//! over loopback gRPC to a real server, through Flight SQL (`GetFlightInfo`
//! then `DoGet`), with the ledger charge, the audit entry and the noise.
//!
//! Two servers in the same run: one executing in confined `veil worker`
//! processes (what `veil serve` does) and one executing in its own process
//! (the baseline). For each: the criterion median per query, then a report of
//! the median and p99 over 1,000 sequential queries and the throughput of 16
//! concurrent clients.
//!
//! ```sh
//! cargo bench --bench e2e
//! VEIL_BENCH_WORKERS=4 cargo bench --bench e2e   # more ready workers
//! VEIL_BENCH_ONLY=in_process cargo bench --bench e2e   # one server only
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "support/example_policy.rs"]
mod example_policy;
use veil::client::Client;

const OPERATOR: &str = "op-univ-07";
const SQL: &str = "SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district";
const SEQUENTIAL: usize = 1_000;
const CLIENTS: usize = 16;
const PER_CLIENT: usize = 40;

/// The example data at the tests' small scale (about 4,000 residents), and
/// the example policy with op-univ-07's budget large enough for the run.
fn example(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    veil::generate::generate(&data, 0.02, veil::generate::DEFAULT_SEED).expect("generate");
    let policy = example_policy::with_budget(
        dir,
        "budget = 10.0\n  per_query_max = 0.5",
        "budget = 100000000.0\n  per_query_max = 0.5",
    );
    (policy, data)
}

async fn client(endpoint: &str) -> Client {
    let mut c = Client::connect(endpoint).await.expect("connect");
    c.login(OPERATOR, &format!("demo-token-{OPERATOR}"))
        .await
        .expect("login");
    c
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let (policy, data) = example(dir.path());
    let mut sandbox = veil::SandboxOptions::new(env!("CARGO_BIN_EXE_veil"));
    sandbox.min_level = veil_sandbox::Level::None;
    // `veil serve --workers`: ready workers (default 2).
    if let Some(n) = std::env::var("VEIL_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        sandbox.workers = n;
    }
    let mut report = Vec::new();
    let mut group = c.benchmark_group("e2e_latency");
    group.sample_size(100);
    for (name, execution) in [
        ("in_process", veil::Execution::InProcess),
        ("sandboxed", veil::Execution::Sandboxed(sandbox)),
    ] {
        if std::env::var("VEIL_BENCH_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let state = tempfile::tempdir().expect("state");
        let engine = veil::open_engine(&policy, &data, state.path(), &execution).expect("engine");
        let level = engine.executor().level().to_owned();
        let server = rt
            .block_on(veil::start(engine, "127.0.0.1:0".parse().expect("addr")))
            .expect("server");
        let endpoint = server.endpoint();
        let one = Arc::new(tokio::sync::Mutex::new(rt.block_on(client(&endpoint))));
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let one = Arc::clone(&one);
                async move {
                    let mut c = one.lock().await;
                    let t = Instant::now();
                    for _ in 0..iters {
                        c.query(SQL).await.expect("answered");
                    }
                    t.elapsed()
                }
            })
        });
        // Median and p99 over sequential queries from one client.
        let mut times = rt.block_on(async {
            let mut c = client(&endpoint).await;
            let mut times = Vec::with_capacity(SEQUENTIAL);
            for _ in 0..SEQUENTIAL {
                let t = Instant::now();
                c.query(SQL).await.expect("answered");
                times.push(t.elapsed());
            }
            times
        });
        times.sort();
        // Throughput: 16 clients, each sending its queries back to back.
        let elapsed = rt.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                clients.push(client(&endpoint).await);
            }
            let t = Instant::now();
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move {
                        for _ in 0..PER_CLIENT {
                            c.query(SQL).await.expect("answered");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("client");
            }
            t.elapsed()
        });
        let qps = (CLIENTS * PER_CLIENT) as f64 / elapsed.as_secs_f64();
        report.push(format!(
            "{name:<11} ({level:<10}) median {:>7.2} ms  p99 {:>7.2} ms  over {SEQUENTIAL} queries; {qps:>6.0} queries/s with {CLIENTS} clients",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
        ));
        rt.block_on(server.stop()).expect("stop");
    }
    group.finish();
    eprintln!("\nend-to-end report (`cargo bench --bench e2e`):");
    for line in &report {
        eprintln!("  {line}");
    }
}

criterion_group!(benches, e2e);
criterion_main!(benches);
