//! veil's certified plan against plain DataFusion on the same Parquet data.
//!
//! The same `GROUP BY district` COUNT/SUM/AVG over `hrss.social_insurance`,
//! once through `Engine::run` (gate, plan, checks, rewrite, ledger charge,
//! contribution bounding, exact sums, noise, post-processing) and once as a
//! plain DataFusion query, at about 1M and 10M rows. A second baseline does by
//! hand in plain DataFusion the least any per-unit bounding must do (aggregate
//! per person and district, cap each person's rows, then aggregate per
//! district), so the report separates the price of bounding from veil's own
//! overhead. Report the ratios of the medians measured in the same run:
//!
//! ```sh
//! cargo bench --bench engine              # VEIL_BENCH_ROWS=1m to skip 10M
//! cargo bench --bench engine -- plan_and_rewrite   # the slt corpus, planning only
//! cargo bench --bench engine -- sandbox_latency    # confined workers vs in process
//! cargo bench --bench engine -- ledger_reserve     # one durable reservation
//! cargo bench --bench engine -- audit_proof        # one receipt and proof
//! ```

#![allow(clippy::disallowed_methods)] // the baseline is a default DataFusion session

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

#[path = "../tests/slt/corpus.rs"]
mod corpus;
#[path = "support/example_policy.rs"]
mod example_policy;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

const QUERY: &str = "SELECT district, COUNT(*) AS n, SUM(wage_base) AS total, AVG(wage_base) AS mean \
                     FROM hrss.social_insurance GROUP BY district";

/// The per-unit floor: one aggregation per (person, district), capped, then
/// one per district.
const PER_UNIT_QUERY: &str = "SELECT district, SUM(LEAST(n, 12)) AS n, SUM(total) AS total, \
                              SUM(total) / SUM(LEAST(n, 12)) AS mean FROM ( \
                              SELECT person_id, district, COUNT(*) AS n, SUM(wage_base) AS total \
                              FROM social_insurance GROUP BY person_id, district) GROUP BY district";

/// Residents per scale unit give about 8.7 social-insurance rows each.
fn scale_for_rows(rows: f64) -> f64 {
    rows / (veil::generate::BASE_RESIDENTS * 8.67)
}

fn policy_with_budget(dir: &Path) -> std::path::PathBuf {
    example_policy::with_budget(
        dir,
        "budget = 2.0\n  per_query_max = 0.05",
        "budget = 1000000.0\n  per_query_max = 0.05",
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sizes: &[(&str, f64)] = match std::env::var("VEIL_BENCH_ROWS").as_deref() {
        Ok("1m") => &[("1M", 1e6)],
        _ => &[("1M", 1e6), ("10M", 1e7)],
    };
    let mut group = c.benchmark_group("group_by_count_sum_avg");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for (label, rows) in sizes {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        veil::generate::generate(&data, scale_for_rows(*rows), veil::generate::DEFAULT_SEED)
            .expect("generate");
        let engine = veil::open_engine(
            &policy_with_budget(dir.path()),
            &data,
            &dir.path().join("state"),
            &veil::Execution::InProcess,
        )
        .expect("engine");

        let ctx = SessionContext::new();
        rt.block_on(
            ctx.register_parquet(
                "social_insurance",
                data.join("hrss/social_insurance.parquet")
                    .to_str()
                    .expect("utf8"),
                ParquetReadOptions::default(),
            ),
        )
        .expect("register");
        let plain_sql = QUERY.replace("hrss.social_insurance", "social_insurance");

        for (name, sql) in [
            ("plain_datafusion", plain_sql.as_str()),
            ("plain_datafusion_per_unit", PER_UNIT_QUERY),
        ] {
            group.bench_with_input(BenchmarkId::new(name, label), &sql, |b, sql| {
                b.to_async(&rt).iter(|| async {
                    ctx.sql(sql)
                        .await
                        .expect("sql")
                        .collect()
                        .await
                        .expect("collect")
                })
            });
        }
        let e = Arc::clone(&engine);
        group.bench_with_input(
            BenchmarkId::new("veil_certified", label),
            &QUERY,
            |b, sql| {
                b.to_async(&rt).iter(|| async {
                    e.run("op-credit-01", sql, chrono::Utc::now().fixed_offset())
                        .await
                        .expect("answered")
                })
            },
        );
    }
    group.finish();
}

/// Every query of the sqllogictest corpus that veil accepts, with the
/// operator it runs as (a `SET veil.operator` statement switches it).
fn slt_corpus() -> Vec<(String, String)> {
    use sqllogictest::{DefaultColumnType, QueryExpect, Record};
    let files = corpus::files();
    let mut out = Vec::new();
    for file in files {
        let mut operator = "op-univ-07".to_owned();
        for record in sqllogictest::parse_file::<DefaultColumnType>(&file).expect("slt") {
            match record {
                Record::Statement { sql, .. } => {
                    if let Some(op) = corpus::operator_switch(&sql) {
                        operator = op;
                    }
                }
                Record::Query {
                    sql,
                    expected: QueryExpect::Results { .. },
                    ..
                } => out.push((operator.clone(), sql)),
                _ => {}
            }
        }
    }
    out
}

/// A runtime and the example data at the tests' small scale (about 4,000
/// residents) in a temporary directory.
fn small_example() -> (
    tokio::runtime::Runtime,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    veil::generate::generate(&data, 0.02, veil::generate::DEFAULT_SEED).expect("generate");
    (rt, dir, data)
}

/// Planning and rewrite latency (a dry run: gate, plan, policy checks,
/// certify, accounting; no data) over the slt corpus, per query.
fn plan_corpus(c: &mut Criterion) {
    let (rt, dir, data) = small_example();
    let engine = veil::open_engine(
        &policy_with_budget(dir.path()),
        &data,
        &dir.path().join("state"),
        &veil::Execution::InProcess,
    )
    .expect("engine");
    let corpus = slt_corpus();
    assert!(corpus.len() >= 10, "the slt corpus is missing");
    let mut group = c.benchmark_group("plan_and_rewrite");
    group.sample_size(20);
    group.bench_function(format!("slt_corpus_{}_queries", corpus.len()), |b| {
        b.to_async(&rt).iter(|| async {
            let now = chrono::Utc::now().fixed_offset();
            for (operator, sql) in &corpus {
                engine.estimate(operator, sql, now).await.expect("plans");
            }
        })
    });
    group.finish();
}

/// What the executor sandbox adds to a small DP query: the same query
/// (about 35,000 rows) through `Engine::run` with in-process execution and
/// with the pool of confined `veil worker` processes (plan serialized,
/// socketpair, a fresh worker per query, killed and reaped after it).
///
/// Each timed query arrives at an idle server (a 100 ms pause, untimed,
/// lets the pool replace its used worker), as interactive queries do; the
/// `back_to_back` variants send queries without pause (in the sandbox, each
/// query then also competes with the spawning of its predecessor's
/// replacement).
fn sandbox_latency(c: &mut Criterion) {
    let (rt, dir, data) = small_example();
    let mut sandbox = veil::SandboxOptions::new(env!("CARGO_BIN_EXE_veil"));
    sandbox.min_level = veil_sandbox::Level::None;
    let mut group = c.benchmark_group("sandbox_latency");
    group.sample_size(100);
    let mut worker_cpu = Vec::new();
    for (name, execution, pause) in [
        ("in_process", veil::Execution::InProcess, true),
        (
            "sandboxed",
            veil::Execution::Sandboxed(sandbox.clone()),
            true,
        ),
        ("in_process_back_to_back", veil::Execution::InProcess, false),
        (
            "sandboxed_back_to_back",
            veil::Execution::Sandboxed(sandbox.clone()),
            false,
        ),
    ] {
        let state = tempfile::tempdir().expect("state");
        let engine = veil::open_engine(
            &policy_with_budget(dir.path()),
            &data,
            state.path(),
            &execution,
        )
        .expect("engine");
        eprintln!("{name}: sandbox level {}", engine.executor().level());
        let queries = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let children_before = reaped_children_cpu();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let engine = Arc::clone(&engine);
                let queries = Arc::clone(&queries);
                async move {
                    queries.fetch_add(iters, std::sync::atomic::Ordering::Relaxed);
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if pause {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        let started = std::time::Instant::now();
                        engine
                            .run("op-credit-01", QUERY, chrono::Utc::now().fixed_offset())
                            .await
                            .expect("answered");
                        total += started.elapsed();
                    }
                    total
                }
            })
        });
        // Dropping the engine stops the pool, which kills and reaps its
        // ready workers (their start is counted too); used workers are
        // reaped in the background, within the pause.
        drop(engine);
        std::thread::sleep(Duration::from_millis(300));
        let queries = queries.load(std::sync::atomic::Ordering::Relaxed);
        if let (Some(before), Some(after)) = (children_before, reaped_children_cpu())
            && after > before
            && queries > 0
        {
            worker_cpu.push(format!(
                "{name}: worker processes used {:.1} ms of CPU per query ({queries} queries)",
                (after - before).as_secs_f64() * 1e3 / queries as f64
            ));
        }
    }
    paired(&mut group, &rt, &dir, &data, sandbox);
    group.finish();
    for line in &worker_cpu {
        eprintln!("{line}");
    }
}

/// The sandbox's price as paired differences. On a shared two-core VM the
/// machine's speed drifts by milliseconds within a minute, more than the
/// sandbox's price, so medians measured one variant after the other can
/// disagree from run to run. Here each round runs the query once in process
/// and once sandboxed (alternating which goes first, each after a 100 ms
/// pause, untimed), so drift falls on both alike. Criterion reports the
/// sandboxed times; the summary line gives both medians and the median of
/// the per-round differences, the figure README reports.
fn paired(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    dir: &tempfile::TempDir,
    data: &Path,
    sandbox: veil::SandboxOptions,
) {
    let state = tempfile::tempdir().expect("state");
    let policy = policy_with_budget(dir.path());
    let engines = [
        ("in_process", veil::Execution::InProcess),
        ("sandboxed", veil::Execution::Sandboxed(sandbox)),
    ]
    .map(|(name, execution)| {
        veil::open_engine(&policy, data, &state.path().join(name), &execution).expect("engine")
    });
    let pairs = Arc::new(std::sync::Mutex::new(Vec::new()));
    group.bench_function("sandboxed_paired", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let engines = engines.clone();
            let pairs = Arc::clone(&pairs);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut round = [Duration::ZERO; 2];
                    let first = pairs.lock().expect("pairs").len() % 2;
                    for i in [first, 1 - first] {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let started = std::time::Instant::now();
                        engines[i]
                            .run("op-credit-01", QUERY, chrono::Utc::now().fixed_offset())
                            .await
                            .expect("answered");
                        round[i] = started.elapsed();
                    }
                    total += round[1];
                    pairs.lock().expect("pairs").push(round);
                }
                total
            }
        })
    });
    let pairs = pairs.lock().expect("pairs");
    if pairs.is_empty() {
        // Filtered out (`cargo bench --bench engine -- group_by`).
        return;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() / 10], v[v.len() * 9 / 10])
    };
    let (in_process, ..) = median(pairs.iter().map(|r| ms(r[0])).collect());
    let (sandboxed, ..) = median(pairs.iter().map(|r| ms(r[1])).collect());
    let (adds, p10, p90) = median(pairs.iter().map(|r| ms(r[1]) - ms(r[0])).collect());
    eprintln!(
        "sandbox_latency/paired: {} rounds; median in process {in_process:.2} ms, sandboxed \
         {sandboxed:.2} ms; the sandbox adds {adds:.2} ms at the median of the paired \
         differences (p10 {p10:.2}, p90 {p90:.2})",
        pairs.len()
    );
}

/// The CPU time of this process's reaped children (the pool reaps every
/// worker it used), from `/proc/self/stat` (`cutime` + `cstime`, in clock
/// ticks of 1/100 s, Linux's `USER_HZ` on every common architecture):
/// coarse per worker, exact enough over hundreds of queries.
fn reaped_children_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces); cutime and
    // cstime are fields 16 and 17 of the whole line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The ledger's budget check as its history grows: one durable reservation
/// on a fresh ledger, and on one whose budget already holds 100,000 draws in
/// the current window (a busy year under a yearly global budget). The
/// history is written with SQL in one transaction, as the ledger would have
/// written it one query at a time.
fn ledger_reserve(c: &mut Criterion) {
    use veil_engine::accounting::Budget;
    use veil_engine::ledger::{Charge, Draw, Ledger};
    let mut group = c.benchmark_group("ledger_reserve");
    group.sample_size(50);
    for (name, prior) in [("fresh", 0), ("100k_prior_draws", 100_000)] {
        let dir = tempfile::tempdir().expect("tmp");
        drop(Ledger::open(dir.path()).expect("ledger"));
        let mut db = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).expect("db");
        let tx = db.transaction().expect("tx");
        for i in 0..prior {
            tx.execute(
                "INSERT INTO requests (request_id, operator, grant_id, policy_hash, query_hash, state, created_ms)
                 VALUES (?1, 'op', 'G', 'h', 'q', 'RELEASED', 0)",
                [format!("old-{i}")],
            )
            .expect("request");
            tx.execute(
                "INSERT INTO draws (request_id, budget, unit, window_index, amount_micro)
                 VALUES (?1, 'dataset:D', 'epsilon', 0, 1)",
                [format!("old-{i}")],
            )
            .expect("draw");
        }
        tx.commit().expect("commit");
        drop(db);
        let ledger = Ledger::open(dir.path()).expect("ledger");
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let id = format!("new-{n}");
                let charge = Charge {
                    request_id: &id,
                    operator: "op",
                    grant: "G",
                    policy_hash: "h",
                    query_hash: "q",
                    draws: vec![Draw {
                        key: "dataset:D".into(),
                        unit: "epsilon",
                        total: Budget::total(1e6).expect("total"),
                        window: None,
                        amount: Budget::charge(1e-6).expect("charge"),
                    }],
                    now_ms: 0,
                };
                ledger.reserve(&charge).expect("reserved");
            })
        });
    }
    group.finish();
}

/// One `GetAuditReceipt` plus `ProveInclusion` on a log of 10,000 entries
/// (a checkpoint after each): as the server answers them (one entry read,
/// the proof from its tree in memory) against verifying and re-reading the
/// whole log for each call, as it did before.
fn audit_proof(c: &mut Criterion) {
    use veil_engine::audit_log::{self, AuditLog, Cadence, Entry};
    let mut group = c.benchmark_group("audit_proof");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let dir = tempfile::tempdir().expect("tmp");
    let log = AuditLog::open(dir.path(), Cadence::default()).expect("log");
    let n = 10_000u64;
    for i in 0..n {
        log.append(Entry {
            operator: "op-univ-07".into(),
            query: Some(format!("SELECT COUNT(*) FROM wjw.outpatient_visits -- {i}")),
            ..Entry::default()
        })
        .expect("append");
    }
    let mut i = 0u64;
    group.bench_function("server_10k_entries", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            log.entry(i).expect("read").expect("present");
            log.prove(i).expect("proof")
        })
    });
    group.bench_function("verify_whole_log_10k_entries", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            audit_log::entries(dir.path()).expect("entries");
            audit_log::prove(dir.path(), i).expect("proof")
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench,
    plan_corpus,
    sandbox_latency,
    ledger_reserve,
    audit_proof
);
criterion_main!(benches);
