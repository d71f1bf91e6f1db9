//! Statistical test of released counts, end to end over Flight SQL.
//!
//! Repeated noisy counts minus the exact counts (computed from the Parquet
//! file by an independent DataFusion session) must have the mean and variance
//! of the discrete Laplace distribution the metadata announces. Each of the
//! two checks uses z = 5.026, a two-sided false-alarm rate of 5e-7 under the
//! central limit theorem (n = 2,400 samples): at most 1e-6 for the test.

use crate::support::*;

/// Two-sided normal quantile for α = 5e-7 per check (two checks: ≤ 1e-6 in all).
const Z: f64 = 5.026_2;

/// Variance and fourth central moment of the discrete Laplace distribution
/// with scale `b` (P(x) ∝ e^{-|x|/b}), by direct summation.
fn discrete_laplace_moments(b: f64) -> (f64, f64) {
    let p = (-1.0 / b).exp();
    let norm = (1.0 - p) / (1.0 + p);
    let (mut m2, mut m4) = (0.0, 0.0);
    for x in 1..10_000 {
        let w = 2.0 * norm * p.powi(x);
        let x = x as f64;
        m2 += w * x * x;
        m4 += w * x.powi(4);
    }
    (m2, m4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_noisy_counts_match_the_mechanism() {
    let policy = example_policy().replace(
        "budget = 10.0\n  per_query_max = 0.5",
        "budget = 1000.0\n  per_query_max = 0.5",
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let exact = exact_counts(&f.data().join("pop/residents.parquet"), "district").await;
    let mut client = f.client("op-univ-07").await;
    let mut errors = Vec::new();
    let mut scale = 0.0;
    for _ in 0..150 {
        let r = client
            .query("SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district")
            .await
            .expect("accepted");
        scale = r.schema.field_with_name("n").expect("n").metadata()[veil_engine::meta::SCALE]
            .parse::<f64>()
            .expect("scale");
        for (d, n) in column_strings(&r, "district")
            .into_iter()
            .zip(column_f64(&r, "n"))
        {
            errors.push(n - *exact.get(&d).unwrap_or(&0) as f64);
        }
    }
    let n = errors.len() as f64;
    let (var, m4) = discrete_laplace_moments(scale);
    let mean = errors.iter().sum::<f64>() / n;
    let sample_var = errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0);
    assert!(
        errors.iter().all(|e| e.fract() == 0.0),
        "discrete noise keeps counts integral"
    );
    assert!(
        mean.abs() <= Z * (var / n).sqrt(),
        "mean {mean} vs 0 (var {var})"
    );
    assert!(
        (sample_var - var).abs() <= Z * ((m4 - var * var) / n).sqrt(),
        "variance {sample_var} vs {var}"
    );
}
