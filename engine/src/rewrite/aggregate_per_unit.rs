//! `AggregatePerUnit`: a per-unit inner aggregate (a CTE or subquery grouped
//! by the privacy unit, e.g. visits and spending per patient), computed over
//! the filtered rows, then the tables the query joins to its output (on the
//! unit or its other keys, with their row filters) and the outer query's
//! predicates. Each
//! output row depends on one unit's rows only; `ClampValues` then clamps its
//! values to the bounds the analysis derived from the policy, and the later
//! stages bound and sum them like any column. Sums add values already
//! clamped to the column's bounds. A query without one passes through.

use datafusion::arrow::datatypes::DataType;
use datafusion::functions_aggregate::expr_fn::{avg, count, sum};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, lit, try_cast};

use super::clamp_values::clamped;
use super::filter_rows::key_and_row_filters;
use super::join_tables::join_sources;
use super::total::total;
use super::{RewriteContext, RewriteStage, df};
use crate::analyze::{AggregateCall, derived_column};
use crate::error::{EngineError, Result};

/// See the module documentation.
pub struct AggregatePerUnit;

impl RewriteStage for AggregatePerUnit {
    fn name(&self) -> &'static str {
        "aggregate_per_unit"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let Some(per_unit) = &ctx.query.per_unit else {
            return Ok(input);
        };
        let keys = per_unit
            .keys
            .iter()
            .map(|k| ctx.expr(k))
            .collect::<Result<Vec<_>>>()?;
        let mut values = Vec::new();
        for (k, d) in per_unit.values.iter().enumerate() {
            let value = match &d.call {
                AggregateCall::CountStar => count(lit(1i64)),
                AggregateCall::Count(c) => count(ctx.expr(c)?),
                AggregateCall::Sum(c) => sum(clamped(c, ctx)?),
                AggregateCall::Avg(c) => avg(try_cast(clamped(c, ctx)?, DataType::Float64)),
                _ => return Err(EngineError::Internal("unsupported per-unit call".into())),
            };
            values.push(value.alias(derived_column(k)));
        }
        let aggregated = input.aggregate(keys, values).map_err(df)?;
        // The tables joined to its output, on the unit or its other keys.
        let outside = |s: usize| !ctx.below_aggregate(s);
        let mut joined: Vec<bool> = (0..ctx.query.sources.len())
            .map(|s| ctx.below_aggregate(s))
            .collect();
        let aggregated = join_sources(aggregated, ctx, &ctx.scans, &mut joined, outside)?;
        let schema = aggregated.schema().clone();
        let mut predicates = per_unit
            .predicates
            .iter()
            .map(|p| total(p.clone(), &schema))
            .collect::<Result<Vec<Expr>>>()?;
        predicates.extend(key_and_row_filters(ctx, outside, &schema)?);
        match conjunction(predicates) {
            Some(p) => aggregated.filter(p).map_err(df),
            None => Ok(aggregated),
        }
    }
}
