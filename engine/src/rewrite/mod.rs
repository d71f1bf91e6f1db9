//! The DP rewrite: from a checked [`PrivateQuery`] to a [`CertifiedPlan`].
//!
//! The rewrite is a fixed sequence of named stages over DataFusion's
//! `LogicalPlan`, one per file, each a `VerbNoun` whose `name()` is its file
//! stem. It is not a DataFusion optimizer rule (those must preserve results);
//! it runs before DataFusion's optimizer, and noise is applied after execution
//! by [`crate::mechanisms`].
//!
//! 1. [`JoinTables`]: the tables read, inner-joined on the query's
//!    equalities (a pass-through for one table).
//! 2. [`FilterRows`]: operator predicates, the grant's mandatory row filters,
//!    and group keys restricted to their public domain.
//! 3. [`AggregatePerUnit`]: a per-unit inner aggregate, if the query has one.
//! 4. [`ClampValues`]: summed values clamped to their bounds, in fixed point.
//! 5. [`BoundContributions`]: one row per (unit, group) holding the unit's
//!    counts and sums over at most `max_rows` of its rows, then at most
//!    `max_groups` groups per unit; rows and groups chosen by a per-query
//!    keyed hash. It runs after the join, so rows a join multiplies are
//!    bounded like any others.
//! 6. [`AggregateExactly`]: counts and exact `i128` decimal sums per group.
//! 7. [`MarkRelease`]: a [`ReleaseNode`] on top, where execution stops and
//!    the broker's noise takes over.
//!
//! Every predicate the stages apply to private rows is first put in total
//! form (`total.rs`): no value can make it fail, or it is refused.

mod aggregate_exactly;
mod aggregate_per_unit;
mod bound_contributions;
mod clamp_values;
mod filter_rows;
mod join_tables;
mod mark_release;
mod total;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::provider_as_source;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use veil_policy::{Column, Dataset, DomainValue, Grant, Policy, PrivacyUnit, UnitKind};

pub use aggregate_exactly::AggregateExactly;
pub use aggregate_per_unit::AggregatePerUnit;
pub use bound_contributions::BoundContributions;
pub use clamp_values::ClampValues;
pub(crate) use clamp_values::DECIMAL_PRECISION;
pub use filter_rows::FilterRows;
pub use join_tables::JoinTables;
pub use mark_release::{MarkRelease, ReleaseNode};

use crate::accounting::{Budget, Mechanism, NoisePlan, plan_noise, vector_sensitivity};
use crate::analyze::{AggregateCall, GroupKey, PrivateQuery};
use crate::catalog::Catalog;
use crate::clamp::Bounds;
use crate::error::{EngineError, Result, Rule};
use crate::mechanisms::BoundingKeys;
use crate::quantile_grid::QuantileGrid;

/// Name of the `j`-th count in the bounded aggregate.
pub fn count_column(j: usize) -> String {
    format!("__veil_count{j}")
}

/// Name of the raw column counted by the `j`-th count (`COUNT(col)`).
pub(crate) fn counted_column(j: usize) -> String {
    format!("__veil_c{j}")
}

/// Name of the `g`-th group key column.
pub(crate) fn key_column(g: usize) -> String {
    format!("__veil_key{g}")
}

/// Name of the privacy-unit column carried to the aggregate.
pub(crate) const UNIT_COLUMN: &str = "__veil_unit";

/// Name of the `i`-th fixed-point sum in the bounded aggregate.
pub fn sum_column(i: usize) -> String {
    format!("__veil_sum{i}")
}

/// Name of one unit's bounded contribution to the `j`-th count of a group.
pub(crate) fn unit_count_column(j: usize) -> String {
    format!("__veil_unit_count{j}")
}

/// Name of one unit's bounded contribution to the `i`-th sum of a group.
pub(crate) fn unit_sum_column(i: usize) -> String {
    format!("__veil_unit_sum{i}")
}

/// Name of the `q`-th quantile's rank column (one rank per raw row).
pub(crate) fn rank_column(q: usize) -> String {
    format!("__veil_rank{q}")
}

/// Name of one unit's kept ranks for the `q`-th quantile in a group.
pub(crate) fn unit_ranks_column(q: usize) -> String {
    format!("__veil_unit_ranks{q}")
}

/// Name of the `q`-th quantile's rank histogram in the bounded aggregate.
pub fn histogram_column(q: usize) -> String {
    format!("__veil_hist{q}")
}

/// Name of the `i`-th clamped value column.
pub(crate) fn value_column(i: usize) -> String {
    format!("__veil_v{i}")
}

/// What a sum adds up: a column's clamped values, or their squares.
#[derive(Debug, Clone)]
pub(crate) struct Summand<'a> {
    /// The column's label in the query.
    pub label: String,
    /// The column.
    pub column: &'a Column,
    /// Whether its clamped values are squared (for VAR_POP/STDDEV_POP).
    pub squared: bool,
}

impl Summand<'_> {
    /// Decimal digits of the summed values: doubled by squaring.
    pub fn precision(&self) -> u32 {
        self.column.precision * if self.squared { 2 } else { 1 }
    }

    /// Bounds of one summed value, in fixed-point units of [`Self::precision`]:
    /// a square lies between 0 (or the smaller bound's square, when the
    /// bounds do not straddle 0) and the larger bound's square.
    pub fn fixed_point_bounds(&self) -> Result<(i128, i128)> {
        let Bounds {
            lo_fp: lo,
            hi_fp: hi,
            ..
        } = fixed_point_bounds(self.column)?;
        if !self.squared {
            return Ok((lo, hi));
        }
        let square = |v: i128| {
            v.checked_mul(v)
                .ok_or_else(|| EngineError::Unavailable(format!(
                    "the bounds of `{}` squared exceed the fixed-point range; the security officer must narrow them",
                    self.column.name
                )))
        };
        let (a, b) = (square(lo)?, square(hi)?);
        let low = if lo <= 0 && hi >= 0 { 0 } else { a.min(b) };
        Ok((low, a.max(b)))
    }
}

/// A sum: its bounds in fixed point and its noise.
#[derive(Debug, Clone)]
pub struct SumStatistic {
    /// Column name.
    pub column: String,
    /// Whether the column's values are squared.
    pub squared: bool,
    /// Decimal digits kept (doubled for squares).
    pub precision: u32,
    /// Lower bound in fixed-point units.
    pub lo_fp: i128,
    /// Upper bound in fixed-point units.
    pub hi_fp: i128,
    /// Declared bounds.
    pub bounds: (f64, f64),
    /// Noise for the vector of sums.
    pub noise: NoisePlan,
}

/// A DP quantile: the candidate grid over the column's bounds and the
/// exponential mechanism's scale.
#[derive(Debug, Clone)]
pub struct QuantileStatistic {
    /// Column name.
    pub column: String,
    /// Which quantile, in [0, 1].
    pub alpha: f64,
    /// Decimal digits kept.
    pub precision: u32,
    /// Candidates, in fixed-point units.
    pub grid: QuantileGrid,
    /// Mechanism (its measure: ε or ρ).
    pub mechanism: Mechanism,
    /// Scale of opendp's noisy max over the scores.
    pub scale: f64,
    /// What opendp's privacy map says the whole vector of groups spends.
    pub spent: f64,
}

/// What a count statistic counts, per group, among the kept rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountKind {
    /// Rows (`COUNT(*)`).
    Rows,
    /// Non-null values of a column (`COUNT(col)`).
    NonNull(String),
    /// Non-null clamped values of the `i`-th summed column (AVG's denominator).
    Summed(usize),
    /// Distinct privacy units (`COUNT(DISTINCT unit)`).
    DistinctUnits,
    /// Values of a column outside its declared bounds, which clamping moved:
    /// released as one noisy total, so operators see how much the bounds
    /// bend their SUM, AVG, variance or quantile.
    Clamped(String),
}

/// A counted statistic and its noise.
#[derive(Debug, Clone)]
pub struct CountStatistic {
    /// What is counted.
    pub kind: CountKind,
    /// Noise for the vector of counts.
    pub noise: NoisePlan,
}

/// How each aggregate of the query is computed from the released statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleasedAggregate {
    /// The `j`-th noisy count.
    Count(usize),
    /// The `i`-th noisy sum.
    Sum(usize),
    /// The `sum`-th noisy sum over the `count`-th noisy count.
    Avg {
        /// Index of the sum.
        sum: usize,
        /// Index of the count of its non-null values.
        count: usize,
    },
    /// The `q`-th DP quantile.
    Quantile(usize),
    /// Population variance (or, with `std`, standard deviation) from the
    /// noisy sum, sum of squares and count of a column's values.
    Var {
        /// Index of the sum.
        sum: usize,
        /// Index of the sum of squares.
        squares: usize,
        /// Index of the count of non-null values.
        count: usize,
        /// Whether the square root is released (STDDEV_POP).
        std: bool,
    },
}

/// Which group keys a release contains.
#[derive(Debug, Clone)]
pub enum KeySet {
    /// Every key of the product of the group columns' public domains, empty
    /// groups included (noisy zeros).
    Public(Vec<Vec<DomainValue>>),
    /// The keys found in the data whose noisy distinct-unit count passes DP
    /// partition selection.
    Selected(Selection),
}

impl KeySet {
    /// How the keys are chosen, as reported in response metadata.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySet::Public(_) => "public_domain",
            KeySet::Selected(_) => "partition_selection",
        }
    }

    /// The number of released rows, when it does not depend on the data.
    pub fn known_len(&self) -> Option<usize> {
        match self {
            KeySet::Public(keys) => Some(keys.len()),
            KeySet::Selected(_) => None,
        }
    }
}

/// DP partition selection: a key is released when its noisy distinct-unit
/// count reaches `max(tau, min_units)`.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Index of the distinct-unit count statistic whose noise selects keys.
    pub count: usize,
    /// τ: the smallest threshold at which opendp's privacy map stays within δ.
    pub tau: u64,
    /// The policy's minimum group size k in distinct units.
    pub min_units: u32,
    /// δ of the grant, spent by the selection.
    pub delta: f64,
    /// At most this many keys are returned (the grant's result-row cap).
    pub max_keys: usize,
    /// Fold the keys found but not released into one `__other__` row.
    pub other_row: bool,
    /// Noise for the number of keys found in the bounded aggregates, from
    /// which the number of suppressed keys is reported: one unit adds or
    /// removes at most `max_groups` keys.
    pub observed: NoisePlan,
}

impl Selection {
    /// The threshold a noisy distinct-unit count must reach: `max(τ, k)`.
    pub fn threshold(&self) -> u64 {
        self.tau.max(u64::from(self.min_units))
    }
}

/// Everything the broker needs to release a certified plan's output.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    /// Dataset id.
    pub dataset: String,
    /// Mechanism of the grant.
    pub mechanism: Mechanism,
    /// GROUP BY columns.
    pub group_columns: Vec<String>,
    /// Which keys are released.
    pub keys: KeySet,
    /// Groups a unit contributes to, at most.
    pub max_groups: u32,
    /// Counted statistics.
    pub counts: Vec<CountStatistic>,
    /// Summed columns.
    pub sums: Vec<SumStatistic>,
    /// Quantiles.
    pub quantiles: Vec<QuantileStatistic>,
    /// One entry per aggregate of the query.
    pub aggregates: Vec<ReleasedAggregate>,
    /// The operator's query (for post-processing over the release).
    pub query: PrivateQuery,
    /// The charge.
    pub cost: Budget,
}

/// A plan that has passed every check and bounds every unit's contribution.
///
/// Only [`certify`] builds one; the executor accepts nothing else.
#[derive(Debug, Clone)]
pub struct CertifiedPlan {
    plan: LogicalPlan,
    spec: ReleaseSpec,
    stages: Vec<(&'static str, LogicalPlan)>,
}

impl CertifiedPlan {
    /// The whole certified plan, its [`ReleaseNode`] on top.
    pub fn plan(&self) -> &LogicalPlan {
        &self.plan
    }

    /// What executors run: the bounded aggregation below the release node.
    pub fn executable(&self) -> &LogicalPlan {
        match &self.plan {
            LogicalPlan::Extension(e) => e
                .node
                .as_any()
                .downcast_ref::<ReleaseNode>()
                .map_or(&self.plan, ReleaseNode::input),
            other => other,
        }
    }

    /// How to release its output.
    pub fn spec(&self) -> &ReleaseSpec {
        &self.spec
    }

    /// The plan after each rewrite stage, by stage name (for review and
    /// plan snapshots).
    pub fn stages(&self) -> &[(&'static str, LogicalPlan)] {
        &self.stages
    }
}

/// Shared inputs of the rewrite stages.
pub(crate) struct RewriteContext<'a> {
    pub query: &'a PrivateQuery,
    /// Each source's dataset and file schema.
    pub sources: Vec<(&'a Dataset, SchemaRef)>,
    /// Each source's scan, under its relation name.
    pub scans: Vec<LogicalPlan>,
    /// The primary dataset's privacy unit.
    pub unit: &'a PrivacyUnit,
    /// Whether every row of the relation is its own unit (a row-level unit,
    /// one table).
    pub rows_are_units: bool,
    /// The grant's mandatory row filters, over the sources' relations, with
    /// the index of the source each filters.
    pub row_filters: Vec<(usize, Expr)>,
    /// The most rows one unit may have in each source (0 for public ones).
    pub unit_rows: Vec<u64>,
    /// Each group key's public domain, if it has one.
    pub key_domains: Vec<Option<Vec<DomainValue>>>,
    pub sums: Vec<Summand<'a>>,
    pub counts: Vec<CountKind>,
    /// Quantile columns (by label) and their candidate grids.
    pub quantiles: Vec<(String, &'a Column, QuantileGrid)>,
    /// Groups per unit, after the grant's tightening.
    pub max_groups: u32,
    /// Rows per unit and group.
    pub max_rows: u32,
    /// How many distinct group keys the query can produce.
    pub key_space: usize,
    /// What the release node says is released.
    pub release_summary: String,
    pub keys: BoundingKeys,
}

impl<'a> RewriteContext<'a> {
    /// The policy of the column a label names.
    pub fn column(&self, label: &str) -> Result<&'a Column> {
        column_policy(self.query, &self.sources, label)
    }

    /// The column a label names, over its source's relation.
    pub fn expr(&self, label: &str) -> Result<Expr> {
        self.query.column_expr(label)
    }

    /// The file schema type of the column a label names.
    pub fn data_type(&self, label: &str) -> Result<DataType> {
        column_type(self.query, &self.sources, label)
    }

    /// Whether source `s` is read before a per-unit aggregate (always, when
    /// the query has none); the others are joined to its output.
    pub fn below_aggregate(&self, s: usize) -> bool {
        self.query
            .per_unit
            .as_ref()
            .is_none_or(|p| p.sources.contains(&s))
    }

    /// The source a group key's column comes from.
    pub fn key_source(&self, key: &GroupKey) -> Result<usize> {
        Ok(self.query.source_column(key.column())?.source)
    }

    /// The unit column: the primary dataset's, or the one a per-unit
    /// aggregate groups by.
    pub fn unit_expr(&self) -> Result<Expr> {
        match &self.query.per_unit {
            Some(p) => self.expr(&p.unit),
            None => Ok(Expr::Column(datafusion::common::Column::new(
                Some(self.query.sources[self.query.primary].relation.clone()),
                &self.unit.column,
            ))),
        }
    }
}

/// The policy of the column a label names: a source column's, or the
/// bounds a per-unit aggregate derives.
fn column_policy<'a>(
    query: &'a PrivateQuery,
    sources: &[(&'a Dataset, SchemaRef)],
    label: &str,
) -> Result<&'a Column> {
    if let Some(d) = query.derived(label) {
        return Ok(&d.column);
    }
    let c = query.source_column(label)?;
    sources[c.source]
        .0
        .column(&c.name)
        .ok_or_else(|| EngineError::Internal(format!("column `{label}` vanished")))
}

/// The type of the column a label names: the file's, or what a per-unit
/// aggregate computes.
fn column_type(
    query: &PrivateQuery,
    sources: &[(&Dataset, SchemaRef)],
    label: &str,
) -> Result<DataType> {
    if let Some(d) = query.derived(label) {
        return Ok(match d.call {
            AggregateCall::Avg(_) => DataType::Float64,
            AggregateCall::Sum(_) => {
                DataType::Decimal128(DECIMAL_PRECISION, d.column.precision as i8)
            }
            _ => DataType::Int64,
        });
    }
    let c = query.source_column(label)?;
    sources[c.source]
        .1
        .field_with_name(&c.name)
        .map(|f| f.data_type().clone())
        .map_err(|e| EngineError::Internal(e.to_string()))
}

/// One stage of the rewrite.
pub(crate) trait RewriteStage {
    /// The stage's name: its file stem.
    fn name(&self) -> &'static str;
    /// Applies the stage.
    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder>;
}

/// The stages, in order.
fn stages() -> [&'static dyn RewriteStage; 7] {
    [
        &JoinTables,
        &FilterRows,
        &AggregatePerUnit,
        &ClampValues,
        &BoundContributions,
        &AggregateExactly,
        &MarkRelease,
    ]
}

/// Names of the rewrite stages in the order they run.
pub fn stage_names() -> Vec<&'static str> {
    stages().iter().map(|s| s.name()).collect()
}

/// Rewrites a checked query into a certified plan and its release spec.
///
/// `bounding` keys rank rows and groups in contribution bounding: fresh for every
/// query ([`BoundingKeys::fresh`]); fixed only by tests that compare
/// neighbouring datasets under the same keys.
pub fn certify(
    query: PrivateQuery,
    policy: &Policy,
    grant: &Grant,
    catalog: &Catalog,
    planning: &SessionState,
    bounding: BoundingKeys,
) -> Result<CertifiedPlan> {
    let mut sources = Vec::new();
    for source in &query.sources {
        let dataset = policy
            .datasets
            .get(&source.dataset)
            .ok_or_else(|| EngineError::Internal("dataset vanished".into()))?;
        sources.push((dataset, catalog.file_schema(&dataset.id)?));
    }
    let dataset = sources[query.primary].0;
    let unit = dataset
        .unit
        .as_ref()
        .ok_or_else(|| EngineError::Internal("private dataset without unit".into()))?;
    // Bounding groups rows by the unit column, which for row-level units
    // need not exist or be unique: only a row read alone is its own unit.
    // A truncated join too ranks each side's rows by their unit column.
    if let Some((row_level, _)) = sources
        .iter()
        .find(|(d, _)| !d.is_public() && d.unit.as_ref().is_some_and(|u| u.kind == UnitKind::Row))
        && query.sources.len() > 1
    {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            format!(
                "the privacy unit of `{}` is the row (kind = \"row\"), so it cannot be joined: a join can repeat a row, and rows have no key to bound their contributions by. Query the dataset alone, or ask the security officer to declare a person or household unit for it",
                row_level.id
            ),
        ));
    }
    let dp = grant.dp.as_ref().ok_or_else(|| {
        EngineError::rejected(
            Rule::UnsupportedShape,
            format!("grant `{}` has no DP settings for private data", grant.id),
        )
    })?;
    // The grant's mandatory row filter of every table read.
    let mut row_filters = Vec::new();
    let mut scans = Vec::new();
    for (source, (dataset, file_schema)) in query.sources.iter().zip(&sources) {
        let df_schema = datafusion::common::DFSchema::try_from_qualified_schema(
            source.relation.clone(),
            file_schema,
        )
        .map_err(df)?;
        if let Some(sql) = grant
            .scope(&dataset.id)
            .and_then(|s| s.row_filter.as_deref())
        {
            row_filters.push((scans.len(), planning.create_logical_expr(sql, &df_schema).map_err(|e| {
                EngineError::Unavailable(format!(
                    "the row filter of grant `{}` on `{}` does not plan: {e}; the security officer must fix the policy",
                    grant.id, dataset.id
                ))
            })?));
        }
        let (schema_name, table_name) = dataset.schema_table();
        let table = datafusion::common::TableReference::partial(schema_name, table_name);
        let provider =
            provider_as_source(catalog.data_table(policy, &dataset.id, file_schema.clone())?);
        let scan = LogicalPlanBuilder::scan(table.clone(), provider, None).map_err(df)?;
        let scan = if source.relation == table {
            scan
        } else {
            scan.alias(source.relation.clone()).map_err(df)?
        };
        scans.push(scan.build().map_err(df)?);
    }
    let policy_column = |label: &str| column_policy(&query, &sources, label);
    // Each group key's public domain: declared in the policy, the buckets of
    // its bounds, or, for a column of a public table, the values it holds.
    let mut key_domains = Vec::new();
    for key in &query.group_keys {
        let c = query.source_column(key.column())?;
        let source = &query.sources[c.source];
        key_domains.push(match key {
            GroupKey::Column(_) if !source.private => Some(
                catalog
                    .public_values(policy, &source.dataset, &c.name)?
                    .to_vec(),
            ),
            _ => key_domain(key, policy_column(key.column())?),
        });
    }

    // Statistics: one vector per distinct count and per summed column.
    let mut sum_columns: Vec<Summand> = Vec::new();
    let mut count_kinds: Vec<CountKind> = Vec::new();
    let mut quantile_calls: Vec<(String, &Column, f64)> = Vec::new();
    let mut aggregates = Vec::new();
    for call in &query.aggregates {
        aggregates.push(match call {
            AggregateCall::CountStar => {
                ReleasedAggregate::Count(index_of(&mut count_kinds, CountKind::Rows))
            }
            AggregateCall::Count(c) => {
                ReleasedAggregate::Count(index_of(&mut count_kinds, CountKind::NonNull(c.clone())))
            }
            AggregateCall::CountDistinctUnit => {
                ReleasedAggregate::Count(index_of(&mut count_kinds, CountKind::DistinctUnits))
            }
            AggregateCall::Sum(c) => {
                ReleasedAggregate::Sum(sum_index(policy_column(c)?, c, false, &mut sum_columns))
            }
            AggregateCall::Avg(c) => {
                let sum = sum_index(policy_column(c)?, c, false, &mut sum_columns);
                let count = index_of(&mut count_kinds, CountKind::Summed(sum));
                ReleasedAggregate::Avg { sum, count }
            }
            AggregateCall::Var { column, std } => {
                let col = policy_column(column)?;
                let sum = sum_index(col, column, false, &mut sum_columns);
                let squares = sum_index(col, column, true, &mut sum_columns);
                let count = index_of(&mut count_kinds, CountKind::Summed(sum));
                ReleasedAggregate::Var {
                    sum,
                    squares,
                    count,
                    std: *std,
                }
            }
            AggregateCall::Quantile { column, alpha } => {
                let col = policy_column(column)?;
                let q = match quantile_calls
                    .iter()
                    .position(|(l, _, a)| l == column && a.to_bits() == alpha.to_bits())
                {
                    Some(q) => q,
                    None => {
                        quantile_calls.push((column.clone(), col, *alpha));
                        quantile_calls.len() - 1
                    }
                };
                ReleasedAggregate::Quantile(q)
            }
        });
    }
    // Every bounded column reports how many of its values were clamped.
    let bounded_columns: Vec<String> = sum_columns
        .iter()
        .map(|s| s.label.clone())
        .chain(quantile_calls.iter().map(|(label, _, _)| label.clone()))
        .collect();
    for column in bounded_columns {
        index_of(&mut count_kinds, CountKind::Clamped(column));
    }
    // Keys without a public domain are released by DP partition selection,
    // which needs δ > 0 and selects on the distinct-unit count.
    let selection = match key_product(&key_domains)? {
        Some(keys) => {
            if keys.len() > grant.max_result_rows as usize {
                return Err(EngineError::rejected(
                    Rule::ResultTooLarge,
                    format!(
                        "the group keys' domains multiply to {} rows; grant `{}` allows {}",
                        keys.len(),
                        grant.id,
                        grant.max_result_rows
                    ),
                ));
            }
            Err(keys)
        }
        None if query.truncated.is_some() => {
            return Err(EngineError::rejected(
                Rule::UnsupportedShape,
                "group keys over a truncated join (截断关联) need public domains: group by columns with a declared domain or buckets",
            ));
        }
        None => {
            let data_type = |label: &str| column_type(&query, &sources, label);
            let delta = selection_delta(&query, &key_domains, grant, dp, data_type)?;
            Ok((index_of(&mut count_kinds, CountKind::DistinctUnits), delta))
        }
    };
    let mechanism = Mechanism::for_grant(dp);
    let cost = Budget::charge(dp.per_query)?;
    // Partition selection also reports how many keys it suppressed.
    let statistics = sum_columns.len()
        + count_kinds.len()
        + quantile_calls.len()
        + usize::from(selection.is_ok());
    let share = cost.as_rational() / dashu::rational::RBig::from(statistics.max(1) as u64);
    // Every private table is joined on the unit: the loosest of their
    // declarations serves them all (see `contribution_bounds`); a truncated
    // join bounds the joined rows a unit changes instead (`truncation_bounds`).
    // The most rows one unit may have in each table: its declared groups
    // (tightened by the grant) times rows per group.
    let unit_rows: Vec<u64> = sources
        .iter()
        .map(|(d, _)| {
            d.unit.as_ref().map_or(0, |u| {
                let groups = dp.max_groups.map_or(u.max_groups, |g| g.min(u.max_groups));
                u64::from(groups) * u64::from(u.max_rows)
            })
        })
        .collect();
    let (max_groups, max_rows) = match &query.truncated {
        Some(t) => truncation_bounds(t, &unit_rows)?,
        None => {
            let (g, r) = crate::analyze::contribution_bounds(sources.iter().map(|(d, _)| *d));
            (dp.max_groups.map_or(g, |cap| cap.min(g)), r)
        }
    };
    let mut counts = Vec::new();
    for kind in &count_kinds {
        // A unit adds at most max_rows rows to a group, and itself once.
        let per_group = match kind {
            CountKind::DistinctUnits => dashu::rational::RBig::from(1u8),
            _ => dashu::rational::RBig::from(max_rows),
        };
        // A clamped-values count is released as one total over all groups:
        // a unit moves it by up to max_groups · max_rows.
        let sensitivity = match kind {
            CountKind::Clamped(_) => vector_sensitivity(
                mechanism,
                1,
                &(per_group * dashu::rational::RBig::from(max_groups)),
            )?,
            _ => vector_sensitivity(mechanism, max_groups, &per_group)?,
        };
        counts.push(CountStatistic {
            kind: kind.clone(),
            noise: plan_noise(mechanism, sensitivity, &share)?,
        });
    }
    let mut sums = Vec::new();
    for summand in &sum_columns {
        let col = summand.column;
        let Bounds { lo, hi, .. } = fixed_point_bounds(col)?;
        let (lo_fp, hi_fp) = summand.fixed_point_bounds()?;
        let per_row = lo_fp.unsigned_abs().max(hi_fp.unsigned_abs());
        // No group's total can wrap the fixed-point decimal: a group has at
        // most as many units as the primary table has rows (its footer's
        // row count, public metadata), each adding at most per_row · max_rows.
        let rows = u128::from(catalog.declared_rows(&dataset.id).unwrap_or(u64::MAX)).max(1);
        if per_row
            .checked_mul(u128::from(max_rows))
            .and_then(|v| v.checked_mul(rows))
            .is_none_or(|v| v >= 10u128.pow(u32::from(DECIMAL_PRECISION)))
        {
            return Err(EngineError::Unavailable(format!(
                "a group's total of `{}` could exceed the 38-digit fixed-point range ({} rows of `{}`, each up to max_rows = {max_rows} values within the bounds); the security officer must narrow its bounds or precision",
                summand.label, rows, dataset.id
            )));
        }
        let per_group =
            dashu::rational::RBig::from(per_row) * dashu::rational::RBig::from(max_rows);
        sums.push(SumStatistic {
            column: summand.label.clone(),
            squared: summand.squared,
            precision: summand.precision(),
            lo_fp,
            hi_fp,
            bounds: (lo, hi),
            noise: plan_noise(
                mechanism,
                vector_sensitivity(mechanism, max_groups, &per_group)?,
                &share,
            )?,
        });
    }

    let mut quantiles = Vec::new();
    let mut quantile_inputs = Vec::new();
    for (label, col, alpha) in &quantile_calls {
        let Bounds { lo_fp, hi_fp, .. } = fixed_point_bounds(col)?;
        let grid = QuantileGrid::over(lo_fp, hi_fp);
        let (scale, spent) = crate::mechanisms::quantile_scale(
            mechanism, &grid, *alpha, max_rows, max_groups, &share,
        )?;
        quantiles.push(QuantileStatistic {
            column: label.clone(),
            alpha: *alpha,
            precision: col.precision,
            grid,
            mechanism,
            scale,
            spent,
        });
        quantile_inputs.push((label.clone(), *col, grid));
    }

    let keys = match selection {
        Err(keys) => KeySet::Public(keys),
        Ok((count, delta)) => KeySet::Selected(Selection {
            count,
            tau: crate::mechanisms::selection_threshold(
                mechanism,
                &counts[count].noise.scale,
                max_groups,
                delta,
            )?,
            min_units: policy.query_min_group_size(
                grant,
                &query
                    .sources
                    .iter()
                    .map(|s| s.dataset.as_str())
                    .collect::<Vec<_>>(),
            ),
            delta,
            max_keys: grant.max_result_rows as usize,
            other_row: dp.other_row,
            observed: plan_noise(mechanism, dashu::rational::RBig::from(max_groups), &share)?,
        }),
    };

    let ctx = RewriteContext {
        query: &query,
        sources,
        scans,
        unit,
        // A row-level unit is read alone (refused above otherwise).
        rows_are_units: query.truncated.is_some() || unit.kind == UnitKind::Row,
        row_filters,
        unit_rows,
        key_domains,
        sums: sum_columns.clone(),
        counts: count_kinds.clone(),
        quantiles: quantile_inputs,
        max_groups,
        max_rows,
        key_space: keys.known_len().unwrap_or(usize::MAX),
        release_summary: format!(
            "{} over {} keys: {}",
            mechanism.name(),
            keys.kind(),
            counts
                .iter()
                .map(|c| format!("{:?}", c.kind))
                .chain(sums.iter().map(|s| {
                    format!(
                        "Sum{}({})",
                        if s.squared { "OfSquares" } else { "" },
                        s.column
                    )
                }))
                .chain(
                    quantiles
                        .iter()
                        .map(|q| format!("Quantile({}, {})", q.column, q.alpha))
                )
                .collect::<Vec<_>>()
                .join(", ")
        ),
        keys: bounding,
    };
    let mut builder = LogicalPlanBuilder::from(ctx.scans[0].clone());
    let mut after = Vec::new();
    for stage in stages() {
        builder = stage.rewrite(builder, &ctx)?;
        after.push((stage.name(), builder.clone().build().map_err(df)?));
    }
    let plan = builder
        .build()
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    let group_columns = query
        .group_keys
        .iter()
        .map(|k| k.column().to_owned())
        .collect();
    Ok(CertifiedPlan {
        plan,
        stages: after,
        spec: ReleaseSpec {
            dataset: dataset.id.clone(),
            mechanism,
            group_columns,
            keys,
            max_groups,
            counts,
            sums,
            quantiles,
            aggregates,
            query,
            cost,
        },
    })
}

/// The contribution bounds of a truncated join, as `(1, S)`: one unit
/// changes at most `S` joined rows, in any groups.
///
/// Before the join each side keeps at most `C` rows per unit (its
/// `max_groups · max_rows`) and then at most `M` rows per key value, both
/// chosen by a keyed hash of the row. Removing a unit removes at most `C`
/// rows of a side; each one removed from a key's kept rows lets at most one
/// other row in, so the side's kept rows change by at most `2C`. Each kept
/// row meets at most `M` rows of the other side, so the joined rows change
/// by at most `S = 2M(C₁ + C₂)` (a self-join counts the unit on both sides).
/// Counts then move by at most `S` in total and sums by `S` times the
/// largest bound: exactly the sensitivities of one group with `max_rows =
/// S`. Quantiles spend their share as if all `S` rows fell in one group;
/// their privacy loss grows at least linearly in the rows changed, so
/// spreading them over groups costs no more. The joined rows are released
/// as they are (each its own contribution), with public group keys only.
fn truncation_bounds(t: &crate::analyze::Truncation, unit_rows: &[u64]) -> Result<(u32, u32)> {
    let [(a, _), (b, _)] = &t.sides;
    let rows = unit_rows[*a]
        .checked_add(unit_rows[*b])
        .and_then(|c| c.checked_mul(2 * u64::from(t.max_matches)))
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| {
            EngineError::Unavailable(
                "the truncated join's bound on a unit's joined rows overflows; the security officer must lower max_matches or the units' bounds".into(),
            )
        })?;
    Ok((1, rows))
}

/// A bounded column's declared bounds, and the same in fixed-point units
/// (rounded inwards).
pub(crate) fn fixed_point_bounds(col: &Column) -> Result<Bounds> {
    let (lo, hi) = col
        .bounds
        .ok_or_else(|| EngineError::Internal("unbounded column".into()))?;
    Ok(Bounds::new(lo, hi, col.precision as i8))
}

/// The index of an item in a list, adding it on first use.
fn index_of<T: PartialEq>(items: &mut Vec<T>, item: T) -> usize {
    match items.iter().position(|x| *x == item) {
        Some(i) => i,
        None => {
            items.push(item);
            items.len() - 1
        }
    }
}

/// The index of a summed column, adding it on first use.
fn sum_index<'a>(
    column: &'a Column,
    label: &str,
    squared: bool,
    sums: &mut Vec<Summand<'a>>,
) -> usize {
    match sums
        .iter()
        .position(|s| s.label == label && s.squared == squared)
    {
        Some(i) => i,
        None => {
            sums.push(Summand {
                label: label.to_owned(),
                column,
                squared,
            });
            sums.len() - 1
        }
    }
}

/// δ for partition selection over the query's group columns, or why the
/// grant cannot select partitions.
///
/// The grant's `delta` is its δ budget for a window, composed by basic
/// composition like its ε (DP-SEMANTICS.md, "Budget and accounting"): each
/// query spends the share of it that its charge is of the budget, `δ ·
/// per_query / budget`. The ledger refuses charges beyond the budget, so
/// the queries of one window spend at most `delta` together on selection.
fn selection_delta(
    query: &PrivateQuery,
    key_domains: &[Option<Vec<DomainValue>>],
    grant: &Grant,
    dp: &veil_policy::DpSettings,
    data_type: impl Fn(&str) -> Result<DataType>,
) -> Result<f64> {
    let private: Vec<&str> = query
        .group_keys
        .iter()
        .zip(key_domains)
        .filter(|(_, d)| d.is_none())
        .map(|(k, _)| k.column())
        .collect();
    let name = |g: &str| -> Result<String> {
        let c = query.source_column(g)?;
        Ok(format!("`{}.{}`", query.sources[c.source].dataset, c.name))
    };
    let names = private
        .iter()
        .map(|g| name(g))
        .collect::<Result<Vec<_>>>()?
        .join(", ");
    let delta = match dp.accounting.delta() {
        delta if delta > 0.0 => delta * (dp.per_query / dp.budget).min(1.0),
        _ => {
            return Err(EngineError::rejected(
                Rule::GroupKeyWithoutDomain,
                format!(
                    "{names} has no public domain listed in the policy, so its keys can only be released by DP partition selection, which needs a grant with δ > 0 (`delta` in its `[grant.dp]`); grant `{}` has none. Group by a column whose domain the policy lists, or ask the data owner for such a grant",
                    grant.id
                ),
            ));
        }
    };
    for g in private {
        let t = data_type(g)?;
        if !(t.is_integer()
            || matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View))
        {
            return Err(EngineError::rejected(
                Rule::UnsupportedShape,
                format!(
                    "{} is neither text nor an integer; partition selection groups by text or integer columns only",
                    name(g)?
                ),
            ));
        }
    }
    Ok(delta)
}

/// A key's public domain from the policy: a column's declared values, or
/// every bucket `width · ⌊x / width⌋` of `x` within the column's bounds.
pub(crate) fn key_domain(key: &GroupKey, column: &Column) -> Option<Vec<DomainValue>> {
    match key {
        GroupKey::Column(_) => column.domain_values().map(<[DomainValue]>::to_vec),
        GroupKey::Bucket { width, .. } => {
            let (lo, hi) = column.bounds?;
            bucket_domain(lo, hi, *width)
        }
    }
}

/// Every bucket `width · ⌊x / width⌋` of `x` in `lo..=hi`; `None` beyond a
/// million buckets or the integers (bounds there saturate).
fn bucket_domain(lo: f64, hi: f64, width: i64) -> Option<Vec<DomainValue>> {
    // `as` saturates: a bound beyond the integers would cut the list short.
    let bucket = |x: f64| {
        let k = (x / width as f64).floor();
        (k >= i64::MIN as f64 && k < i64::MAX as f64).then_some(k as i64)
    };
    let (first, last) = (bucket(lo)?, bucket(hi)?);
    if last.checked_sub(first).is_none_or(|n| n > 1_000_000) {
        return None;
    }
    (first..=last)
        .map(|k| k.checked_mul(width).map(DomainValue::Int))
        .collect()
}

/// All public keys: the product of the group keys' domains, in order;
/// `None` when a group key has no public domain.
fn key_product(key_domains: &[Option<Vec<DomainValue>>]) -> Result<Option<Vec<Vec<DomainValue>>>> {
    let mut keys: Vec<Vec<DomainValue>> = vec![vec![]];
    for domain in key_domains {
        let Some(domain) = domain else {
            return Ok(None);
        };
        if keys.len().saturating_mul(domain.len()) > 1_000_000 {
            return Err(EngineError::rejected(
                Rule::ResultTooLarge,
                "the group keys' domains multiply to more than 1,000,000 rows",
            ));
        }
        keys = keys
            .into_iter()
            .flat_map(|k| {
                domain.iter().map(move |v| {
                    let mut k = k.clone();
                    k.push(v.clone());
                    k
                })
            })
            .collect();
    }
    Ok(Some(keys))
}

pub(crate) fn df(e: datafusion::error::DataFusionError) -> EngineError {
    EngineError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_domains_beyond_the_integers_are_no_public_list() {
        assert_eq!(
            bucket_domain(0.0, 20.0, 5),
            Some((0..=4).map(|k| DomainValue::Int(5 * k)).collect())
        );
        assert_eq!(bucket_domain(-1e19, 1e19, 1), None);
        assert_eq!(bucket_domain(9.2e18, 9.3e18, 1), None);
        // Close to the largest integer, with the upper bound beyond it.
        assert_eq!(bucket_domain(9.223_372_036_854_775e18, 1e19, 1), None);
        assert_eq!(bucket_domain(-1e19, -9.223_372_036_854_775e18, 1), None);
        assert_eq!(bucket_domain(f64::NAN, 1.0, 1), None);
        assert_eq!(bucket_domain(0.0, 2e6, 1), None);
    }

    #[test]
    fn a_truncated_join_bound_that_overflows_is_refused() {
        let t = crate::analyze::Truncation {
            sides: [(0, "k".into()), (1, "k".into())],
            max_matches: 3,
        };
        assert_eq!(truncation_bounds(&t, &[2, 5]).expect("fits"), (1, 42));
        assert!(truncation_bounds(&t, &[u64::MAX, 2]).is_err());
        assert!(truncation_bounds(&t, &[u64::MAX / 2, u64::MAX / 2]).is_err());
    }
}
