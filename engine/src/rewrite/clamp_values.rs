//! `ClampValues`: every summed value becomes a fixed-point decimal clamped to
//! its declared bounds, and every quantile's value its rank on the candidate
//! grid ([`crate::quantile_grid`]). Values that do not convert (NaN, ±∞, out of range)
//! become NULL through `TRY_CAST` and are dropped by the sum: no
//! data-dependent error can arise here.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Column as DfColumn;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, cast, col, lit, try_cast, when};
use datafusion::scalar::ScalarValue;

use veil_policy::Column;

use super::{
    RewriteContext, RewriteStage, df, fixed_point_bounds, key_column, rank_column, value_column,
};
use crate::analyze::GroupKey;
use crate::error::Result;

/// See the module documentation.
pub struct ClampValues;

/// A group key's value: the column, or its bucket `w · ⌊x / w⌋` (exact
/// integer arithmetic for integer columns, also below zero).
fn key_expr(key: &GroupKey, ctx: &RewriteContext<'_>) -> Expr {
    let x = col(DfColumn::new(Some(ctx.table.clone()), key.column()));
    let GroupKey::Bucket { width, .. } = key else {
        return x;
    };
    let integer = ctx
        .file_schema
        .field_with_name(key.column())
        .is_ok_and(|f| f.data_type().is_integer());
    let w = lit(*width);
    if integer {
        let x = cast(x, DataType::Int64);
        let remainder = ((x.clone() % w.clone()) + w.clone()) % w;
        x - remainder
    } else {
        let x = cast(x, DataType::Float64);
        datafusion::functions::math::expr_fn::floor(x / lit(*width as f64)) * lit(*width as f64)
    }
}

/// A column's values as fixed-point decimals, its bounds in the same type,
/// and whether a value lies below or above them.
fn fixed_point(column: &Column, ctx: &RewriteContext<'_>) -> Result<(Expr, Expr, Expr)> {
    let (_, _, lo_fp, hi_fp) = fixed_point_bounds(column)?;
    let p = column.precision as i8;
    let decimal = |v: i128| lit(ScalarValue::Decimal128(Some(v), DECIMAL_PRECISION, p));
    let v = try_cast(
        col(DfColumn::new(Some(ctx.table.clone()), &column.name)),
        DataType::Decimal128(DECIMAL_PRECISION, p),
    );
    Ok((v, decimal(lo_fp), decimal(hi_fp)))
}

/// A column's values as fixed-point decimals clamped to its bounds; NULL
/// where they do not convert.
fn clamped(column: &Column, ctx: &RewriteContext<'_>) -> Result<Expr> {
    let (v, lo, hi) = fixed_point(column, ctx)?;
    when(v.clone().lt(lo.clone()), lo)
        .when(v.clone().gt(hi.clone()), hi)
        .otherwise(v)
        .map_err(df)
}

/// 1 where a value lies outside the column's bounds (and is clamped), NULL
/// otherwise: counted like a column's non-NULL values.
fn outside_bounds(column: &Column, ctx: &RewriteContext<'_>) -> Result<Expr> {
    let (v, lo, hi) = fixed_point(column, ctx)?;
    when(v.clone().lt(lo).or(v.gt(hi)), lit(1i64))
        .end()
        .map_err(df)
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
            exprs.push(key_expr(key, ctx).alias(key_column(g)));
        }
        for (i, summand) in ctx.sums.iter().enumerate() {
            let v = clamped(summand.column, ctx)?;
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
        for (q, (column, grid)) in ctx.quantiles.iter().enumerate() {
            exprs.push(grid.rank_of(clamped(column, ctx)?).alias(rank_column(q)));
        }
        for (j, kind) in ctx.counts.iter().enumerate() {
            match kind {
                super::CountKind::NonNull(name) => exprs.push(
                    col(DfColumn::new(Some(ctx.table.clone()), name))
                        .alias(super::counted_column(j)),
                ),
                super::CountKind::Clamped(name) => {
                    let column = ctx.dataset.column(name).ok_or_else(|| {
                        crate::error::EngineError::Internal("column vanished".into())
                    })?;
                    exprs.push(outside_bounds(column, ctx)?.alias(super::counted_column(j)));
                }
                _ => {}
            }
        }
        exprs.push(
            col(DfColumn::new(Some(ctx.table.clone()), &ctx.unit.column)).alias(super::UNIT_COLUMN),
        );
        input.project(exprs).map_err(df)
    }
}
