//! Plan analysis: derive every column's *use* from DataFusion's logical plan,
//! check it against the grant, and extract the query's DP shape.
//!
//! Decisions depend on the plan, the policy and public metadata only.

use std::collections::BTreeSet;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchemaRef, TableReference};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::scalar::ScalarValue;
use veil_policy::{Column, Dataset, Grant, Policy, Use};

use crate::dp_interval;
use crate::error::{EngineError, Result, Rule};

/// One aggregate of the query, in the Aggregate node's order.
#[derive(Debug, Clone, PartialEq)]
pub enum AggregateCall {
    /// `COUNT(*)` (or `COUNT(<literal>)`).
    CountStar,
    /// `COUNT(col)`: non-null values.
    Count(String),
    /// `COUNT(DISTINCT <unit>)`: distinct privacy units.
    CountDistinctUnit,
    /// `SUM(col)`.
    Sum(String),
    /// `AVG(col)`.
    Avg(String),
    /// `VAR_POP(col)`, or with `std`, `STDDEV_POP(col)`.
    Var {
        /// Column.
        column: String,
        /// Whether the standard deviation is asked for.
        std: bool,
    },
    /// A DP quantile: `MEDIAN(col)` (α = 0.5), `PERCENTILE_CONT(α) WITHIN
    /// GROUP (ORDER BY col)`, `APPROX_PERCENTILE_CONT(col, α)`, and `MIN`/`MAX`
    /// (α = 0 / 1) where the grant lists them.
    Quantile {
        /// Column.
        column: String,
        /// Which quantile, in [0, 1].
        alpha: f64,
    },
}

/// One GROUP BY key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupKey {
    /// A granted column.
    Column(String),
    /// `FLOOR(col / width) * width` on a column whose policy allows buckets
    /// of a width dividing `width`: the key is `width · ⌊col / width⌋`.
    Bucket {
        /// Column.
        column: String,
        /// Bucket width.
        width: i64,
    },
}

impl GroupKey {
    /// The column the key is computed from.
    pub fn column(&self) -> &str {
        match self {
            GroupKey::Column(c) | GroupKey::Bucket { column: c, .. } => c,
        }
    }
}

/// The DP shape of an aggregate query over one private dataset.
#[derive(Debug, Clone)]
pub struct PrivateQuery {
    /// Dataset id.
    pub dataset: String,
    /// Operator predicates (below the aggregate), to be AND-ed.
    pub predicates: Vec<Expr>,
    /// GROUP BY keys, in order.
    pub group_keys: Vec<GroupKey>,
    /// Aggregates, in the Aggregate node's order.
    pub aggregates: Vec<AggregateCall>,
    /// Output schema of the Aggregate node (group columns, then aggregates).
    pub aggregate_schema: DFSchemaRef,
    /// The operator's whole plan; everything above the Aggregate node is
    /// post-processing of noisy values.
    pub plan: LogicalPlan,
}

/// What a query is, once checked.
#[derive(Debug, Clone)]
pub enum Analyzed {
    /// Touches public datasets only: runs as planned, no DP, no charge.
    Public(LogicalPlan),
    /// Aggregates one private dataset.
    Private(PrivateQuery),
}

/// An expression without any of its (possibly nested) aliases.
pub fn strip_aliases(e: &Expr) -> Expr {
    let mut e = e.clone();
    while let Expr::Alias(a) = e {
        e = *a.expr;
    }
    e
}

/// Dataset ids scanned by a plan, subqueries included.
pub fn scanned_datasets(plan: &LogicalPlan) -> Result<Vec<String>> {
    let mut out = BTreeSet::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            out.insert(dataset_id(&scan.table_name));
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(out.into_iter().collect())
}

/// The dataset id a table reference names.
pub fn dataset_id(t: &TableReference) -> String {
    match t.schema() {
        Some(s) => format!("{s}.{}", t.table()),
        None => t.table().to_owned(),
    }
}

struct Ctx<'a> {
    grant: &'a Grant,
    dataset: &'a Dataset,
    schema: SchemaRef,
}

impl Ctx<'_> {
    fn column(&self, name: &str) -> Result<&Column> {
        self.dataset.column(name).ok_or_else(|| {
            EngineError::rejected(
                Rule::ColumnNotGranted,
                format!(
                    "column `{name}` is not part of dataset `{}` under grant `{}`",
                    self.dataset.id, self.grant.id
                ),
            )
        })
    }

    fn require(&self, name: &str, u: Use) -> Result<&Column> {
        let col = self.column(name)?;
        if col.identifier && matches!(u, Use::GroupBy | Use::Aggregate | Use::Project) {
            let rule = if u == Use::GroupBy {
                Rule::GroupByIdentifier
            } else {
                Rule::ColumnUseNotGranted
            };
            return Err(EngineError::rejected(
                rule,
                format!(
                    "`{}.{name}` is an identifier; it may never be used for {u} (group by a public attribute such as district instead)",
                    self.dataset.id
                ),
            ));
        }
        let granted = self
            .grant
            .scope(&self.dataset.id)
            .and_then(|s| s.columns.get(name));
        match granted {
            Some(uses) if uses.contains(&u) => Ok(col),
            Some(uses) => Err(EngineError::rejected(
                Rule::ColumnUseNotGranted,
                format!(
                    "grant `{}` does not allow {u} on `{}.{name}` (granted: {}); rewrite the query or ask the data owner to widen the grant",
                    self.grant.id,
                    self.dataset.id,
                    if uses.is_empty() {
                        "nothing".to_owned()
                    } else {
                        uses.iter()
                            .map(|u| u.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            )),
            None => Err(EngineError::rejected(
                Rule::ColumnNotGranted,
                format!(
                    "column `{}.{name}` is not granted to operator `{}` under grant `{}`",
                    self.dataset.id, self.grant.grantee, self.grant.id
                ),
            )),
        }
    }
}

/// Checks a planned query against the grant and extracts its shape.
pub fn analyze(plan: LogicalPlan, policy: &Policy, grant: &Grant) -> Result<Analyzed> {
    reject_forbidden_nodes(&plan)?;
    let datasets = scanned_datasets(&plan)?;
    let private: Vec<&Dataset> = datasets
        .iter()
        .filter_map(|d| policy.datasets.get(d))
        .filter(|d| !d.is_public())
        .collect();
    if private.is_empty() {
        return Ok(Analyzed::Public(plan));
    }
    let mut scans = 0;
    let mut subqueries = false;
    plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(_) => scans += 1,
            LogicalPlan::Subquery(_) => subqueries = true,
            _ => {}
        }
        for e in node.expressions() {
            subqueries |= e
                .exists(|e| {
                    Ok(matches!(
                        e,
                        Expr::ScalarSubquery(_)
                            | Expr::Exists(_)
                            | Expr::InSubquery(_)
                            | Expr::OuterReferenceColumn(..)
                    ))
                })
                .unwrap_or(true);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    if subqueries {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            "subqueries over private datasets are not supported yet; aggregate the private table directly",
        ));
    }
    if scans != 1 || datasets.len() != 1 {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            "queries combining a private dataset with other tables are not supported yet; query one private table",
        ));
    }
    let mut schema = None;
    plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            schema = Some(scan.source.schema());
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    let ctx = Ctx {
        grant,
        dataset: private[0],
        schema: schema.ok_or_else(|| EngineError::Internal("no table scan".into()))?,
    };
    analyze_private(plan, &ctx)
}

fn reject_forbidden_nodes(plan: &LogicalPlan) -> Result<()> {
    let mut bad: Option<&'static str> = None;
    plan.apply_with_subqueries(|node| {
        bad = match node {
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some("EXPLAIN"),
            LogicalPlan::DescribeTable(_) => Some("DESCRIBE"),
            LogicalPlan::RecursiveQuery(_) => Some("recursive CTEs"),
            LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => {
                Some("data definition or modification")
            }
            LogicalPlan::Statement(_) => Some("statements"),
            LogicalPlan::Extension(_) => Some("extension nodes"),
            _ => None,
        };
        Ok(if bad.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })
    .map_err(|e| EngineError::Internal(e.to_string()))?;
    match bad {
        Some(what) => Err(EngineError::rejected(
            Rule::SingleSelect,
            format!("{what} is not accepted"),
        )),
        None => Ok(()),
    }
}

fn analyze_private(plan: LogicalPlan, ctx: &Ctx<'_>) -> Result<Analyzed> {
    // Walk down from the root through post-processing nodes to the aggregate.
    let mut node = &plan;
    let mut above = Vec::new();
    let aggregate = loop {
        match node {
            LogicalPlan::Aggregate(a) => break a,
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => {
                above.push(node);
                node = node.inputs()[0];
            }
            LogicalPlan::TableScan(_) => {
                return Err(project_private(ctx, &plan));
            }
            other => return Err(unsupported_node(other)),
        }
    };
    check_interval_calls(&above, aggregate)?;
    // The shape below the aggregate first: it decides what columns mean.
    let mut predicates = Vec::new();
    let mut below = aggregate.input.as_ref();
    loop {
        match below {
            LogicalPlan::Filter(f) => {
                check_predicate(&f.predicate, ctx)?;
                predicates.push(f.predicate.clone());
                below = f.input.as_ref();
            }
            LogicalPlan::SubqueryAlias(s) => below = s.input.as_ref(),
            // A CTE or FROM-subquery that selects columns of the private
            // table as they are (e.g. `WITH t AS (SELECT district, age FROM …
            // WHERE …)`): the outer query's columns are the table's.
            LogicalPlan::Projection(p) if p.expr.iter().all(keeps_column) => {
                below = p.input.as_ref();
            }
            LogicalPlan::Projection(_) => {
                return Err(EngineError::rejected(
                    Rule::UnsupportedShape,
                    "a CTE or subquery over private data may only select columns as they are (no expressions or renaming yet); compute in the outer query",
                ));
            }
            LogicalPlan::TableScan(_) => break,
            other => return Err(unsupported_node(other)),
        }
    }
    let mut group_keys = Vec::new();
    for g in &aggregate.group_expr {
        group_keys.push(group_key(&strip_aliases(g), ctx)?);
    }
    let mut aggregates = Vec::new();
    for a in &aggregate.aggr_expr {
        aggregates.push(aggregate_call(a, ctx)?);
    }
    Ok(Analyzed::Private(PrivateQuery {
        dataset: ctx.dataset.id.clone(),
        predicates,
        group_keys,
        aggregates,
        aggregate_schema: aggregate.schema.clone(),
        plan: plan.clone(),
    }))
}

fn unsupported_node(node: &LogicalPlan) -> EngineError {
    let what = match node {
        LogicalPlan::Join(_) => "joins",
        LogicalPlan::Window(_) => "window functions",
        LogicalPlan::Union(_) => "UNION",
        LogicalPlan::Distinct(_) => "DISTINCT",
        LogicalPlan::Aggregate(_) => "nested aggregates",
        LogicalPlan::Unnest(_) => "UNNEST",
        LogicalPlan::Values(_) => "VALUES",
        LogicalPlan::Projection(_) => "expressions below the aggregate",
        _ => "this query shape",
    };
    EngineError::rejected(
        Rule::UnsupportedShape,
        format!("{what} over private data are not supported yet"),
    )
}

fn project_private(ctx: &Ctx<'_>, plan: &LogicalPlan) -> EngineError {
    let name = plan
        .schema()
        .fields()
        .first()
        .map(|f| f.name().clone())
        .unwrap_or_default();
    EngineError::rejected(
        Rule::ProjectPrivateColumn,
        format!(
            "`{}.{name}` is private (dataset level {}) and may not appear in output rows; veil releases only noisy aggregates, e.g. SELECT district, COUNT(*) FROM {} GROUP BY district",
            ctx.dataset.id, ctx.dataset.level, ctx.dataset.id
        ),
    )
}

fn aggregate_call(e: &Expr, ctx: &Ctx<'_>) -> Result<AggregateCall> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = strip_aliases(e) else {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            "only plain aggregate calls are supported",
        ));
    };
    let name = func.name().to_ascii_uppercase();
    if (name == "MIN" || name == "MAX") && !ctx.grant.agg_functions.contains(&name) {
        return Err(EngineError::rejected(
            Rule::AggregateNotAllowed,
            format!(
                "{name} reveals one unit's value and is not released; use a DP percentile such as PERCENTILE_CONT(0.99) WITHIN GROUP (ORDER BY col), or ask the security officer to list {name} (a DP quantile at {}) in the grant",
                if name == "MIN" { 0 } else { 1 }
            ),
        ));
    }
    if !ctx.grant.agg_functions.contains(&name) {
        return Err(EngineError::rejected(
            Rule::AggregateNotAllowed,
            format!(
                "grant `{}` allows only {}; {name} is not among them",
                ctx.grant.id,
                ctx.grant
                    .agg_functions
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let ordered_set = matches!(name.as_str(), "PERCENTILE_CONT" | "APPROX_PERCENTILE_CONT");
    if params.filter.is_some() || (!params.order_by.is_empty() && !ordered_set) {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            format!("{name} with FILTER or ORDER BY is not supported yet"),
        ));
    }
    let unit = ctx.dataset.unit.as_ref().map(|u| u.column.as_str());
    if params.distinct {
        return match (name.as_str(), params.args.as_slice()) {
            ("COUNT", [Expr::Column(c)]) if Some(c.name.as_str()) == unit => {
                Ok(AggregateCall::CountDistinctUnit)
            }
            _ => Err(EngineError::rejected(
                Rule::AggregateNotAllowed,
                format!(
                    "DISTINCT is supported only as COUNT(DISTINCT {}), the privacy unit of `{}`",
                    unit.unwrap_or("<unit>"),
                    ctx.dataset.id
                ),
            )),
        };
    }
    let column = |args: &[Expr]| -> Result<String> {
        match args {
            [Expr::Column(c)] => Ok(c.name.clone()),
            _ => Err(EngineError::rejected(
                Rule::UnsupportedShape,
                format!("{name} accepts a plain column argument"),
            )),
        }
    };
    let call = match name.as_str() {
        "COUNT" => match params.args.as_slice() {
            [Expr::Literal(v, _)] if !v.is_null() => AggregateCall::CountStar,
            [Expr::Column(c)] => {
                ctx.require(&c.name, Use::Aggregate)?;
                AggregateCall::Count(c.name.clone())
            }
            _ => {
                return Err(EngineError::rejected(
                    Rule::UnsupportedShape,
                    "COUNT accepts *, a plain column, or DISTINCT of the privacy unit",
                ));
            }
        },
        "SUM" => AggregateCall::Sum(column(&params.args)?),
        "AVG" => AggregateCall::Avg(column(&params.args)?),
        "VAR_POP" | "STDDEV_POP" => AggregateCall::Var {
            column: column(&params.args)?,
            std: name == "STDDEV_POP",
        },
        "MEDIAN" | "MIN" | "MAX" => AggregateCall::Quantile {
            column: column(&params.args)?,
            alpha: match name.as_str() {
                "MIN" => 0.0,
                "MAX" => 1.0,
                _ => 0.5,
            },
        },
        "PERCENTILE_CONT" | "APPROX_PERCENTILE_CONT" => {
            // `f(p) WITHIN GROUP (ORDER BY col)` plans as args [col, p] with
            // the ordering kept; `APPROX_PERCENTILE_CONT(col, p)` likewise.
            let (column, p) = match params.args.as_slice() {
                [Expr::Column(c), Expr::Literal(p, _), ..] => (Some(c.name.clone()), fraction(p)),
                _ => (None, None),
            };
            let (Some(column), Some(p)) = (column, p) else {
                return Err(EngineError::rejected(
                    Rule::UnsupportedShape,
                    format!(
                        "{name} accepts a literal fraction in [0, 1] and a plain column: {name}(0.9) WITHIN GROUP (ORDER BY col)"
                    ),
                ));
            };
            let descending = params.order_by.first().is_some_and(|s| !s.asc);
            AggregateCall::Quantile {
                column,
                alpha: if descending { 1.0 - p } else { p },
            }
        }
        _ => {
            return Err(EngineError::rejected(
                Rule::AggregateNotAllowed,
                format!("{name} is not supported"),
            ));
        }
    };
    if let AggregateCall::Sum(c)
    | AggregateCall::Avg(c)
    | AggregateCall::Var { column: c, .. }
    | AggregateCall::Quantile { column: c, .. } = &call
    {
        let col = ctx.require(c, Use::Aggregate)?;
        if col.bounds.is_none() {
            return Err(EngineError::rejected(
                Rule::AggregateNotAllowed,
                format!(
                    "`{}.{c}` has no bounds in the policy; ask the data owner to declare them, or query COUNT instead",
                    ctx.dataset.id
                ),
            ));
        }
    }
    Ok(call)
}

/// `DP_INTERVAL_LOW/HIGH` only in post-processing, each directly around an
/// aggregate of the query.
fn check_interval_calls(
    above: &[&LogicalPlan],
    aggregate: &datafusion::logical_expr::Aggregate,
) -> Result<()> {
    let groups = aggregate.group_expr.len();
    let misuse = || {
        EngineError::rejected(
            Rule::UnsupportedShape,
            "DP_INTERVAL_LOW and DP_INTERVAL_HIGH take one aggregate of the query directly, e.g. DP_INTERVAL_LOW(COUNT(*))",
        )
    };
    for node in above {
        for e in node.expressions() {
            let mut ok = true;
            e.apply(|x| {
                if let Some((_, args)) = dp_interval::call(x) {
                    ok &= dp_interval::target(args, &aggregate.schema, groups).is_some();
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(|e| EngineError::Internal(e.to_string()))?;
            if !ok {
                return Err(misuse());
            }
        }
    }
    let mut below = false;
    let aggregate_node = LogicalPlan::Aggregate(aggregate.clone());
    aggregate_node
        .apply(|n| {
            for e in n.expressions() {
                below |= e.exists(|x| Ok(dp_interval::call(x).is_some()))?;
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    if below { Err(misuse()) } else { Ok(()) }
}

/// A GROUP BY expression: a granted column, or `FLOOR(col / w) * w` where the
/// column's policy allows buckets whose width divides `w`.
fn group_key(e: &Expr, ctx: &Ctx<'_>) -> Result<GroupKey> {
    let unsupported = || {
        EngineError::rejected(
            Rule::UnsupportedShape,
            "GROUP BY accepts granted columns and buckets written FLOOR(col / w) * w",
        )
    };
    if let Expr::Column(c) = e {
        ctx.require(&c.name, Use::GroupBy)?;
        return Ok(GroupKey::Column(c.name.clone()));
    }
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Multiply,
        right,
    }) = e
    else {
        return Err(unsupported());
    };
    let Expr::ScalarFunction(f) = left.as_ref() else {
        return Err(unsupported());
    };
    let [
        Expr::BinaryExpr(BinaryExpr {
            left: inner,
            op: Operator::Divide,
            right: divisor,
        }),
    ] = f.args.as_slice()
    else {
        return Err(unsupported());
    };
    let (Expr::Column(c), Some(w), Some(w2)) = (
        inner.as_ref(),
        integer_literal(divisor),
        integer_literal(right),
    ) else {
        return Err(unsupported());
    };
    if f.func.name() != "floor" || w != w2 || w <= 0 {
        return Err(unsupported());
    }
    let col = ctx.require(&c.name, Use::GroupBy)?;
    match col.bucket {
        Some(b) if b.width.fract() == 0.0 && w % (b.width as i64).max(1) == 0 => {
            Ok(GroupKey::Bucket {
                column: c.name.clone(),
                width: w,
            })
        }
        Some(b) => Err(EngineError::rejected(
            Rule::ColumnUseNotGranted,
            format!(
                "`{}.{}` may be grouped in buckets of a multiple of {} only; use FLOOR({} / {}) * {}",
                ctx.dataset.id, c.name, b.width, c.name, b.width, b.width
            ),
        )),
        None => Err(EngineError::rejected(
            Rule::ColumnUseNotGranted,
            format!(
                "`{}.{}` has no bucket width in the policy, so it cannot be grouped in buckets; ask the security officer to declare one",
                ctx.dataset.id, c.name
            ),
        )),
    }
}

/// A projected column under its own name.
fn keeps_column(e: &Expr) -> bool {
    match e {
        Expr::Column(_) => true,
        Expr::Alias(a) => matches!(a.expr.as_ref(), Expr::Column(c) if c.name == a.name),
        _ => false,
    }
}

/// A positive integer literal.
fn integer_literal(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else { return None };
    match v.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(x)) if x.fract() == 0.0 && x.abs() < 1e15 => Some(x as i64),
        _ => None,
    }
}

/// A literal fraction in [0, 1].
fn fraction(v: &ScalarValue) -> Option<f64> {
    let f = v.cast_to(&DataType::Float64).ok()?;
    match f {
        ScalarValue::Float64(Some(x)) if (0.0..=1.0).contains(&x) => Some(x),
        _ => None,
    }
}

/// Checks a WHERE predicate: comparisons of a column with literals need
/// `filter_literal`; any other use of a column needs `filter`.
fn check_predicate(e: &Expr, ctx: &Ctx<'_>) -> Result<()> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And | Operator::Or,
            right,
        }) => {
            check_predicate(left, ctx)?;
            check_predicate(right, ctx)
        }
        Expr::Not(inner) => check_predicate(inner, ctx),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if is_comparison(*op) => {
            match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                    literal_use(c.name.as_str(), std::slice::from_ref(v), ctx)
                }
                _ => general_use(e, ctx),
            }
        }
        Expr::InList(list) => match list.expr.as_ref() {
            Expr::Column(c) => {
                let values: Option<Vec<ScalarValue>> = list
                    .list
                    .iter()
                    .map(|x| match x {
                        Expr::Literal(v, _) => Some(v.clone()),
                        _ => None,
                    })
                    .collect();
                match values {
                    Some(vs) => literal_use(&c.name, &vs, ctx),
                    None => general_use(e, ctx),
                }
            }
            _ => general_use(e, ctx),
        },
        Expr::Between(b) => match (b.expr.as_ref(), b.low.as_ref(), b.high.as_ref()) {
            (Expr::Column(c), Expr::Literal(lo, _), Expr::Literal(hi, _)) => {
                literal_use(&c.name, &[lo.clone(), hi.clone()], ctx)
            }
            _ => general_use(e, ctx),
        },
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => match inner.as_ref() {
            Expr::Column(c) => literal_use(&c.name, &[], ctx),
            _ => general_use(e, ctx),
        },
        _ => general_use(e, ctx),
    }
}

fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
    )
}

fn literal_use(column: &str, values: &[ScalarValue], ctx: &Ctx<'_>) -> Result<()> {
    ctx.require(column, Use::FilterLiteral)?;
    // A literal of another type class would make DataFusion cast the column,
    // and a failing cast is a data-dependent error: refuse it up front.
    let Ok(field) = ctx.schema.field_with_name(column) else {
        return Ok(());
    };
    let want = type_class(field.data_type());
    for v in values.iter().filter(|v| !v.is_null()) {
        if type_class(&v.data_type()) != want {
            return Err(EngineError::rejected(
                Rule::InvalidSql,
                format!("`{column}` holds {want}; compare it with {want} literals"),
            ));
        }
    }
    Ok(())
}

fn type_class(t: &DataType) -> &'static str {
    if t.is_numeric() {
        "numbers"
    } else if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        "text"
    } else {
        "other values"
    }
}

fn general_use(e: &Expr, ctx: &Ctx<'_>) -> Result<()> {
    for c in e.column_refs() {
        ctx.require(&c.name, Use::Filter)?;
    }
    Ok(())
}
