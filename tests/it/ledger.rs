//! The privacy-budget ledger under load, retries and restarts.
//!
//! - Concurrency: 64 Flight SQL clients race for a budget that admits
//!   exactly 10 queries, 100 times over.
//! - Idempotency: a retry under the same request id (Flight header) gets the
//!   same answer and no new charge.
//! - Global dataset budgets bind every operator together.
//! - A soak of 10⁵ random operations (reserve, dispatch, release, fail,
//!   abort, retry, restart) agrees with an in-memory reference model after
//!   every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tonic::Code;
use veil_engine::accounting::Budget;
use veil_engine::ledger::{Charge, ChargeState, Draw, Ledger, ReserveError, Reserved, Window};
use veil_engine::meta;

use crate::support::*;

const COUNT: &str = "SELECT COUNT(*) AS n FROM hrss.social_insurance";

/// G-2026-002 (op-ndrc): 0.5 ε per query; a budget of 5.0 admits ten.
fn ten_query_policy() -> String {
    example_policy_with_ndrc_budget("5.0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_racing_for_ten_queries_get_exactly_ten() {
    let f = Fixture::with_policy(&ten_query_policy(), |_| {}).await;
    let policy = f.dir.path().join("policy.toml");
    for round in 0..100 {
        let state = tempfile::tempdir().expect("state");
        let engine = veil::open_engine(
            &policy,
            &f.data(),
            state.path(),
            &crate::support::sandboxed(),
        )
        .expect("engine");
        let server = veil::start(Arc::clone(&engine), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("server");
        // 64 Flight SQL clients, connected first, then released together.
        let start = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (endpoint, start) = (server.endpoint(), Arc::clone(&start));
                tokio::spawn(async move {
                    let mut client = veil::client::Client::connect(&endpoint)
                        .await
                        .expect("connect");
                    client.with_bearer("demo-token-op-ndrc");
                    start.wait().await;
                    client.query(COUNT).await
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => admitted += 1,
                Err(e) => assert!(
                    e.code == Code::ResourceExhausted && e.message.contains("BUDGET_EXHAUSTED"),
                    "round {round}: {e:?}"
                ),
            }
        }
        server.stop().await.expect("stop");
        assert_eq!(admitted, 10, "round {round}");
        assert_eq!(engine.ledger().charges().expect("charges"), 10);
        assert_eq!(
            engine.spent("G-2026-002").expect("spent").1.micro(),
            5_000_000
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_under_the_same_request_id_gets_the_same_answer_without_a_new_charge() {
    let f = Fixture::start().await;
    let mut client = f.client("op-ndrc").await;
    client.with_request_id("report-2026-11-27");
    let first = client.query(COUNT).await.expect("first");
    let again = client.query(COUNT).await.expect("retry");
    let columns = |f: &veil::client::Fetched| -> Vec<_> {
        f.batches.iter().map(|b| b.columns().to_vec()).collect()
    };
    assert_eq!(columns(&first), columns(&again), "the same noisy answer");
    assert_eq!(f.charges(), 1);
    assert_eq!(f.spent("G-2026-002", "epsilon"), 500_000);
    let request = &first.schema.metadata()[meta::REQUEST];
    assert_eq!(request, &again.schema.metadata()[meta::REQUEST]);
    assert!(request.ends_with("report-2026-11-27"), "{request}");
    // The same id for another query is refused, and charges nothing.
    assert_refused(
        client
            .query("SELECT district, COUNT(*) FROM hrss.social_insurance GROUP BY district")
            .await,
        Code::InvalidArgument,
        &["request id was already used"],
    );
    assert_eq!(f.charges(), 1);
    // A new id is a new charge.
    client.with_request_id("report-2026-11-28");
    let other = client.query(COUNT).await.expect("new id");
    assert_ne!(other.schema.metadata()[meta::REQUEST], *request);
    assert_eq!(f.charges(), 2);
    // A malformed id is refused before anything else.
    client.with_request_id("not ok!");
    assert_refused(
        client.query(COUNT).await,
        Code::InvalidArgument,
        &["request id"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_budget_binds_every_operator_together() {
    // The visits' global budget: ρ = 0.25, i.e. two of G-2026-031's ε = 0.5
    // queries (ε²/2 = 0.125 each), whatever the grant's own budget says.
    let policy = example_policy().replacen(
        "budget = { accounting = \"rho\", total = 20.0, window = \"P365D\" }",
        "budget = { accounting = \"rho\", total = 0.25, window = \"P365D\" }",
        1,
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let sql = "SELECT district, COUNT(*) FROM wjw.outpatient_visits GROUP BY district";
    for _ in 0..2 {
        f.query("op-univ-07", sql).await.expect("admitted");
    }
    assert_refused(
        f.query("op-univ-07", sql).await,
        Code::ResourceExhausted,
        &[
            "the global budget of dataset `wjw.outpatient_visits`",
            "rho",
        ],
    );
    // The grant's own budget is untouched by the refusal.
    assert_eq!(f.spent("G-2026-031", "epsilon"), 1_000_000);
    // Officers see both budgets.
    let view = veil_engine::ledger::LedgerView::open(&f.dir.path().join("state")).expect("view");
    let report = veil_engine::broker::budget_report(
        &f.engine.policy(),
        &view,
        None,
        chrono::Utc::now().timestamp_millis(),
    )
    .expect("report");
    let line = |b: &str| report.iter().find(|l| l.budget == b).expect("line").clone();
    assert!((line("dataset:wjw.outpatient_visits").spent - 0.25).abs() < 1e-12);
    assert!(line("dataset:wjw.outpatient_visits").refreshes.is_some());
    assert!((line("grant:G-2026-031").spent - 1.0).abs() < 1e-12);
}

/// The reference model of one budget key: what each live request drew.
#[derive(Debug, Default, Clone)]
struct Model {
    requests: BTreeMap<String, (ChargeState, u64)>,
}

impl Model {
    fn spent(&self) -> u64 {
        self.requests
            .values()
            .filter(|(s, _)| *s != ChargeState::Aborted)
            .map(|(_, a)| a)
            .sum()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(u8, u64),
    Dispatch(u8),
    Release(u8),
    Fail(u8),
    Abort(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40, 1u64..300_000).prop_map(|(r, a)| Op::Reserve(r, a)),
        3 => (0u8..40).prop_map(Op::Dispatch),
        2 => (0u8..40).prop_map(Op::Release),
        1 => (0u8..40).prop_map(Op::Fail),
        1 => (0u8..40).prop_map(Op::Abort),
        1 => Just(Op::Restart),
    ]
}

/// A state directory on tmpfs when there is one: the soak checks logic, not
/// the disk, and tmpfs makes its 10⁵ fsyncs cheap.
fn fast_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tmpfs")
    } else {
        tempfile::tempdir().expect("tmp")
    }
}

const TOTAL: u64 = 5_000_000;

fn soak(ops: &[Op], round: usize) -> Result<(), TestCaseError> {
    let dir = fast_dir();
    let mut ledger = Ledger::open(dir.path()).expect("open");
    let mut model = Model::default();
    let draw = |amount: u64| Draw {
        key: "grant:G".into(),
        unit: "rho",
        total: Budget::from_micro(TOTAL),
        window: Some(Window::days(0, 1)),
        amount: Budget::from_micro(amount),
    };
    let id = |r: u8| format!("round{round}-r{r}");
    for op in ops {
        match op {
            Op::Reserve(r, amount) => {
                let charge = Charge {
                    request_id: &id(*r),
                    operator: "op",
                    grant: "G",
                    policy_hash: "h",
                    query_hash: &format!("q{amount}"),
                    draws: vec![draw(*amount)],
                    now_ms: 1_000,
                };
                let outcome = ledger.reserve(&charge);
                match (model.requests.get(&id(*r)).copied(), outcome) {
                    (Some((state, drawn)), Ok(Reserved::Replay { state: s, .. }))
                        if state != ChargeState::Aborted =>
                    {
                        prop_assert_eq!(drawn, *amount, "a replay repeats its query");
                        prop_assert_eq!(s, state);
                    }
                    // An id stays bound to its query, even once aborted.
                    (Some((_, drawn)), Err(ReserveError::Conflict)) => {
                        prop_assert_ne!(drawn, *amount);
                    }
                    (prior, Ok(Reserved::New(_))) => {
                        prop_assert!(
                            prior.is_none_or(|(s, a)| s == ChargeState::Aborted && a == *amount)
                        );
                        prop_assert!(model.spent() + amount <= TOTAL, "overspent");
                        model
                            .requests
                            .insert(id(*r), (ChargeState::Reserved, *amount));
                    }
                    (prior, Err(ReserveError::Exhausted { spent, .. })) => {
                        prop_assert!(
                            prior.is_none_or(|(s, a)| s == ChargeState::Aborted && a == *amount)
                        );
                        prop_assert_eq!(spent.micro(), model.spent());
                        prop_assert!(model.spent() + amount > TOTAL);
                    }
                    (prior, other) => {
                        return Err(TestCaseError::fail(format!("{prior:?} then {other:?}")));
                    }
                }
            }
            Op::Dispatch(r) | Op::Release(r) | Op::Fail(r) | Op::Abort(r) => {
                let next = match op {
                    Op::Dispatch(_) => ChargeState::Dispatched,
                    Op::Release(_) => ChargeState::Released,
                    Op::Fail(_) => ChargeState::FailedAfterDispatch,
                    _ => ChargeState::Aborted,
                };
                let allowed = matches!(
                    (model.requests.get(&id(*r)).map(|x| x.0), next),
                    (
                        Some(ChargeState::Reserved),
                        ChargeState::Dispatched | ChargeState::Aborted
                    ) | (
                        Some(ChargeState::Dispatched),
                        ChargeState::Released | ChargeState::FailedAfterDispatch
                    )
                );
                let outcome = ledger.advance(&id(*r), next, Some(b"answer"));
                prop_assert_eq!(
                    outcome.is_ok(),
                    allowed,
                    "{:?} on {:?}",
                    op,
                    model.requests.get(&id(*r))
                );
                if allowed && let Some(entry) = model.requests.get_mut(&id(*r)) {
                    entry.0 = next;
                }
            }
            Op::Restart => {
                drop(ledger);
                ledger = Ledger::open(dir.path()).expect("reopen");
                // Reservations that never dispatched are given back.
                for (state, _) in model.requests.values_mut() {
                    if *state == ChargeState::Reserved {
                        *state = ChargeState::Aborted;
                    }
                }
            }
        }
        let usage = ledger
            .usage("grant:G", "rho", Some(Window::days(0, 1)), 1_000)
            .expect("usage");
        prop_assert_eq!(usage.spent.micro(), model.spent(), "after {:?}", op);
        prop_assert!(ledger.failure().is_none());
    }
    Ok(())
}

#[test]
fn a_soak_of_random_operations_agrees_with_the_reference_model() {
    // 100 runs of 1,000 operations: 10⁵ in all.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 100,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let round = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&prop::collection::vec(op(), 1_000), |ops| {
            soak(
                &ops,
                round.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            )
        })
        .expect("the ledger agrees with the model");
}
