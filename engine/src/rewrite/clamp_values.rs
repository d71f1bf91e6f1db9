//! `ClampValues`: every summed value becomes a fixed-point decimal clamped to
//! its declared bounds. Values that do not convert (NaN, ±∞, out of range)
//! become NULL through `TRY_CAST` and are dropped by the sum: no
//! data-dependent error can arise here.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Column as DfColumn;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit, try_cast, when};
use datafusion::scalar::ScalarValue;

use super::{RewriteContext, RewriteStage, df, value_column};
use crate::error::{EngineError, Result};

/// See the module documentation.
pub struct ClampValues;

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
        let mut exprs: Vec<Expr> = ctx
            .query
            .group_columns
            .iter()
            .map(|g| col(DfColumn::new(Some(ctx.table.clone()), g)))
            .collect();
        for (i, column) in ctx.sums.iter().enumerate() {
            let (lo, hi) = column
                .bounds
                .ok_or_else(|| EngineError::Internal("unbounded sum column".into()))?;
            let scale = 10f64.powi(column.precision as i32);
            let p = column.precision as i8;
            let decimal = |v: i128| lit(ScalarValue::Decimal128(Some(v), DECIMAL_PRECISION, p));
            let (lo_fp, hi_fp) = ((lo * scale).ceil() as i128, (hi * scale).floor() as i128);
            let v = try_cast(
                col(DfColumn::new(Some(ctx.table.clone()), &column.name)),
                DataType::Decimal128(DECIMAL_PRECISION, p),
            );
            let clamped = when(v.clone().lt(decimal(lo_fp)), decimal(lo_fp))
                .when(v.clone().gt(decimal(hi_fp)), decimal(hi_fp))
                .otherwise(v)
                .map_err(df)?;
            exprs.push(clamped.alias(value_column(i)));
        }
        for (j, kind) in ctx.counts.iter().enumerate() {
            if let super::CountKind::NonNull(name) = kind {
                exprs.push(
                    col(DfColumn::new(Some(ctx.table.clone()), name))
                        .alias(super::counted_column(j)),
                );
            }
        }
        exprs.push(
            col(DfColumn::new(Some(ctx.table.clone()), &ctx.unit.column)).alias(super::UNIT_COLUMN),
        );
        input.project(exprs).map_err(df)
    }
}
