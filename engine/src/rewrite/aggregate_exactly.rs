//! `AggregateExactly`: per group, the sums of the units' bounded counts and
//! the exact sums of their fixed-point contributions (decimal128: `i128`
//! arithmetic, which the bounds keep far from overflow; never a wrapping
//! integer or a float sum). Each input row is one unit in one group, so the
//! number of rows is the distinct-unit count. Quantiles get a histogram of
//! their kept values' ranks.

use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};

use super::{
    CountKind, RewriteContext, RewriteStage, count_column, df, histogram_column, key_column,
    sum_column, unit_count_column, unit_ranks_column, unit_sum_column,
};
use crate::error::Result;

/// See the module documentation.
pub struct AggregateExactly;

impl RewriteStage for AggregateExactly {
    fn name(&self) -> &'static str {
        "aggregate_exactly"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let groups: Vec<Expr> = (0..ctx.query.group_keys.len())
            .map(|g| col(key_column(g)))
            .collect();
        let mut aggregates: Vec<Expr> = ctx
            .counts
            .iter()
            .enumerate()
            .map(|(j, kind)| {
                match kind {
                    CountKind::DistinctUnits => count(lit(1i64)),
                    _ => sum(col(unit_count_column(j))),
                }
                .alias(count_column(j))
            })
            .collect();
        for i in 0..ctx.sums.len() {
            aggregates.push(sum(col(unit_sum_column(i))).alias(sum_column(i)));
        }
        for (q, (_, _, grid)) in ctx.quantiles.iter().enumerate() {
            aggregates.push(
                grid.histogram(col(unit_ranks_column(q)))
                    .alias(histogram_column(q)),
            );
        }
        input.aggregate(groups, aggregates).map_err(df)
    }
}
