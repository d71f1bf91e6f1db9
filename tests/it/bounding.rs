//! Contribution bounding, checked exactly against an independent oracle on
//! the un-noised bounded aggregates (test hook, no charge).

use datafusion::prelude::*;

use crate::support::*;

#[allow(clippy::disallowed_methods)] // an independent oracle, outside veil
async fn oracle(data: &std::path::Path, sql: &str) -> i64 {
    let ctx = SessionContext::new();
    ctx.register_parquet(
        "si",
        data.join("hrss/social_insurance.parquet")
            .to_str()
            .expect("utf8"),
        ParquetReadOptions::default(),
    )
    .await
    .expect("register");
    let b = ctx
        .sql(sql)
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    datafusion::arrow::compute::cast(
        b[0].column(0),
        &datafusion::arrow::datatypes::DataType::Int64,
    )
    .expect("cast")
    .as_any()
    .downcast_ref::<datafusion::arrow::array::Int64Array>()
    .expect("int")
    .value(0)
}

async fn bounded_total(f: &Fixture, sql: &str) -> (usize, i64) {
    let now = chrono::Utc::now().fixed_offset();
    let exact = f
        .engine
        .exact_bounded_aggregates_for_tests("op-ndrc", sql, now, None)
        .await
        .expect("certified and executed")
        .1;
    (
        exact.groups.len(),
        exact.groups.iter().map(|g| g.counts[0]).sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_counts_in_at_most_max_groups_groups() {
    // One row per person and month; max_groups = 4 binds, max_rows = 12 does not.
    let f = Fixture::start().await;
    let (groups, total) = bounded_total(
        &f,
        "SELECT pay_month, COUNT(*) FROM hrss.social_insurance GROUP BY pay_month",
    )
    .await;
    let expected = oracle(
        &f.data(),
        "SELECT SUM(LEAST(n, 4)) FROM (SELECT person_id, COUNT(DISTINCT pay_month) AS n FROM si GROUP BY person_id)",
    )
    .await;
    assert_eq!(groups, 24);
    assert_eq!(total, expected);
    let unbounded = oracle(&f.data(), "SELECT COUNT(*) FROM si").await;
    assert!(total < unbounded, "bounding must bind on this data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_counts_at_most_max_rows_rows_per_group() {
    // Each person has one employer, so one district: max_groups does not bind,
    // max_rows = 12 does (up to 24 months per person).
    let f = Fixture::start().await;
    let (_, total) = bounded_total(
        &f,
        "SELECT district, COUNT(*) FROM hrss.social_insurance GROUP BY district",
    )
    .await;
    let expected = oracle(
        &f.data(),
        "SELECT SUM(LEAST(n, 12)) FROM (SELECT person_id, district, COUNT(*) AS n FROM si GROUP BY person_id, district)",
    )
    .await;
    assert_eq!(total, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kept_groups_change_from_query_to_query() {
    // Uniform choice under a fresh key: two runs keep different months for
    // people with more than four, so per-month counts differ (the totals agree).
    let f = Fixture::start().await;
    let now = chrono::Utc::now().fixed_offset();
    let sql = "SELECT pay_month, COUNT(*) FROM hrss.social_insurance GROUP BY pay_month";
    let a = f
        .engine
        .exact_bounded_aggregates_for_tests("op-ndrc", sql, now, None)
        .await
        .expect("a")
        .1;
    let b = f
        .engine
        .exact_bounded_aggregates_for_tests("op-ndrc", sql, now, None)
        .await
        .expect("b")
        .1;
    let counts = |x: &veil_sandbox::BoundedAggregates| {
        let mut v: Vec<_> = x
            .groups
            .iter()
            .map(|g| (g.key.clone(), g.counts[0]))
            .collect();
        v.sort();
        v
    };
    assert_ne!(counts(&a), counts(&b));
    assert_eq!(
        a.groups.iter().map(|g| g.counts[0]).sum::<i64>(),
        b.groups.iter().map(|g| g.counts[0]).sum::<i64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_units_are_counted_once_per_group() {
    // COUNT(DISTINCT unit) needs no grant on the unit column (POLICY.md), and
    // each person has one employer district, so per-district distinct counts
    // add up to the number of people.
    let f = Fixture::start().await;
    let (_, total) = bounded_total(
        &f,
        "SELECT district, COUNT(DISTINCT person_id) FROM hrss.social_insurance GROUP BY district",
    )
    .await;
    assert_eq!(
        total,
        oracle(&f.data(), "SELECT COUNT(DISTINCT person_id) FROM si").await
    );
}
