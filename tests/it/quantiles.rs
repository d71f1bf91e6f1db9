//! DP quantiles: MEDIAN, PERCENTILE_CONT … WITHIN GROUP and
//! APPROX_PERCENTILE_CONT through opendp's exponential mechanism, checked
//! against the exact ranks of the released values.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int32Type;
use tonic::Code;
use veil_engine::meta;

use crate::support::*;

/// Every resident's age, read straight from the file (test oracle).
fn ages(f: &Fixture) -> Vec<i32> {
    let mut out = Vec::new();
    let file = std::fs::File::open(f.data().join("pop/residents.parquet")).expect("open");
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
    for batch in reader {
        let batch = batch.expect("batch");
        let col = batch.column_by_name("age").expect("age");
        out.extend(col.as_primitive::<Int32Type>().values().iter().copied());
    }
    out
}

/// The fraction of ages below `v`, and of ages at most `v`.
fn rank_fraction(ages: &[i32], v: f64) -> (f64, f64) {
    let n = ages.len() as f64;
    let below = ages.iter().filter(|a| f64::from(**a) < v).count() as f64;
    let at_most = ages.iter().filter(|a| f64::from(**a) <= v).count() as f64;
    (below / n, at_most / n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantiles_land_near_their_exact_rank() {
    let f = Fixture::start().await;
    let ages = ages(&f);
    assert!(ages.len() >= 4000, "{} residents", ages.len());
    // Each query spends ε = 0.5 on one quantile over 111 candidates (ages 0
    // to 110). A released value whose exact rank is off by more than 10% of
    // 4,000 residents needs a candidate 400 rows worse to beat the best: at
    // most 111·e^(−0.5·400/4) ≈ 2e-20 per query, this test's false-alarm rate.
    for (sql, alpha) in [
        ("SELECT MEDIAN(age) AS q FROM pop.residents", 0.5),
        (
            "SELECT PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY age) AS q FROM pop.residents",
            0.9,
        ),
        (
            "SELECT PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY age DESC) AS q FROM pop.residents",
            0.1,
        ),
        (
            "SELECT APPROX_PERCENTILE_CONT(age, 0.25) AS q FROM pop.residents",
            0.25,
        ),
    ] {
        let r = f.query("op-univ-07", sql).await.expect(sql);
        let v = column_f64(&r, "q")[0];
        assert!((0.0..=110.0).contains(&v) && v.fract() == 0.0, "{sql}: {v}");
        let (below, at_most) = rank_fraction(&ages, v);
        assert!(
            below <= alpha + 0.1 && at_most >= alpha - 0.1,
            "{sql}: {v} has rank [{below}, {at_most}], wanted {alpha}"
        );
        let field = r.schema.field_with_name("q").expect("q");
        assert_eq!(
            field.metadata().get(meta::MECHANISM).map(String::as_str),
            Some("exponential")
        );
        assert!(
            !field.metadata().contains_key(meta::CI95),
            "no closed-form interval"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantiles_share_a_query_with_counts_per_public_key() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT district, COUNT(*) AS n, MEDIAN(age) AS median_age FROM pop.residents GROUP BY district ORDER BY district",
        )
        .await
        .expect("answered");
    assert_eq!(column_strings(&r, "district").len(), 16);
    for v in column_f64(&r, "median_age") {
        assert!((0.0..=110.0).contains(&v), "{v}");
    }
    // Two statistics share the query's one charge.
    let cost: f64 = r.schema.metadata()[meta::COST].parse().expect("cost");
    assert!((cost - 0.5).abs() < 1e-9, "{cost}");
    assert_eq!(f.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_and_max_need_the_grant_to_list_them() {
    let f = Fixture::start().await;
    assert_refused(
        f.query("op-univ-07", "SELECT MAX(age) FROM pop.residents")
            .await,
        Code::PermissionDenied,
        &["[AGGREGATE_NOT_ALLOWED]", "PERCENTILE_CONT", "MAX"],
    );
    // Listed, MAX is the DP quantile at 1: some age near the top.
    let policy = example_policy().replace(
        "\"APPROX_PERCENTILE_CONT\"]",
        "\"APPROX_PERCENTILE_CONT\", \"MAX\"]",
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let r = f
        .query("op-univ-07", "SELECT MAX(age) AS oldest FROM pop.residents")
        .await
        .expect("answered");
    let v = column_f64(&r, "oldest")[0];
    let (_, at_most) = rank_fraction(&ages(&f), v);
    assert!(at_most >= 0.9, "{v} is not near the top: {at_most}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variance_and_standard_deviation_track_the_exact_ones() {
    // ε = 5 per query, split over the sum, the sum of squares and the count.
    let policy = example_policy().replacen(
        "  budget = 10.0\n  per_query_max = 0.5",
        "  budget = 10.0\n  per_query_max = 5.0",
        1,
    );
    assert!(
        policy.contains("per_query_max = 5.0"),
        "the example policy changed"
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let ages: Vec<f64> = ages(&f).into_iter().map(f64::from).collect();
    let n = ages.len() as f64;
    let mean = ages.iter().sum::<f64>() / n;
    let var = ages.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
    let r = f
        .query(
            "op-univ-07",
            "SELECT VAR_POP(age) AS v, STDDEV_POP(age) AS s FROM pop.residents",
        )
        .await
        .expect("answered");
    let (v, s) = (column_f64(&r, "v")[0], column_f64(&r, "s")[0]);
    // Four statistics share ε = 5 (sum, squares, count, clamped values).
    // Each one's noise stays within 14 scales except with probability
    // e^-14 ≈ 8e-7 (false-alarm rate below 4e-6). With scales 88 (sum),
    // 9,680 (squares) and 0.8 (count) over 4,000 ages near 40, the variance
    // moves by at most about 74 and the deviation by 1.8.
    assert!((v - var).abs() <= 80.0, "VAR_POP {v} vs exact {var}");
    assert!(
        (s - var.sqrt()).abs() <= 2.0,
        "STDDEV_POP {s} vs exact {}",
        var.sqrt()
    );
    assert!(
        (s * s - v).abs() < 1e-6 * v.max(1.0),
        "one release, two views"
    );
    // Every age lies within [0, 110]: the noisy count of clamped ages is 0
    // plus noise of scale max_groups · max_rows / 1.25 = 0.8, floored at 0.
    let clamped = field_number(&r, "v", meta::CLAMPED) as u64;
    assert!(clamped <= 14, "{clamped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_of_a_bucketed_column_are_public_keys() {
    let f = Fixture::start().await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT FLOOR(age / 10) * 10 AS band, COUNT(*) AS n FROM pop.residents \
             GROUP BY FLOOR(age / 10) * 10 ORDER BY band",
        )
        .await
        .expect("answered");
    // Every ten-year band of [0, 110] is released, empty or not.
    let bands = column_f64(&r, "band");
    assert_eq!(
        bands,
        (0..=11).map(|k| f64::from(k * 10)).collect::<Vec<_>>()
    );
    let ages = ages(&f);
    let ci = field_number(&r, "n", meta::CI95);
    for (band, n) in bands.iter().zip(column_f64(&r, "n")) {
        let exact = ages
            .iter()
            .filter(|a| i64::from(**a / 10 * 10) == *band as i64)
            .count() as f64;
        // The 95% half-width of discrete Laplace noise is about 3 scales, so
        // 7 half-widths are about 21 scales: exceeded with probability near
        // e^-21 < 1e-9 per cell, 1.2e-8 for the 12 bands.
        assert!((n - exact).abs() <= 7.0 * ci, "band {band}: {n} vs {exact}");
    }
    // Buckets narrower than the policy's five years, or not of this form, are refused.
    for sql in [
        "SELECT FLOOR(age / 2) * 2, COUNT(*) FROM pop.residents GROUP BY FLOOR(age / 2) * 2",
        "SELECT age % 5, COUNT(*) FROM pop.residents GROUP BY age % 5",
    ] {
        assert!(f.query("op-univ-07", sql).await.is_err(), "{sql}");
    }
}
