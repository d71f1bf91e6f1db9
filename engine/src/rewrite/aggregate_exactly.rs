//! `AggregateExactly`: per group, the number of kept rows and the exact sums of
//! the clamped fixed-point values (decimal128: `i128` arithmetic, which the
//! bounds keep far from overflow; never a wrapping integer or a float sum).

use datafusion::functions_aggregate::expr_fn::{count, count_distinct, sum};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};

use super::{
    CountKind, RewriteContext, RewriteStage, UNIT_COLUMN, count_column, counted_column, df,
    sum_column, value_column,
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
        let groups: Vec<Expr> = ctx.query.group_columns.iter().map(col).collect();
        let mut aggregates: Vec<Expr> = ctx
            .counts
            .iter()
            .enumerate()
            .map(|(j, kind)| {
                match kind {
                    CountKind::Rows => count(lit(1i64)),
                    CountKind::NonNull(_) => count(col(counted_column(j))),
                    CountKind::Summed(i) => count(col(value_column(*i))),
                    CountKind::DistinctUnits => count_distinct(col(UNIT_COLUMN)),
                }
                .alias(count_column(j))
            })
            .collect();
        for i in 0..ctx.sums.len() {
            aggregates.push(sum(col(value_column(i))).alias(sum_column(i)));
        }
        input.aggregate(groups, aggregates).map_err(df)
    }
}
