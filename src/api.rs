//! veil's own gRPC API (`veil.v1.Veil`), served beside Flight SQL.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use veil_proto::v1::veil_server::{Veil, VeilServer};
use veil_proto::v1::{
    AggregateEstimate, CostEstimate, EstimateCostRequest, GetBudgetRequest, GetBudgetResponse,
    GetServerInfoRequest, GrantBudget, ServerInfo,
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

#[tonic::async_trait]
impl Veil for VeilApi {
    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        self.shared.operator(request.metadata())?;
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
        let operator = self.shared.operator(request.metadata())?;
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
        let operator = self.shared.operator(request.metadata())?;
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
