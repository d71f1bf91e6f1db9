//! veil's own gRPC API (`veil.v1.Veil`), served beside Flight SQL.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use veil_engine::audit_log;
use veil_proto::v1::veil_server::{Veil, VeilServer};
use veil_proto::v1::{
    AggregateEstimate, AuditReceipt, Checkpoint, ColumnGrant, CostEstimate, DpSettings,
    EstimateCostRequest, GetAuditReceiptRequest, GetBudgetRequest, GetBudgetResponse,
    GetServerInfoRequest, Grant, GrantBudget, InclusionProof, ListGrantsRequest,
    ListGrantsResponse, ProveInclusionRequest, Scope, ServerInfo,
};

use crate::server::{Shared, status_of};

/// The `veil.v1.Veil` service.
pub struct VeilApi {
    shared: Arc<Shared>,
}

impl VeilApi {
    /// The tonic service.
    pub fn service(shared: Arc<Shared>) -> VeilServer<VeilApi> {
        VeilServer::new(VeilApi { shared })
    }
}

impl VeilApi {
    /// Runs `f` on the engine's audit log off the async threads, after
    /// checking that entry `index` exists and belongs to `operator`: another
    /// operator's entry is indistinguishable from a missing one. Each call
    /// reads one entry and O(log² n) tree nodes, never the whole log.
    async fn own_entry<T: Send + 'static>(
        &self,
        operator: String,
        index: u64,
        f: impl FnOnce(&audit_log::AuditLog, Vec<u8>) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = Arc::clone(self.shared.engine());
        tokio::task::spawn_blocking(move || {
            let audit = engine.audit();
            match audit.entry(index).map_err(|e| internal(&e))? {
                Some((stored, line)) if stored.entry.operator == operator => f(audit, line),
                _ => Err(Status::not_found(format!(
                    "you have no audit entry {index}; a response's `veil.audit_index` names its entry"
                ))),
            }
        })
        .await
        .map_err(|e| internal(&e.to_string()))?
    }
}

fn internal(detail: &str) -> Status {
    crate::server::status_of(&veil_engine::EngineError::Internal(detail.to_owned()))
}

fn checkpoint(c: audit_log::Checkpoint) -> Checkpoint {
    Checkpoint {
        size: c.size,
        root: c.root,
        time: c.time,
        signature: c.signature,
    }
}

/// A grant as `ListGrants` shows it.
fn grant(g: &veil_policy::Grant, now: chrono::DateTime<chrono::FixedOffset>) -> Grant {
    let minutes = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
    Grant {
        id: g.id.clone(),
        channel: g.channel.as_str().to_owned(),
        purpose: g.purpose.to_string(),
        purpose_detail: g.purpose_detail.clone(),
        agency: g.agency.clone(),
        agreement: g.agreement.clone(),
        valid_from: g.valid_from.to_rfc3339(),
        valid_until: g.valid_until.to_rfc3339(),
        in_force: g.in_force(now),
        hours: g
            .hours
            .map(|h| format!("{}-{}", minutes(h.from_minute), minutes(h.until_minute))),
        scopes: g
            .scopes
            .iter()
            .map(|s| Scope {
                dataset: s.dataset.clone(),
                row_filter: s.row_filter.clone(),
                columns: s
                    .columns
                    .iter()
                    .map(|(name, uses)| ColumnGrant {
                        name: name.clone(),
                        uses: uses.iter().map(|u| u.as_str().to_owned()).collect(),
                    })
                    .collect(),
            })
            .collect(),
        aggregate_functions: g.agg_functions.iter().cloned().collect(),
        min_group_size: g.min_group_size,
        max_queries_per_day: g.max_queries_per_day,
        max_result_rows: g.max_result_rows,
        dp: g.dp.as_ref().map(|d| DpSettings {
            accounting: match d.accounting {
                veil_policy::Accounting::Epsilon { .. } => "epsilon",
                veil_policy::Accounting::Rho { .. } => "rho",
            }
            .to_owned(),
            delta: d.accounting.delta(),
            budget: d.budget,
            per_query_max: d.per_query,
            window: d.window.clone(),
        }),
        pricing: match &g.pricing {
            veil_policy::Pricing::Free { conditions: None } => "free".to_owned(),
            veil_policy::Pricing::Free {
                conditions: Some(c),
            } => format!("free, on condition: {c}"),
            veil_policy::Pricing::GuidedPrice {
                unit,
                price_cny,
                cap_cny,
            } => format!("guided price {price_cny:.2} CNY {unit} (cap {cap_cny:.2} CNY)"),
        },
    }
}

#[tonic::async_trait]
impl Veil for VeilApi {
    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let operator = self.shared.operator(&request)?;
        let policy = self.shared.engine().policy();
        let now = chrono::Utc::now().fixed_offset();
        Ok(Response::new(ListGrantsResponse {
            grants: policy.grants_of(&operator).map(|g| grant(g, now)).collect(),
        }))
    }

    async fn get_audit_receipt(
        &self,
        request: Request<GetAuditReceiptRequest>,
    ) -> Result<Response<AuditReceipt>, Status> {
        let operator = self.shared.operator(&request)?;
        let index = request.into_inner().index;
        let receipt = self
            .own_entry(operator, index, move |audit, line| {
                let latest = audit.latest().map_err(|e| internal(&e))?;
                Ok(AuditReceipt {
                    index,
                    entry_json: String::from_utf8_lossy(&line).into_owned(),
                    checkpoint: latest.map(checkpoint),
                })
            })
            .await?;
        Ok(Response::new(receipt))
    }

    async fn prove_inclusion(
        &self,
        request: Request<ProveInclusionRequest>,
    ) -> Result<Response<InclusionProof>, Status> {
        let operator = self.shared.operator(&request)?;
        let index = request.into_inner().index;
        let proof = self
            .own_entry(operator, index, move |audit, _| {
                // Only "not yet covered" is the caller's to know; a log that
                // fails verification is the server's problem.
                let p = audit.prove(index).map_err(|e| {
                    if e.starts_with("no checkpoint covers") {
                        Status::failed_precondition(e)
                    } else {
                        internal(&e)
                    }
                })?;
                Ok(InclusionProof {
                    index: p.index,
                    leaf: p.leaf,
                    path: p.path,
                    checkpoint: Some(checkpoint(p.checkpoint)),
                })
            })
            .await?;
        Ok(Response::new(proof))
    }

    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        self.shared.operator(&request)?;
        let policy = self.shared.engine().policy();
        Ok(Response::new(ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            policy_id: policy.id.clone(),
            policy_version: policy.version.clone(),
            policy_hash: policy.hash.clone(),
            sandbox_level: self.shared.engine().executor().level().to_owned(),
        }))
    }

    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<GetBudgetResponse>, Status> {
        let operator = self.shared.operator(&request)?;
        let grants = self
            .shared
            .engine()
            .budgets(&operator)
            .map_err(|e| status_of(&e))?
            .into_iter()
            .map(|line| GrantBudget {
                grant_id: line.budget.trim_start_matches("grant:").to_owned(),
                unit: line.unit.to_owned(),
                remaining: (line.total - line.spent).max(0.0),
                total: line.total,
                refreshes: line.refreshes,
            })
            .collect();
        Ok(Response::new(GetBudgetResponse {
            operator_id: operator,
            grants,
        }))
    }

    async fn estimate_cost(
        &self,
        request: Request<EstimateCostRequest>,
    ) -> Result<Response<CostEstimate>, Status> {
        let operator = self.shared.operator(&request)?;
        let now = chrono::Utc::now().fixed_offset();
        let e = self
            .shared
            .engine()
            .estimate(&operator, &request.into_inner().sql, now)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(CostEstimate {
            grant_id: e.grant,
            unit: e.unit.to_owned(),
            cost: e.cost,
            remaining: e.remaining,
            exceeds_budget: e.cost > e.remaining + 1e-12 && !e.unit.is_empty(),
            rows: e.rows.map(|r| r as u64),
            selection_threshold: e.threshold,
            warnings: e.warnings,
            aggregates: e
                .aggregates
                .into_iter()
                .map(|(column, acc)| AggregateEstimate {
                    column,
                    aggregate: acc.aggregate,
                    mechanism: acc.mechanism.to_owned(),
                    scale: acc.scale,
                    half_width_95: acc.half_width_95,
                })
                .collect(),
        }))
    }
}
