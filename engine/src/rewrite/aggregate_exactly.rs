//! `AggregateExactly`: per group, the number of kept rows and the exact sums of
//! the clamped fixed-point values (decimal128: `i128` arithmetic, which the
//! bounds keep far from overflow; never a wrapping integer or a float sum).

use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};

use super::{COUNT_COLUMN, RewriteContext, RewriteStage, df, sum_column, value_column};
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
        let mut aggregates = vec![count(lit(1i64)).alias(COUNT_COLUMN)];
        for i in 0..ctx.sums.len() {
            aggregates.push(sum(col(value_column(i))).alias(sum_column(i)));
        }
        input.aggregate(groups, aggregates).map_err(df)
    }
}
