//! `BoundContributions`: one row per (unit, group) carrying the unit's
//! contribution to each statistic, over at most `max_rows` of its rows in
//! that group (L∞), and at most `max_groups` such rows per unit (L0).
//!
//! Rows and groups are ranked by a keyed hash under a fresh per-query key, so
//! the kept ones are a uniformly random choice, never "the first rows"; the
//! ranking of a unit's rows depends on that unit's rows alone. The L∞ bound
//! is one hash aggregation ([`BoundedSample`] keeps the `max_rows` smallest
//! priorities per pair), so the raw rows are never sorted; the L0 bound ranks
//! the much smaller set of (unit, group) rows in one sorted stream (a row's
//! position minus the start of its unit's run: no per-unit partitions), and
//! is skipped when the query has no more possible keys than `max_groups`.
//!
//! When every row is its own unit, each row is already one (unit, group)
//! contribution and only the per-row statistics are projected.

use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::functions_window::expr_fn::{rank, row_number};
use datafusion::logical_expr::{Expr, ExprFunctionExt, LogicalPlanBuilder, col, lit, when};

use super::{
    CountKind, RewriteContext, RewriteStage, UNIT_COLUMN, counted_column, df, key_column,
    rank_column, unit_count_column, unit_ranks_column, unit_sum_column, value_column,
};
use crate::bounded_sample::{BoundedSample, Output};
use crate::error::{EngineError, Result};
use crate::keyed_hash::KeyedHash;

/// See the module documentation.
pub struct BoundContributions;

const ROWS: &str = "__veil_rows";
const SAMPLE: &str = "__veil_sample";
const GROUP_PRIORITY: &str = "__veil_group_priority";
const POSITION: &str = "__veil_position";
const RUN_START: &str = "__veil_run_start";

/// The column whose non-NULL values the `j`-th count counts.
fn counted(kind: &CountKind, j: usize) -> Option<Expr> {
    match kind {
        CountKind::Rows => Some(lit(1i64)),
        CountKind::NonNull(_) | CountKind::Clamped(_) => Some(col(counted_column(j))),
        CountKind::Summed(i) => Some(col(value_column(*i))),
        // Each (unit, group) row is one unit: counted by the final aggregate.
        CountKind::DistinctUnits => None,
    }
}

/// The sample's value columns and outputs, built up statistic by statistic.
#[derive(Default)]
struct SamplePlan {
    values: Vec<Expr>,
    outputs: Vec<Output>,
}

impl SamplePlan {
    /// Requests `output` over `value` (one column per distinct value); returns
    /// the expression reading it from the sample's struct.
    fn request(&mut self, value: Expr, output: fn(usize) -> Output) -> Expr {
        let c = match self.values.iter().position(|v| *v == value) {
            Some(c) => c,
            None => {
                self.values.push(value);
                self.values.len() - 1
            }
        };
        self.outputs.push(output(c));
        get_field(col(SAMPLE), BoundedSample::field(self.outputs.len() - 1))
    }
}

impl RewriteStage for BoundContributions {
    fn name(&self) -> &'static str {
        "bound_contributions"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let groups: Vec<Expr> = (0..ctx.query.group_keys.len())
            .map(|g| col(key_column(g)))
            .collect();
        let counts = ctx.counts.iter().enumerate();
        if ctx.rows_are_units {
            let mut per_row = groups;
            for (j, kind) in counts {
                if let Some(c) = counted(kind, j) {
                    let one = when(c.is_not_null(), lit(1i64)).otherwise(lit(0i64));
                    per_row.push(one.map_err(df)?.alias(unit_count_column(j)));
                }
            }
            for i in 0..ctx.sums.len() {
                per_row.push(col(value_column(i)).alias(unit_sum_column(i)));
            }
            for q in 0..ctx.quantiles.len() {
                per_row.push(col(rank_column(q)).alias(unit_ranks_column(q)));
            }
            return input.project(per_row).map_err(df);
        }

        let mut unit_and_groups = vec![col(UNIT_COLUMN)];
        unit_and_groups.extend(groups.iter().cloned());
        // One sample of max_rows rows per (unit, group) serves every
        // statistic; a row count needs none: any max_rows of a unit's rows
        // hold min(rows, max_rows) rows, a plain count capped afterwards.
        let k = ctx.max_rows;
        let mut sample = SamplePlan::default();
        let mut contributions = Vec::new();
        if ctx.counts.contains(&CountKind::Rows) {
            contributions.push(count(lit(1i64)).alias(ROWS));
        }
        let mut per_pair_exprs = unit_and_groups.clone();
        for (j, kind) in counts {
            let contribution = match kind {
                CountKind::DistinctUnits => continue,
                CountKind::Rows => when(col(ROWS).gt(lit(i64::from(k))), lit(i64::from(k)))
                    .otherwise(col(ROWS))
                    .map_err(df)?,
                other => {
                    let value = counted(other, j)
                        .ok_or_else(|| EngineError::Internal("uncounted count".into()))?;
                    sample.request(value, Output::Count)
                }
            };
            per_pair_exprs.push(contribution.alias(unit_count_column(j)));
        }
        for i in 0..ctx.sums.len() {
            per_pair_exprs.push(
                sample
                    .request(col(value_column(i)), Output::Sum)
                    .alias(unit_sum_column(i)),
            );
        }
        for q in 0..ctx.quantiles.len() {
            per_pair_exprs.push(
                sample
                    .request(col(rank_column(q)), Output::Kept)
                    .alias(unit_ranks_column(q)),
            );
        }
        // A row's priority hashes the values the sample keeps: within one
        // (unit, group) they tell rows apart, and rows with equal values are
        // interchangeable (the unit and keys, equal within the pair, and the
        // columns no statistic reads need not be hashed). The sample hashes
        // them itself, only in pairs with more than `k` rows.
        if !sample.outputs.is_empty() {
            contributions.push(
                BoundedSample::call(k, ctx.keys.rows, sample.values, sample.outputs).alias(SAMPLE),
            );
        }
        let per_pair = input
            .aggregate(unit_and_groups.clone(), contributions)
            .and_then(|b| b.project(per_pair_exprs))
            .map_err(df)?;
        if ctx.key_space <= ctx.max_groups as usize {
            return Ok(per_pair);
        }

        let mut with_group_priority: Vec<Expr> = per_pair
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        with_group_priority
            .push(KeyedHash::call(ctx.keys.groups, unit_and_groups).alias(GROUP_PRIORITY));
        // Each (unit, group) row's rank among its unit's rows by priority
        // (ties by the keys): its position in one order by (unit, priority,
        // keys) minus the position where its unit's run starts. Two windows
        // over one sorted stream, without PARTITION BY's bookkeeping per unit.
        let unit_order = col(UNIT_COLUMN).sort(true, false);
        let mut order = vec![unit_order.clone(), col(GROUP_PRIORITY).sort(true, false)];
        order.extend(groups.iter().map(|g| g.clone().sort(true, false)));
        let position = row_number()
            .order_by(order)
            .build()
            .map_err(df)?
            .alias(POSITION);
        let run_start = rank()
            .order_by(vec![unit_order])
            .build()
            .map_err(df)?
            .alias(RUN_START);
        let kept = col(POSITION).lt(col(RUN_START) + lit(u64::from(ctx.max_groups)));
        per_pair
            .project(with_group_priority)
            // One window node per ordering; the unit's run start reads the
            // stream already sorted by (unit, priority, keys).
            .and_then(|b| b.window(vec![position]))
            .and_then(|b| b.window(vec![run_start]))
            .and_then(|b| b.filter(kept))
            .map_err(df)
    }
}
