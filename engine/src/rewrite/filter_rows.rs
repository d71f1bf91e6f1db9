//! `FilterRows`: the operator's predicates (in total form, [`total`]: no
//! value can make them fail), the grant's mandatory row filter,
//! and every group key restricted to its public domain (rows outside it could
//! otherwise create keys that are not public); keys left to partition
//! selection only lose NULL, which is never released.

use datafusion::common::DFSchema;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, lit};
use veil_policy::DomainValue;

use super::total::total;
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
        let schema = input.schema().clone();
        let mut predicates = Vec::new();
        for p in &ctx.query.predicates {
            predicates.push(total(p.clone(), &schema)?);
        }
        predicates.extend(key_and_row_filters(
            ctx,
            |s| ctx.below_aggregate(s),
            &schema,
        )?);
        match conjunction(predicates) {
            Some(p) => input.filter(p).map_err(df),
            None => Ok(input),
        }
    }
}

/// The grant's row filters of the tables `read` selects, and their group
/// keys restricted to their domains, all in total form (coerced here, so
/// that the executor adds no cast).
pub(super) fn key_and_row_filters(
    ctx: &RewriteContext<'_>,
    read: impl Fn(usize) -> bool,
    schema: &DFSchema,
) -> Result<Vec<Expr>> {
    let mut predicates = Vec::new();
    for (s, p) in &ctx.row_filters {
        if read(*s) {
            predicates.push(p.clone());
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
    predicates.into_iter().map(|p| total(p, schema)).collect()
}
