//! Empirical privacy audits (THREATS.md): run a mechanism on two neighbouring
//! inputs, pick a distinguishing event on a training half of the outputs, and
//! bound the privacy loss from below on the other half with Clopper–Pearson
//! intervals. A lower bound above the claimed ε is a privacy bug.
//!
//! Compiled for unit tests and, behind `test-hooks`, for the integration
//! tests that audit whole queries.

/// Total false-alarm rate of one audit (two one-sided bounds at α/2 each).
pub const ALPHA: f64 = 1e-6;

/// x with `regularized_incomplete_beta(a, b, x) = target`, by bisection.
fn beta_quantile(a: f64, b: f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if statrs::function::beta::beta_reg(a, b, mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// One-sided Clopper–Pearson lower bound on a rate, at level `a`.
pub fn cp_lower(k: usize, n: usize, a: f64) -> f64 {
    if k == 0 {
        0.0
    } else {
        beta_quantile(k as f64, (n - k + 1) as f64, a)
    }
}

/// One-sided Clopper–Pearson upper bound on a rate, at level `a`.
pub fn cp_upper(k: usize, n: usize, a: f64) -> f64 {
    if k == n {
        1.0
    } else {
        beta_quantile((k + 1) as f64, (n - k) as f64, 1.0 - a)
    }
}

/// ε lower bound from outputs `d0` and `d1` (same length) on two neighbouring
/// inputs, over the events {X ≥ t} for `t` in `thresholds`, allowing `delta`.
/// Wrong with probability at most [`ALPHA`].
pub fn loss_lower_bound(
    d0: &[i64],
    d1: &[i64],
    delta: f64,
    thresholds: impl IntoIterator<Item = i64>,
) -> f64 {
    let n = d0.len().min(d1.len()) / 2;
    let (train0, test0) = (&d0[..n], &d0[n..2 * n]);
    let (train1, test1) = (&d1[..n], &d1[n..2 * n]);
    // The event whose training data give the best lower bound: enough mass
    // on both sides to be estimated tightly.
    let at_least = |xs: &[i64], t: i64| xs.iter().filter(|x| **x >= t).count();
    let bound =
        |p1_low: f64, p0_high: f64| ((p1_low - delta).max(f64::MIN_POSITIVE) / p0_high).ln();
    let t = thresholds
        .into_iter()
        .max_by(|a, b| {
            let score = |t: i64| {
                bound(
                    cp_lower(at_least(train1, t), n, ALPHA / 2.0),
                    cp_upper(at_least(train0, t), n, ALPHA / 2.0),
                )
            };
            score(*a).total_cmp(&score(*b))
        })
        .expect("a threshold");
    bound(
        cp_lower(at_least(test1, t), n, ALPHA / 2.0),
        cp_upper(at_least(test0, t), n, ALPHA / 2.0),
    )
}

/// Up to `n` thresholds spread over the observed outputs (their quantiles),
/// for outputs with too many distinct values to try each.
pub fn spread_thresholds(outputs: &[i64], n: usize) -> Vec<i64> {
    let mut sorted = outputs.to_vec();
    sorted.sort_unstable();
    let mut t: Vec<i64> = (1..n).map(|k| sorted[k * (sorted.len() - 1) / n]).collect();
    t.dedup();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_known_values() {
        // n = 100, k = 50, 97.5% one-sided: [0.3983, 0.6017].
        assert!((cp_lower(50, 100, 0.025) - 0.3983).abs() < 1e-3);
        assert!((cp_upper(50, 100, 0.025) - 0.6017).abs() < 1e-3);
    }
}
