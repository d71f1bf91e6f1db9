//! `FilterRows`: the operator's predicates (in total form: no value can make
//! them fail), the grant's mandatory row filter,
//! and every group key restricted to its public domain (rows outside it could
//! otherwise create keys that are not public); keys left to partition
//! selection only lose NULL, which is never released.

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::functions::core::expr_fn::nullif;
use datafusion::logical_expr::expr::{Cast, TryCast};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlanBuilder, Operator, lit};
use veil_policy::DomainValue;

use super::{RewriteContext, RewriteStage, df};
use crate::analyze::GroupKey;
use crate::error::{EngineError, Result};

/// See the module documentation.
pub struct FilterRows;

impl RewriteStage for FilterRows {
    fn name(&self) -> &'static str {
        "filter_rows"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let mut predicates = Vec::new();
        for p in &ctx.query.predicates {
            predicates.push(total(p.clone())?);
        }
        predicates.extend(key_and_row_filters(ctx, |s| ctx.below_aggregate(s))?);
        match conjunction(predicates) {
            Some(p) => input.filter(p).map_err(df),
            None => Ok(input),
        }
    }
}

/// The grant's row filters of the tables `read` selects, and their group
/// keys restricted to their domains, in total form.
pub(super) fn key_and_row_filters(
    ctx: &RewriteContext<'_>,
    read: impl Fn(usize) -> bool,
) -> Result<Vec<Expr>> {
    let mut predicates = Vec::new();
    for (s, p) in &ctx.row_filters {
        if read(*s) {
            predicates.push(total(p.clone())?);
        }
    }
    for (g, domain) in ctx.query.group_keys.iter().zip(&ctx.key_domains) {
        if !read(ctx.key_source(g)?) {
            continue;
        }
        let key = ctx.expr(g.column())?;
        let source = &ctx.query.sources[ctx.query.source_column(g.column())?.source];
        match (g, domain) {
            // Buckets of values within the bounds are the public keys.
            (GroupKey::Bucket { .. }, _) => {
                let (lo, hi) = ctx
                    .column(g.column())?
                    .bounds
                    .ok_or_else(|| EngineError::Internal("bucket without bounds".into()))?;
                predicates.push(key.clone().gt_eq(lit(lo)).and(key.lt_eq(lit(hi))));
            }
            // A public table's column holds only values of its domain;
            // partition selection never releases NULL.
            (_, Some(_)) if !source.private => predicates.push(key.is_not_null()),
            (_, None) => predicates.push(key.is_not_null()),
            (_, Some(domain)) => {
                let list = domain
                    .iter()
                    .map(|v| match v {
                        DomainValue::Int(i) => lit(*i),
                        DomainValue::Text(s) => lit(s.as_str()),
                    })
                    .collect();
                predicates.push(key.in_list(list, false));
            }
        }
    }
    Ok(predicates)
}

/// The total form of a predicate: no row can make it fail, since whether a
/// query fails must not depend on the data. Division and remainder by zero
/// give NULL (`x / NULLIF(y, 0)`), casts become `TRY_CAST` (NULL when a value
/// does not convert). Idempotent: a divisor already guarded stays as it is.
pub(super) fn total(e: Expr) -> Result<Expr> {
    let guarded = |e: &Expr| {
        matches!(e, Expr::ScalarFunction(f)
            if f.func.name() == "nullif" && f.args.get(1) == Some(&lit(0)))
    };
    e.transform(|e| {
        Ok(match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: op @ (Operator::Divide | Operator::Modulo),
                right,
            }) if !guarded(&right) => Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                left,
                op,
                right: Box::new(nullif(*right, lit(0))),
            })),
            Expr::Cast(Cast { expr, field }) => {
                Transformed::yes(Expr::TryCast(TryCast::new(expr, field.data_type().clone())))
            }
            other => Transformed::no(other),
        })
    })
    .map(|t| t.data)
    .map_err(df)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::common::tree_node::TreeNode;
    use datafusion::logical_expr::{Expr, cast, col, lit};
    use proptest::prelude::*;

    use super::total;

    /// Arithmetic and comparisons over two columns and small literals, with
    /// casts, division and remainder anywhere.
    fn expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![Just(col("a")), Just(col("b")), (-2i64..3).prop_map(lit),];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x / y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x % y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x + y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x.gt(y)),
                inner.prop_map(|x| cast(x, DataType::Int32)),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_total_form_is_idempotent_and_total(e in expr()) {
            let once = total(e).expect("total");
            prop_assert_eq!(total(once.clone()).expect("total"), once.clone());
            // Nothing that can fail is left: every divisor is guarded, no
            // plain cast remains.
            let mut unguarded = false;
            once.apply(|x| {
                if let Expr::BinaryExpr(b) = x
                    && matches!(b.op, datafusion::logical_expr::Operator::Divide | datafusion::logical_expr::Operator::Modulo)
                {
                    unguarded |= !matches!(b.right.as_ref(), Expr::ScalarFunction(f) if f.func.name() == "nullif");
                }
                unguarded |= matches!(x, Expr::Cast(_));
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            }).expect("walk");
            prop_assert!(!unguarded, "{once}");
        }
    }
}
