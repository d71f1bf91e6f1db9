//! The executor side: runs a [`CertifiedPlan`] and returns bounded aggregates.
//!
//! This is the only code that reads raw data. Its sole output is
//! [`BoundedAggregates`]; any failure becomes [`EngineError::ExecutionFailed`]
//! with no detail, because what failed may depend on the data.

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::collect;
use veil_sandbox::{BoundedAggregates, GroupAggregate, KeyValue};

use crate::error::{EngineError, Result};
use crate::rewrite::{CertifiedPlan, count_column, histogram_column, sum_column};

/// Executes a certified plan on `state` (an execution session of the catalog).
///
/// Runs on its own task, so that a panic anywhere in planning or execution
/// becomes the uniform error instead of taking the caller down. `request` is
/// the correlation id used in the uniform error.
pub async fn execute_certified(
    plan: &CertifiedPlan,
    state: &SessionState,
    request: &str,
) -> Result<BoundedAggregates> {
    let (plan, state, id) = (plan.clone(), state.clone(), request.to_owned());
    match tokio::spawn(async move { execute_inner(&plan, &state, &id).await }).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(request, "the executor task panicked or was cancelled");
            Err(EngineError::ExecutionFailed {
                request: request.to_owned(),
            })
        }
    }
}

async fn execute_inner(
    plan: &CertifiedPlan,
    state: &SessionState,
    request: &str,
) -> Result<BoundedAggregates> {
    let failed = || EngineError::ExecutionFailed {
        request: request.to_owned(),
    };
    // The plan crosses to the executor as bytes, and only as bytes.
    let bytes = crate::plan_codec::encode(plan.executable())?;
    let executable = crate::plan_codec::decode(&bytes, &state.task_ctx()).map_err(|e| {
        tracing::warn!(request, error = %e, "the certified plan did not decode");
        failed()
    })?;
    let physical = state.create_physical_plan(&executable).await.map_err(|e| {
        tracing::warn!(
            request,
            error_kind = error_kind(&e),
            "planning the certified plan failed"
        );
        failed()
    })?;
    let batches = collect(physical, state.task_ctx()).await.map_err(|e| {
        tracing::warn!(
            request,
            error_kind = error_kind(&e),
            "executing the certified plan failed"
        );
        failed()
    })?;
    let spec = plan.spec();
    let mut groups = Vec::new();
    for batch in &batches {
        read_batch(
            batch,
            spec.group_columns.len(),
            [spec.counts.len(), spec.sums.len(), spec.quantiles.len()],
            &mut groups,
        )
        .ok_or_else(|| {
            tracing::warn!(request, "bounded aggregate had an unexpected shape");
            failed()
        })?;
    }
    Ok(BoundedAggregates { groups })
}

fn read_batch(
    batch: &RecordBatch,
    keys: usize,
    [counts, sums, quantiles]: [usize; 3],
    out: &mut Vec<GroupAggregate>,
) -> Option<()> {
    let count_arrays = typed_columns::<Int64Type>(batch, counts, count_column)?;
    let sum_arrays = typed_columns::<Decimal128Type>(batch, sums, sum_column)?;
    let histogram_arrays: Vec<_> = (0..quantiles)
        .map(|q| {
            batch
                .column_by_name(&histogram_column(q))
                .and_then(|a| a.as_list_opt::<i32>())
        })
        .collect::<Option<_>>()?;
    for row in 0..batch.num_rows() {
        let mut key = Vec::with_capacity(keys);
        for k in 0..keys {
            let col = batch.column(k);
            if col.is_null(row) {
                return None;
            }
            key.push(match col.data_type() {
                DataType::Utf8 => KeyValue::Text(col.as_string::<i32>().value(row).to_owned()),
                DataType::LargeUtf8 => KeyValue::Text(col.as_string::<i64>().value(row).to_owned()),
                DataType::Utf8View => KeyValue::Text(col.as_string_view().value(row).to_owned()),
                _ => {
                    let ints = datafusion::arrow::compute::cast(col, &DataType::Int64).ok()?;
                    KeyValue::Int(ints.as_primitive::<Int64Type>().value(row))
                }
            });
        }
        out.push(GroupAggregate {
            key,
            counts: count_arrays.iter().map(|a| a.value(row)).collect(),
            // A NULL sum means every value was NULL: the empty sum, zero.
            sums: sum_arrays
                .iter()
                .map(|a| if a.is_null(row) { 0 } else { a.value(row) })
                .collect(),
            histograms: histogram_arrays
                .iter()
                .map(|h| {
                    let counts = h.value(row);
                    Some(counts.as_primitive_opt::<Int64Type>()?.values().to_vec())
                })
                .collect::<Option<_>>()?,
        });
    }
    Some(())
}

/// The `n` columns named by `name(0..n)`, all of primitive type `T`.
fn typed_columns<T: datafusion::arrow::datatypes::ArrowPrimitiveType>(
    batch: &RecordBatch,
    n: usize,
    name: fn(usize) -> String,
) -> Option<Vec<&datafusion::arrow::array::PrimitiveArray<T>>> {
    (0..n)
        .map(|i| {
            batch
                .column_by_name(&name(i))
                .and_then(|a| a.as_primitive_opt::<T>())
        })
        .collect()
}

/// A data-independent classification of a DataFusion error: its variant only,
/// never its message (which can quote cell values).
fn error_kind(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::ArrowError(..) => "arrow",
        E::ParquetError(..) => "parquet",
        E::ObjectStore(..) | E::IoError(..) => "io",
        E::ResourcesExhausted(..) => "resources_exhausted",
        E::Execution(..) | E::ExecutionJoin(..) => "execution",
        E::Plan(..) | E::SchemaError(..) | E::NotImplemented(..) => "planning",
        E::Internal(..) => "internal",
        _ => "other",
    }
}
