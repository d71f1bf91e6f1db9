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
        let query = ctx.query;
        let column = |c: &SourceColumn| {
            DfColumn::new(Some(query.sources[c.source].relation.clone()), &c.name)
        };
        let mut joined = vec![false; query.sources.len()];
        joined[0] = true;
        let mut builder = input;
        while let Some(next) = (0..query.sources.len()).find(|&s| {
            !joined[s]
                && query.joins.iter().any(|(l, r)| {
                    (l.source == s && joined[r.source]) || (r.source == s && joined[l.source])
                })
        }) {
            // Every equality between the new table and those already joined.
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
        if joined.iter().any(|j| !j) {
            return Err(EngineError::Internal("a table is not joined".into()));
        }
        Ok(builder)
    }
}
