//! Accepted queries over Flight SQL: every public key, finite values, interval
//! metadata, and the promised schema equal to the streamed one.

use std::collections::BTreeSet;

use veil::client::Client;
use veil_engine::meta;

use crate::support::*;

const DISTRICTS: usize = 16;

fn domain_of(f: &Fixture, dataset: &str, column: &str) -> BTreeSet<String> {
    f.engine.policy().datasets[dataset]
        .column(column)
        .and_then(|c| c.domain_values())
        .expect("domain")
        .iter()
        .map(|v| v.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_by_district_returns_every_public_key_with_intervals() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT district, COUNT(*) AS residents FROM pop.residents GROUP BY district",
        )
        .await
        .expect("accepted");
    assert_eq!(
        r.promised, r.schema,
        "FlightInfo schema must equal the streamed schema"
    );
    let keys: Vec<String> = column_strings(&r, "district");
    assert_eq!(keys.len(), DISTRICTS);
    assert_eq!(
        keys.iter().cloned().collect::<BTreeSet<_>>(),
        domain_of(&f, "pop.residents", "district")
    );
    assert!(column_f64(&r, "residents").iter().all(|v| v.is_finite()));

    let field = r.schema.field_with_name("residents").expect("field");
    let md = field.metadata();
    assert_eq!(
        md.get(meta::MECHANISM).map(String::as_str),
        Some("discrete_laplace")
    );
    let scale: f64 = md[meta::SCALE].parse().expect("scale");
    assert!(
        (scale - 2.0).abs() < 1e-3,
        "ε = 0.5 on a count with sensitivity 1 gives scale 2, got {scale}"
    );
    let ci: f64 = md[meta::CI95].parse().expect("ci");
    assert!(ci > 0.0 && ci < 20.0, "{ci}");
    let smd = r.schema.metadata();
    assert_eq!(smd[meta::COST], "0.500000");
    assert_eq!(smd[meta::REMAINING], "9.500000");
    assert_eq!(smd[meta::UNIT], "epsilon");
    assert_eq!(smd[meta::GRANT], "G-2026-031");
    assert_eq!(f.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sum_and_avg_over_two_public_keys_use_the_gaussian_mechanism() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-credit-01",
            "SELECT district, pay_month, SUM(wage_base) AS total, AVG(wage_base) AS mean \
             FROM hrss.social_insurance GROUP BY district, pay_month",
        )
        .await
        .expect("accepted");
    assert_eq!(r.promised, r.schema);
    assert_eq!(
        r.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        DISTRICTS * 24
    );
    let pairs: BTreeSet<(String, String)> = column_strings(&r, "district")
        .into_iter()
        .zip(column_strings(&r, "pay_month"))
        .collect();
    assert_eq!(
        pairs.len(),
        DISTRICTS * 24,
        "every (district, month) key exactly once"
    );
    assert!(column_f64(&r, "total").iter().all(|v| v.is_finite()));
    assert!(
        column_f64(&r, "mean")
            .iter()
            .all(|v| v.is_finite() && (0.0..=40_000.0).contains(v))
    );
    for name in ["total", "mean"] {
        let md = r
            .schema
            .field_with_name(name)
            .expect("field")
            .metadata()
            .clone();
        assert_eq!(
            md.get(meta::MECHANISM).map(String::as_str),
            Some("discrete_gaussian"),
            "{name}"
        );
        assert!(md[meta::CI95].parse::<f64>().expect("ci") > 0.0);
    }
    assert_eq!(r.schema.metadata()[meta::UNIT], "rho");
    assert_eq!(r.schema.metadata()[meta::COST], "0.050000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_groups_are_released_with_noise_and_order_by_is_post_processing() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT icd10_chapter, COUNT(*) AS visits FROM wjw.outpatient_visits \
             WHERE district = '延庆区' AND visit_month = '2024-01' \
             GROUP BY icd10_chapter ORDER BY icd10_chapter",
        )
        .await
        .expect("accepted");
    let chapters = column_strings(&r, "icd10_chapter");
    assert_eq!(
        chapters.len(),
        22,
        "all 22 ICD-10 chapters, the empty ones too"
    );
    let mut sorted = chapters.clone();
    sorted.sort();
    assert_eq!(chapters, sorted);
    assert!(column_f64(&r, "visits").iter().all(|v| v.is_finite()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_of_a_column_and_of_distinct_units() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-credit-01",
            "SELECT district, COUNT(wage_base) AS paid, COUNT(DISTINCT person_id) AS people, AVG(wage_base) AS mean \
             FROM hrss.social_insurance GROUP BY district",
        )
        .await
        .expect("accepted");
    assert_eq!(column_strings(&r, "district").len(), DISTRICTS);
    let md = |name: &str| {
        r.schema
            .field_with_name(name)
            .expect("field")
            .metadata()
            .clone()
    };
    assert_eq!(md("paid")[meta::AGGREGATE], "COUNT(wage_base)");
    assert_eq!(md("people")[meta::AGGREGATE], "COUNT(DISTINCT unit)");
    // A unit adds at most 12 rows to a group but itself only once: less noise.
    let scale = |name: &str| md(name)[meta::SCALE].parse::<f64>().expect("scale");
    assert!(
        (scale("paid") / scale("people") - 12.0).abs() < 1e-6,
        "{} {}",
        scale("paid"),
        scale("people")
    );
    // Four statistics share the cost: COUNT(wage_base), COUNT(DISTINCT), SUM and AVG's count.
    assert!(column_f64(&r, "people").iter().all(|v| v.is_finite()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_header_works_without_a_handshake() {
    let f = Fixture::start().await;
    let mut c = Client::connect(&f.server.endpoint())
        .await
        .expect("connect");
    c.with_bearer("demo-token-op-univ-07");
    let r = c
        .query("SELECT gender, AVG(age) AS age FROM pop.residents GROUP BY gender")
        .await
        .expect("accepted");
    assert_eq!(column_strings(&r, "gender").len(), 2);
    assert!(
        column_f64(&r, "age")
            .iter()
            .all(|v| (0.0..=110.0).contains(v))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_unauthenticated() {
    let f = Fixture::start().await;
    let mut c = Client::connect(&f.server.endpoint())
        .await
        .expect("connect");
    let e = c
        .login("op-univ-07", "demo-token-op-ndrc")
        .await
        .expect_err("wrong token");
    assert_eq!(e.code, tonic::Code::Unauthenticated);
    let mut c = Client::connect(&f.server.endpoint())
        .await
        .expect("connect");
    c.with_bearer("not-a-token");
    let e = c
        .query("SELECT COUNT(*) FROM pop.residents")
        .await
        .expect_err("refused");
    assert_eq!(e.code, tonic::Code::Unauthenticated);
    assert_eq!(f.charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_data_is_exact_and_free() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-ndrc",
            "SELECT district, COUNT(*) AS n FROM samr.enterprises GROUP BY district",
        )
        .await
        .expect("accepted");
    let exact = exact_counts(&f.data().join("samr/enterprises.parquet"), "district").await;
    let got: std::collections::HashMap<String, i64> = column_strings(&r, "district")
        .into_iter()
        .zip(column_f64(&r, "n").into_iter().map(|v| v as i64))
        .collect();
    assert_eq!(got, exact);
    assert_eq!(f.charges(), 0, "public data costs no budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grants_mandatory_row_filter_is_always_applied() {
    // A grant that only exposes the second half of 2025, with a large per-query
    // budget so that the noise (σ ≈ 7.6) is small next to the counts.
    let policy = example_policy()
        .replace(
            "row_filter = \"pay_month >= '2024-01'\"",
            "row_filter = \"pay_month >= '2025-07'\"",
        )
        .replace(
            "budget = 2.0\n  per_query_max = 0.05",
            "budget = 50.0\n  per_query_max = 5.0",
        );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let r = f
        .query(
            "op-credit-01",
            "SELECT pay_month, COUNT(*) AS n FROM hrss.social_insurance WHERE district <> '不存在区' GROUP BY pay_month",
        )
        .await
        .expect("accepted");
    for (month, n) in column_strings(&r, "pay_month")
        .into_iter()
        .zip(column_f64(&r, "n"))
    {
        if month.as_str() < "2025-07" {
            // Filtered out: noise around zero; |N(0, 7.6²)| > 60 has probability < 1e-14.
            assert!(n.abs() < 60.0, "{month}: {n}");
        } else {
            assert!(n > 100.0, "{month}: {n}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_columns_bracket_every_noisy_cell() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT district, COUNT(*) AS n, DP_INTERVAL_LOW(COUNT(*)) AS n_low, \
             DP_INTERVAL_HIGH(COUNT(*)) AS n_high, AVG(age) AS age, \
             DP_INTERVAL_LOW(AVG(age)), DP_INTERVAL_HIGH(AVG(age)), MEDIAN(age) AS m, \
             DP_INTERVAL_LOW(MEDIAN(age)) AS m_low \
             FROM pop.residents GROUP BY district HAVING DP_INTERVAL_HIGH(COUNT(*)) > 0 \
             ORDER BY district",
        )
        .await
        .expect("answered");
    let n = column_f64(&r, "n");
    let (low, high) = (column_f64(&r, "n_low"), column_f64(&r, "n_high"));
    let ci = field_number(&r, "n", meta::CI95);
    assert_eq!(n.len(), 16);
    for k in 0..n.len() {
        assert!((n[k] - low[k] - ci).abs() < 1e-9 && (high[k] - n[k] - ci).abs() < 1e-9);
    }
    // AVG's per-cell interval holds its value, inside the declared bounds;
    // unaliased calls keep their SQL names.
    let age = column_f64(&r, "age");
    let a_low = column_f64(&r, "dp_interval_low(avg(pop.residents.age))");
    let a_high = column_f64(&r, "dp_interval_high(avg(pop.residents.age))");
    for k in 0..age.len() {
        assert!(0.0 <= a_low[k] && a_low[k] <= age[k] && age[k] <= a_high[k] && a_high[k] <= 110.0);
    }
    // Quantiles have no interval in output units.
    assert!(column_strings(&r, "m_low").iter().all(|v| v == "NULL"));
    // Only around an aggregate of the query.
    for sql in [
        "SELECT district, DP_INTERVAL_LOW(district) FROM pop.residents GROUP BY district",
        "SELECT COUNT(*) FROM pop.residents WHERE DP_INTERVAL_LOW(age) > 3",
    ] {
        assert_refused(
            f.query("op-univ-07", sql).await,
            tonic::Code::InvalidArgument,
            &["DP_INTERVAL_LOW"],
        );
    }
}
