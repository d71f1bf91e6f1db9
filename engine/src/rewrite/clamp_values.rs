//! `ClampValues`: every summed value becomes a fixed-point decimal clamped to
//! its declared bounds ([`crate::clamp`]), and every quantile's value its rank
//! on the candidate grid ([`crate::quantile_grid`]). Values that are no number
//! (NULL, NaN, text that does not convert) become NULL and are dropped by the
//! sum: no data-dependent error can arise here.

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, lit, try_cast};

use super::{
    RewriteContext, RewriteStage, df, fixed_point_bounds, key_column, rank_column, value_column,
};
use crate::analyze::GroupKey;
use crate::clamp::Clamp;
use crate::error::Result;

/// See the module documentation.
pub struct ClampValues;

/// A group key's value: the column, or its bucket `w · ⌊x / w⌋` (exact
/// integer arithmetic for integer columns, also below zero). `TRY_CAST`, as
/// everywhere a value meets a cast: an unsigned value beyond the 64-bit
/// integers becomes NULL, which no public key holds.
fn key_expr(key: &GroupKey, ctx: &RewriteContext<'_>) -> Result<Expr> {
    let x = ctx.expr(key.column())?;
    let GroupKey::Bucket { width, .. } = key else {
        return Ok(x);
    };
    let w = lit(*width);
    Ok(if ctx.data_type(key.column())?.is_integer() {
        let x = try_cast(x, DataType::Int64);
        let remainder = ((x.clone() % w.clone()) + w.clone()) % w;
        x - remainder
    } else {
        let x = try_cast(x, DataType::Float64);
        datafusion::functions::math::expr_fn::floor(x / lit(*width as f64)) * lit(*width as f64)
    })
}

/// A column's values as fixed-point decimals clamped to its bounds; NULL
/// where they are no value (NULL, NaN, text that is no number).
pub(super) fn clamped(label: &str, ctx: &RewriteContext<'_>) -> Result<Expr> {
    let bounds = fixed_point_bounds(ctx.column(label)?)?;
    Ok(bounds.call(Clamp::Value, ctx.expr(label)?))
}

/// 1 where a value lies outside the column's bounds (and is clamped), NULL
/// otherwise: counted like a column's non-NULL values.
fn outside_bounds(label: &str, ctx: &RewriteContext<'_>) -> Result<Expr> {
    let bounds = fixed_point_bounds(ctx.column(label)?)?;
    Ok(bounds.call(Clamp::Outside, ctx.expr(label)?))
}

/// Precision of the fixed-point decimals.
pub(crate) const DECIMAL_PRECISION: u8 = 38;

impl RewriteStage for ClampValues {
    fn name(&self) -> &'static str {
        "clamp_values"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let mut exprs: Vec<Expr> = Vec::new();
        for (g, key) in ctx.query.group_keys.iter().enumerate() {
            exprs.push(key_expr(key, ctx)?.alias(key_column(g)));
        }
        for (i, summand) in ctx.sums.iter().enumerate() {
            let v = clamped(&summand.label, ctx)?;
            let v = if summand.squared {
                // Exact: the square of a clamped value fits 38 digits (checked
                // when the statistic was planned).
                try_cast(
                    v.clone() * v,
                    DataType::Decimal128(DECIMAL_PRECISION, summand.precision() as i8),
                )
            } else {
                v
            };
            exprs.push(v.alias(value_column(i)));
        }
        for (q, (label, _, grid)) in ctx.quantiles.iter().enumerate() {
            exprs.push(grid.rank_of(clamped(label, ctx)?).alias(rank_column(q)));
        }
        for (j, kind) in ctx.counts.iter().enumerate() {
            match kind {
                super::CountKind::NonNull(label) => {
                    exprs.push(ctx.expr(label)?.alias(super::counted_column(j)));
                }
                super::CountKind::Clamped(label) => {
                    exprs.push(outside_bounds(label, ctx)?.alias(super::counted_column(j)));
                }
                _ => {}
            }
        }
        exprs.push(ctx.unit_expr()?.alias(super::UNIT_COLUMN));
        input.project(exprs).map_err(df)
    }
}
