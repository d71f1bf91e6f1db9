//! Mechanisms: the only place veil draws randomness.
//!
//! Noise comes from opendp's exact samplers (discrete Laplace and discrete
//! Gaussian, OpenSSL's CSPRNG); bounding keys come from opendp's `fill_bytes`.
//! A [`Release`] (noisy aggregates plus their accuracy) can only be built here.

use std::collections::HashMap;
use std::sync::Arc;

use dashu::integer::IBig;
use dashu::rational::RBig;
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};
use veil_policy::DomainValue;
use veil_sandbox::{BoundedAggregates, GroupAggregate, KeyValue};

use opendp::core::{Measure, Measurement, Metric};
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    MakeNoise, MakeNoiseThreshold, TopKMeasure, ZExpFamily, make_private_quantile,
};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{
    AbsoluteDistance, L1Distance, L01InfDistance, L2Distance, L02InfDistance, SymmetricDistance,
};

use crate::accounting::{Mechanism, NoisePlan, opendp_err};
use crate::dp_interval;
use crate::error::{EngineError, Result};
use crate::quantile_grid::QuantileGrid;
use crate::rewrite::{CountKind, KeySet, ReleaseSpec, ReleasedAggregate};

/// Per-query secret keys for contribution bounding.
#[derive(Clone, Copy)]
pub struct BoundingKeys {
    /// Key ranking a unit's groups.
    pub groups: [u8; 16],
    /// Key ranking a unit's rows within a group.
    pub rows: [u8; 16],
}

impl std::fmt::Debug for BoundingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundingKeys(<redacted>)")
    }
}

impl BoundingKeys {
    /// Fresh keys from opendp's CSPRNG.
    pub fn fresh() -> Result<BoundingKeys> {
        let mut bytes = [0u8; 32];
        opendp::traits::samplers::fill_bytes(&mut bytes).map_err(opendp_err)?;
        let mut groups = [0u8; 16];
        let mut rows = [0u8; 16];
        groups.copy_from_slice(&bytes[..16]);
        rows.copy_from_slice(&bytes[16..]);
        Ok(BoundingKeys { groups, rows })
    }
}

/// Accuracy and provenance of one released aggregate column.
#[derive(Debug, Clone)]
pub struct Accuracy {
    /// Mechanism name.
    pub mechanism: &'static str,
    /// Noise scale in output units (for AVG: of the sum).
    pub scale: f64,
    /// Half-width of the 95% interval, valid for every cell of the column;
    /// `None` where the mechanism has no interval in output units (quantiles).
    pub half_width_95: Option<f64>,
    /// What was computed, e.g. `AVG(wage_base)`.
    pub aggregate: String,
    /// For aggregates of a bounded column: a noisy count of its values that
    /// lay outside the bounds and were clamped (known only after release).
    pub clamped_values: Option<u64>,
}

/// Noisy aggregates over every public key, with their accuracy.
///
/// Built only by [`release`]; the broker turns it into the response.
#[derive(Debug, Clone)]
pub struct Release {
    batch: RecordBatch,
    accuracy: Vec<Accuracy>,
    truncated: bool,
    suppressed: Option<u64>,
}

impl Release {
    /// Under partition selection, the noisy number of keys left out.
    pub fn suppressed(&self) -> Option<u64> {
        self.suppressed
    }

    /// One row per released key: group columns, then aggregates, typed as
    /// the operator's Aggregate node promised, then each aggregate's interval
    /// bounds ([`dp_interval::bound_column`]).
    pub fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// Whether selected keys beyond the grant's result-row cap were dropped.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Accuracy of each aggregate column, in order.
    pub fn accuracy(&self) -> &[Accuracy] {
        &self.accuracy
    }
}

/// The opendp measurement of a statistic, as its two operations: the privacy
/// map and the noisy release. (opendp measurements are not `Send`, so they are
/// built where they are used, from the parameters kept in [`NoisePlan`].)
pub(crate) struct NoiseMeasurement {
    map: PrivacyMapFn<RBig>,
    invoke: ReleaseFn<Vec<IBig>, Vec<IBig>>,
}

/// An opendp measurement's privacy map, behind its measure's generic type.
type PrivacyMapFn<D> = Box<dyn Fn(&D) -> opendp::error::Fallible<f64>>;
/// An opendp measurement's function.
type ReleaseFn<I, O> = Box<dyn Fn(&I) -> opendp::error::Fallible<O>>;

impl NoiseMeasurement {
    /// Discrete Laplace (L1 → ε) or discrete Gaussian (L2 → ρ) at `scale`,
    /// over integer vectors.
    pub(crate) fn new(mechanism: Mechanism, scale: &RBig) -> Result<NoiseMeasurement> {
        let domain = VectorDomain::new(AtomDomain::<IBig>::default());
        let scale = scale.clone();
        Ok(match mechanism {
            Mechanism::DiscreteLaplace => Self::wrap(
                MakeNoise::<_, _, MaxDivergence>::make_noise(
                    ZExpFamily::<1> { scale },
                    (domain, L1Distance::<RBig>::default()),
                )
                .map_err(opendp_err)?,
            ),
            Mechanism::DiscreteGaussian => Self::wrap(
                MakeNoise::<_, _, ZeroConcentratedDivergence>::make_noise(
                    ZExpFamily::<2> { scale },
                    (domain, L2Distance::<RBig>::default()),
                )
                .map_err(opendp_err)?,
            ),
        })
    }

    fn wrap<MI, MO>(
        m: Measurement<VectorDomain<AtomDomain<IBig>>, MI, MO, Vec<IBig>>,
    ) -> NoiseMeasurement
    where
        MI: 'static + Metric<Distance = RBig>,
        MO: 'static + Measure<Distance = f64>,
    {
        let m = std::rc::Rc::new(m);
        let m2 = m.clone();
        NoiseMeasurement {
            map: Box::new(move |d| m.map(d)),
            invoke: Box::new(move |x| m2.invoke(x)),
        }
    }

    /// Privacy loss (ε or ρ) at an input distance.
    pub(crate) fn spend(&self, sensitivity: &RBig) -> Result<f64> {
        (self.map)(sensitivity).map_err(opendp_err)
    }

    /// Adds noise to every element.
    pub(crate) fn sample(&self, exact: &Vec<IBig>) -> Result<Vec<IBig>> {
        (self.invoke)(exact).map_err(opendp_err)
    }
}

/// DP partition selection: discrete Laplace (ε grants) or discrete Gaussian
/// (ρ grants) noise on each observed key's distinct-unit count, keeping the
/// keys whose noisy count reaches a threshold (opendp's noise-threshold
/// measurement, approximate DP or approximate zCDP).
pub struct SelectionMeasurement {
    map: SelectionMapFn,
    invoke: ReleaseFn<HashMap<u64, IBig>, HashMap<u64, IBig>>,
}

/// The key of the row that folds the groups partition selection left out.
pub const OTHER: &str = "__other__";

/// Exact distinct-unit counts by key index.
type KeyCounts = MapDomain<AtomDomain<u64>, AtomDomain<IBig>>;
/// The selection's privacy map: (keys touched, L1 or L2, L∞) to (ε or ρ, δ).
type SelectionMapFn = Box<dyn Fn(&(u32, RBig, RBig)) -> opendp::error::Fallible<(f64, f64)>>;

impl SelectionMeasurement {
    /// `mechanism`'s noise at `scale`, keeping noisy counts `≥ threshold`.
    pub fn new(mechanism: Mechanism, scale: &RBig, threshold: u64) -> Result<SelectionMeasurement> {
        let domain = KeyCounts::new(AtomDomain::default(), AtomDomain::default());
        let threshold = IBig::from(threshold);
        Ok(match mechanism {
            Mechanism::DiscreteLaplace => Self::wrap(
                ZExpFamily::<1> {
                    scale: scale.clone(),
                }
                .make_noise_threshold(
                    (domain, L01InfDistance::<AbsoluteDistance<RBig>>::default()),
                    threshold,
                )
                .map_err(opendp_err)?,
            ),
            Mechanism::DiscreteGaussian => Self::wrap(
                ZExpFamily::<2> {
                    scale: scale.clone(),
                }
                .make_noise_threshold(
                    (domain, L02InfDistance::<AbsoluteDistance<RBig>>::default()),
                    threshold,
                )
                .map_err(opendp_err)?,
            ),
        })
    }

    fn wrap<MI, MO>(m: Measurement<KeyCounts, MI, MO, HashMap<u64, IBig>>) -> SelectionMeasurement
    where
        MI: 'static + Metric<Distance = (u32, RBig, RBig)>,
        MO: 'static + Measure<Distance = (f64, f64)>,
    {
        let m = std::rc::Rc::new(m);
        let m2 = m.clone();
        SelectionMeasurement {
            map: Box::new(move |d| m.map(d)),
            invoke: Box::new(move |x| m2.invoke(x)),
        }
    }

    /// (ε or ρ, δ) when one unit touches at most `max_groups` keys, once
    /// each. (opendp caps the L1 or L2 norm by what the other two allow.)
    pub fn spend(&self, max_groups: u32) -> Result<(f64, f64)> {
        let g = RBig::from(max_groups);
        (self.map)(&(max_groups, g, RBig::ONE)).map_err(opendp_err)
    }

    /// The kept keys (by index) and their noisy counts.
    pub fn select(&self, exact: &HashMap<u64, IBig>) -> Result<HashMap<u64, IBig>> {
        (self.invoke)(exact).map_err(opendp_err)
    }
}

/// τ: the smallest threshold at which partition selection with noise `scale`
/// spends at most `delta` when a unit touches `max_groups` keys, found by
/// searching opendp's own privacy map (δ falls as the threshold rises), plus
/// one.
///
/// The one: opendp 0.16's map bounds δ by `Pr[Z > T − l∞]`, but its
/// measurement keeps a key whose noisy count is `≥ T`, so a key holding
/// `l∞` units survives with `Pr[Z ≥ T − l∞] = Pr[Z > (T − 1) − l∞]`: the map at
/// `T − 1` is the true δ at `T`. The empirical audit in this module's tests
/// measures the gap (at ε = 1, δ = 0.01 opendp's own τ = 5 releases a lonely
/// key 1.3% of the time) and checks the corrected threshold.
pub fn selection_threshold(
    mechanism: Mechanism,
    scale: &RBig,
    max_groups: u32,
    delta: f64,
) -> Result<u64> {
    opendp_threshold(mechanism, scale, max_groups, delta).map(|t| t + 1)
}

/// The smallest threshold opendp's privacy map accepts for `delta`.
fn opendp_threshold(
    mechanism: Mechanism,
    scale: &RBig,
    max_groups: u32,
    delta: f64,
) -> Result<u64> {
    let delta_at = |t: u64| -> Result<f64> {
        Ok(SelectionMeasurement::new(mechanism, scale, t)?
            .spend(max_groups)?
            .1)
    };
    let mut high = 1u64;
    while delta_at(high)? > delta {
        high = high
            .checked_mul(2)
            .filter(|h| *h < 1 << 62)
            .ok_or_else(|| {
                EngineError::Internal("no partition-selection threshold reaches δ".into())
            })?;
    }
    let mut low = high / 2; // δ(low) > delta, or low = 0 (never a valid threshold)
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if delta_at(mid)? > delta {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(high)
}

/// Accuracy of a released column as known before any data is read. COUNT and
/// SUM intervals are exact; AVG's depends on its noisy count (computed per
/// release) and a quantile's has no closed form in output units.
pub fn planned_accuracy(spec: &ReleaseSpec, agg: ReleasedAggregate) -> Result<Accuracy> {
    Ok(match agg {
        ReleasedAggregate::Count(c) => {
            let plan = &spec.counts[c].noise;
            Accuracy {
                mechanism: plan.mechanism.name(),
                scale: plan.scale_f64(),
                half_width_95: Some(plan.half_width(0.05)?),
                aggregate: match &spec.counts[c].kind {
                    CountKind::Rows => "COUNT(*)".to_owned(),
                    CountKind::NonNull(col) => format!("COUNT({col})"),
                    CountKind::Summed(i) => format!("COUNT({})", spec.sums[*i].column),
                    CountKind::DistinctUnits => "COUNT(DISTINCT unit)".to_owned(),
                    CountKind::Clamped(col) => format!("clamped values of {col}"),
                },
                clamped_values: None,
            }
        }
        ReleasedAggregate::Sum(i) => {
            let s = &spec.sums[i];
            let unit = 10f64.powi(s.precision as i32);
            Accuracy {
                mechanism: s.noise.mechanism.name(),
                scale: s.noise.scale_f64() / unit,
                half_width_95: Some(s.noise.half_width(0.05)? / unit),
                aggregate: format!("SUM({})", s.column),
                clamped_values: None,
            }
        }
        ReleasedAggregate::Avg { sum, .. } => {
            let s = &spec.sums[sum];
            Accuracy {
                mechanism: s.noise.mechanism.name(),
                scale: s.noise.scale_f64() / 10f64.powi(s.precision as i32),
                half_width_95: None,
                aggregate: format!("AVG({})", s.column),
                clamped_values: None,
            }
        }
        ReleasedAggregate::Var { sum, std, .. } => {
            let s = &spec.sums[sum];
            Accuracy {
                mechanism: s.noise.mechanism.name(),
                scale: s.noise.scale_f64() / 10f64.powi(s.precision as i32),
                half_width_95: None,
                aggregate: format!(
                    "{}({})",
                    if std { "STDDEV_POP" } else { "VAR_POP" },
                    s.column
                ),
                clamped_values: None,
            }
        }
        ReleasedAggregate::Quantile(q) => {
            let stat = &spec.quantiles[q];
            Accuracy {
                mechanism: "exponential",
                scale: stat.scale,
                half_width_95: None,
                aggregate: format!("QUANTILE({}, {})", stat.column, stat.alpha),
                clamped_values: None,
            }
        }
    })
}

/// opendp's DP quantile (exponential mechanism: noisy max over the scores
/// of a grid's candidates) for one group's kept values, given as ranks.
struct QuantileMeasurement {
    map: PrivacyMapFn<u32>,
    invoke: ReleaseFn<Vec<i64>, i64>,
}

impl QuantileMeasurement {
    fn new(mechanism: Mechanism, grid: &QuantileGrid, alpha: f64, scale: f64) -> Result<Self> {
        match mechanism {
            Mechanism::DiscreteLaplace => Self::with::<MaxDivergence>(grid, alpha, scale),
            Mechanism::DiscreteGaussian => {
                Self::with::<ZeroConcentratedDivergence>(grid, alpha, scale)
            }
        }
    }

    fn with<MO: TopKMeasure + Default>(
        grid: &QuantileGrid,
        alpha: f64,
        scale: f64,
    ) -> Result<Self> {
        let m = std::rc::Rc::new(
            make_private_quantile(
                VectorDomain::new(AtomDomain::<i64>::default()),
                SymmetricDistance,
                MO::default(),
                grid.candidate_ranks(),
                alpha,
                scale,
            )
            .map_err(opendp_err)?,
        );
        let m2 = m.clone();
        Ok(QuantileMeasurement {
            map: Box::new(move |d| m.map(d)),
            invoke: Box::new(move |x| m2.invoke(x)),
        })
    }
}

/// The scale at which a quantile over every group spends at most `share`:
/// a unit changes at most `max_rows` values in each of at most `max_groups`
/// groups, so the spend is `max_groups` times opendp's map at `max_rows`.
/// Returns the scale and that spend.
pub fn quantile_scale(
    mechanism: Mechanism,
    grid: &QuantileGrid,
    alpha: f64,
    max_rows: u32,
    max_groups: u32,
    share: &RBig,
) -> Result<(f64, f64)> {
    // Round the share down so that float rounding cannot overspend.
    let target = share.to_f64().value() * (1.0 - 1e-9);
    let spend = |scale: f64| -> Result<f64> {
        let per_group = (QuantileMeasurement::new(mechanism, grid, alpha, scale)?.map)(&max_rows)
            .map_err(opendp_err)?;
        Ok(per_group * f64::from(max_groups))
    };
    let mut high = 1.0f64;
    while spend(high)? > target {
        high *= 2.0;
        if high > 1e300 {
            return Err(EngineError::Internal(
                "no quantile scale fits the share".into(),
            ));
        }
    }
    let mut low = high / 2.0;
    while low > 1e-300 && spend(low)? <= target {
        high = low;
        low /= 2.0;
    }
    for _ in 0..60 {
        let mid = 0.5 * (low + high);
        if spend(mid)? <= target {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok((high, spend(high)?))
}

/// Adds noise to a vector of exact integers through its opendp measurement.
fn noisy_vector(plan: &NoisePlan, exact: Vec<IBig>) -> Result<Vec<IBig>> {
    NoiseMeasurement::new(plan.mechanism, &plan.scale)?.sample(&exact)
}

fn to_f64(x: &IBig) -> f64 {
    x.to_f64().value()
}

fn key_value(v: &DomainValue) -> KeyValue {
    match v {
        DomainValue::Int(i) => KeyValue::Int(*i),
        DomainValue::Text(s) => KeyValue::Text(s.clone()),
    }
}

/// The released keys, and the noisy statistic that selected them (if any).
struct ReleasedKeys {
    keys: Vec<Vec<KeyValue>>,
    /// Index of the count that selected the keys, and its noisy values.
    selected_by: Option<(usize, Vec<IBig>)>,
    /// Keys dropped by the grant's result-row cap (post-processing).
    truncated: bool,
    /// Noisy number of keys partition selection left out.
    suppressed: Option<u64>,
    /// With an `__other__` row: the groups (indices into the bounded
    /// aggregates) it folds together.
    other: Option<Vec<usize>>,
}

/// Public keys in domain order, or the keys that pass partition selection
/// (sorted by key, so the order reveals nothing beyond the keys).
fn released_keys(spec: &ReleaseSpec, exact: &BoundedAggregates) -> Result<ReleasedKeys> {
    let selection = match &spec.keys {
        KeySet::Public(keys) => {
            return Ok(ReleasedKeys {
                keys: keys
                    .iter()
                    .map(|k| k.iter().map(key_value).collect())
                    .collect(),
                selected_by: None,
                truncated: false,
                suppressed: None,
                other: None,
            });
        }
        KeySet::Selected(selection) => selection,
    };
    let units: HashMap<u64, IBig> = exact
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let n = g.counts.get(selection.count).copied().unwrap_or(0);
            (i as u64, IBig::from(n))
        })
        .collect();
    let measurement = SelectionMeasurement::new(
        spec.mechanism,
        &spec.counts[selection.count].noise.scale,
        selection.threshold(),
    )?;
    let mut kept: Vec<(&[KeyValue], IBig, usize)> = measurement
        .select(&units)?
        .into_iter()
        .filter_map(|(i, v)| {
            let i = i as usize;
            Some((exact.groups.get(i)?.key.as_slice(), v, i))
        })
        .collect();
    kept.sort();
    // Keys found minus keys kept, from a noisy count of the keys found.
    let observed = noisy_vector(&selection.observed, vec![IBig::from(exact.groups.len())])?;
    let suppressed = observed
        .first()
        .map(|o| u64::try_from(o - IBig::from(kept.len())).unwrap_or(0));
    let truncated = kept.len() > selection.max_keys;
    kept.truncate(selection.max_keys);
    // Everything found and not released, for the optional __other__ row.
    let other = selection.other_row.then(|| {
        let released: std::collections::HashSet<usize> = kept.iter().map(|k| k.2).collect();
        (0..exact.groups.len())
            .filter(|i| !released.contains(i))
            .collect()
    });
    let (keys, noisy) = kept.into_iter().map(|(k, v, _)| (k.to_vec(), v)).unzip();
    Ok(ReleasedKeys {
        keys,
        selected_by: Some((selection.count, noisy)),
        truncated,
        suppressed,
        other,
    })
}

/// `array` with row `row` set to NULL, if `apply`.
fn null_at(array: ArrayRef, row: usize, apply: bool) -> Result<ArrayRef> {
    if !apply {
        return Ok(array);
    }
    let mask: datafusion::arrow::array::BooleanArray =
        (0..array.len()).map(|r| Some(r == row)).collect();
    datafusion::arrow::compute::nullif(&array, &mask)
        .map_err(|e| EngineError::Internal(e.to_string()))
}

/// One key column as `target`: integers or text, as the keys hold them.
fn key_column(keys: &[Vec<KeyValue>], g: usize, target: &DataType) -> Result<ArrayRef> {
    let array: ArrayRef = if keys.iter().all(|k| matches!(k[g], KeyValue::Int(_))) {
        Arc::new(Int64Array::from_iter_values(keys.iter().map(
            |k| match &k[g] {
                KeyValue::Int(i) => *i,
                KeyValue::Text(_) => 0,
            },
        )))
    } else {
        Arc::new(StringArray::from_iter_values(keys.iter().map(
            |k| match &k[g] {
                KeyValue::Int(i) => i.to_string(),
                KeyValue::Text(s) => s.clone(),
            },
        )))
    };
    cast(&array, target).map_err(|e| EngineError::Internal(e.to_string()))
}

/// Releases a certified plan's bounded aggregates: every public key, or the
/// keys partition selection keeps, each statistic noisy.
///
/// `schema` is the arrow schema of the operator's Aggregate node.
pub fn release(
    spec: &ReleaseSpec,
    exact: &BoundedAggregates,
    schema: SchemaRef,
) -> Result<Release> {
    let by_key: HashMap<&[KeyValue], &GroupAggregate> =
        exact.groups.iter().map(|g| (g.key.as_slice(), g)).collect();
    let ReleasedKeys {
        mut keys,
        selected_by,
        truncated,
        suppressed,
        other,
    } = released_keys(spec, exact)?;
    // `Ok(j)` picks the j-th count, `Err(i)` the i-th sum.
    let value_of = |g: &GroupAggregate, stat: std::result::Result<usize, usize>| match stat {
        Ok(j) => g.counts.get(j).map_or(0, |v| i128::from(*v)),
        Err(i) => g.sums.get(i).copied().unwrap_or(0),
    };
    // Exact per-key statistics in release order; absent keys are empty
    // groups (zero). The __other__ row, last, totals the groups it folds,
    // with the noise of a merged cell (`NoisePlan::for_merged_cell`: the
    // statistic's own under ε, wider by √max_groups under ρ).
    let released = keys.len();
    if other.is_some() {
        keys.push(vec![
            KeyValue::Text(OTHER.to_owned());
            spec.group_columns.len()
        ]);
    }
    let exact_vector = |stat: std::result::Result<usize, usize>| -> Vec<IBig> {
        let mut v: Vec<IBig> = keys[..released]
            .iter()
            .map(|k| IBig::from(by_key.get(k.as_slice()).map_or(0, |g| value_of(g, stat))))
            .collect();
        if let Some(folded) = &other {
            let total: i128 = folded
                .iter()
                .filter_map(|i| exact.groups.get(*i))
                .map(|g| value_of(g, stat))
                .sum();
            v.push(IBig::from(total));
        }
        v
    };
    let n = keys.len();
    // Cells with no release: the __other__ row of the selecting count (its
    // noise already selected the keys) and of quantiles.
    let unreleased = |row: usize| other.is_some() && row == released;
    let merged = |plan: &NoisePlan| plan.for_merged_cell(spec.max_groups);
    let noisy = |plan: &NoisePlan, mut exact: Vec<IBig>| -> Result<Vec<IBig>> {
        let last = other.is_some().then(|| exact.split_off(released));
        let mut v = noisy_vector(plan, exact)?;
        if let Some(last) = last {
            v.extend(noisy_vector(&merged(plan), last)?);
        }
        Ok(v)
    };
    // A cell's noise: the merged cell's in the __other__ row.
    let plan_at = |plan: &NoisePlan, row: usize| {
        if unreleased(row) {
            merged(plan)
        } else {
            plan.clone()
        }
    };
    let mut noisy_counts = Vec::new();
    let mut clamped: HashMap<&str, u64> = HashMap::new();
    for (j, c) in spec.counts.iter().enumerate() {
        if let CountKind::Clamped(column) = &c.kind {
            // One total over every group found, noisy, floored at zero.
            let total: i128 = exact
                .groups
                .iter()
                .filter_map(|g| g.counts.get(j))
                .map(|n| i128::from(*n))
                .sum();
            let noisy = noisy_vector(&c.noise, vec![IBig::from(total)])?;
            let value = noisy.first().map_or(0, |v| u64::try_from(v).unwrap_or(0));
            clamped.insert(column.as_str(), value);
            noisy_counts.push(Vec::new());
            continue;
        }
        noisy_counts.push(match &selected_by {
            // The selecting count is already noisy: released as drawn.
            Some((s, noisy)) if *s == j => {
                let mut v = noisy.clone();
                v.resize(n, IBig::ZERO);
                v
            }
            _ => noisy(&c.noise, exact_vector(Ok(j)))?,
        });
    }
    let mut noisy_sums = Vec::new();
    for (i, s) in spec.sums.iter().enumerate() {
        noisy_sums.push(noisy(&s.noise, exact_vector(Err(i)))?);
    }
    let mut noisy_quantiles = Vec::new();
    for (q, stat) in spec.quantiles.iter().enumerate() {
        let m = QuantileMeasurement::new(stat.mechanism, &stat.grid, stat.alpha, stat.scale)?;
        let unit = 10f64.powi(stat.precision as i32);
        let mut values = Vec::with_capacity(n);
        for (row, k) in keys.iter().enumerate() {
            if unreleased(row) {
                values.push(f64::NAN);
                continue;
            }
            // A dataset with the kept values' order relations to every
            // candidate: each rank repeated as often as it was counted.
            let ranks: Vec<i64> = by_key
                .get(k.as_slice())
                .and_then(|g| g.histograms.get(q))
                .map(|h| {
                    h.iter()
                        .enumerate()
                        .flat_map(|(rank, n)| {
                            std::iter::repeat_n(rank as i64, usize::try_from(*n).unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let chosen = (m.invoke)(&ranks).map_err(opendp_err)?;
            values.push(stat.grid.candidate(chosen) as f64 / unit);
        }
        noisy_quantiles.push(values);
    }

    let groups = spec.group_columns.len();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for g in 0..groups {
        columns.push(key_column(&keys, g, schema.field(g).data_type())?);
    }
    let mut accuracy = Vec::new();
    // Per aggregate, each cell's 95% interval (for DP_INTERVAL_LOW/HIGH).
    let mut intervals: Vec<Vec<Option<(f64, f64)>>> = Vec::new();
    // A noisy value's interval from a half-width known in advance; the
    // __other__ row's from its own noise.
    let around = |values: Vec<f64>,
                  acc: &Accuracy,
                  plan: &NoisePlan,
                  unit: f64|
     -> Result<Vec<Option<(f64, f64)>>> {
        values
            .into_iter()
            .enumerate()
            .map(|(row, v)| {
                let h = if unreleased(row) {
                    Some(merged(plan).half_width(0.05)? / unit)
                } else {
                    acc.half_width_95
                };
                Ok(h.map(|h| (v - h, v + h)))
            })
            .collect()
    };
    for (j, agg) in spec.aggregates.iter().enumerate() {
        let field = schema.field(groups + j);
        let (array, acc): (ArrayRef, Accuracy) = match *agg {
            ReleasedAggregate::Var {
                sum,
                squares,
                count,
                std,
            } => {
                // Post-processing of three noisy statistics: the mean and the
                // mean of squares, each clamped to what the bounds allow.
                let (s, q) = (&spec.sums[sum], &spec.sums[squares]);
                let (lo, hi) = s.bounds;
                let spread = ((hi - lo) / 2.0).powi(2);
                let values: Vec<f64> = (0..n)
                    .map(|k| {
                        let c = to_f64(&noisy_counts[count][k]).max(1.0);
                        let mean =
                            (to_f64(&noisy_sums[sum][k]) / 10f64.powi(s.precision as i32) / c)
                                .clamp(lo, hi);
                        let mean_sq =
                            to_f64(&noisy_sums[squares][k]) / 10f64.powi(q.precision as i32) / c;
                        let var = (mean_sq - mean * mean).clamp(0.0, spread);
                        if std { var.sqrt() } else { var }
                    })
                    .collect();
                intervals.push(vec![None; n]);
                (
                    Arc::new(Float64Array::from(values)),
                    planned_accuracy(spec, *agg)?,
                )
            }
            ReleasedAggregate::Quantile(q) => {
                intervals.push(vec![None; n]);
                (
                    Arc::new(Float64Array::from(noisy_quantiles[q].clone())),
                    planned_accuracy(spec, *agg)?,
                )
            }
            ReleasedAggregate::Count(c) => {
                let array = Int64Array::from_iter_values(noisy_counts[c].iter().map(|v| {
                    i64::try_from(v).unwrap_or(if *v > IBig::ZERO { i64::MAX } else { i64::MIN })
                }));
                let acc = planned_accuracy(spec, *agg)?;
                intervals.push(around(
                    noisy_counts[c].iter().map(to_f64).collect(),
                    &acc,
                    &spec.counts[c].noise,
                    1.0,
                )?);
                (Arc::new(array), acc)
            }
            ReleasedAggregate::Sum(i) => {
                let unit = 10f64.powi(spec.sums[i].precision as i32);
                let values: Vec<f64> = noisy_sums[i].iter().map(|v| to_f64(v) / unit).collect();
                let acc = planned_accuracy(spec, *agg)?;
                intervals.push(around(values.clone(), &acc, &spec.sums[i].noise, unit)?);
                (Arc::new(Float64Array::from(values)), acc)
            }
            ReleasedAggregate::Avg { sum: i, count: c } => {
                let s = &spec.sums[i];
                let plan = &spec.counts[c].noise;
                let values = &noisy_counts[c];
                let unit = 10f64.powi(s.precision as i32);
                let (lo, hi) = s.bounds;
                let mut widest: f64 = 0.0;
                let mut out = Vec::with_capacity(n);
                let mut cells = Vec::with_capacity(n);
                for (row, (sum, cnt)) in noisy_sums[i].iter().zip(values).enumerate() {
                    // Each interval at 97.5% so that both hold together with ≥ 95%.
                    let a_s = plan_at(&s.noise, row).half_width(0.025)? / unit;
                    let a_c = plan_at(plan, row).half_width(0.025)?;
                    let (s_hat, c_hat) = (to_f64(sum) / unit, to_f64(cnt));
                    let avg = (s_hat / c_hat.max(1.0)).clamp(lo, hi);
                    let (low, high) = if c_hat - a_c >= 1.0 {
                        let corners = [
                            (s_hat - a_s) / (c_hat - a_c),
                            (s_hat - a_s) / (c_hat + a_c),
                            (s_hat + a_s) / (c_hat - a_c),
                            (s_hat + a_s) / (c_hat + a_c),
                        ]
                        .map(|c| c.clamp(lo, hi));
                        (
                            corners.iter().copied().fold(avg, f64::min),
                            corners.iter().copied().fold(avg, f64::max),
                        )
                    } else {
                        (lo, hi)
                    };
                    widest = widest.max(avg - low).max(high - avg);
                    cells.push(Some((low, high)));
                    out.push(avg);
                }
                intervals.push(cells);
                (
                    Arc::new(Float64Array::from(out)),
                    Accuracy {
                        half_width_95: Some(widest),
                        ..planned_accuracy(spec, *agg)?
                    },
                )
            }
        };
        // No value where nothing was released for the __other__ row.
        let selecting = selected_by.as_ref().map(|(s, _)| *s);
        let withheld = unreleased(released)
            && match *agg {
                ReleasedAggregate::Quantile(_) => true,
                ReleasedAggregate::Count(c) => Some(c) == selecting,
                _ => false,
            };
        let array = null_at(array, released, withheld)?;
        if let Some(cells) = intervals.last_mut().filter(|_| withheld) {
            cells[released] = None;
        }
        columns.push(
            cast(&array, field.data_type()).map_err(|e| EngineError::Internal(e.to_string()))?,
        );
        let bounded = match *agg {
            ReleasedAggregate::Count(_) => None,
            ReleasedAggregate::Sum(i)
            | ReleasedAggregate::Avg { sum: i, .. }
            | ReleasedAggregate::Var { sum: i, .. } => Some(spec.sums[i].column.as_str()),
            ReleasedAggregate::Quantile(q) => Some(spec.quantiles[q].column.as_str()),
        };
        accuracy.push(Accuracy {
            clamped_values: bounded.and_then(|c| clamped.get(c).copied()),
            ..acc
        });
    }
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    for (j, cells) in intervals.iter().enumerate() {
        for high in [false, true] {
            fields.push(Field::new(
                dp_interval::bound_column(j, high),
                DataType::Float64,
                true,
            ));
            columns.push(Arc::new(Float64Array::from_iter(
                cells
                    .iter()
                    .map(|c| c.map(|(l, h)| if high { h } else { l })),
            )));
        }
    }
    let plain = Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
    let batch =
        RecordBatch::try_new(plain, columns).map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(Release {
        batch,
        accuracy,
        truncated,
        suppressed,
    })
}

/// A fresh, unguessable request id (hex), from opendp's CSPRNG.
pub fn request_id() -> Result<String> {
    let mut bytes = [0u8; 12];
    opendp::traits::samplers::fill_bytes(&mut bytes).map_err(opendp_err)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    //! Goodness of fit of the samplers as veil calls them. Each test makes two
    //! checks at z = 5.026 (two-sided 5e-7 each under the CLT, n = 20,000), so
    //! a test's false-alarm rate is at most 1e-6.

    use super::*;
    use crate::accounting::{Budget, plan_noise, vector_sensitivity};

    const Z: f64 = 5.026_2;
    const N: usize = 20_000;

    /// (variance, fourth central moment) of a symmetric integer distribution
    /// with unnormalised mass `w(x)`.
    fn moments(w: impl Fn(f64) -> f64) -> (f64, f64) {
        let (mut total, mut m2, mut m4) = (w(0.0), 0.0, 0.0);
        for x in 1..20_000 {
            let x = x as f64;
            let p = 2.0 * w(x);
            total += p;
            m2 += p * x * x;
            m4 += p * x.powi(4);
        }
        (m2 / total, m4 / total)
    }

    fn check(plan: &NoisePlan, var: f64, m4: f64) {
        let shift = 1_000_000i64;
        let noisy = noisy_vector(plan, vec![IBig::from(shift); N]).expect("noise");
        let e: Vec<f64> = noisy.iter().map(|v| to_f64(v) - shift as f64).collect();
        let n = N as f64;
        let mean = e.iter().sum::<f64>() / n;
        let s2 = e.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() <= Z * (var / n).sqrt(), "mean {mean}");
        assert!(
            (s2 - var).abs() <= Z * ((m4 - var * var) / n).sqrt(),
            "variance {s2} vs {var}"
        );
    }

    #[test]
    fn discrete_laplace_has_the_announced_distribution() {
        let share = Budget::charge(1.0 / 3.0).expect("ok").as_rational();
        let plan = plan_noise(Mechanism::DiscreteLaplace, RBig::from(1u8), &share).expect("plan");
        let b = plan.scale_f64();
        let (var, m4) = moments(|x| (-x / b).exp());
        check(&plan, var, m4);
    }

    #[test]
    fn discrete_gaussian_has_the_announced_distribution() {
        let share = Budget::charge(1.0 / 18.0).expect("ok").as_rational();
        let plan = plan_noise(Mechanism::DiscreteGaussian, RBig::from(1u8), &share).expect("plan");
        let s = plan.scale_f64();
        assert!((s - 3.0).abs() < 0.01, "{s}");
        let (var, m4) = moments(|x| (-x * x / (2.0 * s * s)).exp());
        check(&plan, var, m4);
    }

    #[test]
    fn bounding_keys_are_fresh() {
        let a = BoundingKeys::fresh().expect("keys");
        let b = BoundingKeys::fresh().expect("keys");
        assert_ne!(a.groups, b.groups);
        assert_ne!(a.groups, a.rows);
        assert!(!format!("{a:?}").contains(&format!("{}", a.groups[0])) || a.groups[0] < 10);
    }

    #[test]
    fn tau_is_the_smallest_threshold_within_delta() {
        let scale = RBig::from(2u8);
        let delta_at = |t: u64| {
            SelectionMeasurement::new(Mechanism::DiscreteLaplace, &scale, t)
                .expect("m")
                .spend(3)
                .expect("map")
        };
        let mut previous = 0;
        for delta in [1e-3, 1e-6, 1e-9] {
            let tau = selection_threshold(Mechanism::DiscreteLaplace, &scale, 3, delta).expect("τ");
            // One above opendp's own choice (see `selection_threshold`).
            let (eps, at) = delta_at(tau - 1);
            assert!(
                at <= delta && delta_at(tau - 2).1 > delta,
                "τ = {tau} for δ = {delta}"
            );
            // ε does not depend on the threshold: max_groups / scale.
            assert!((eps - 1.5).abs() < 1e-9, "{eps}");
            assert!(tau > previous, "a smaller δ needs a larger τ");
            previous = tau;
        }
    }

    /// Empirical privacy audit (THREATS.md): run the mechanism on neighbouring
    /// inputs, pick a distinguishing event on a training half, and bound the
    /// privacy loss from below on a fresh half with Clopper–Pearson intervals.
    mod audit {
        use super::*;
        use crate::audit::{ALPHA, cp_lower, loss_lower_bound};

        const N: usize = 60_000;

        /// ε lower bound for `plan` distinguishing inputs 0 and `shift`.
        fn epsilon_lower_bound(plan: &NoisePlan, shift: i64, delta: f64) -> f64 {
            let sample = |x: i64| -> Vec<i64> {
                noisy_vector(plan, vec![IBig::from(x); N])
                    .expect("noise")
                    .iter()
                    .map(|v| i64::try_from(v).expect("small"))
                    .collect()
            };
            loss_lower_bound(&sample(0), &sample(shift), delta, -20..=60)
        }

        #[test]
        fn discrete_laplace_keeps_its_epsilon_and_the_audit_can_see_a_leak() {
            let share = Budget::charge(1.0).expect("ok").as_rational();
            let plan =
                plan_noise(Mechanism::DiscreteLaplace, RBig::from(1u8), &share).expect("plan");
            let claimed = plan.spent;
            let lb = epsilon_lower_bound(&plan, 1, 0.0);
            assert!(
                lb <= claimed,
                "ε lower bound {lb} exceeds the claimed {claimed}"
            );
            assert!(lb > 0.5 * claimed, "the audit has power: {lb}");
            // Negative control: the same noise on a neighbour three units away
            // (an under-estimated sensitivity) is caught.
            let leak = epsilon_lower_bound(&plan, 3, 0.0);
            eprintln!(
                "discrete Laplace audit: claimed ε = {claimed:.4}, lower bound {lb:.4}; with a 3× sensitivity bug {leak:.4}"
            );
            assert!(
                leak > claimed,
                "a sensitivity bug must fail the audit: {leak}"
            );
        }

        /// The share of `keys` single-unit keys that partition selection at
        /// `threshold` releases: on the neighbour without that unit the key
        /// is never released, so this share must stay within δ.
        fn single_unit_release_rate(
            mechanism: Mechanism,
            scale: &RBig,
            threshold: u64,
            keys: u64,
        ) -> (usize, usize) {
            let lonely: HashMap<u64, IBig> = (0..keys).map(|k| (k, IBig::ONE)).collect();
            let kept = SelectionMeasurement::new(mechanism, scale, threshold)
                .expect("measurement")
                .select(&lonely)
                .expect("selection");
            (kept.len(), lonely.len())
        }

        #[test]
        fn partition_selection_releases_a_lonely_key_at_most_delta_often() {
            let delta = 1e-2;
            for (mechanism, budget, max_groups) in [
                (Mechanism::DiscreteLaplace, 1.0, 1u32),
                (Mechanism::DiscreteLaplace, 0.5, 3),
                (Mechanism::DiscreteGaussian, 0.5, 1),
                (Mechanism::DiscreteGaussian, 0.1, 3),
            ] {
                let share = Budget::charge(budget).expect("ok").as_rational();
                let sensitivity =
                    vector_sensitivity(mechanism, max_groups, &RBig::ONE).expect("sensitivity");
                let plan = plan_noise(mechanism, sensitivity, &share).expect("plan");
                let tau =
                    selection_threshold(mechanism, &plan.scale, max_groups, delta).expect("τ");
                let (released, n) = single_unit_release_rate(mechanism, &plan.scale, tau, 200_000);
                // A unit in max_groups lonely keys: δ covers all of them at once.
                let per_key_bound = 1.0 - (1.0 - delta).powf(1.0 / f64::from(max_groups));
                let low = cp_lower(released, n, ALPHA / 2.0);
                eprintln!(
                    "partition selection audit: {} {budget}, max_groups = {max_groups}, τ = {tau}: {released}/{n} lonely keys released, lower bound {low:.5} vs per-key δ {per_key_bound:.5}",
                    mechanism.unit()
                );
                assert!(
                    low <= per_key_bound,
                    "lonely keys leak: {low} > {per_key_bound}"
                );
                // Negative control: three noise scales below τ the release
                // rate is many times δ (e³ for Laplace), and the same audit
                // sees it. (Two steps below τ would be within the audit's
                // resolution at large scales, and flaky.)
                let shift = (3.0 * plan.scale_f64()).ceil() as u64;
                let (leaked, n) = single_unit_release_rate(
                    mechanism,
                    &plan.scale,
                    tau.saturating_sub(shift).max(1),
                    200_000,
                );
                assert!(
                    cp_lower(leaked, n, ALPHA / 2.0) > per_key_bound,
                    "the audit has power: {leaked}/{n}"
                );
            }
        }

        #[test]
        fn quantiles_keep_their_epsilon() {
            // Candidates 0..=10; neighbours differ by one value at the top.
            let grid = QuantileGrid::over(0, 10);
            let share = Budget::charge(1.0).expect("ok").as_rational();
            let (scale, claimed) =
                quantile_scale(Mechanism::DiscreteLaplace, &grid, 0.5, 1, 1, &share)
                    .expect("scale");
            let m = QuantileMeasurement::new(Mechanism::DiscreteLaplace, &grid, 0.5, scale)
                .expect("measurement");
            let ranks = |values: &[i128]| values.iter().map(|v| grid.rank(*v)).collect::<Vec<_>>();
            let d0 = ranks(&[2, 3, 4, 5, 6]);
            let d1 = ranks(&[2, 3, 4, 5, 6, 10]);
            let sample = |d: &Vec<i64>| -> Vec<i64> {
                (0..N).map(|_| (m.invoke)(d).expect("quantile")).collect()
            };
            let lb = loss_lower_bound(&sample(&d0), &sample(&d1), 0.0, 1..=21);
            eprintln!("quantile audit: claimed ε = {claimed:.4}, lower bound {lb:.4}");
            assert!(
                lb <= claimed,
                "ε lower bound {lb} exceeds the claimed {claimed}"
            );
            assert!(lb > 0.1, "the audit sees the neighbours apart: {lb}");
        }

        #[test]
        fn discrete_gaussian_keeps_its_epsilon_delta() {
            // ρ = 0.5 with sensitivity 1 (σ = 1); as (ε, δ): ε = ρ + 2√(ρ ln 1/δ).
            let share = Budget::charge(0.5).expect("ok").as_rational();
            let plan =
                plan_noise(Mechanism::DiscreteGaussian, RBig::from(1u8), &share).expect("plan");
            let delta: f64 = 1e-6;
            let claimed = plan.spent + 2.0 * (plan.spent * (1.0 / delta).ln()).sqrt();
            let lb = epsilon_lower_bound(&plan, 1, delta);
            eprintln!(
                "discrete Gaussian audit: claimed ε = {claimed:.4} at δ = {delta}, lower bound {lb:.4}"
            );
            assert!(
                lb <= claimed,
                "ε lower bound {lb} exceeds the claimed {claimed}"
            );
            assert!(lb > 0.7, "the audit has power: {lb}");
        }
    }
}
