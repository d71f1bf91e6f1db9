//! Accounting: what a query costs and how much noise each statistic gets.
//!
//! Everything here is a function of the policy and the query's shape only,
//! never of the data. Budgets are kept in exact integer micro-units; the
//! per-statistic shares are exact rationals, and opendp's own privacy maps
//! check that the chosen noise scales spend no more than the charge.

use dashu::rational::RBig;
use veil_policy::{Accounting, DpSettings};

use crate::error::{EngineError, Result};

/// Budget micro-units per unit of ε or ρ.
pub const MICRO: u64 = 1_000_000;

/// Noise distribution of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Discrete Laplace (pure ε-DP, L1 sensitivity).
    DiscreteLaplace,
    /// Discrete Gaussian (ρ-zCDP, L2 sensitivity).
    DiscreteGaussian,
}

impl Mechanism {
    /// Name used in response metadata.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::DiscreteLaplace => "discrete_laplace",
            Mechanism::DiscreteGaussian => "discrete_gaussian",
        }
    }

    /// The budget unit this mechanism is accounted in.
    pub fn unit(self) -> &'static str {
        match self {
            Mechanism::DiscreteLaplace => "epsilon",
            Mechanism::DiscreteGaussian => "rho",
        }
    }

    /// The mechanism a grant's accounting calls for.
    pub fn for_grant(dp: &DpSettings) -> Mechanism {
        match dp.accounting {
            Accounting::Epsilon { .. } => Mechanism::DiscreteLaplace,
            Accounting::Rho { .. } => Mechanism::DiscreteGaussian,
        }
    }
}

/// An amount of privacy budget in exact micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Budget(u64);

impl Budget {
    /// Converts a policy number, rounding up (charges) or down (totals).
    fn from_f64(x: f64, round_up: bool) -> Result<Budget> {
        if !(x.is_finite() && x > 0.0 && x.is_normal()) {
            return Err(EngineError::Internal(
                "budget parameter is not a positive finite number".into(),
            ));
        }
        let scaled = x * MICRO as f64;
        if scaled >= u64::MAX as f64 / 2.0 {
            return Err(EngineError::Internal("budget parameter overflows".into()));
        }
        // Policy decimals such as 0.05 are not exact in binary: snap values within
        // a relative 1e-9 of an integer to it, otherwise round in the safe direction.
        let nearest = scaled.round();
        let micro = if (scaled - nearest).abs() <= nearest * 1e-9 {
            nearest
        } else if round_up {
            scaled.ceil()
        } else {
            scaled.floor()
        };
        Ok(Budget(micro.max(1.0) as u64))
    }

    /// A per-query charge: rounded up.
    pub fn charge(x: f64) -> Result<Budget> {
        Budget::from_f64(x, true)
    }

    /// A total budget: rounded down.
    pub fn total(x: f64) -> Result<Budget> {
        Budget::from_f64(x, false)
    }

    /// From micro-units.
    pub fn from_micro(micro: u64) -> Budget {
        Budget(micro)
    }

    /// In micro-units.
    pub fn micro(self) -> u64 {
        self.0
    }

    /// As a float, for display only.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / MICRO as f64
    }

    /// Exactly, as a rational.
    pub fn as_rational(self) -> RBig {
        RBig::from_parts(self.0.into(), MICRO.into())
    }
}

/// One released statistic: a vector over all group keys with one noise scale.
#[derive(Debug, Clone)]
pub struct NoisePlan {
    /// Mechanism.
    pub mechanism: Mechanism,
    /// Sensitivity of the whole vector (L1 or L2, in fixed-point units).
    pub sensitivity: RBig,
    /// Noise scale in fixed-point units.
    pub scale: RBig,
    /// What opendp's privacy map says this statistic spends.
    pub spent: f64,
}

impl NoisePlan {
    /// The noise scale as a float, for display.
    pub fn scale_f64(&self) -> f64 {
        self.scale.to_f64().value()
    }

    /// The noise for one cell that totals a unit's contributions to up to
    /// `max_groups` cells of this statistic (the `__other__` row).
    ///
    /// Under an L1 calibration (discrete Laplace) merging cells cannot raise
    /// a unit's contribution, so the plan is unchanged. Under L2 (discrete
    /// Gaussian, zCDP) it can: a unit adding `c_g` to `k ≤ max_groups`
    /// merged cells adds `(Σ c_g)² ≤ k · Σ c_g²` to the squared norm. Noise
    /// of scale `σ·√max_groups` on the merged cell keeps that term at most
    /// `Σ c_g² / (2σ²)`, the cells' own share, so the vector's ρ is still
    /// bounded by the calibration's `Δ₂² / (2σ²)`. `√max_groups` is rounded
    /// up to thousandths.
    pub fn for_merged_cell(&self, max_groups: u32) -> NoisePlan {
        match self.mechanism {
            Mechanism::DiscreteLaplace => self.clone(),
            Mechanism::DiscreteGaussian => {
                // The smallest p with p² ≥ 10⁶ · max_groups: p / 1000 ≥ √max_groups.
                let target = 1_000_000u64 * u64::from(max_groups.max(1));
                let mut p = (target as f64).sqrt() as u64;
                while p * p < target {
                    p += 1;
                }
                while p > 0 && (p - 1) * (p - 1) >= target {
                    p -= 1;
                }
                NoisePlan {
                    scale: self.scale.clone() * RBig::from_parts(p.into(), 1000u32.into()),
                    ..self.clone()
                }
            }
        }
    }

    /// Half-width of the two-sided `1 - alpha` interval of the noise.
    ///
    /// opendp computes it exactly; its discrete-Gaussian routine sums the
    /// density term by term, so above [`EXACT_GAUSSIAN_ACCURACY_MAX_SCALE`] the
    /// continuous Gaussian quantile (indistinguishable at that scale) is used.
    pub fn half_width(&self, alpha: f64) -> Result<f64> {
        let scale = self.scale_f64();
        let r = match self.mechanism {
            Mechanism::DiscreteLaplace => {
                opendp::accuracy::discrete_laplacian_scale_to_accuracy(scale, alpha)
            }
            Mechanism::DiscreteGaussian if scale <= EXACT_GAUSSIAN_ACCURACY_MAX_SCALE => {
                opendp::accuracy::discrete_gaussian_scale_to_accuracy(scale, alpha)
            }
            Mechanism::DiscreteGaussian => {
                return Ok((scale * normal_quantile(1.0 - alpha / 2.0)).ceil());
            }
        };
        r.map_err(|e| EngineError::Internal(format!("accuracy: {e:?}")))
    }
}

/// Largest discrete-Gaussian scale whose accuracy opendp computes term by term.
pub const EXACT_GAUSSIAN_ACCURACY_MAX_SCALE: f64 = 2_000.0;

/// The standard normal quantile (Acklam's rational approximation, relative
/// error below 1.2e-9), for accuracy reporting only.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Sensitivity of one statistic's vector when a unit touches at most
/// `max_groups` groups and changes each group's value by at most `per_group`.
pub fn vector_sensitivity(mechanism: Mechanism, max_groups: u32, per_group: &RBig) -> Result<RBig> {
    match mechanism {
        Mechanism::DiscreteLaplace => Ok(RBig::from(max_groups) * per_group),
        Mechanism::DiscreteGaussian => {
            // √max_groups · per_group, rounded up to a rational and checked exactly.
            let exact_sq = RBig::from(max_groups) * per_group * per_group;
            let approx = (max_groups as f64).sqrt() * per_group.to_f64().value();
            let mut up = RBig::try_from(approx * (1.0 + 1e-12))
                .map_err(|_| EngineError::Internal("sensitivity is not finite".into()))?;
            while &up * &up < exact_sq {
                up *= RBig::try_from(1.0 + 1e-9)
                    .map_err(|_| EngineError::Internal("rational".into()))?;
            }
            Ok(up)
        }
    }
}

/// Chooses the noise scale that spends at most `share` on a statistic with the
/// given sensitivity, and confirms it with opendp's privacy map.
pub fn plan_noise(mechanism: Mechanism, sensitivity: RBig, share: &RBig) -> Result<NoisePlan> {
    // Aim a hair below the share so opendp's upward-rounded map stays within it.
    let margin = RBig::from_parts(((1u64 << 20) - 1).into(), (1u64 << 20).into());
    let target = share * &margin;
    let scale = match mechanism {
        Mechanism::DiscreteLaplace => &sensitivity / &target,
        Mechanism::DiscreteGaussian => {
            // ρ = (Δ/σ)²/2  ⇒  σ = Δ/√(2ρ); irrational, so round σ up.
            let sigma = sensitivity.to_f64().value() / (2.0 * target.to_f64().value()).sqrt();
            RBig::try_from(sigma * (1.0 + 1e-9))
                .map_err(|_| EngineError::Internal("noise scale is not finite".into()))?
        }
    };
    let spent = crate::mechanisms::NoiseMeasurement::new(mechanism, &scale)?.spend(&sensitivity)?;
    let spent_exact = RBig::try_from(spent)
        .map_err(|_| EngineError::Internal("privacy map returned a non-finite loss".into()))?;
    if &spent_exact > share {
        return Err(EngineError::Internal(
            "noise scale spends more than its share of the charge".into(),
        ));
    }
    Ok(NoisePlan {
        mechanism,
        sensitivity,
        scale,
        spent,
    })
}

/// A charge in unit `from` as a draw on a budget kept in unit `to` (at δ
/// `delta` for an ε budget), never below what the release spends in `to`:
///
/// - the same unit: unchanged;
/// - ε → ρ: pure ε-DP implies (ε²/2)-zCDP (Bun & Steinke 2016, Prop. 1.4),
///   so ρ = ε²/2, computed exactly in micro-units and rounded up;
/// - ρ → ε: ρ-zCDP implies (ρ + 2√(ρ·ln(1/δ)), δ)-DP for every δ > 0
///   (Prop. 1.3), so ε = ρ + 2√(ρ·ln(1/δ)), rounded up with one micro-unit
///   to spare for floating-point error.
///
/// The δ of an approximate-DP release (partition selection) is not part of
/// the conversion: the ledger keeps ε and ρ, and the grant's δ bounds each
/// query's δ.
pub fn convert(cost: Budget, from: &str, to: &str, delta: f64) -> Result<Budget> {
    match (from, to) {
        (a, b) if a == b => Ok(cost),
        ("epsilon", "rho") => {
            let micro = u128::from(cost.micro());
            let rho = (micro * micro).div_ceil(2 * u128::from(MICRO));
            u64::try_from(rho)
                .map(Budget::from_micro)
                .map_err(|_| EngineError::Internal("converted charge overflows".into()))
        }
        ("rho", "epsilon") if delta > 0.0 && delta < 1.0 => {
            let rho = cost.as_f64();
            let epsilon = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
            let micro = (epsilon * MICRO as f64).ceil() + 1.0;
            if !(micro.is_finite() && micro < u64::MAX as f64 / 2.0) {
                return Err(EngineError::Internal("converted charge overflows".into()));
            }
            Ok(Budget::from_micro(micro as u64))
        }
        _ => Err(EngineError::Unavailable(format!(
            "a charge in {from} cannot be drawn on a budget in {to} without a δ; the security officer must declare one"
        ))),
    }
}

pub(crate) fn opendp_err(e: opendp::error::Error) -> EngineError {
    EngineError::Internal(format!("opendp: {:?}", e.variant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_the_documented_rule() {
        // ε = 0.5 → ρ = 0.125 exactly; ε = 1e-6 → ρ = 5e-13, rounded up to 1e-6.
        let c = |x: u64, from, to, d| convert(Budget::from_micro(x), from, to, d).expect("ok");
        assert_eq!(c(500_000, "epsilon", "rho", 0.0).micro(), 125_000);
        assert_eq!(c(1, "epsilon", "rho", 0.0).micro(), 1);
        // ρ = 0.1 at δ = 1e-6: 0.1 + 2√(0.1·ln 1e6) = 2.4506…
        let eps = c(100_000, "rho", "epsilon", 1e-6).as_f64();
        assert!((2.4506..2.4508).contains(&eps), "{eps}");
        assert!(convert(Budget::from_micro(1), "rho", "epsilon", 0.0).is_err());
    }

    #[test]
    fn charges_round_up_and_totals_round_down() {
        assert_eq!(Budget::charge(0.05).expect("ok").micro(), 50_000);
        assert_eq!(Budget::charge(1e-7).expect("ok").micro(), 1);
        assert_eq!(Budget::charge(0.3333333333).expect("ok").micro(), 333_334);
        assert_eq!(Budget::total(0.3333333333).expect("ok").micro(), 333_333);
    }

    #[test]
    fn bad_budget_parameters_are_rejected() {
        for x in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            1e-310,
        ] {
            assert!(Budget::charge(x).is_err(), "{x}");
        }
    }

    #[test]
    fn laplace_scale_spends_at_most_its_share() {
        let share = Budget::charge(0.25).expect("ok").as_rational();
        let plan = plan_noise(Mechanism::DiscreteLaplace, RBig::from(48u32), &share).expect("plan");
        assert!(plan.spent <= 0.25 && plan.spent > 0.2499, "{}", plan.spent);
        assert!((plan.scale_f64() - 192.0).abs() < 0.001);
    }

    #[test]
    fn gaussian_scale_spends_at_most_its_share() {
        let share = Budget::charge(0.05).expect("ok").as_rational();
        let sens =
            vector_sensitivity(Mechanism::DiscreteGaussian, 4, &RBig::from(12u32)).expect("ok");
        assert!(sens >= RBig::from(24u32));
        let plan = plan_noise(Mechanism::DiscreteGaussian, sens, &share).expect("plan");
        assert!(plan.spent <= 0.05 && plan.spent > 0.0499, "{}", plan.spent);
        // σ = 24 / √0.1 ≈ 75.89
        assert!(
            (plan.scale_f64() - 75.894).abs() < 0.01,
            "{}",
            plan.scale_f64()
        );
    }

    #[test]
    fn normal_quantiles_are_accurate() {
        assert!((normal_quantile(0.975) - 1.959_963_985).abs() < 1e-8);
        assert!((normal_quantile(0.9875) - 2.241_402_728).abs() < 1e-8);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
    }

    #[test]
    fn large_gaussian_scales_report_the_normal_quantile() {
        let share = Budget::charge(0.01).expect("ok").as_rational();
        let plan = plan_noise(
            Mechanism::DiscreteGaussian,
            RBig::from(96_000_000u64),
            &share,
        )
        .expect("plan");
        let hw = plan.half_width(0.05).expect("ok");
        assert!((hw / plan.scale_f64() - 1.96).abs() < 0.01, "{hw}");
        // Continuity with opendp's exact computation at the switch-over.
        let near = NoisePlan {
            scale: RBig::try_from(EXACT_GAUSSIAN_ACCURACY_MAX_SCALE).expect("rational"),
            ..plan.clone()
        };
        let exact = near.half_width(0.05).expect("ok");
        assert!(
            (exact / EXACT_GAUSSIAN_ACCURACY_MAX_SCALE - 1.96).abs() < 0.01,
            "{exact}"
        );
    }

    #[test]
    fn a_merged_cell_under_zcdp_gets_noise_scaled_by_the_root_of_max_groups() {
        let plan = |mechanism| NoisePlan {
            mechanism,
            sensitivity: RBig::from(2u8),
            scale: RBig::from(10u8),
            spent: 0.5,
        };
        let laplace = plan(Mechanism::DiscreteLaplace).for_merged_cell(4);
        assert_eq!(laplace.scale, RBig::from(10u8));
        for (groups, expected) in [(1u32, 10.0), (4, 20.0), (3, 17.330), (10, 31.630)] {
            let merged = plan(Mechanism::DiscreteGaussian).for_merged_cell(groups);
            let got = merged.scale.to_f64().value();
            assert!(got >= 10.0 * f64::from(groups).sqrt(), "{groups}: {got}");
            assert!((got - expected).abs() < 1e-9, "{groups}: {got}");
        }
    }

    #[test]
    fn half_widths_match_the_distribution() {
        let share = Budget::charge(1.0).expect("ok").as_rational();
        let plan = plan_noise(Mechanism::DiscreteLaplace, RBig::from(1u32), &share).expect("plan");
        // Discrete Laplace with scale 1: P(|X| >= k) = 2e^{-k}/(1+e^{-1}) ≤ 0.05 from k = 4.
        let hw = plan.half_width(0.05).expect("ok");
        assert!((3.0..=4.0).contains(&hw), "{hw}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the policy numbers, the chosen noise never spends more
        /// than the statistic's share of the charge (checked by opendp's map).
        #[test]
        fn noise_never_overspends(
            per_query in 1e-4f64..10.0,
            statistics in 1u64..6,
            max_groups in 1u32..50,
            per_group in 1u64..10_000_000,
            gaussian in any::<bool>(),
        ) {
            let mechanism = if gaussian { Mechanism::DiscreteGaussian } else { Mechanism::DiscreteLaplace };
            let share = Budget::charge(per_query).expect("valid").as_rational() / RBig::from(statistics);
            let sensitivity = vector_sensitivity(mechanism, max_groups, &RBig::from(per_group)).expect("sens");
            let plan = plan_noise(mechanism, sensitivity, &share).expect("plan");
            prop_assert!(RBig::try_from(plan.spent).expect("finite") <= share);
            prop_assert!(plan.half_width(0.05).expect("accuracy") > 0.0);
        }

        /// Converted charges are never below the tight conversion, keep
        /// their order, and a unit converts to itself unchanged.
        #[test]
        fn conversions_are_conservative_and_monotone(a in 1u64..5_000_000, b in 1u64..5_000_000, delta in 1e-12f64..0.5) {
            let (a, b) = (Budget::from_micro(a.min(b)), Budget::from_micro(a.max(b)));
            let to_rho = |x: Budget| convert(x, "epsilon", "rho", 0.0).expect("ε→ρ");
            let to_eps = |x: Budget| convert(x, "rho", "epsilon", delta).expect("ρ→ε");
            // ρ ≥ ε²/2, checked exactly in micro-units (as floats, a charge
            // equal to the bound could compare one ulp below it).
            let eps = u128::from(a.micro());
            prop_assert!(u128::from(to_rho(a).micro()) * 2 * u128::from(MICRO) >= eps * eps);
            let rho = a.as_f64();
            prop_assert!(to_eps(a).as_f64() >= rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt());
            prop_assert!(to_rho(a) <= to_rho(b) && to_eps(a) <= to_eps(b));
            prop_assert_eq!(convert(a, "rho", "rho", 0.0).expect("same"), a);
        }

        /// A charge is never below the policy's per-query cost, and a total
        /// never above the policy's budget (beyond float representation).
        #[test]
        fn rounding_is_conservative(x in 1e-6f64..1e6) {
            prop_assert!(Budget::charge(x).expect("ok").as_f64() >= x * (1.0 - 1e-9));
            prop_assert!(Budget::total(x).expect("ok").as_f64() <= x * (1.0 + 1e-9));
        }
    }
}
