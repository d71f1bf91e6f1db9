//! `BoundContributions`: each privacy unit keeps at most `max_groups` groups
//! (L0) and at most `max_rows` rows per group (L∞).
//!
//! Groups and rows are ranked by a keyed hash under a fresh per-query key, so
//! the kept ones are a uniformly random choice, never "the first rows". The
//! ranking of a unit's rows depends on that unit's rows alone.

use datafusion::common::Column as DfColumn;
use datafusion::functions_window::expr_fn::{dense_rank, row_number};
use datafusion::logical_expr::{Expr, ExprFunctionExt, LogicalPlanBuilder, col, lit};

use super::{RewriteContext, RewriteStage, df};
use crate::error::Result;
use crate::keyed_hash::KeyedHash;

/// See the module documentation.
pub struct BoundContributions;

const GROUP_PRIORITY: &str = "__veil_group_priority";
const ROW_PRIORITY: &str = "__veil_row_priority";
const GROUP_RANK: &str = "__veil_group_rank";
const ROW_RANK: &str = "__veil_row_rank";

impl RewriteStage for BoundContributions {
    fn name(&self) -> &'static str {
        "bound_contributions"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let c = |name: &str| col(DfColumn::new(Some(ctx.table.clone()), name));
        let unit = c(&ctx.unit.column);
        let groups: Vec<Expr> = ctx.query.group_columns.iter().map(|g| c(g)).collect();
        let values: Vec<Expr> = ctx.value_sources().iter().map(|s| c(s)).collect();

        let mut unit_and_groups = vec![unit.clone()];
        unit_and_groups.extend(groups.iter().cloned());
        let mut row_identity = unit_and_groups.clone();
        row_identity.extend(values.iter().cloned());

        // Keep every column later stages read, plus the two priorities.
        let mut keep: Vec<Expr> = unit_and_groups.clone();
        keep.extend(values.iter().cloned());
        keep.push(KeyedHash::call(ctx.keys.groups, unit_and_groups.clone()).alias(GROUP_PRIORITY));
        keep.push(KeyedHash::call(ctx.keys.rows, row_identity).alias(ROW_PRIORITY));

        let mut group_order = vec![col(GROUP_PRIORITY).sort(true, false)];
        group_order.extend(groups.iter().map(|g| g.clone().sort(true, false)));
        let group_rank = dense_rank()
            .partition_by(vec![unit.clone()])
            .order_by(group_order)
            .build()
            .map_err(df)?
            .alias(GROUP_RANK);
        let row_rank = row_number()
            .partition_by(unit_and_groups)
            .order_by(vec![col(ROW_PRIORITY).sort(true, false)])
            .build()
            .map_err(df)?
            .alias(ROW_RANK);

        input
            .project(keep)
            // Different sort keys need separate window nodes.
            .and_then(|b| b.window(vec![group_rank]))
            .and_then(|b| b.window(vec![row_rank]))
            .and_then(|b| {
                b.filter(
                    col(GROUP_RANK)
                        .lt_eq(lit(u64::from(ctx.max_groups)))
                        .and(col(ROW_RANK).lt_eq(lit(u64::from(ctx.unit.max_rows)))),
                )
            })
            .map_err(df)
    }
}
