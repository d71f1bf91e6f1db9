//! `JoinTables`: the tables a query reads, inner-joined on the equalities the
//! operator wrote, starting from the first scan and adding each table joined
//! to those already in (the analysis checked that every table is connected
//! and that private tables meet only on their privacy unit). Contributions
//! are bounded after the join, so a unit's rows that a join multiplies are
//! bounded like any others. A query over one table passes through.
//!
//! The two sides of a truncated join (截断关联) are truncated first: after
//! the grant's row filter and the operator's predicates on that table alone,
//! each unit keeps at most its declared rows (`max_groups · max_rows`) and
//! each key value at most `max_matches` rows, both chosen by a keyed hash of
//! the row (see `truncation_bounds` for what this bounds).

use datafusion::common::{Column as DfColumn, JoinType};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, col, lit};

use super::total::total;
use super::{RewriteContext, RewriteStage, df};
use crate::analyze::SourceColumn;
use crate::error::{EngineError, Result};
use crate::keyed_hash::KeyedHash;

/// See the module documentation.
pub struct JoinTables;

impl RewriteStage for JoinTables {
    fn name(&self) -> &'static str {
        "join_tables"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        // With a per-unit aggregate, only the tables it reads; the stage
        // that computes it joins the others to its output.
        let first = (0..ctx.query.sources.len())
            .find(|s| ctx.below_aggregate(*s))
            .ok_or_else(|| EngineError::Internal("no table to read".into()))?;
        let mut joined = vec![false; ctx.query.sources.len()];
        joined[first] = true;
        let Some(t) = &ctx.query.truncated else {
            let builder = if first == 0 {
                input
            } else {
                LogicalPlanBuilder::from(ctx.scans[first].clone())
            };
            return join_sources(builder, ctx, &ctx.scans, &mut joined, |s| {
                ctx.below_aggregate(s)
            });
        };
        let mut inputs = ctx.scans.clone();
        for (s, key) in &t.sides {
            inputs[*s] = truncate(ctx, *s, key, t.max_matches)?;
        }
        let builder = LogicalPlanBuilder::from(inputs[first].clone());
        join_sources(builder, ctx, &inputs, &mut joined, |_| true)
    }
}

const PRIORITY: &str = "__veil_truncation_priority";
const UNIT_ROW: &str = "__veil_unit_row";
const KEY_ROW: &str = "__veil_key_row";

/// Source `s`, filtered by what concerns it alone, then at most its
/// declared rows per unit and `max_matches` rows per value of `key`.
fn truncate(
    ctx: &RewriteContext<'_>,
    s: usize,
    key: &str,
    max_matches: u32,
) -> Result<LogicalPlan> {
    let (dataset, _) = ctx.sources[s];
    let unit = dataset
        .unit
        .as_ref()
        .ok_or_else(|| EngineError::Internal("private dataset without unit".into()))?;
    let relation = &ctx.query.sources[s].relation;
    let column = |name: &str| Expr::Column(DfColumn::new(Some(relation.clone()), name));
    let schema = ctx.scans[s].schema().clone();
    let mut own = Vec::new();
    for (f, p) in &ctx.row_filters {
        if *f == s {
            own.push(total(p.clone(), &schema)?);
        }
    }
    for p in &ctx.query.predicates {
        if p.column_refs()
            .iter()
            .all(|c| c.relation.as_ref() == Some(relation))
        {
            own.push(total(p.clone(), &schema)?);
        }
    }
    let mut builder = LogicalPlanBuilder::from(ctx.scans[s].clone());
    if let Some(p) = conjunction(own) {
        builder = builder.filter(p).map_err(df)?;
    }
    let columns: Vec<Expr> = builder
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let mut with_priority = columns.clone();
    with_priority.push(KeyedHash::call(ctx.keys.rows, columns.clone()).alias(PRIORITY));
    let per_unit = ctx.unit_rows[s];
    let ranked = |partition: Expr, name: &str| {
        row_number()
            .partition_by(vec![partition])
            .order_by(vec![col(PRIORITY).sort(true, false)])
            .build()
            .map(|e| e.alias(name))
            .map_err(df)
    };
    builder
        .project(with_priority)
        .map_err(df)?
        .window(vec![ranked(column(&unit.column), UNIT_ROW)?])
        .and_then(|b| b.filter(col(UNIT_ROW).lt_eq(lit(per_unit))))
        .map_err(df)?
        .window(vec![ranked(column(key), KEY_ROW)?])
        .and_then(|b| b.filter(col(KEY_ROW).lt_eq(lit(u64::from(max_matches)))))
        .and_then(|b| b.project(columns))
        .and_then(|b| b.build())
        .map_err(df)
}

/// Joins every allowed table not yet `joined` to `builder`, each once it
/// connects to those already in, on every equality between them.
pub(super) fn join_sources(
    mut builder: LogicalPlanBuilder,
    ctx: &RewriteContext<'_>,
    inputs: &[LogicalPlan],
    joined: &mut [bool],
    allowed: impl Fn(usize) -> bool,
) -> Result<LogicalPlanBuilder> {
    let query = ctx.query;
    let column =
        |c: &SourceColumn| DfColumn::new(Some(query.sources[c.source].relation.clone()), &c.name);
    while let Some(next) = (0..query.sources.len()).find(|&s| {
        !joined[s]
            && allowed(s)
            && query.joins.iter().any(|(l, r)| {
                (l.source == s && joined[r.source]) || (r.source == s && joined[l.source])
            })
    }) {
        let (mut left, mut right) = (Vec::new(), Vec::new());
        for (l, r) in &query.joins {
            let (inside, new) = match (l.source == next, r.source == next) {
                (true, false) => (r, l),
                (false, true) => (l, r),
                _ => continue,
            };
            if joined[inside.source] {
                left.push(column(inside));
                right.push(column(new));
            }
        }
        builder = builder
            .join(inputs[next].clone(), JoinType::Inner, (left, right), None)
            .map_err(df)?;
        joined[next] = true;
    }
    if (0..joined.len()).any(|s| allowed(s) && !joined[s]) {
        return Err(EngineError::Internal("a table is not joined".into()));
    }
    Ok(builder)
}
