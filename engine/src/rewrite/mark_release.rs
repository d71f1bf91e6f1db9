//! `MarkRelease`: the last stage puts a release node on top of the bounded
//! aggregation. Execution stops below it: the executor runs the node's input
//! and returns bounded aggregates; the broker's mechanisms apply what the
//! node describes (mechanism, statistics, key set). Nothing else in the plan
//! is veil-specific except the keyed-hash and sample functions.

use std::fmt;
use std::sync::Arc;

use datafusion::common::DFSchemaRef;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, LogicalPlanBuilder, UserDefinedLogicalNodeCore,
};

use super::{RewriteContext, RewriteStage, df};
use crate::error::Result;

/// See the module documentation.
pub struct MarkRelease;

/// Where execution stops and noise is applied, with what is released.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Hash)]
pub struct ReleaseNode {
    input: LogicalPlan,
    /// What the broker releases, e.g. `discrete_laplace over public_domain
    /// keys: COUNT(*), SUM(wage_base)`.
    summary: String,
}

impl ReleaseNode {
    /// The bounded aggregation below the node: what executors run.
    pub fn input(&self) -> &LogicalPlan {
        &self.input
    }
}

impl UserDefinedLogicalNodeCore for ReleaseNode {
    fn name(&self) -> &str {
        "VeilRelease"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        self.input.schema()
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "VeilRelease: {}", self.summary)
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> datafusion::common::Result<Self> {
        Ok(ReleaseNode {
            input: inputs.swap_remove(0),
            summary: self.summary.clone(),
        })
    }
}

impl RewriteStage for MarkRelease {
    fn name(&self) -> &'static str {
        "mark_release"
    }

    fn rewrite(
        &self,
        input: LogicalPlanBuilder,
        ctx: &RewriteContext<'_>,
    ) -> Result<LogicalPlanBuilder> {
        let node = ReleaseNode {
            input: input.build().map_err(df)?,
            summary: ctx.release_summary.clone(),
        };
        Ok(LogicalPlanBuilder::from(LogicalPlan::Extension(
            Extension {
                node: Arc::new(node),
            },
        )))
    }
}
