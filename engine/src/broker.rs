//! The broker pipeline for one query: gate → plan → check → certify →
//! reserve → execute → release → post-process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, FixedOffset};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::Column as DfColumn;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, col};
use datafusion::physical_plan::collect;
use veil_policy::{Grant, Policy};

use crate::accounting::Budget;
use crate::analyze::{Analyzed, analyze, dataset_id};
use crate::audit_log::AuditLog;
use crate::catalog::Catalog;
use crate::error::{EngineError, Result, Rule};
use crate::execute::Executor;
use crate::gate::gate;
use crate::ledger::{Charge, ChargeState, Draw, Ledger, ReserveError, Reserved, Window};
use crate::mechanisms::{BoundingKeys, Release, release};
use crate::rewrite::{CertifiedPlan, KeySet, certify};

/// Schema metadata keys of an answer.
pub mod meta {
    /// Cost charged, in the grant's unit.
    pub const COST: &str = "veil.cost";
    /// `epsilon` or `rho`.
    pub const UNIT: &str = "veil.budget_unit";
    /// Remaining budget after this query.
    pub const REMAINING: &str = "veil.budget_remaining";
    /// Total budget of the grant.
    pub const TOTAL: &str = "veil.budget_total";
    /// Grant id.
    pub const GRANT: &str = "veil.grant";
    /// Policy hash.
    pub const POLICY: &str = "veil.policy_hash";
    /// Request id.
    pub const REQUEST: &str = "veil.request_id";
    /// How group keys were chosen: `public_domain` or `partition_selection`.
    pub const KEYS: &str = "veil.keys";
    /// Partition selection: τ, the smallest threshold opendp certifies for
    /// the grant's δ.
    pub const TAU: &str = "veil.tau";
    /// Partition selection: the threshold applied, `max(τ, k)` with k the
    /// policy's minimum group size in distinct units.
    pub const THRESHOLD: &str = "veil.selection_threshold";
    /// Partition selection: the noisy number of keys found in the data but
    /// not released.
    pub const SUPPRESSED: &str = "veil.suppressed_groups";
    /// Partition selection: `true` when selected keys beyond the grant's
    /// result-row cap were left out.
    pub const TRUNCATED: &str = "veil.truncated";
    /// Field: mechanism.
    pub const MECHANISM: &str = "veil.mechanism";
    /// Field: noise scale in output units.
    pub const SCALE: &str = "veil.scale";
    /// Field: half-width of the 95% interval.
    pub const CI95: &str = "veil.ci95_half_width";
    /// Field: noisy count of the column's values clamped to its bounds.
    pub const CLAMPED: &str = "veil.clamped_values";
    /// Field: aggregate computed.
    pub const AGGREGATE: &str = "veil.aggregate";
    /// Schema: the index of the query's audit entry (its receipt).
    pub const AUDIT_INDEX: &str = "veil.audit_index";
    /// Schema: the latest signed audit checkpoint, as JSON.
    pub const AUDIT_CHECKPOINT: &str = "veil.audit_checkpoint";
}

/// What a query returns.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Schema, with accuracy and budget metadata.
    pub schema: SchemaRef,
    /// Rows.
    pub batches: Vec<RecordBatch>,
    /// Request id.
    pub request_id: String,
}

/// What a query would cost and how accurate it would be: computed from the
/// query, the policy and the ledger only, without reading data or spending.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// Grant the query would run under.
    pub grant: String,
    /// Cost in the grant's unit (0 for public data).
    pub cost: f64,
    /// `epsilon`, `rho`, or empty for public data.
    pub unit: &'static str,
    /// Budget remaining now, before this query.
    pub remaining: f64,
    /// Rows the answer would have (every public key), if known in advance.
    pub rows: Option<usize>,
    /// Partition selection's threshold `max(τ, k)`, if keys are selected.
    pub threshold: Option<u64>,
    /// What the operator should know before spending.
    pub warnings: Vec<String>,
    /// Accuracy of each aggregate column; `None` where it depends on noisy
    /// values (AVG).
    pub aggregates: Vec<(String, crate::mechanisms::Accuracy)>,
}

/// The engine of one domain: the policy in force (with its catalog) and the
/// ledger. The policy can be replaced while serving; every query runs on one
/// consistent [`Snapshot`].
#[derive(Debug)]
pub struct Engine {
    current: RwLock<Arc<Snapshot>>,
    ledger: Ledger,
    audit: AuditLog,
    executor: Executor,
}

/// A policy and the catalog built for it.
#[derive(Debug)]
pub struct Snapshot {
    policy: Arc<Policy>,
    catalog: Catalog,
}

enum Planned {
    Public {
        plan: Box<LogicalPlan>,
        grant: Grant,
    },
    Private {
        certified: Box<CertifiedPlan>,
        planning: Box<SessionState>,
        grant: Grant,
    },
}

impl Engine {
    /// Assembles an engine.
    pub fn new(
        policy: Arc<Policy>,
        catalog: Catalog,
        ledger: Ledger,
        audit: AuditLog,
        executor: Executor,
    ) -> Engine {
        Engine {
            current: RwLock::new(Arc::new(Snapshot { policy, catalog })),
            ledger,
            audit,
            executor,
        }
    }

    /// Where queries run.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.snapshot().policy.clone()
    }

    /// Replaces the policy in force, atomically: queries already running
    /// finish under the old one, every later query sees the new one. The new
    /// catalog is built first; if that fails, the old policy stays.
    pub fn reload(&self, policy: Policy) -> Result<()> {
        let old = self.snapshot();
        let catalog = Catalog::open(&policy, old.catalog.data_dir())?;
        let next = Arc::new(Snapshot {
            policy: Arc::new(policy),
            catalog,
        });
        match self.current.write() {
            Ok(mut w) => *w = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(())
    }

    /// The tables and columns `operator`'s grants in force at `now` expose
    /// (see [`crate::listing`]).
    pub fn listing(
        &self,
        operator: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Vec<crate::listing::ListedTable>> {
        let snap = self.snapshot();
        crate::listing::list(&snap.policy, &snap.catalog, operator, now)
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The budget of each grant of an operator in its current window.
    pub fn budgets(&self, operator: &str) -> Result<Vec<BudgetLine>> {
        budget_report(
            &self.snapshot().policy,
            self.ledger.view(),
            Some(operator),
            chrono::Utc::now().timestamp_millis(),
        )
    }

    /// What a grant has spent in its current window, and in which unit.
    pub fn spent(&self, grant: &str) -> Result<(&'static str, Budget)> {
        let snap = self.snapshot();
        let g = snap
            .policy
            .grants
            .iter()
            .find(|g| g.id == grant)
            .ok_or_else(|| EngineError::Internal(format!("no grant `{grant}`")))?;
        let draw = grant_draw(g, Budget::from_micro(1))?
            .ok_or_else(|| EngineError::Internal(format!("grant `{grant}` has no budget")))?;
        let now = chrono::Utc::now().timestamp_millis();
        let usage = self.ledger.usage(&draw.key, draw.unit, draw.window, now)?;
        Ok((draw.unit, usage.spent))
    }

    /// What remains of a budget in its current window.
    fn remaining(&self, draw: &Draw, now_ms: i64) -> Result<Budget> {
        let usage = self
            .ledger
            .usage(&draw.key, draw.unit, draw.window, now_ms)?;
        Ok(Budget::from_micro(
            draw.total.micro().saturating_sub(usage.spent.micro()),
        ))
    }

    /// Runs one query for an authenticated operator.
    pub async fn run(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Answer> {
        self.run_request(operator, sql, now, None).await
    }

    /// Runs one query under a request id the client chose, so that a retry
    /// with the same id and query returns the recorded outcome (the same
    /// answer once released) without a new charge; `None` draws a fresh id.
    pub async fn run_request(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
        request: Option<&str>,
    ) -> Result<Answer> {
        let request_id = match request {
            Some(id) => client_request_id(operator, id)?,
            None => crate::mechanisms::request_id()?,
        };
        // Fail closed: nothing is admitted while the ledger or the audit
        // log cannot record it.
        if let Some(why) = self.ledger.failure() {
            return Err(crate::ledger::unavailable(why));
        }
        if let Some(why) = self.audit.failure() {
            return Err(crate::audit_log::unavailable(why));
        }
        // A refusal before the grant is known keeps the text only if every
        // grant of the operator would.
        let trail = Trail {
            withhold_text: self
                .snapshot()
                .policy
                .grants_of(operator)
                .any(|g| !g.audit_query_text),
            ..Trail::default()
        };
        // If the caller drops this future (a client cancel), the guard
        // settles the charge and records the query as failed.
        let mut guard = Unfinished {
            engine: self,
            operator,
            sql,
            now,
            request_id: &request_id,
            trail: Some(trail),
        };
        let outcome = match guard.trail.as_mut() {
            Some(trail) => self.run_inner(operator, sql, now, &request_id, trail).await,
            None => Err(EngineError::Internal("no trail".into())),
        };
        let trail = guard.trail.take().unwrap_or_default();
        let outcome = self.record(operator, sql, now, &request_id, trail, outcome);
        if outcome.is_ok() {
            crash_point("before_response");
        }
        match &outcome {
            Ok(_) => {
                tracing::info!(request = %request_id, operator, decision = "released", "query answered")
            }
            Err(e) => {
                tracing::info!(request = %request_id, operator, decision = "refused", code = e.code(), "query refused")
            }
        }
        outcome
    }

    async fn run_inner(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
        request_id: &str,
        trail: &mut Trail,
    ) -> Result<Answer> {
        let snap = self.snapshot();
        trail.policy = snap.policy.hash.clone();
        match self
            .plan(&snap, operator, sql, now, BoundingKeys::fresh()?)
            .await?
        {
            Planned::Public { plan, grant } => {
                trail.grant = Some(grant.id.clone());
                trail.purpose = Some(grant.purpose.to_string());
                trail.withhold_text = !grant.audit_query_text;
                trail.datasets = crate::analyze::scanned_datasets(&plan)?;
                self.run_public(&snap, *plan, &grant, request_id).await
            }
            Planned::Private {
                certified,
                planning,
                grant,
            } => {
                trail.grant = Some(grant.id.clone());
                trail.purpose = Some(grant.purpose.to_string());
                trail.withhold_text = !grant.audit_query_text;
                let mut datasets: Vec<String> = certified
                    .spec()
                    .query
                    .sources
                    .iter()
                    .map(|s| s.dataset.clone())
                    .collect();
                datasets.sort();
                datasets.dedup();
                trail.datasets = datasets;
                let query = Query {
                    operator,
                    sql,
                    now,
                    request_id,
                };
                self.run_private(&snap, *certified, &planning, &grant, &query, trail)
                    .await
            }
        }
    }

    /// Appends the audit entry of a query, admitted or refused, and puts its
    /// receipt in the answer's metadata. An answer whose entry cannot be
    /// written is not returned (its charge stands).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
        request_id: &str,
        trail: Trail,
        outcome: Result<Answer>,
    ) -> Result<Answer> {
        use sha2::Digest;
        let (decision, rule, result_hash) = match &outcome {
            Ok(answer) => (
                if trail.replayed {
                    "replayed"
                } else {
                    "released"
                },
                None,
                Some(hex::encode(sha2::Sha256::digest(encode_answer(answer)?))),
            ),
            Err(e) => ("refused", Some(e.code().to_owned()), None),
        };
        let entry = crate::audit_log::Entry {
            time: now.to_rfc3339(),
            operator: operator.to_owned(),
            grant: trail.grant,
            purpose: trail.purpose,
            policy: trail.policy,
            datasets: trail.datasets,
            query_hash: query_hash(sql),
            query: (!trail.withhold_text).then(|| sql.to_owned()),
            decision: decision.to_owned(),
            rule,
            cost: trail.cost,
            unit: trail.unit.to_owned(),
            request: request_id.to_owned(),
            result_hash,
            sandbox: self.executor.level().to_owned(),
        };
        let receipt = self.audit.append(entry)?;
        let mut answer = outcome?;
        let mut metadata = answer.schema.metadata().clone();
        metadata.insert(meta::AUDIT_INDEX.to_owned(), receipt.index.to_string());
        metadata.insert(
            meta::AUDIT_CHECKPOINT.to_owned(),
            serde_json::to_string(&receipt.checkpoint)
                .map_err(|e| EngineError::Internal(e.to_string()))?,
        );
        let schema = Arc::new(answer.schema.as_ref().clone().with_metadata(metadata));
        answer.batches = with_schema(answer.batches, &schema)?;
        answer.schema = schema;
        Ok(answer)
    }

    /// Test hook: the certified plan of a private query and its exact bounded
    /// aggregates, without noise and without a charge. Compiled only with the
    /// `test-hooks` feature, which release builds never enable.
    ///
    /// `keys`: the bounding keys, fixed so that neighbouring datasets can be
    /// compared under the same choice of rows; `None` draws fresh ones.
    #[cfg(feature = "test-hooks")]
    pub async fn exact_bounded_aggregates_for_tests(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
        keys: Option<BoundingKeys>,
    ) -> Result<(CertifiedPlan, veil_sandbox::BoundedAggregates)> {
        let snap = self.snapshot();
        let keys = match keys {
            Some(k) => k,
            None => BoundingKeys::fresh()?,
        };
        match self.plan(&snap, operator, sql, now, keys).await? {
            Planned::Private { certified, .. } => {
                let exact = self
                    .executor
                    .bounded(&snap.catalog, &certified, "test")
                    .await?;
                Ok((*certified, exact))
            }
            Planned::Public { .. } => Err(EngineError::Internal("not a private query".into())),
        }
    }

    /// Test hook: the plan after each rewrite stage, the certified plan as
    /// the executor's optimizer leaves it, and that plan optimized once more,
    /// each as indented text.
    #[cfg(feature = "test-hooks")]
    pub async fn certified_plans_for_tests(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<(Vec<(&'static str, String)>, String, String)> {
        let snap = self.snapshot();
        match self
            .plan(&snap, operator, sql, now, BoundingKeys::fresh()?)
            .await?
        {
            Planned::Private { certified, .. } => {
                let stages = certified
                    .stages()
                    .iter()
                    .map(|(name, plan)| (*name, plan.display_indent().to_string()))
                    .collect();
                let state = snap.catalog.execution_state()?;
                let optimize = |p: &LogicalPlan| {
                    state
                        .optimize(p)
                        .map_err(|e| EngineError::Internal(e.to_string()))
                };
                let optimized = optimize(certified.executable())?;
                let again = optimize(&optimized)?;
                Ok((
                    stages,
                    optimized.display_indent().to_string(),
                    again.display_indent().to_string(),
                ))
            }
            Planned::Public { .. } => Err(EngineError::Internal("not a private query".into())),
        }
    }

    /// The columns a query would answer with (names and types; veil's
    /// metadata comes with the answer), with every check applied but no
    /// data read and nothing spent: what a prepared statement promises.
    pub async fn describe(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<SchemaRef> {
        let snap = self.snapshot();
        let plan_schema = match self
            .plan(&snap, operator, sql, now, BoundingKeys::fresh()?)
            .await?
        {
            Planned::Public { plan, .. } => plan.schema().clone(),
            Planned::Private { certified, .. } => certified.spec().query.plan.schema().clone(),
        };
        Ok(Arc::new(plan_schema.as_arrow().clone()))
    }

    /// A dry run: the cost and accuracy of a query, with every check applied,
    /// but no data read and no budget spent.
    pub async fn estimate(
        &self,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
    ) -> Result<Estimate> {
        let snap = self.snapshot();
        match self
            .plan(&snap, operator, sql, now, BoundingKeys::fresh()?)
            .await?
        {
            Planned::Public { grant, .. } => Ok(Estimate {
                grant: grant.id.clone(),
                cost: 0.0,
                unit: "",
                remaining: 0.0,
                rows: None,
                threshold: None,
                warnings: vec![],
                aggregates: vec![],
            }),
            Planned::Private {
                certified, grant, ..
            } => {
                let spec = certified.spec();
                let now_ms = now.timestamp_millis();
                let mut remaining = None;
                let mut warnings = Vec::new();
                for draw in draws(&snap.policy, &grant, spec)? {
                    let left = self.remaining(&draw, now_ms)?;
                    if draw.key.starts_with("grant:") {
                        remaining = Some(left);
                    } else if left < draw.amount {
                        warnings.push(format!(
                            "the global budget of `{}` has {} {} left, less than this query's {} {}: it would be refused",
                            draw.key.trim_start_matches("dataset:"),
                            left.as_f64(),
                            draw.unit,
                            draw.amount.as_f64(),
                            draw.unit
                        ));
                    }
                }
                let unit = spec.mechanism.unit();
                // Name each estimate after the output column that shows it.
                let groups = spec.group_columns.len();
                let out_schema = spec.query.plan.schema();
                let origins = output_origins(&spec.query.plan, &spec.query.aggregate_schema);
                let mut aggregates = Vec::new();
                for (k, origin) in origins.iter().enumerate() {
                    if let Some(j) = origin
                        && *j >= groups
                        && let Some(agg) = spec.aggregates.get(j - groups)
                    {
                        aggregates.push((
                            out_schema.field(k).name().clone(),
                            crate::mechanisms::planned_accuracy(spec, *agg)?,
                        ));
                    }
                }
                Ok(Estimate {
                    grant: grant.id.clone(),
                    cost: spec.cost.as_f64(),
                    unit,
                    remaining: remaining.map_or(0.0, Budget::as_f64),
                    rows: spec.keys.known_len(),
                    threshold: match &spec.keys {
                        KeySet::Selected(selection) => Some(selection.threshold()),
                        KeySet::Public(_) => None,
                    },
                    warnings: selection_warnings(spec, snap.catalog.declared_rows(&spec.dataset))
                        .into_iter()
                        .chain(warnings)
                        .collect(),
                    aggregates,
                })
            }
        }
    }

    async fn plan(
        &self,
        snap: &Snapshot,
        operator: &str,
        sql: &str,
        now: DateTime<FixedOffset>,
        keys: BoundingKeys,
    ) -> Result<Planned> {
        let gated = gate(sql)?;
        // Resolve the datasets from the AST, so the grant (and with it the
        // visible columns) is known before planning.
        let (tables, _ctes) = datafusion::sql::resolve::resolve_table_references(&gated.0, true)
            .map_err(|e| EngineError::rejected(Rule::InvalidSql, e.to_string()))?;
        let mut datasets = Vec::new();
        for t in &tables {
            let id = dataset_id(t);
            if !snap.policy.datasets.contains_key(&id) {
                return Err(EngineError::rejected(
                    Rule::InvalidSql,
                    format!(
                        "table `{t}` is not in the catalog; tables are named schema.table, e.g. pop.residents"
                    ),
                ));
            }
            if !datasets.contains(&id) {
                datasets.push(id);
            }
        }
        if datasets.is_empty() {
            return Err(EngineError::rejected(
                Rule::UnsupportedShape,
                "the query reads no dataset",
            ));
        }
        let ids: Vec<&str> = datasets.iter().map(String::as_str).collect();
        let grant = snap.policy.grant_for(operator, &ids, now)?.clone();
        let planning = snap.catalog.planning_state(&grant)?;
        let plan = planning
            .statement_to_plan(gated.0)
            .await
            .map_err(|e| Self::planning_error(&snap.policy, e, &grant, &datasets))?;
        datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| EngineError::rejected(Rule::SingleSelect, e.to_string()))?;
        match analyze(plan, &snap.policy, &grant)? {
            Analyzed::Public(plan) => Ok(Planned::Public {
                plan: Box::new(plan),
                grant,
            }),
            Analyzed::Private(q) => {
                let certified = certify(*q, &snap.policy, &grant, &snap.catalog, &planning, keys)?;
                Ok(Planned::Private {
                    certified: Box::new(certified),
                    planning: Box::new(planning),
                    grant,
                })
            }
        }
    }

    /// Maps a planning error; an unknown field that exists in the dataset but
    /// is not granted is reported as such.
    fn planning_error(
        policy: &Policy,
        e: DataFusionError,
        grant: &Grant,
        datasets: &[String],
    ) -> EngineError {
        if let DataFusionError::SchemaError(err, _) = e.find_root()
            && let datafusion::common::SchemaError::FieldNotFound { field, .. } = err.as_ref()
        {
            for d in datasets {
                if let Some(ds) = policy.datasets.get(d)
                    && ds.column(&field.name).is_some()
                {
                    return EngineError::rejected(
                        Rule::ColumnNotGranted,
                        format!(
                            "column `{d}.{}` is not granted to operator `{}` under grant `{}`",
                            field.name, grant.grantee, grant.id
                        ),
                    );
                }
            }
        }
        let message = e.strip_backtrace();
        // DataFusion's "did you mean" picks among equally close names in
        // hash order: name what is allowed instead, the same every time.
        if let Some(rest) = message.split("Invalid function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            return EngineError::rejected(
                Rule::InvalidSql,
                format!(
                    "function `{name}` is not available; scalar functions: {}; aggregates: those your grant lists",
                    crate::catalog::ALLOWED_SCALAR_FUNCTIONS.join(", ")
                ),
            );
        }
        let message = message
            .split("\nDid you mean")
            .next()
            .unwrap_or_default()
            .to_owned();
        EngineError::rejected(
            Rule::InvalidSql,
            format!("the query does not plan: {message}"),
        )
    }

    async fn run_public(
        &self,
        snap: &Snapshot,
        plan: LogicalPlan,
        grant: &Grant,
        request_id: &str,
    ) -> Result<Answer> {
        // Swap the planning session's empty tables for the data files.
        let plan = plan
            .transform_up(|node| {
                if let LogicalPlan::TableScan(mut scan) = node {
                    let id = dataset_id(&scan.table_name);
                    let schema = snap
                        .catalog
                        .granted_schema(grant, &id)
                        .map_err(|e| DataFusionError::Plan(e.to_string()))?;
                    let table = snap
                        .catalog
                        .data_table(&snap.policy, &id, schema)
                        .map_err(|e| DataFusionError::Plan(e.to_string()))?;
                    scan.source = provider_as_source(table);
                    Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                } else {
                    Ok(Transformed::no(node))
                }
            })
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .data;
        let plan = LogicalPlanBuilder::from(plan)
            .limit(0, Some(grant.max_result_rows as usize))
            .and_then(|b| b.build())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let batches = self.executor.rows(&snap.catalog, &plan, request_id).await?;
        let mut metadata = HashMap::new();
        metadata.insert(meta::GRANT.to_owned(), grant.id.clone());
        metadata.insert(meta::POLICY.to_owned(), snap.policy.hash.clone());
        metadata.insert(meta::REQUEST.to_owned(), request_id.to_owned());
        metadata.insert(meta::COST.to_owned(), "0".to_owned());
        let schema = Arc::new(plan.schema().as_arrow().clone().with_metadata(metadata));
        let batches = with_schema(batches, &schema)?;
        Ok(Answer {
            schema,
            batches,
            request_id: request_id.to_owned(),
        })
    }

    async fn run_private(
        &self,
        snap: &Snapshot,
        certified: CertifiedPlan,
        planning: &SessionState,
        grant: &Grant,
        query: &Query<'_>,
        trail: &mut Trail,
    ) -> Result<Answer> {
        let spec = certified.spec();
        let request_id = query.request_id;
        // 1. Durable charge on every budget before any data is read.
        let draws = draws(&snap.policy, grant, spec)?;
        let charge = Charge {
            request_id,
            operator: query.operator,
            grant: &grant.id,
            policy_hash: &snap.policy.hash,
            query_hash: &query_hash(query.sql),
            draws: draws.clone(),
            now_ms: query.now.timestamp_millis(),
        };
        let reservation = match self.ledger.reserve(&charge) {
            Ok(Reserved::New(r)) => {
                trail.reserved = true;
                trail.cost = spec.cost.as_f64();
                trail.unit = spec.mechanism.unit();
                r
            }
            Ok(Reserved::Replay { state, answer }) => {
                trail.replayed = true;
                return replay(request_id, state, answer);
            }
            Err(ReserveError::Exhausted { draw, spent }) => {
                return Err(EngineError::BudgetExhausted {
                    owner: match draw.key.strip_prefix("dataset:") {
                        Some(d) => format!("the global budget of dataset `{d}`"),
                        None => format!("grant `{}`", grant.id),
                    },
                    cost: draw.amount.as_f64(),
                    remaining: draw.total.micro().saturating_sub(spent.micro()) as f64
                        / crate::accounting::MICRO as f64,
                    budget: draw.total.as_f64(),
                    unit: draw.unit,
                });
            }
            Err(ReserveError::Conflict) => {
                return Err(EngineError::rejected(
                    crate::error::Rule::InvalidSql,
                    "this request id was already used for another query; use a new request id for a new query",
                ));
            }
            Err(ReserveError::Ledger(why) | ReserveError::Step(why)) => {
                return Err(crate::ledger::unavailable(why));
            }
        };
        crash_point("after_reserve");
        // 2. Execute; failures keep the charge.
        self.ledger
            .advance(request_id, ChargeState::Dispatched, None)?;
        crash_point("after_dispatch");
        let exact = match self
            .executor
            .bounded(&snap.catalog, &certified, request_id)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                self.ledger
                    .advance(request_id, ChargeState::FailedAfterDispatch, None)?;
                return Err(e);
            }
        };
        // 3. Noise, then post-processing of noisy values only.
        let aggregate_schema = Arc::new(spec.query.aggregate_schema.as_arrow().clone());
        let released = release(spec, &exact, aggregate_schema)?;
        drop(exact);
        let (schema, batches) = post_process(&released, &certified, planning).await?;
        let grant_spent = reservation.spent[0];
        let total = draws[0].total;
        let mut metadata: HashMap<String, String> = HashMap::new();
        metadata.insert(meta::COST.to_owned(), fmt_budget(spec.cost.as_f64()));
        metadata.insert(meta::UNIT.to_owned(), draws[0].unit.to_owned());
        metadata.insert(
            meta::REMAINING.to_owned(),
            fmt_budget(
                total.micro().saturating_sub(grant_spent.micro()) as f64
                    / crate::accounting::MICRO as f64,
            ),
        );
        metadata.insert(meta::TOTAL.to_owned(), fmt_budget(total.as_f64()));
        metadata.insert(meta::GRANT.to_owned(), grant.id.clone());
        metadata.insert(meta::POLICY.to_owned(), snap.policy.hash.clone());
        metadata.insert(meta::REQUEST.to_owned(), request_id.to_owned());
        metadata.insert(meta::KEYS.to_owned(), spec.keys.kind().to_owned());
        if let KeySet::Selected(selection) = &spec.keys {
            metadata.insert(meta::TAU.to_owned(), selection.tau.to_string());
            metadata.insert(
                meta::THRESHOLD.to_owned(),
                selection.threshold().to_string(),
            );
            metadata.insert(meta::TRUNCATED.to_owned(), released.truncated().to_string());
            if let Some(n) = released.suppressed() {
                metadata.insert(meta::SUPPRESSED.to_owned(), n.to_string());
            }
        }
        let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
        let batches = with_schema(batches, &schema)?;
        let answer = Answer {
            schema,
            batches,
            request_id: request_id.to_owned(),
        };
        // 4. The release is recorded with the answer a retry gets.
        self.ledger.advance(
            request_id,
            ChargeState::Released,
            Some(&encode_answer(&answer)?),
        )?;
        Ok(answer)
    }
}

/// What the audit entry of a query records beside its outcome, filled in
/// as the query proceeds.
#[derive(Debug, Default)]
struct Trail {
    grant: Option<String>,
    purpose: Option<String>,
    policy: String,
    datasets: Vec<String>,
    cost: f64,
    unit: &'static str,
    replayed: bool,
    withhold_text: bool,
    /// This call reserved a new charge (so it, and no retry under the same
    /// request id, settles it).
    reserved: bool,
}

/// A query whose future may still be dropped before it finishes (the
/// client went away). Dropped while armed, it does what a failure would:
/// a charge that reached an executor stands (`FAILED_AFTER_DISPATCH`), one
/// that did not is returned (`ABORTED`), and the query gets its audit entry
/// as `EXECUTION_FAILED`.
struct Unfinished<'a> {
    engine: &'a Engine,
    operator: &'a str,
    sql: &'a str,
    now: DateTime<FixedOffset>,
    request_id: &'a str,
    trail: Option<Trail>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let Some(trail) = self.trail.take() else {
            return;
        };
        let ledger = &self.engine.ledger;
        // Only the charge this call reserved: a cancelled retry must not
        // settle the original's.
        let settled = match ledger.state(self.request_id) {
            _ if !trail.reserved => Ok(()),
            Ok(Some(ChargeState::Dispatched)) => {
                ledger.advance(self.request_id, ChargeState::FailedAfterDispatch, None)
            }
            Ok(Some(ChargeState::Reserved)) => ledger.abort(self.request_id),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = settled {
            tracing::error!(request = %self.request_id, error = %e, "settling a cancelled query");
        }
        let failed = Err(EngineError::ExecutionFailed {
            request: self.request_id.to_owned(),
        });
        if let Err(e) = self.engine.record(
            self.operator,
            self.sql,
            self.now,
            self.request_id,
            trail,
            failed,
        ) && !matches!(e, EngineError::ExecutionFailed { .. })
        {
            tracing::error!(request = %self.request_id, error = %e, "auditing a cancelled query");
        }
        tracing::info!(request = %self.request_id, operator = self.operator, decision = "cancelled", "query cancelled by its client");
    }
}

/// A point where the crash tests kill the server (`VEIL_TEST_CRASH_AT`):
/// it says so on standard error and waits for its SIGKILL. Compiled only
/// with the `test-hooks` feature, which release builds never enable.
#[cfg(feature = "test-hooks")]
fn crash_point(name: &str) {
    if std::env::var("VEIL_TEST_CRASH_AT").as_deref() == Ok(name) {
        eprintln!("VEIL_TEST_CRASH_POINT {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
fn crash_point(_: &str) {}

/// One query as the operator sent it.
struct Query<'a> {
    operator: &'a str,
    sql: &'a str,
    now: DateTime<FixedOffset>,
    request_id: &'a str,
}

/// The ledger id of a request id the client chose: checked (1 to 128
/// characters of `A-Z a-z 0-9 . _ : -`) and namespaced by operator, so that
/// operators cannot collide or probe each other's requests.
fn client_request_id(operator: &str, id: &str) -> Result<String> {
    let valid = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if !valid {
        return Err(EngineError::rejected(
            crate::error::Rule::InvalidSql,
            "a request id is 1 to 128 characters of letters, digits, `.`, `_`, `:` and `-`",
        ));
    }
    Ok(format!("{operator}/{id}"))
}

/// SHA-256 of the query text with runs of whitespace collapsed: a retry must
/// repeat the query.
pub fn query_hash(sql: &str) -> String {
    use sha2::Digest;
    let normalized = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    hex::encode(sha2::Sha256::digest(normalized.as_bytes()))
}

/// The outcome recorded for a request id seen before.
fn replay(request_id: &str, state: ChargeState, answer: Option<Vec<u8>>) -> Result<Answer> {
    match (state, answer) {
        (ChargeState::Released, Some(bytes)) => decode_answer(&bytes, request_id),
        (ChargeState::FailedAfterDispatch, _) => Err(EngineError::ExecutionFailed {
            request: request_id.to_owned(),
        }),
        _ => Err(EngineError::Unavailable(format!(
            "request {request_id} is still running or was interrupted after its data was read; its charge stands. Retry later, or send the query under a new request id"
        ))),
    }
}

/// An answer as an Arrow IPC stream, metadata included.
fn encode_answer(answer: &Answer) -> Result<Vec<u8>> {
    let internal = |e: datafusion::arrow::error::ArrowError| EngineError::Internal(e.to_string());
    let mut out = Vec::new();
    let mut writer =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &answer.schema)
            .map_err(internal)?;
    for b in &answer.batches {
        writer.write(b).map_err(internal)?;
    }
    writer.finish().map_err(internal)?;
    drop(writer);
    Ok(out)
}

fn decode_answer(bytes: &[u8], request_id: &str) -> Result<Answer> {
    let internal = |e: datafusion::arrow::error::ArrowError| EngineError::Internal(e.to_string());
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(bytes, None).map_err(internal)?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(internal)?;
    Ok(Answer {
        schema,
        batches,
        request_id: request_id.to_owned(),
    })
}

/// The grant's budget, as a draw of `amount` (`None` without DP settings):
/// in the grant's unit, refreshed per window from the grant's start.
fn grant_draw(grant: &Grant, amount: Budget) -> Result<Option<Draw>> {
    let Some(dp) = &grant.dp else { return Ok(None) };
    let unit = crate::accounting::Mechanism::for_grant(dp).unit();
    Ok(Some(Draw {
        key: format!("grant:{}", grant.id),
        unit,
        total: Budget::total(dp.budget)?,
        window: dp
            .window
            .as_deref()
            .and_then(veil_policy::iso_duration_days)
            .map(|days| Window::days(grant.valid_from.timestamp_millis(), days)),
        amount,
    }))
}

/// Start of dataset budget windows: midnight, 1970-01-01, Beijing time.
const DATASET_WINDOW_ANCHOR_MS: i64 = -8 * 3_600_000;

/// The budgets a private query draws on: its grant's first, then the global
/// budget of every private dataset it reads, its cost converted to each
/// budget's unit ([`crate::accounting::convert`]).
fn draws(policy: &Policy, grant: &Grant, spec: &crate::rewrite::ReleaseSpec) -> Result<Vec<Draw>> {
    let mut out = vec![
        grant_draw(grant, spec.cost)?
            .ok_or_else(|| EngineError::Internal("private query without DP".into()))?,
    ];
    let mut seen = std::collections::BTreeSet::new();
    for source in spec.query.sources.iter().filter(|s| s.private) {
        if !seen.insert(source.dataset.as_str()) {
            continue;
        }
        let Some(d) = policy.datasets.get(&source.dataset) else {
            continue;
        };
        if let Some(mut draw) = dataset_draw(d, Budget::from_micro(1))? {
            let delta = d.budget.as_ref().map_or(0.0, |b| b.accounting.delta());
            draw.amount =
                crate::accounting::convert(spec.cost, spec.mechanism.unit(), draw.unit, delta)?;
            out.push(draw);
        }
    }
    Ok(out)
}

/// A dataset's global budget as a draw of `amount`, in its own unit
/// (`None` when it declares none).
fn dataset_draw(dataset: &veil_policy::Dataset, amount: Budget) -> Result<Option<Draw>> {
    let Some(b) = &dataset.budget else {
        return Ok(None);
    };
    Ok(Some(Draw {
        key: format!("dataset:{}", dataset.id),
        unit: match b.accounting {
            veil_policy::Accounting::Epsilon { .. } => "epsilon",
            veil_policy::Accounting::Rho { .. } => "rho",
        },
        total: Budget::total(b.total)?,
        window: b
            .window_days
            .map(|days| Window::days(DATASET_WINDOW_ANCHOR_MS, days)),
        amount,
    }))
}

/// One budget's consumption in its current window.
#[derive(Debug, Clone)]
pub struct BudgetLine {
    /// `grant:<id>` or `dataset:<id>`.
    pub budget: String,
    /// `epsilon` or `rho`.
    pub unit: &'static str,
    /// Spent in the current window.
    pub spent: f64,
    /// The budget per window (or overall).
    pub total: f64,
    /// When the current window ends (RFC 3339), for budgets that refresh.
    pub refreshes: Option<String>,
}

/// The consumption of every budget of a policy (`operator`: only that
/// operator's grants, and no dataset budgets), read from a ledger view.
pub fn budget_report(
    policy: &Policy,
    view: &crate::ledger::LedgerView,
    operator: Option<&str>,
    now_ms: i64,
) -> Result<Vec<BudgetLine>> {
    let one = Budget::from_micro(1);
    let mut draws = Vec::new();
    for g in policy
        .grants
        .iter()
        .filter(|g| operator.is_none_or(|o| g.grantee == o))
    {
        draws.extend(grant_draw(g, one)?);
    }
    if operator.is_none() {
        for d in policy.datasets.values() {
            draws.extend(dataset_draw(d, one)?);
        }
    }
    draws
        .into_iter()
        .map(|d| {
            let usage = view.usage(&d.key, d.unit, d.window, now_ms)?;
            Ok(BudgetLine {
                budget: d.key,
                unit: d.unit,
                spent: usage.spent.as_f64(),
                total: d.total.as_f64(),
                refreshes: d.window.and_then(|w| {
                    chrono::DateTime::from_timestamp_millis(w.end_ms(usage.window))
                        .map(|t| t.to_rfc3339())
                }),
            })
        })
        .collect()
}

/// Warns when partition selection can release few or no groups: a unit
/// counts once in at most `max_groups` keys and there are at most as many
/// units as rows, so at most `rows · max_groups / threshold` keys can pass.
fn selection_warnings(spec: &crate::rewrite::ReleaseSpec, rows: Option<u64>) -> Vec<String> {
    let (KeySet::Selected(selection), Some(rows)) = (&spec.keys, rows) else {
        return vec![];
    };
    let threshold = selection.threshold().max(1);
    let passable = rows.saturating_mul(u64::from(spec.max_groups)) / threshold;
    match passable {
        0 => vec![format!(
            "no group can be released: `{}` declares {rows} rows, fewer than the {threshold} distinct units a group needs; the query would spend its budget on an empty answer",
            spec.dataset
        )],
        1..=3 => vec![format!(
            "at most {passable} group(s) can be released: `{}` declares {rows} rows and a group needs {threshold} distinct units",
            spec.dataset
        )],
        _ => vec![],
    }
}

/// The unit and total budget a certified query is charged against.
fn fmt_budget(x: f64) -> String {
    format!("{x:.6}")
}

fn with_schema(batches: Vec<RecordBatch>, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    batches
        .into_iter()
        .map(|b| {
            RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                .map_err(|e| EngineError::Internal(e.to_string()))
        })
        .collect()
}

/// Runs the operator's plan above its Aggregate node over the release, and
/// labels every output column that carries a noisy aggregate.
async fn post_process(
    released: &Release,
    certified: &CertifiedPlan,
    planning: &SessionState,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let spec = certified.spec();
    let agg_schema = spec.query.aggregate_schema.clone();
    let batch = released.batch().clone();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]])
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    // Re-create the Aggregate node's exact output schema (names and
    // qualifiers), followed by the interval columns.
    let mut exprs: Vec<Expr> = agg_schema
        .iter()
        .map(|(qualifier, field)| {
            col(DfColumn::new(Some("__veil_release"), field.name()))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    for j in 0..spec.aggregates.len() {
        for high in [false, true] {
            let name = crate::dp_interval::bound_column(j, high);
            exprs.push(col(DfColumn::new(Some("__veil_release"), &name)).alias(name));
        }
    }
    let groups = spec.group_columns.len();
    let replacement =
        LogicalPlanBuilder::scan("__veil_release", provider_as_source(Arc::new(table)), None)
            .and_then(|b| b.project(exprs))
            .and_then(|b| b.build())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
    let plan = spec
        .query
        .plan
        .clone()
        .transform_up(|node| {
            // The query's DP aggregate (not a per-unit one below it).
            if let LogicalPlan::Aggregate(a) = &node
                && a.schema == agg_schema
            {
                return Ok(Transformed::yes(replacement.clone()));
            }
            // DP_INTERVAL_LOW/HIGH become the release's interval columns;
            // every node above the release sees them.
            // A projection keeps its output names.
            let projection = matches!(node, LogicalPlan::Projection(_));
            node.map_expressions(|e| {
                let name = e.schema_name().to_string();
                let resolved = crate::dp_interval::resolve(e, &agg_schema, groups)?;
                Ok(if resolved.transformed && projection {
                    Transformed::yes(resolved.data.alias_if_changed(name)?)
                } else {
                    resolved
                })
            })?
            .map_data(|n| n.recompute_schema())
        })
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .data;
    let physical = planning
        .create_physical_plan(&plan)
        .await
        .map_err(|e| EngineError::Internal(format!("post-processing: {}", e.strip_backtrace())))?;
    let batches = collect(physical, planning.task_ctx())
        .await
        .map_err(|e| EngineError::Internal(format!("post-processing: {}", e.strip_backtrace())))?;
    // Label output columns: trace each through the top projection to the
    // aggregate it shows.
    let groups = spec.group_columns.len();
    let out_schema = plan.schema().as_arrow().clone();
    let origins = output_origins(&plan, &agg_schema);
    let fields: Vec<Field> = out_schema
        .fields()
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let mut md = HashMap::new();
            match origins.get(k).copied().flatten() {
                Some(j) if j >= groups => {
                    let acc = &released.accuracy()[j - groups];
                    md.insert(meta::MECHANISM.to_owned(), acc.mechanism.to_owned());
                    md.insert(meta::SCALE.to_owned(), format!("{}", acc.scale));
                    if let Some(h) = acc.half_width_95 {
                        md.insert(meta::CI95.to_owned(), format!("{h}"));
                    }
                    if let Some(n) = acc.clamped_values {
                        md.insert(meta::CLAMPED.to_owned(), n.to_string());
                    }
                    md.insert(meta::AGGREGATE.to_owned(), acc.aggregate.clone());
                }
                Some(_) => {
                    md.insert(meta::KEYS.to_owned(), spec.keys.kind().to_owned());
                }
                None => {
                    md.insert(meta::MECHANISM.to_owned(), "post_processing".to_owned());
                }
            }
            f.as_ref().clone().with_metadata(md)
        })
        .collect();
    Ok((Arc::new(Schema::new(fields)), batches))
}

/// For each output column, the index of the Aggregate output column it shows
/// unchanged (if any).
fn output_origins(
    plan: &LogicalPlan,
    agg_schema: &datafusion::common::DFSchemaRef,
) -> Vec<Option<usize>> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                return p
                    .expr
                    .iter()
                    .map(|e| match crate::analyze::strip_aliases(e) {
                        Expr::Column(c) => agg_schema.index_of_column(&c).ok().or_else(|| {
                            agg_schema.fields().iter().position(|f| f.name() == &c.name)
                        }),
                        _ => None,
                    })
                    .collect();
            }
            LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_) => {
                node = node.inputs()[0];
            }
            _ => return (0..agg_schema.fields().len()).map(Some).collect(),
        }
    }
}
