//! Execution: where a certified (or public) plan meets the data.
//!
//! This is the only code that reads raw data. The plan always crosses to it
//! as `datafusion-proto` bytes ([`crate::plan_codec`]), and its only outputs
//! are [`BoundedAggregates`] (private queries) or the rows of a public
//! query, again as bytes. [`Executor::Sandboxed`] runs it in a confined
//! `veil worker` process ([`veil_sandbox::pool`]); [`Executor::InProcess`]
//! runs the same code in the broker (benchmark baselines and engine-level
//! tests). Any failure becomes [`EngineError::ExecutionFailed`] with no
//! detail, because what failed may depend on the data.

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::collect;
use serde::{Deserialize, Serialize};
use veil_sandbox::pool::Pool;
use veil_sandbox::{BoundedAggregates, GroupAggregate, Job, KeyValue};

use crate::catalog::Catalog;
use crate::error::{EngineError, Result};
use crate::rewrite::{CertifiedPlan, count_column, histogram_column, sum_column};

/// Datasets up to this many rows (as their Parquet footers declare) are
/// executed in one stream, larger ones in two. On two cores a small query
/// spends more on handing batches between threads than it gains, and a
/// fresh worker more so: the example query (35,000 rows) cost 4.2 to
/// 4.7 ms more sandboxed than in process with one partition, 5.0 to 5.3 ms
/// with two; at 1M rows two partitions ran the benchmark query in 96 ms,
/// one in 127 to 137 ms (benches/engine.rs).
const ONE_STREAM_ROWS: u64 = 250_000;

/// What a job runs with, besides its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// What to return.
    pub output: Output,
    /// DataFusion's target partitions for the plan.
    pub partitions: usize,
}

impl JobSpec {
    /// The spec of `plan`: one stream when the datasets it scans (their
    /// `rows`, by dataset id) are small together.
    fn for_plan(
        rows_of: impl Fn(&str) -> Option<u64>,
        plan: &LogicalPlan,
        output: &Output,
    ) -> JobSpec {
        let mut rows = 0u64;
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let dataset = match (scan.table_name.schema(), scan.table_name.table()) {
                    (Some(schema), table) => format!("{schema}.{table}"),
                    (None, table) => table.to_owned(),
                };
                // A table the catalog does not know counts as large.
                rows = rows.saturating_add(rows_of(&dataset).unwrap_or(u64::MAX));
            }
            Ok(TreeNodeRecursion::Continue)
        });
        JobSpec {
            output: output.clone(),
            partitions: if rows <= ONE_STREAM_ROWS { 1 } else { 2 },
        }
    }
}

/// Where plans run.
#[derive(Debug)]
pub enum Executor {
    /// In the broker's own process: no confinement. For benchmark baselines
    /// and engine-level tests; `veil serve` never uses it.
    InProcess,
    /// In confined worker processes, one per query.
    Sandboxed(Pool),
}

/// What a job returns, as its spec says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "output", rename_all = "lowercase")]
pub enum Output {
    /// A certified plan's bounded aggregates, with the shape the release
    /// specification gives.
    Bounded {
        /// Group-key columns.
        keys: usize,
        /// Count columns.
        counts: usize,
        /// Sum columns.
        sums: usize,
        /// Quantile histogram columns.
        quantiles: usize,
    },
    /// A public query's rows, as an Arrow IPC stream.
    Rows,
}

impl Executor {
    /// The sandbox level recorded in audit entries: `strict`, `landlock`,
    /// `none`, or `in-process`.
    pub fn level(&self) -> &'static str {
        match self {
            Executor::InProcess => "in-process",
            Executor::Sandboxed(pool) => pool.report().level.as_str(),
        }
    }

    /// Executes a certified plan and returns its bounded aggregates.
    pub async fn bounded(
        &self,
        catalog: &Catalog,
        plan: &CertifiedPlan,
        request: &str,
    ) -> Result<BoundedAggregates> {
        let spec = plan.spec();
        let output = Output::Bounded {
            keys: spec.group_columns.len(),
            counts: spec.counts.len(),
            sums: spec.sums.len(),
            quantiles: spec.quantiles.len(),
        };
        let bytes = self
            .run(catalog, plan.executable(), &output, request)
            .await?;
        BoundedAggregates::decode(&bytes).map_err(|_| {
            tracing::warn!(request, "the executor's answer did not decode");
            failed(request)
        })
    }

    /// Executes a public query's plan (its scans already over the data
    /// files) and returns its rows.
    pub async fn rows(
        &self,
        catalog: &Catalog,
        plan: &LogicalPlan,
        request: &str,
    ) -> Result<Vec<RecordBatch>> {
        let bytes = self.run(catalog, plan, &Output::Rows, request).await?;
        let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(&bytes[..], None)
            .map_err(|_| {
                tracing::warn!(request, "the executor's rows did not decode");
                failed(request)
            })?;
        reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| failed(request))
    }

    async fn run(
        &self,
        catalog: &Catalog,
        plan: &LogicalPlan,
        output: &Output,
        request: &str,
    ) -> Result<Vec<u8>> {
        // The plan crosses to the executor as bytes, and only as bytes.
        let bytes = crate::plan_codec::encode(plan)?;
        let spec = JobSpec::for_plan(|d| catalog.declared_rows(d), plan, output);
        match self {
            Executor::InProcess => {
                let state = catalog.execution_state()?;
                // On its own task, so that a panic becomes the uniform error.
                let task = tokio::spawn(async move { execute_job(state, &bytes, &spec).await });
                match task.await {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(kind)) => {
                        tracing::warn!(request, error_kind = kind, "execution failed");
                        Err(failed(request))
                    }
                    Err(_) => {
                        tracing::warn!(request, "the executor task panicked or was cancelled");
                        Err(failed(request))
                    }
                }
            }
            Executor::Sandboxed(pool) => {
                let job = Job {
                    request: request.to_owned(),
                    spec: serde_json::to_string(&spec)
                        .map_err(|e| EngineError::Internal(e.to_string()))?,
                };
                pool.run(&job, bytes).await.map_err(|failure| {
                    // Failures name a kind, a signal or a deadline: never data.
                    tracing::warn!(request, %failure, "execution failed");
                    failed(request)
                })
            }
        }
    }
}

fn failed(request: &str) -> EngineError {
    EngineError::ExecutionFailed {
        request: request.to_owned(),
    }
}

/// A worker's runtime and execution session, built while it waits in the
/// pool.
pub struct WorkerContext {
    runtime: tokio::runtime::Runtime,
    state: SessionState,
}

/// The fork server's warm-up, once before any worker is forked: the
/// execution session, with DataFusion's memory pool at half the
/// address-space limit (the rest is the program, its threads and allocator
/// arenas), and one small plan run through the whole path (encode, decode,
/// plan, execute) so that no query pays for first use. Reads no data. It
/// runs on the calling thread, on a single-threaded runtime dropped before
/// it returns: the server forks only while it has one thread. (The server
/// is not under Landlock, so DataFusion's recursion guard can learn the
/// main thread's stack from `/proc/self/maps`; no arena of an exited
/// thread is left for the workers' threads to inherit copy-on-write.)
pub fn worker_warm(
    data_dir: &Path,
    memory_bytes: u64,
) -> std::result::Result<SessionState, String> {
    let limit = usize::try_from(memory_bytes / 2).unwrap_or(usize::MAX);
    let state =
        crate::catalog::execution_state(data_dir, Some(limit)).map_err(|_| "session".to_owned())?;
    let warm_state = state.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|_| "runtime".to_owned())?;
    runtime.block_on(warm_up(warm_state))?;
    drop(runtime);
    Ok(state)
}

/// One small plan through the whole path: planned, encoded, decoded,
/// planned physically and executed.
async fn warm_up(state: SessionState) -> std::result::Result<Vec<u8>, &'static str> {
    let warm = state
        .create_logical_plan(
            "SELECT k, COUNT(v) AS n, SUM(v) AS s FROM (VALUES (1, 2), (1, 3), (2, 4)) AS t(k, v) GROUP BY k",
        )
        .await
        .map_err(|_| "warm-up plan")?;
    let bytes = crate::plan_codec::encode(&warm).map_err(|_| "warm-up encode")?;
    let spec = JobSpec {
        output: Output::Rows,
        partitions: 2,
    };
    execute_job(state, &bytes, &spec).await
}

/// Prepares a forked, confined worker: a two-thread runtime for the
/// session the server warmed up and, when `rehearse` is set (no query is
/// waiting for this worker), the warm-up plan once more on that runtime. A
/// forked process shares the server's memory until it writes (its code
/// too, once the server has moved it onto huge pages; code that did not
/// move it maps only as it first runs it): on the worker's own threads, the
/// rehearsal takes those page faults, and the first allocations of its
/// threads' arenas, off the query's path (about 1 ms of a small query's
/// latency, for 3 to 5 ms of the worker's CPU, measured before the move).
/// A query already waiting would wait for the rehearsal too, so the broker
/// asks for one only when none is.
pub fn worker_prepare(
    warmed: &std::result::Result<SessionState, String>,
    rehearse: bool,
) -> std::result::Result<WorkerContext, String> {
    let state = warmed.clone()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .build()
        .map_err(|_| "runtime".to_owned())?;
    if rehearse {
        on_worker_thread(&runtime, warm_up(state.clone()))?;
    }
    Ok(WorkerContext { runtime, state })
}

/// `veil worker`'s job, on the prepared context.
pub fn worker_job(
    context: std::result::Result<WorkerContext, String>,
    job: &Job,
    plan: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    let WorkerContext { runtime, state } = context?;
    let spec: JobSpec = serde_json::from_str(&job.spec).map_err(|_| "spec".to_owned())?;
    on_worker_thread(
        &runtime,
        async move { execute_job(state, &plan, &spec).await },
    )
}

/// Runs `work` on one of the runtime's threads, not on the worker's main
/// thread. DataFusion's recursion guard (`stacker`) learns a thread's stack
/// bounds lazily; on the main thread that means reading `/proc/self/maps`,
/// which Landlock refuses, and without bounds it switches to a freshly
/// mapped 2 MiB stack segment at every recursive call.
fn on_worker_thread<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    work: impl std::future::Future<Output = std::result::Result<T, &'static str>> + Send + 'static,
) -> std::result::Result<T, String> {
    runtime
        .block_on(runtime.spawn(work))
        .map_err(|_| "panic".to_owned())?
        .map_err(str::to_owned)
}

/// The executor proper, the same in a worker and in process: decodes the
/// plan, runs it, and encodes its output. Errors are data-independent kinds.
/// Takes the session by value: each job owns one (fresh in process, the
/// worker's only one), and sets its partitions on it.
pub async fn execute_job(
    mut state: SessionState,
    plan: &[u8],
    spec: &JobSpec,
) -> std::result::Result<Vec<u8>, &'static str> {
    state.config_mut().options_mut().execution.target_partitions = spec.partitions.clamp(1, 2);
    let state = &state;
    let executable =
        crate::plan_codec::decode(plan, &state.task_ctx()).map_err(|_| "plan_decode")?;
    let physical = state
        .create_physical_plan(&executable)
        .await
        .map_err(|e| error_kind(&e))?;
    let batches = collect(physical, state.task_ctx())
        .await
        .map_err(|e| error_kind(&e))?;
    match spec.output {
        Output::Bounded {
            keys,
            counts,
            sums,
            quantiles,
        } => {
            let mut groups = Vec::new();
            for batch in &batches {
                read_batch(batch, keys, [counts, sums, quantiles], &mut groups)
                    .ok_or("unexpected_shape")?;
            }
            BoundedAggregates { groups }.encode().map_err(|_| "encode")
        }
        Output::Rows => {
            let schema = match batches.first() {
                Some(b) => b.schema(),
                None => std::sync::Arc::new(executable.schema().as_arrow().clone()),
            };
            let mut out = Vec::new();
            let mut writer =
                datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)
                    .map_err(|_| "encode")?;
            for b in &batches {
                writer.write(b).map_err(|_| "encode")?;
            }
            writer.finish().map_err(|_| "encode")?;
            drop(writer);
            Ok(out)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_datasets_run_in_one_stream_and_large_or_unknown_ones_in_two() {
        use datafusion::arrow::datatypes::{Field, Schema};
        use datafusion::datasource::{empty::EmptyTable, provider_as_source};
        use datafusion::logical_expr::{LogicalPlanBuilder, col, exists};
        let scan = |name: &str| {
            let schema = Schema::new(vec![Field::new("v", DataType::Int64, true)]);
            let table = provider_as_source(std::sync::Arc::new(EmptyTable::new(schema.into())));
            LogicalPlanBuilder::scan(name, table, None).expect("scan")
        };
        let rows = |d: &str| match d {
            "hrss.small" => Some(200_000),
            "hrss.also_small" => Some(100_000),
            "hrss.large" => Some(1_000_000),
            _ => None,
        };
        let partitions =
            |plan: LogicalPlan| JobSpec::for_plan(rows, &plan, &Output::Rows).partitions;
        let one = |name: &str| scan(name).build().expect("plan");
        assert_eq!(partitions(one("hrss.small")), 1);
        assert_eq!(partitions(one("hrss.large")), 2);
        assert_eq!(partitions(one("hrss.unknown")), 2);
        // Every scan counts, those in subqueries too.
        let with_subquery = |inner: &str| {
            let sub = std::sync::Arc::new(one(inner));
            scan("hrss.small")
                .filter(exists(sub))
                .and_then(|b| b.project(vec![col("v")]))
                .and_then(|b| b.build())
                .expect("plan")
        };
        assert_eq!(partitions(with_subquery("hrss.also_small")), 2);
        assert_eq!(partitions(with_subquery("hrss.small")), 2);
        let tiny = |d: &str| rows(d).map(|r| r / 4);
        assert_eq!(
            JobSpec::for_plan(tiny, &with_subquery("hrss.also_small"), &Output::Rows).partitions,
            1
        );
    }

    #[test]
    fn a_worker_warms_up_and_prepares_without_data() {
        let dir = tempfile::tempdir().expect("tmp");
        let warmed = worker_warm(dir.path(), 1 << 30);
        assert!(warmed.is_ok(), "{:?}", warmed.err());
        for rehearse in [true, false] {
            let prepared = worker_prepare(&warmed, rehearse);
            assert!(prepared.is_ok(), "{:?}", prepared.err());
        }
    }
}
