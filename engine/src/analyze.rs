//! Plan analysis: derive every column's *use* from DataFusion's logical plan,
//! check it against the grant, and extract the query's DP shape.
//!
//! Decisions depend on the plan, the policy and public metadata only.

use std::collections::BTreeSet;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, JoinType, NullEquality, TableReference};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::split_conjunction;
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

/// One table a private query reads.
#[derive(Debug, Clone)]
pub struct Source {
    /// Dataset id.
    pub dataset: String,
    /// The relation name the certified plan scans it under: the table itself
    /// when the query reads one table, else `__veil_s{i}`.
    pub relation: TableReference,
    /// How the operator's query names it (its alias, CTE name or table), for
    /// labels.
    pub label: String,
    /// Whether the dataset is private.
    pub private: bool,
}

/// A column of one of the query's sources.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceColumn {
    /// Index into [`PrivateQuery::sources`].
    pub source: usize,
    /// Column name in the dataset.
    pub name: String,
}

/// The DP shape of an aggregate query over private data: one private table,
/// or several joined on the privacy unit, and any public tables joined on a
/// key.
#[derive(Debug, Clone)]
pub struct PrivateQuery {
    /// Id of the primary private dataset, whose privacy unit the rewrite
    /// bounds (every other private source is joined on the same unit).
    pub dataset: String,
    /// Tables read, in the plan's scan order.
    pub sources: Vec<Source>,
    /// Index of the primary private dataset in `sources`.
    pub primary: usize,
    /// Inner equi-join conditions between sources.
    pub joins: Vec<(SourceColumn, SourceColumn)>,
    /// Every column the query may name, by label: the column's name when the
    /// query reads one table, else `<source label>.<name>`.
    pub columns: std::collections::BTreeMap<String, SourceColumn>,
    /// Operator predicates (below the aggregate, and below the per-unit
    /// aggregate if any), over the sources' relations, to be AND-ed.
    pub predicates: Vec<Expr>,
    /// A per-unit inner aggregate (a CTE or subquery grouped by the unit),
    /// whose outputs the outer aggregate reads.
    pub per_unit: Option<PerUnit>,
    /// Two private tables joined on another key than the unit, under a
    /// policy's `[[truncated_join]]`.
    pub truncated: Option<Truncation>,
    /// GROUP BY keys, in order (columns by label).
    pub group_keys: Vec<GroupKey>,
    /// Aggregates, in the Aggregate node's order (columns by label).
    pub aggregates: Vec<AggregateCall>,
    /// Output schema of the Aggregate node (group columns, then aggregates).
    pub aggregate_schema: DFSchemaRef,
    /// The operator's whole plan; everything above the Aggregate node is
    /// post-processing of noisy values.
    pub plan: LogicalPlan,
}

/// A join of two private tables on a declared key other than their unit:
/// each side is truncated to `max_matches` rows per key value before the join.
#[derive(Debug, Clone)]
pub struct Truncation {
    /// The source and key column of each side.
    pub sides: [(usize, String); 2],
    /// Rows of each side kept per key value.
    pub max_matches: u32,
}

/// The `source` of a [`SourceColumn`] that a per-unit aggregate computes.
pub const DERIVED: usize = usize::MAX;

/// The name of the `k`-th per-unit aggregate's output in certified plans.
pub fn derived_column(k: usize) -> String {
    format!("__veil_d{k}")
}

/// A per-unit inner aggregate: `SELECT <unit>, <keys>, COUNT(*) AS n, SUM(x)
/// AS s … GROUP BY <unit>, <keys>`. Each output row depends on one unit's
/// rows only; its values are clamped to bounds derived from the policy
/// before the outer aggregate bounds and sums them.
#[derive(Debug, Clone)]
pub struct PerUnit {
    /// Label of the privacy-unit column it groups by.
    pub unit: String,
    /// Labels of all its GROUP BY columns (the unit among them).
    pub keys: Vec<String>,
    /// Its aggregates, in order: the `k`-th is [`derived_column`]`(k)`.
    pub values: Vec<Derived>,
    /// Predicates over its output and the tables joined to it (the outer
    /// WHERE and join filters), to be AND-ed.
    pub predicates: Vec<Expr>,
    /// Indices of the sources it aggregates; the others are joined to its
    /// output.
    pub sources: Vec<usize>,
}

/// One per-unit aggregate.
#[derive(Debug, Clone)]
pub struct Derived {
    /// How the outer query names it.
    pub label: String,
    /// What it computes over the unit's rows: `CountStar`, `Count`, `Sum`
    /// or `Avg` of a column label.
    pub call: AggregateCall,
    /// Its policy: bounds derived from the unit's contribution bounds and
    /// the column's bounds, and the column's precision.
    pub column: Column,
}

impl PrivateQuery {
    /// The source column a label names.
    pub fn source_column(&self, label: &str) -> Result<&SourceColumn> {
        self.columns
            .get(label)
            .ok_or_else(|| EngineError::Internal(format!("unknown column label `{label}`")))
    }

    /// A column's expression over its source's relation in the certified plan.
    pub fn column_expr(&self, label: &str) -> Result<Expr> {
        let c = self.source_column(label)?;
        Ok(Expr::Column(if c.source == DERIVED {
            datafusion::common::Column::new_unqualified(&c.name)
        } else {
            datafusion::common::Column::new(Some(self.sources[c.source].relation.clone()), &c.name)
        }))
    }

    /// The per-unit aggregate a label names, if it names one.
    pub fn derived(&self, label: &str) -> Option<&Derived> {
        self.per_unit
            .as_ref()
            .and_then(|p| p.values.iter().find(|d| d.label == label))
    }
}

/// What a query is, once checked.
#[derive(Debug, Clone)]
pub enum Analyzed {
    /// Touches public datasets only: runs as planned, no DP, no charge.
    Public(LogicalPlan),
    /// Aggregates one private dataset.
    Private(Box<PrivateQuery>),
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

/// A table being analysed: its policy and the schema the operator sees.
struct SourceInfo<'a> {
    dataset: &'a Dataset,
    schema: SchemaRef,
    relation: TableReference,
    label: Option<String>,
}

/// The checks' context: the grant and the query's sources, and what the
/// walk below the aggregate found.
struct Ctx<'a> {
    policy: &'a Policy,
    grant: &'a Grant,
    /// The number of table scans in the plan.
    scans: usize,
    sources: Vec<SourceInfo<'a>>,
    predicates: Vec<Expr>,
    joins: Vec<(SourceColumn, SourceColumn)>,
    /// The per-unit aggregate met in the walk: its GROUP BY columns, its
    /// aggregate expressions (over the sources' relations), their names,
    /// and how many predicates lie below it.
    inner: Option<Inner>,
    /// The per-unit aggregates' policies, once resolved.
    derived: Vec<Derived>,
    /// A truncated join, once the joins are checked.
    truncated: Option<Truncation>,
}

/// A per-unit aggregate as the walk finds it.
struct Inner {
    keys: Vec<SourceColumn>,
    calls: Vec<(String, Expr)>,
    /// The predicates and sources the walk met below it.
    predicates: std::ops::Range<usize>,
    sources: std::ops::Range<usize>,
}

impl<'a> Ctx<'a> {
    fn dataset(&self, c: &SourceColumn) -> &'a Dataset {
        self.sources[c.source].dataset
    }

    fn column(&self, c: &SourceColumn) -> Result<&'a Column> {
        let dataset = self.dataset(c);
        dataset.column(&c.name).ok_or_else(|| {
            EngineError::rejected(
                Rule::ColumnNotGranted,
                format!(
                    "column `{}` is not part of dataset `{}` under grant `{}`",
                    c.name, dataset.id, self.grant.id
                ),
            )
        })
    }

    fn require(&self, c: &SourceColumn, u: Use) -> Result<&Column> {
        if c.source == DERIVED {
            let d = self
                .derived
                .iter()
                .zip(0..)
                .find(|(_, k)| derived_column(*k) == c.name)
                .map(|(d, _)| d)
                .ok_or_else(|| EngineError::Internal("unknown derived column".into()))?;
            return match u {
                Use::Aggregate | Use::Filter | Use::FilterLiteral => Ok(&d.column),
                _ => Err(EngineError::rejected(
                    Rule::UnsupportedShape,
                    format!(
                        "`{}` is computed per privacy unit; it may be aggregated or filtered, not used for {u}",
                        d.label
                    ),
                )),
            };
        }
        let col = self.column(c)?;
        let dataset = self.dataset(c);
        let name = &c.name;
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
                    dataset.id
                ),
            ));
        }
        let granted = self
            .grant
            .scope(&dataset.id)
            .and_then(|s| s.columns.get(name));
        match granted {
            Some(uses) if uses.contains(&u) => Ok(col),
            Some(uses) => Err(EngineError::rejected(
                Rule::ColumnUseNotGranted,
                format!(
                    "grant `{}` does not allow {u} on `{}.{name}` (granted: {}); rewrite the query or ask the data owner to widen the grant",
                    self.grant.id,
                    dataset.id,
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
                    dataset.id, self.grant.grantee, self.grant.id
                ),
            )),
        }
    }

    /// [`Self::require`] for a column and for every private column a join
    /// equates it with: they hold the same values, so grouping by (or
    /// filtering on) a public table's key joined to a private identifier is
    /// grouping by (or filtering on) that identifier. Call after the walk,
    /// when every join condition is known.
    fn require_joined(&self, c: &SourceColumn, u: Use) -> Result<&Column> {
        for other in self.joined_class(c).iter().skip(1) {
            if !self.dataset(other).is_public() {
                self.require(other, u)?;
            }
        }
        self.require(c, u)
    }

    /// `c` and every column the join conditions equate it with, `c` first.
    fn joined_class(&self, c: &SourceColumn) -> Vec<SourceColumn> {
        reachable(c.clone(), |x| {
            self.joins
                .iter()
                .filter_map(|(l, r)| match (l == x, r == x) {
                    (true, _) => Some(r.clone()),
                    (_, true) => Some(l.clone()),
                    _ => None,
                })
                .collect()
        })
    }

    /// Whether a column is a private table's privacy-unit column.
    fn is_private_unit(&self, c: &SourceColumn) -> bool {
        c.source != DERIVED && {
            let d = self.dataset(c);
            !d.is_public() && d.unit.as_ref().is_some_and(|u| u.column == c.name)
        }
    }

    /// The source column behind a column of the certified plan's relations.
    fn source_column(&self, c: &datafusion::common::Column) -> Result<SourceColumn> {
        if c.relation.is_none() && c.name.starts_with("__veil_d") {
            return Ok(SourceColumn {
                source: DERIVED,
                name: c.name.clone(),
            });
        }
        let source = self
            .sources
            .iter()
            .position(|s| c.relation.as_ref() == Some(&s.relation))
            .ok_or_else(|| EngineError::Internal(format!("unresolved column `{c}`")))?;
        Ok(SourceColumn {
            source,
            name: c.name.clone(),
        })
    }

    /// The source column a label names.
    fn label_to_column(&self, label: &str) -> Option<SourceColumn> {
        self.sources.iter().enumerate().find_map(|(i, s)| {
            s.schema.fields().iter().find_map(|f| {
                let c = SourceColumn {
                    source: i,
                    name: f.name().clone(),
                };
                (self.label(&c) == label).then_some(c)
            })
        })
    }

    /// The file schema type of a source column, as the operator sees it.
    fn data_type(&self, c: &SourceColumn) -> Option<DataType> {
        if c.source == DERIVED {
            return Some(DataType::Float64);
        }
        self.sources[c.source]
            .schema
            .field_with_name(&c.name)
            .ok()
            .map(|f| f.data_type().clone())
    }

    /// A column's label: its name when the query reads one table, else
    /// `<source label>.<name>`.
    fn label(&self, c: &SourceColumn) -> String {
        if c.source == DERIVED {
            let k = (0..self.derived.len()).find(|k| derived_column(*k) == c.name);
            return k.map_or_else(|| c.name.clone(), |k| self.derived[k].label.clone());
        }
        if self.sources.len() == 1 {
            c.name.clone()
        } else {
            let source = &self.sources[c.source];
            format!("{}.{}", source.label.as_deref().unwrap_or("?"), c.name)
        }
    }

    /// An expression of the operator's plan, its columns (resolved in
    /// `schema`, whose fields come from `origins`) pointed at the sources'
    /// relations.
    fn canonical(&self, e: &Expr, schema: &DFSchema, origins: &[SourceColumn]) -> Result<Expr> {
        e.clone()
            .transform(|e| {
                Ok(match e {
                    Expr::Column(c) => {
                        let i = schema.index_of_column(&c)?;
                        let o = &origins[i];
                        Transformed::yes(Expr::Column(if o.source == DERIVED {
                            datafusion::common::Column::new_unqualified(&o.name)
                        } else {
                            datafusion::common::Column::new(
                                Some(self.sources[o.source].relation.clone()),
                                &o.name,
                            )
                        }))
                    }
                    other => Transformed::no(other),
                })
            })
            .map(|t| t.data)
            .map_err(|e| EngineError::Internal(e.to_string()))
    }

    /// Walks the relation below the aggregate: table scans, aliases,
    /// projections that keep columns, filters and inner joins. Returns where
    /// each output field comes from.
    fn walk(&mut self, plan: &LogicalPlan) -> Result<Vec<SourceColumn>> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let id = dataset_id(&scan.table_name);
                let dataset = self
                    .policy
                    .datasets
                    .get(&id)
                    .ok_or_else(|| EngineError::Internal(format!("unknown dataset `{id}`")))?;
                let source = self.sources.len();
                let relation = if self.scans == 1 {
                    let (schema, table) = dataset.schema_table();
                    TableReference::partial(schema, table)
                } else {
                    TableReference::bare(format!("__veil_s{source}"))
                };
                self.sources.push(SourceInfo {
                    dataset,
                    schema: scan.source.schema(),
                    relation,
                    label: None,
                });
                Ok(scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| SourceColumn {
                        source,
                        name: f.name().clone(),
                    })
                    .collect())
            }
            LogicalPlan::SubqueryAlias(a) => {
                let origins = self.walk(&a.input)?;
                // The innermost alias names a table in labels.
                for o in origins.iter().filter(|o| o.source != DERIVED) {
                    let label = &mut self.sources[o.source].label;
                    if label.is_none() {
                        *label = Some(a.alias.to_string());
                    }
                }
                Ok(origins)
            }
            LogicalPlan::Filter(f) => {
                let origins = self.walk(&f.input)?;
                let predicate = self.canonical(&f.predicate, f.input.schema(), &origins)?;
                self.conjuncts(&predicate)?;
                Ok(origins)
            }
            // A CTE or FROM-subquery that selects columns as they are (e.g.
            // `WITH t AS (SELECT district, age FROM … WHERE …)`).
            LogicalPlan::Projection(p) if p.expr.iter().all(selects_column) => {
                let origins = self.walk(&p.input)?;
                let mut out = Vec::new();
                for e in &p.expr {
                    let Expr::Column(c) = strip_aliases(e) else {
                        return Err(EngineError::Internal("projection changed".into()));
                    };
                    let o = p
                        .input
                        .schema()
                        .index_of_column(&c)
                        .map(|i| origins[i].clone())
                        .map_err(|e| EngineError::Internal(e.to_string()))?;
                    // A per-unit aggregate is labelled by its first alias.
                    if let (Expr::Alias(a), true) = (e, o.source == DERIVED)
                        && let Some(inner) = &mut self.inner
                        && let Some(k) =
                            (0..inner.calls.len()).find(|k| derived_column(*k) == o.name)
                        && inner.calls[k].0 == c.name
                    {
                        inner.calls[k].0 = a.name.clone();
                    }
                    out.push(o);
                }
                Ok(out)
            }
            LogicalPlan::Projection(_) => Err(EngineError::rejected(
                Rule::UnsupportedShape,
                "a CTE or subquery over private data may only select and rename columns (and aggregate per privacy unit); compute in the outer query",
            )),
            // A per-unit aggregate: `SELECT <unit>, …, COUNT(*) AS n, SUM(x)
            // AS s FROM … GROUP BY <unit>, …` as a CTE or subquery.
            LogicalPlan::Aggregate(a) => {
                let (predicates, sources) = (self.predicates.len(), self.sources.len());
                let origins = self.walk(&a.input)?;
                if self.inner.is_some() {
                    return Err(unsupported_node(plan));
                }
                let input = a.input.schema();
                let mut keys = Vec::new();
                for g in &a.group_expr {
                    match strip_aliases(g) {
                        Expr::Column(c) => keys.push(
                            input
                                .index_of_column(&c)
                                .map(|i| origins[i].clone())
                                .map_err(|e| EngineError::Internal(e.to_string()))?,
                        ),
                        _ => {
                            return Err(EngineError::rejected(
                                Rule::UnsupportedShape,
                                "a per-unit subquery groups by plain columns: GROUP BY <privacy unit>, …",
                            ));
                        }
                    }
                }
                if !keys.iter().any(|k| self.is_private_unit(k)) {
                    return Err(EngineError::rejected(
                        Rule::UnsupportedShape,
                        "a CTE or subquery may aggregate only per privacy unit (GROUP BY the unit column, e.g. patient_id); aggregate across units in the outer query",
                    ));
                }
                let mut calls = Vec::new();
                for e in &a.aggr_expr {
                    let name = e.schema_name().to_string();
                    calls.push((name, self.canonical(&strip_aliases(e), input, &origins)?));
                }
                let mut out = keys.clone();
                out.extend((0..calls.len()).map(|k| SourceColumn {
                    source: DERIVED,
                    name: derived_column(k),
                }));
                self.inner = Some(Inner {
                    keys,
                    calls,
                    predicates: predicates..self.predicates.len(),
                    sources: sources..self.sources.len(),
                });
                // Output fields are named as the plan names them.
                debug_assert_eq!(out.len(), a.schema.fields().len());
                Ok(out)
            }
            LogicalPlan::Join(j) => {
                if j.join_type != JoinType::Inner
                    || j.null_equality != NullEquality::NullEqualsNothing
                    || j.null_aware
                {
                    return Err(EngineError::rejected(
                        Rule::UnsupportedShape,
                        format!(
                            "{} joins over private data are not supported; write an inner JOIN … ON a.key = b.key",
                            j.join_type
                        ),
                    ));
                }
                let left = self.walk(&j.left)?;
                let right = self.walk(&j.right)?;
                for (l, r) in &j.on {
                    let l = self.canonical(l, j.left.schema(), &left)?;
                    let r = self.canonical(r, j.right.schema(), &right)?;
                    self.conjuncts(&l.eq(r))?;
                }
                let origins = [left, right].concat();
                if let Some(f) = &j.filter {
                    let predicate = self.canonical(f, &j.schema, &origins)?;
                    self.conjuncts(&predicate)?;
                }
                Ok(origins)
            }
            other => Err(unsupported_node(other)),
        }
    }

    /// Sorts a predicate's conjuncts into join conditions (a column of one
    /// table equal to a column of another) and row predicates.
    fn conjuncts(&mut self, predicate: &Expr) -> Result<()> {
        for part in split_conjunction(predicate) {
            if let Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) = part
                && let (Expr::Column(l), Expr::Column(r)) = (left.as_ref(), right.as_ref())
            {
                let (l, r) = (self.source_column(l)?, self.source_column(r)?);
                // A per-unit value compared with a column is a row predicate.
                if l.source != r.source && l.source != DERIVED && r.source != DERIVED {
                    self.joins.push((l, r));
                    continue;
                }
            }
            self.predicates.push(part.clone());
        }
        Ok(())
    }

    /// A join condition's columns need the `join` use and one type; checked
    /// after the join's shape, which decides whether any grant could allow it.
    fn check_join_condition(&self, l: &SourceColumn, r: &SourceColumn) -> Result<()> {
        self.require(l, Use::Join)?;
        self.require(r, Use::Join)?;
        if self.data_type(l) != self.data_type(r) {
            return Err(EngineError::rejected(
                Rule::InvalidSql,
                format!(
                    "`{}.{}` and `{}.{}` have different types; join keys must have the same type",
                    self.dataset(l).id,
                    l.name,
                    self.dataset(r).id,
                    r.name
                ),
            ));
        }
        Ok(())
    }

    /// After the walk: names every source, and checks that the tables are
    /// joined so that one privacy unit's rows can be bounded: every table is
    /// connected by an equality, and every private table is joined on the
    /// same privacy unit (same kind of unit, and either the same column name
    /// or a declared foreign key between the two).
    fn check_joins(&mut self) -> Result<usize> {
        for i in 0..self.sources.len() {
            let label = match self.sources[i].label.take() {
                Some(l) => l,
                None => self.sources[i].dataset.id.clone(),
            };
            let taken = self.sources[..i]
                .iter()
                .any(|s| s.label.as_deref() == Some(label.as_str()));
            self.sources[i].label = Some(if taken { format!("{label}#{i}") } else { label });
        }
        let primary = self
            .sources
            .iter()
            .position(|s| !s.dataset.is_public())
            .ok_or_else(|| EngineError::Internal("no private source".into()))?;
        // Every table joined, directly or not, to the first.
        let connected = reachable(0, |t| {
            self.joins
                .iter()
                .filter_map(|(l, r)| match (l.source == *t, r.source == *t) {
                    (true, _) => Some(r.source),
                    (_, true) => Some(l.source),
                    _ => None,
                })
                .collect()
        });
        if let Some(lonely) = (0..self.sources.len()).find(|i| !connected.contains(i)) {
            return Err(EngineError::rejected(
                Rule::JoinNotAllowed,
                format!(
                    "`{}` is combined with the other tables without an equality (a cross join); join it on a key: JOIN … ON a.key = b.key",
                    self.sources[lonely].label.as_deref().unwrap_or("?")
                ),
            ));
        }
        let unit_of = |i: usize| {
            self.sources[i].dataset.unit.as_ref().map(|u| SourceColumn {
                source: i,
                name: u.column.clone(),
            })
        };
        let Some(primary_unit) = unit_of(primary) else {
            return Err(EngineError::Internal("private dataset without unit".into()));
        };
        let unit_class = self.joined_class(&primary_unit);
        for other in (0..self.sources.len())
            .filter(|&i| i != primary && !self.sources[i].dataset.is_public())
        {
            let Some(unit) = unit_of(other) else { continue };
            let joined = unit_class.contains(&unit);
            let (p, o) = (self.sources[primary].dataset, self.sources[other].dataset);
            if joined && self.policy.share_units(&p.id, &o.id) {
                continue;
            }
            self.truncated = Some(self.truncation(primary, other).map_err(|why| {
                EngineError::rejected(
                    Rule::JoinNotAllowed,
                    format!(
                        "`{}` and `{}` are both private, so they may be joined only on their privacy units (`{}.{}` = `{}.{}`, units of the same kind linked by a shared name or a declared foreign key), which lets veil bound each unit's rows after the join; {why}",
                        p.id, o.id, p.id, primary_unit.name, o.id, unit.name
                    ),
                )
            })?);
        }
        for (l, r) in &self.joins {
            self.check_join_condition(l, r)?;
        }
        Ok(primary)
    }
}

impl Ctx<'_> {
    /// The truncated join of sources `a` and `b`: the policy declares one of
    /// the equalities between them, and the query reads nothing else (another
    /// table's rows would be multiplied past the truncation's bound). The
    /// error says why not.
    fn truncation(&self, a: usize, b: usize) -> std::result::Result<Truncation, String> {
        let id = |c: &SourceColumn| self.dataset(c).id.as_str();
        let declared = self.joins.iter().find_map(|(l, r)| {
            let between = (l.source, r.source) == (a, b) || (l.source, r.source) == (b, a);
            let t = self
                .policy
                .truncated_join((id(l), &l.name), (id(r), &r.name))
                .filter(|_| between)?;
            Some(Truncation {
                sides: [(l.source, l.name.clone()), (r.source, r.name.clone())],
                max_matches: t.max_matches,
            })
        });
        match declared {
            None => Err(
                "other joins of private tables need a `[[truncated_join]]` declaration in the policy for one of their key equalities, and none covers this one".into(),
            ),
            Some(_) if self.sources.len() > 2 || self.inner.is_some() => Err(
                "a truncated join (截断关联) reads exactly its two tables, with no other table and no per-unit aggregate".into(),
            ),
            Some(t) => Ok(t),
        }
    }
}

/// Everything reachable from `start` along `next`, `start` first.
fn reachable<T: Clone + PartialEq>(start: T, next: impl Fn(&T) -> Vec<T>) -> Vec<T> {
    let mut seen = vec![start];
    let mut i = 0;
    while i < seen.len() {
        for n in next(&seen[i]) {
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
        i += 1;
    }
    seen
}

/// Checks a planned query against the grant and extracts its shape.
pub fn analyze(plan: LogicalPlan, policy: &Policy, grant: &Grant) -> Result<Analyzed> {
    reject_forbidden_nodes(&plan)?;
    let datasets = scanned_datasets(&plan)?;
    if !datasets
        .iter()
        .filter_map(|d| policy.datasets.get(d))
        .any(|d| !d.is_public())
    {
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
    let mut ctx = Ctx {
        policy,
        grant,
        scans,
        sources: Vec::new(),
        predicates: Vec::new(),
        joins: Vec::new(),
        inner: None,
        derived: Vec::new(),
        truncated: None,
    };
    analyze_private(plan, &mut ctx)
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

fn analyze_private(plan: LogicalPlan, ctx: &mut Ctx<'_>) -> Result<Analyzed> {
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
            LogicalPlan::TableScan(_) | LogicalPlan::Join(_) => {
                return Err(project_private(ctx.policy, &plan));
            }
            other => return Err(unsupported_node(other)),
        }
    };
    check_interval_calls(&above, aggregate)?;
    // The relation below the aggregate first: it decides what columns mean.
    let origins = ctx.walk(&aggregate.input)?;
    let primary = ctx.check_joins()?;
    let per_unit = resolve_per_unit(ctx, primary)?;
    // Row predicates, once every join is known (a column's uses include
    // those of the private columns a join equates it with).
    for p in ctx
        .predicates
        .iter()
        .chain(per_unit.iter().flat_map(|p| &p.predicates))
    {
        check_predicate(p, ctx)?;
    }
    let predicates = std::mem::take(&mut ctx.predicates);
    let input = aggregate.input.schema();
    let mut group_keys = Vec::new();
    for g in &aggregate.group_expr {
        let g = ctx.canonical(&strip_aliases(g), input, &origins)?;
        group_keys.push(group_key(&g, ctx)?);
    }
    let mut aggregates = Vec::new();
    for a in &aggregate.aggr_expr {
        let a = ctx.canonical(&strip_aliases(a), input, &origins)?;
        aggregates.push(aggregate_call(&a, ctx, primary)?);
    }
    // Rows of a truncated join belong to two units each: it releases row
    // statistics, not distinct units.
    if ctx.truncated.is_some() && aggregates.contains(&AggregateCall::CountDistinctUnit) {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            "COUNT(DISTINCT <unit>) is not supported over a truncated join (截断关联); count rows with COUNT(*)",
        ));
    }
    let mut columns = std::collections::BTreeMap::new();
    for (i, source) in ctx.sources.iter().enumerate() {
        for f in source.schema.fields() {
            let c = SourceColumn {
                source: i,
                name: f.name().clone(),
            };
            columns.insert(ctx.label(&c), c);
        }
    }
    for (k, d) in ctx.derived.iter().enumerate() {
        let c = SourceColumn {
            source: DERIVED,
            name: derived_column(k),
        };
        if columns.insert(d.label.clone(), c).is_some() {
            return Err(EngineError::rejected(
                Rule::InvalidSql,
                format!(
                    "the per-unit aggregate `{}` has the name of a column; name it differently (… AS n_{})",
                    d.label, d.label
                ),
            ));
        }
    }
    Ok(Analyzed::Private(Box::new(PrivateQuery {
        dataset: ctx.sources[primary].dataset.id.clone(),
        sources: ctx
            .sources
            .iter()
            .map(|s| Source {
                dataset: s.dataset.id.clone(),
                relation: s.relation.clone(),
                label: s.label.clone().unwrap_or_default(),
                private: !s.dataset.is_public(),
            })
            .collect(),
        primary,
        joins: std::mem::take(&mut ctx.joins),
        columns,
        predicates,
        per_unit,
        truncated: ctx.truncated.take(),
        group_keys,
        aggregates,
        aggregate_schema: aggregate.schema.clone(),
        plan: plan.clone(),
    })))
}

/// Checks the per-unit aggregate's calls (after the walk, when labels are
/// known) and derives each output's policy: a unit contributes at most
/// `max_groups · max_rows` rows (the loosest of the joined private tables),
/// so a count per unit is clamped to [0, that], a sum to that many times the
/// column's bounds (widened to include 0), an average to the column's bounds.
fn resolve_per_unit(ctx: &mut Ctx<'_>, primary: usize) -> Result<Option<PerUnit>> {
    let Some(inner) = ctx.inner.take() else {
        return Ok(None);
    };
    let (groups, rows) = contribution_bounds(ctx.sources.iter().map(|s| s.dataset));
    let per_unit_rows = f64::from(groups) * f64::from(rows);
    let unit = inner
        .keys
        .iter()
        .find(|k| ctx.is_private_unit(k))
        .map(|k| ctx.label(k))
        .ok_or_else(|| EngineError::Internal("per-unit aggregate without unit".into()))?;
    let mut values = Vec::new();
    for (label, e) in &inner.calls {
        let call = aggregate_call(e, ctx, primary)?;
        let template = ctx.sources[primary]
            .dataset
            .unit
            .as_ref()
            .and_then(|u| ctx.sources[primary].dataset.column(&u.column))
            .ok_or_else(|| EngineError::Internal("unit without column".into()))?;
        let mut column = Column {
            name: label.clone(),
            identifier: false,
            domain: None,
            bucket: None,
            ..template.clone()
        };
        let source_bounds = |c: &str| -> Result<(f64, f64, u32)> {
            let arg = ctx
                .label_to_column(c)
                .ok_or_else(|| EngineError::Internal("argument vanished".into()))?;
            let col = ctx.column(&arg)?;
            let (lo, hi) = col
                .bounds
                .ok_or_else(|| EngineError::Internal("unbounded argument".into()))?;
            Ok((lo, hi, col.precision))
        };
        (column.bounds, column.precision) = match &call {
            AggregateCall::CountStar | AggregateCall::Count(_) => (Some((0.0, per_unit_rows)), 0),
            AggregateCall::Sum(c) => {
                let (lo, hi, p) = source_bounds(c)?;
                (
                    Some((per_unit_rows * lo.min(0.0), per_unit_rows * hi.max(0.0))),
                    p,
                )
            }
            AggregateCall::Avg(c) => {
                let (lo, hi, p) = source_bounds(c)?;
                (Some((lo, hi)), p)
            }
            _ => {
                return Err(EngineError::rejected(
                    Rule::UnsupportedShape,
                    "a per-unit subquery may compute COUNT(*), COUNT(col), SUM(col) and AVG(col)",
                ));
            }
        };
        values.push(Derived {
            label: label.clone(),
            call,
            column,
        });
    }
    ctx.derived = values.clone();
    // The predicates met below it filter its input; the others apply to
    // its output (joined with the tables outside it).
    let (below, above): (Vec<_>, Vec<_>) = std::mem::take(&mut ctx.predicates)
        .into_iter()
        .enumerate()
        .partition(|(i, _)| inner.predicates.contains(i));
    ctx.predicates = below.into_iter().map(|(_, p)| p).collect();
    Ok(Some(PerUnit {
        unit,
        keys: inner.keys.iter().map(|k| ctx.label(k)).collect(),
        values,
        predicates: above.into_iter().map(|(_, p)| p).collect(),
        sources: inner.sources.collect(),
    }))
}

/// Groups per unit and rows per unit and group when private tables are
/// joined on their unit: the loosest of their declarations (the rewrite
/// enforces them on the joined rows and the noise follows, so the choice
/// costs accuracy, never privacy); `(1, 1)` for row-level units.
pub fn contribution_bounds<'d>(datasets: impl Iterator<Item = &'d Dataset>) -> (u32, u32) {
    datasets
        .filter(|d| !d.is_public())
        .filter_map(|d| d.unit.as_ref())
        .map(|u| match u.kind {
            veil_policy::UnitKind::Row => (1, 1),
            _ => (u.max_groups, u.max_rows),
        })
        .fold((1, 1), |(g, r), (g2, r2)| (g.max(g2), r.max(r2)))
}

fn unsupported_node(node: &LogicalPlan) -> EngineError {
    if let LogicalPlan::Window(_) = node {
        return EngineError::rejected(
            Rule::UnsupportedShape,
            "window functions over private data compute a value per row and are never released; aggregate with GROUP BY instead",
        );
    }
    let what = match node {
        LogicalPlan::Join(_) => "joins",
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

fn project_private(policy: &Policy, plan: &LogicalPlan) -> EngineError {
    let private = scanned_datasets(plan)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| policy.datasets.get(&d))
        .find(|d| !d.is_public());
    let (id, level) = private.map_or((String::new(), String::new()), |d| {
        (d.id.clone(), d.level.to_string())
    });
    let name = plan
        .schema()
        .fields()
        .first()
        .map(|f| f.name().clone())
        .unwrap_or_default();
    EngineError::rejected(
        Rule::ProjectPrivateColumn,
        format!(
            "`{id}.{name}` is private (dataset level {level}) and may not appear in output rows; veil releases only noisy aggregates, e.g. SELECT district, COUNT(*) FROM {id} GROUP BY district"
        ),
    )
}

fn aggregate_call(e: &Expr, ctx: &Ctx<'_>, primary: usize) -> Result<AggregateCall> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = e else {
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
    let primary_dataset = ctx.sources[primary].dataset;
    let unit = primary_dataset.unit.as_ref().map(|u| u.column.as_str());
    if params.distinct {
        // Every private table is joined on the unit (checked), so any
        // private table's unit column counts the same units.
        let is_unit = |c: &datafusion::common::Column| {
            ctx.source_column(c).is_ok_and(|c| ctx.is_private_unit(&c))
        };
        return match (name.as_str(), params.args.as_slice()) {
            ("COUNT", [Expr::Column(c)]) if is_unit(c) => Ok(AggregateCall::CountDistinctUnit),
            _ => Err(EngineError::rejected(
                Rule::AggregateNotAllowed,
                format!(
                    "DISTINCT is supported only as COUNT(DISTINCT {}), the privacy unit of `{}`",
                    unit.unwrap_or("<unit>"),
                    primary_dataset.id
                ),
            )),
        };
    }
    let column = |args: &[Expr]| -> Result<String> {
        match args {
            [Expr::Column(c)] => Ok(ctx.label(&ctx.source_column(c)?)),
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
                let c = ctx.source_column(c)?;
                ctx.require(&c, Use::Aggregate)?;
                AggregateCall::Count(ctx.label(&c))
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
                [Expr::Column(c), Expr::Literal(p, _), ..] => {
                    (Some(ctx.label(&ctx.source_column(c)?)), fraction(p))
                }
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
        let [Expr::Column(arg), ..] = params.args.as_slice() else {
            return Err(EngineError::Internal("aggregate without column".into()));
        };
        let arg = ctx.source_column(arg)?;
        let col = ctx.require(&arg, Use::Aggregate)?;
        if col.bounds.is_none() {
            return Err(EngineError::rejected(
                Rule::AggregateNotAllowed,
                format!(
                    "`{}.{}` has no bounds in the policy; ask the data owner to declare them, or query COUNT instead",
                    ctx.dataset(&arg).id,
                    arg.name
                ),
            ));
        }
        debug_assert_eq!(*c, ctx.label(&arg));
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
        let c = ctx.source_column(c)?;
        ctx.require_joined(&c, Use::GroupBy)?;
        return Ok(GroupKey::Column(ctx.label(&c)));
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
    let c = ctx.source_column(c)?;
    let col = ctx.require_joined(&c, Use::GroupBy)?;
    let dataset = ctx.dataset(&c);
    match col.bucket {
        Some(b) if b.width.fract() == 0.0 && w % (b.width as i64).max(1) == 0 => {
            Ok(GroupKey::Bucket {
                column: ctx.label(&c),
                width: w,
            })
        }
        Some(b) => Err(EngineError::rejected(
            Rule::ColumnUseNotGranted,
            format!(
                "`{}.{}` may be grouped in buckets of a multiple of {} only; use FLOOR({} / {}) * {}",
                dataset.id, c.name, b.width, c.name, b.width, b.width
            ),
        )),
        None => Err(EngineError::rejected(
            Rule::ColumnUseNotGranted,
            format!(
                "`{}.{}` has no bucket width in the policy, so it cannot be grouped in buckets; ask the security officer to declare one",
                dataset.id, c.name
            ),
        )),
    }
}

/// A projected column, possibly renamed.
fn selects_column(e: &Expr) -> bool {
    matches!(strip_aliases(e), Expr::Column(_))
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
                    literal_use(c, std::slice::from_ref(v), ctx)
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
                    Some(vs) => literal_use(c, &vs, ctx),
                    None => general_use(e, ctx),
                }
            }
            _ => general_use(e, ctx),
        },
        Expr::Between(b) => match (b.expr.as_ref(), b.low.as_ref(), b.high.as_ref()) {
            (Expr::Column(c), Expr::Literal(lo, _), Expr::Literal(hi, _)) => {
                literal_use(c, &[lo.clone(), hi.clone()], ctx)
            }
            _ => general_use(e, ctx),
        },
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => match inner.as_ref() {
            Expr::Column(c) => literal_use(c, &[], ctx),
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

fn literal_use(
    column: &datafusion::common::Column,
    values: &[ScalarValue],
    ctx: &Ctx<'_>,
) -> Result<()> {
    let c = ctx.source_column(column)?;
    ctx.require_joined(&c, Use::FilterLiteral)?;
    // A literal of another type class would make DataFusion cast the column
    // (text to a number, say): the rewrite's total form would turn the values
    // that do not convert into NULL (`rewrite/total.rs`), which silently
    // drops rows; such a comparison is most likely a mistake, so refuse it.
    let Some(data_type) = ctx.data_type(&c) else {
        return Ok(());
    };
    let column = &c.name;
    let want = type_class(&data_type);
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
        ctx.require_joined(&ctx.source_column(c)?, Use::Filter)?;
    }
    Ok(())
}
