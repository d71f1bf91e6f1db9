//! Dry runs (`veil.v1.EstimateCost`): the cost and accuracy of a query with
//! every check applied, no data read, no budget spent.

use tonic::Code;
use veil_engine::meta;

use crate::support::*;

const SQL: &str =
    "SELECT district, COUNT(*) AS residents, AVG(age) AS age FROM pop.residents GROUP BY district";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_predicts_cost_and_intervals_without_spending() {
    let f = Fixture::start().await;
    let token = "demo-token-op-univ-07";
    let e = veil::client::estimate(&veil::client::Target::new(&f.server.endpoint(), token), SQL)
        .await
        .expect("estimate");
    assert_eq!(
        (e.grant_id.as_str(), e.unit.as_str()),
        ("G-2026-031", "epsilon")
    );
    assert!(
        (e.cost - 0.5).abs() < 1e-9 && (e.remaining - 10.0).abs() < 1e-9,
        "{e:?}"
    );
    assert_eq!(e.rows, Some(16));
    assert!(!e.exceeds_budget);
    assert_eq!(f.charges(), 0, "a dry run spends nothing");

    // The real answer carries exactly the predicted interval.
    let r = f.query("op-univ-07", SQL).await.expect("accepted");
    let predicted = e
        .aggregates
        .iter()
        .find(|a| a.column == "residents")
        .expect("count");
    let actual: f64 = r
        .schema
        .field_with_name("residents")
        .expect("field")
        .metadata()[meta::CI95]
        .parse()
        .expect("ci");
    assert_eq!(predicted.half_width_95, Some(actual));
    let avg = e
        .aggregates
        .iter()
        .find(|a| a.column == "age")
        .expect("avg");
    assert_eq!(
        avg.half_width_95, None,
        "AVG's interval depends on its noisy count"
    );

    // The same checks as a real query.
    let refused = veil::client::estimate(
        &veil::client::Target::new(&f.server.endpoint(), token),
        "SELECT * FROM pop.residents",
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code, Code::PermissionDenied);
    assert!(
        refused.message.contains("[PROJECT_PRIVATE_COLUMN]"),
        "{}",
        refused.message
    );
    assert_eq!(f.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_says_when_the_budget_would_refuse() {
    let f = Fixture::start().await;
    let sql = "SELECT district, COUNT(*) FROM hrss.social_insurance GROUP BY district";
    for _ in 0..4 {
        f.query("op-ndrc", sql).await.expect("admitted");
    }
    let e = veil::client::estimate(
        &veil::client::Target::new(&f.server.endpoint(), "demo-token-op-ndrc"),
        sql,
    )
    .await
    .expect("estimate");
    assert!(e.exceeds_budget && e.remaining.abs() < 1e-9, "{e:?}");
    assert_eq!(f.charges(), 4);
}
