//! `JoinTables`: the tables a query reads, inner-joined on the equalities the
//! operator wrote, starting from the first scan and adding each table joined
//! to those already in (the analysis checked that every table is connected
//! and that private tables meet only on their privacy unit). Contributions
//! are bounded after the join, so a unit's rows that a join multiplies are
//! bounded like any others. A query over one table passes through.

use datafusion::common::{Column as DfColumn, JoinType};
use datafusion::logical_expr::LogicalPlanBuilder;

use super::{RewriteContext, RewriteStage, df};
use crate::analyze::SourceColumn;
use crate::error::{EngineError, Result};

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
        let builder = if first == 0 {
            input
        } else {
            LogicalPlanBuilder::from(ctx.scans[first].clone())
        };
        join_sources(builder, ctx, &mut joined, |s| ctx.below_aggregate(s))
    }
}

/// Joins every allowed table not yet `joined` to `builder`, each once it
/// connects to those already in, on every equality between them.
pub(super) fn join_sources(
    mut builder: LogicalPlanBuilder,
    ctx: &RewriteContext<'_>,
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
            .join(
                ctx.scans[next].clone(),
                JoinType::Inner,
                (left, right),
                None,
            )
            .map_err(df)?;
        joined[next] = true;
    }
    if (0..joined.len()).any(|s| allowed(s) && !joined[s]) {
        return Err(EngineError::Internal("a table is not joined".into()));
    }
    Ok(builder)
}
