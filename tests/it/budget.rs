//! The ledger: charged before execution, never refunded, and exhausted budgets
//! refuse queries.

use tonic::Code;
use veil_engine::meta;

use crate::support::*;

const COUNT_BY_DISTRICT: &str =
    "SELECT district, COUNT(*) AS n FROM hrss.social_insurance GROUP BY district";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_spent_to_exhaustion_refuses_the_next_query() {
    let f = Fixture::start().await;
    // G-2026-002: ε budget 2.0, 0.5 per query → exactly four queries.
    for remaining in ["1.500000", "1.000000", "0.500000", "0.000000"] {
        let r = f
            .query("op-ndrc", COUNT_BY_DISTRICT)
            .await
            .expect("admitted");
        assert_eq!(r.schema.metadata()[meta::REMAINING], remaining);
    }
    let e = assert_refused(
        f.query("op-ndrc", COUNT_BY_DISTRICT).await,
        Code::ResourceExhausted,
        &["[BUDGET_EXHAUSTED]", "G-2026-002"],
    );
    assert!(e.message.contains("0 epsilon of 2 remain"), "{}", e.message);
    assert_eq!(f.charges(), 4);
    assert_eq!(f.spent("G-2026-002", "epsilon"), 2_000_000);
    // Other grants are unaffected.
    f.query("op-univ-07", "SELECT COUNT(*) FROM pop.residents")
        .await
        .expect("other grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charge_is_durable_before_execution_and_stands_when_execution_fails() {
    let f = Fixture::start().await;
    // Break the data after the server opened its catalog: execution must fail
    // with the uniform error, after the charge was committed.
    std::fs::write(
        f.data().join("hrss/social_insurance.parquet"),
        b"not parquet",
    )
    .expect("corrupt");
    let e = assert_refused(
        f.query("op-ndrc", COUNT_BY_DISTRICT).await,
        Code::Internal,
        &["[EXECUTION_FAILED]"],
    );
    assert!(!e.message.contains("parquet"), "{}", e.message);
    assert_eq!(f.charges(), 1, "the reservation stands after dispatch");
    assert_eq!(f.spent("G-2026-002", "epsilon"), 500_000);
    // The ledger survives a restart with the same state.
    drop(f.engine.clone());
    let reopened = veil_engine::ledger::Ledger::open(&f.dir.path().join("state")).expect("reopen");
    assert_eq!(
        reopened
            .usage("grant:G-2026-002", "epsilon", None, 0)
            .expect("spent")
            .spent
            .micro(),
        500_000
    );
}
