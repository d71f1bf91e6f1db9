//! The certified plan as bytes: what the broker hands an executor.
//!
//! Plans travel as `datafusion-proto` protobuf. Built-in functions travel by
//! name and are resolved in the executor's own session, which registers only
//! the functions a certified plan may contain ([`EXECUTOR_SCALAR_FUNCTIONS`]
//! and friends): a plan naming anything else does not decode. veil's own
//! functions (the keyed row hash, the bounded sample, the clamp, the quantile
//! rank and histogram) carry their parameters in the extension codec; tables are
//! `ListingTable`s over the data store and travel natively.

use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::common::{TableReference, internal_err, not_impl_err};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan, ScalarUDF};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use serde::{Deserialize, Serialize};

use crate::bounded_sample::{BoundedSample, Output};
use crate::clamp::{Bounds, Clamp};
use crate::error::{EngineError, Result};
use crate::keyed_hash::KeyedHash;
use crate::quantile_grid::QuantileGrid;

/// Built-in scalar functions an executor resolves: what an operator may call
/// ([`crate::catalog::ALLOWED_SCALAR_FUNCTIONS`]) and what the rewrite adds.
pub const EXECUTOR_SCALAR_FUNCTIONS: &[&str] = &["get_field", "floor"];
/// Built-in window functions an executor resolves (contribution bounding).
pub const EXECUTOR_WINDOW_FUNCTIONS: &[&str] = &["row_number", "rank"];

/// veil's functions and their parameters.
#[derive(Debug, Serialize, Deserialize)]
enum Payload {
    KeyedHash {
        key: [u8; 16],
    },
    BoundedSample {
        k: u32,
        key: [u8; 16],
        outputs: Vec<Output>,
    },
    QuantileRank {
        grid: QuantileGrid,
    },
    Clamp {
        bounds: Bounds,
        clamp: Clamp,
    },
    RankHistogram {
        bins: usize,
    },
}

/// The extension codec for veil's functions.
#[derive(Debug, Default)]
pub struct VeilCodec;

fn codec_err(e: impl std::fmt::Display) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Internal(format!("veil plan codec: {e}"))
}

impl LogicalExtensionCodec for VeilCodec {
    fn try_decode(
        &self,
        _buf: &[u8],
        _inputs: &[LogicalPlan],
        _ctx: &TaskContext,
    ) -> datafusion::error::Result<Extension> {
        not_impl_err!("a certified plan has no extension nodes below its release")
    }

    fn try_encode(&self, _node: &Extension, _buf: &mut Vec<u8>) -> datafusion::error::Result<()> {
        not_impl_err!("a certified plan has no extension nodes below its release")
    }

    fn try_decode_table_provider(
        &self,
        _buf: &[u8],
        _table_ref: &TableReference,
        _schema: datafusion::arrow::datatypes::SchemaRef,
        _ctx: &TaskContext,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        not_impl_err!("tables travel as listing tables")
    }

    fn try_encode_table_provider(
        &self,
        _table_ref: &TableReference,
        _node: Arc<dyn TableProvider>,
        _buf: &mut Vec<u8>,
    ) -> datafusion::error::Result<()> {
        not_impl_err!("tables travel as listing tables")
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> datafusion::error::Result<()> {
        let inner = node.inner().as_ref() as &dyn std::any::Any;
        let payload = if let Some(h) = inner.downcast_ref::<KeyedHash>() {
            Payload::KeyedHash { key: h.key() }
        } else if let Some(r) = crate::quantile_grid::rank_grid(node) {
            Payload::QuantileRank { grid: r }
        } else if let Some((bounds, clamp)) = crate::clamp::clamp_of(node) {
            Payload::Clamp { bounds, clamp }
        } else {
            return Ok(()); // a built-in: by name
        };
        serde_json::to_writer(buf, &payload).map_err(codec_err)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> datafusion::error::Result<Arc<ScalarUDF>> {
        match serde_json::from_slice(buf).map_err(codec_err)? {
            Payload::KeyedHash { key } => Ok(KeyedHash::udf(key)),
            Payload::QuantileRank { grid } => Ok(grid.rank_udf()),
            Payload::Clamp { bounds, clamp } => Ok(bounds.udf(clamp)),
            _ => internal_err!("`{name}` is not a veil scalar function"),
        }
    }

    fn try_encode_udaf(
        &self,
        node: &AggregateUDF,
        buf: &mut Vec<u8>,
    ) -> datafusion::error::Result<()> {
        let inner = node.inner().as_ref() as &dyn std::any::Any;
        let payload = if let Some(s) = inner.downcast_ref::<BoundedSample>() {
            let (k, key, outputs) = s.parameters();
            Payload::BoundedSample { k, key, outputs }
        } else if let Some(bins) = crate::quantile_grid::histogram_bins(node) {
            Payload::RankHistogram { bins }
        } else {
            return Ok(());
        };
        serde_json::to_writer(buf, &payload).map_err(codec_err)
    }

    fn try_decode_udaf(
        &self,
        name: &str,
        buf: &[u8],
    ) -> datafusion::error::Result<Arc<AggregateUDF>> {
        match serde_json::from_slice(buf).map_err(codec_err)? {
            Payload::BoundedSample { k, key, outputs } => Ok(BoundedSample::udaf(k, key, outputs)),
            Payload::RankHistogram { bins } => Ok(crate::quantile_grid::histogram_udaf(bins)),
            _ => internal_err!("`{name}` is not a veil aggregate function"),
        }
    }
}

/// A plan as the bytes an executor receives.
pub fn encode(plan: &LogicalPlan) -> Result<Vec<u8>> {
    datafusion_proto::bytes::logical_plan_to_bytes_with_extension_codec(plan, &VeilCodec)
        .map(|b| b.to_vec())
        .map_err(|e| EngineError::Internal(format!("encoding the certified plan: {e}")))
}

/// The plan back, its functions resolved in the executor's session.
pub fn decode(bytes: &[u8], ctx: &TaskContext) -> Result<LogicalPlan> {
    datafusion_proto::bytes::logical_plan_from_bytes_with_extension_codec(bytes, ctx, &VeilCodec)
        .map_err(|e| EngineError::Internal(format!("decoding the certified plan: {e}")))
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};

    use super::*;

    /// The executor's session: only the functions a certified plan may name.
    fn executor() -> Arc<TaskContext> {
        let dir = tempfile::tempdir().expect("tmp");
        let policy = veil_policy::Policy::from_toml("[policy]\nid = \"p\"\nversion = \"1\"\n")
            .expect("policy");
        crate::catalog::Catalog::open(&policy, dir.path())
            .expect("catalog")
            .execution_state()
            .expect("state")
            .task_ctx()
    }

    fn values() -> LogicalPlanBuilder {
        LogicalPlanBuilder::values(vec![
            vec![lit(1i64), lit(10i64)],
            vec![lit(1i64), lit(20i64)],
        ])
        .expect("values")
    }

    #[test]
    fn veil_functions_keep_their_parameters_across_the_wire() {
        let key = [7u8; 16];
        let sample = BoundedSample::call(3, key, vec![col("column2")], vec![Output::Count(0)]);
        let grid = QuantileGrid::over(0, 100);
        let bounds = Bounds {
            lo: 0.5,
            hi: 99.25,
            scale: 2,
            lo_fp: 50,
            hi_fp: 9925,
        };
        let plan = values()
            .project(vec![
                col("column1"),
                col("column2"),
                KeyedHash::call(key, vec![col("column2")]).alias("h"),
                grid.rank_of(col("column2")).alias("r"),
                bounds.call(Clamp::Value, col("column2")).alias("v"),
                bounds.call(Clamp::Outside, col("column2")).alias("o"),
            ])
            .and_then(|b| {
                b.aggregate(
                    vec![col("column1")],
                    vec![sample.alias("s"), grid.histogram(col("r")).alias("hist")],
                )
            })
            .and_then(|b| b.build())
            .expect("plan");
        let back = decode(&encode(&plan).expect("encode"), &executor()).expect("decode");
        assert_eq!(
            back, plan,
            "the same plan, functions and parameters included"
        );
    }

    #[test]
    fn a_plan_naming_a_function_outside_the_executors_list_does_not_decode() {
        let plan = values()
            .project(vec![datafusion::functions::math::expr_fn::power(
                col("column1"),
                lit(2i64),
            )])
            .and_then(|b| b.build())
            .expect("plan");
        let err = decode(&encode(&plan).expect("encode"), &executor()).expect_err("unknown");
        assert!(err.to_string().contains("decoding"), "{err}");
    }
}
