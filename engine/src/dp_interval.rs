//! `DP_INTERVAL_LOW(agg)` and `DP_INTERVAL_HIGH(agg)`: the bounds of a noisy
//! aggregate's 95% interval as explicit columns.
//!
//! The functions exist in the planning session so that SQL using them plans;
//! `analyze` accepts them only around an aggregate of the query, and
//! post-processing replaces each call by a column of the release that
//! [`crate::mechanisms::release`] fills from noisy values and public
//! parameters only (NULL where no interval is known, as for quantiles). They
//! never run: the function body reports a plain error if a public query uses
//! them.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, plan_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Function name of the lower bound.
pub const LOW: &str = "dp_interval_low";
/// Function name of the upper bound.
pub const HIGH: &str = "dp_interval_high";

#[derive(Debug, PartialEq, Eq, Hash)]
struct IntervalBound {
    name: &'static str,
    signature: Signature,
}

impl ScalarUDFImpl for IntervalBound {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        plan_err!(
            "{} applies to a differentially private aggregate; public data is exact",
            self.name.to_uppercase()
        )
    }
}

/// The two functions, for the planning session.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    [LOW, HIGH]
        .into_iter()
        .map(|name| {
            Arc::new(ScalarUDF::new_from_impl(IntervalBound {
                name,
                signature: Signature::any(1, Volatility::Immutable),
            }))
        })
        .collect()
}

/// Name of the release column holding the lower or upper bound of the
/// `j`-th aggregate.
pub fn bound_column(j: usize, high: bool) -> String {
    if high {
        format!("__veil_high{j}")
    } else {
        format!("__veil_low{j}")
    }
}

/// If `e` calls an interval function, whether it is the upper bound and its
/// argument.
pub fn call(e: &Expr) -> Option<(bool, &[Expr])> {
    match e {
        Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == LOW => {
            Some((false, args))
        }
        Expr::ScalarFunction(ScalarFunction { func, args }) if func.name() == HIGH => {
            Some((true, args))
        }
        _ => None,
    }
}

/// The index of the aggregate an interval call's argument shows: a column of
/// the Aggregate node's output past its `groups` keys.
pub fn target(args: &[Expr], aggregate: &DFSchema, groups: usize) -> Option<usize> {
    let [arg] = args else { return None };
    let mut arg = arg;
    // The planner names `COUNT(*)` by aliasing its column.
    while let Expr::Alias(a) = arg {
        arg = &a.expr;
    }
    match arg {
        Expr::Column(c) => aggregate
            .index_of_column(c)
            .ok()
            .and_then(|i| i.checked_sub(groups)),
        _ => None,
    }
}

/// Replaces every interval call in `e` by its release column (callers keep
/// output names with `alias_if_changed`).
pub fn resolve(e: Expr, aggregate: &DFSchema, groups: usize) -> Result<Transformed<Expr>> {
    e.transform(|e| {
        let replacement = call(&e)
            .and_then(|(high, args)| Some((high, target(args, aggregate, groups)?)))
            .map(|(high, j)| datafusion::logical_expr::col(bound_column(j, high)));
        Ok(match replacement {
            Some(r) => Transformed::yes(r),
            None => Transformed::no(e),
        })
    })
}
