//! Shared fixtures: example data at a small scale, a policy (possibly edited),
//! a state directory, and a running server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use veil::Running;
use veil::client::{CallError, Client, Fetched};
use veil_engine::Engine;

/// Data scale used by tests (≈ 4,000 residents): small enough for debug builds.
pub const SCALE: f64 = 0.02;

/// A running server with its own data, policy and state.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub engine: Arc<Engine>,
    pub server: Running,
}

/// How test servers execute queries: in confined workers of the `veil`
/// binary under test, as `veil serve` does. Any level is accepted here, so
/// that the suite runs on kernels without Landlock; the sandbox tests check
/// the level themselves and say so when they skip.
pub fn sandboxed() -> veil::Execution {
    let mut o = veil::SandboxOptions::new(env!("CARGO_BIN_EXE_veil"));
    o.min_level = veil_sandbox::Level::None;
    o.deadline = std::time::Duration::from_secs(30);
    o.limits.memory_bytes = 2 << 30;
    veil::Execution::Sandboxed(o)
}

pub fn example_policy() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/beijing/policy.toml"),
    )
    .expect("example policy")
}

impl Fixture {
    /// The example policy, unchanged.
    pub async fn start() -> Fixture {
        Fixture::with_policy(&example_policy(), |_| {}).await
    }

    /// A policy text, and a hook that may edit the generated data.
    pub async fn with_policy(policy: &str, edit_data: impl FnOnce(&Path)) -> Fixture {
        Fixture::with_execution(policy, edit_data, &sandboxed()).await
    }

    /// The same, with executors configured by the test.
    pub async fn with_execution(
        policy: &str,
        edit_data: impl FnOnce(&Path),
        execution: &veil::Execution,
    ) -> Fixture {
        Fixture::build(policy, edit_data, execution, None).await
    }

    /// A server over TLS (mTLS when `tls` has a client CA).
    pub async fn with_tls(policy: &str, tls: veil::ServerTls) -> Fixture {
        Fixture::build(policy, |_| {}, &sandboxed(), Some(tls)).await
    }

    async fn build(
        policy: &str,
        edit_data: impl FnOnce(&Path),
        execution: &veil::Execution,
        tls: Option<veil::ServerTls>,
    ) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        veil::generate::generate(&data, SCALE, veil::generate::DEFAULT_SEED).expect("generate");
        edit_data(&data);
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).expect("write policy");
        let engine = veil::open_engine(&policy_path, &data, &dir.path().join("state"), execution)
            .expect("engine");
        let server =
            veil::start_with_tls(engine.clone(), "127.0.0.1:0".parse().expect("addr"), tls)
                .await
                .expect("server");
        Fixture {
            dir,
            engine,
            server,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A client logged in as `operator` with its demo token (Flight handshake).
    pub async fn client(&self, operator: &str) -> Client {
        let mut c = Client::connect(&self.server.endpoint())
            .await
            .expect("connect");
        c.login(operator, &format!("demo-token-{operator}"))
            .await
            .expect("login");
        c
    }

    pub async fn query(&self, operator: &str, sql: &str) -> Result<Fetched, CallError> {
        self.client(operator).await.query(sql).await
    }

    pub fn charges(&self) -> u64 {
        self.engine.ledger().charges().expect("ledger")
    }

    /// Budget spent on a grant, in micro-units.
    pub fn spent(&self, grant: &str, unit: &str) -> u64 {
        let (spent_unit, spent) = self.engine.spent(grant).expect("ledger");
        assert_eq!(spent_unit, unit);
        spent.micro()
    }
}

/// All values of a column as strings (NULL as "NULL").
pub fn column_strings(f: &Fetched, name: &str) -> Vec<String> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut out = Vec::new();
    for b in &f.batches {
        let idx = b.schema().index_of(name).expect("column");
        let fmt = ArrayFormatter::try_new(
            b.column(idx).as_ref(),
            &FormatOptions::default().with_null("NULL"),
        )
        .expect("formatter");
        for r in 0..b.num_rows() {
            out.push(fmt.value(r).to_string());
        }
    }
    out
}

/// A number from a column's field metadata (e.g. `meta::CI95`).
pub fn field_number(f: &Fetched, column: &str, key: &str) -> f64 {
    f.schema
        .field_with_name(column)
        .expect("column")
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("`{key}` missing on `{column}`"))
        .parse()
        .expect("a number")
}

/// All values of a numeric column as f64.
pub fn column_f64(f: &Fetched, name: &str) -> Vec<f64> {
    column_strings(f, name)
        .into_iter()
        .map(|s| s.parse::<f64>().unwrap_or(f64::NAN))
        .collect()
}

/// Exact per-key counts computed directly from the Parquet file (test oracle).
#[allow(clippy::disallowed_methods)] // an independent oracle, outside veil
pub async fn exact_counts(file: &Path, key: &str) -> std::collections::HashMap<String, i64> {
    use datafusion::prelude::*;
    let ctx = SessionContext::new();
    ctx.register_parquet(
        "t",
        file.to_str().expect("utf8"),
        ParquetReadOptions::default(),
    )
    .await
    .expect("register");
    let batches = ctx
        .sql(&format!(
            "SELECT CAST({key} AS VARCHAR) AS k, COUNT(*) AS n FROM t GROUP BY {key}"
        ))
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let mut out = std::collections::HashMap::new();
    for b in batches {
        let k = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .expect("cast");
        let k = k
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .expect("strings");
        let n = b
            .column(1)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .expect("ints");
        for r in 0..b.num_rows() {
            out.insert(k.value(r).to_owned(), n.value(r));
        }
    }
    out
}

/// Rewrites a Parquet file through a function of its (single) batch.
pub fn rewrite_parquet(
    path: &Path,
    f: impl FnOnce(datafusion::arrow::array::RecordBatch) -> datafusion::arrow::array::RecordBatch,
) {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).expect("open"))
        .expect("parquet")
        .with_batch_size(1 << 30)
        .build()
        .expect("reader");
    let batches: Vec<_> = reader.map(|b| b.expect("batch")).collect();
    let schema = batches[0].schema();
    let batch = datafusion::arrow::compute::concat_batches(&schema, &batches).expect("concat");
    write_parquet(path, &f(batch));
}

/// Writes one batch as a Parquet file, creating its directory.
pub fn write_parquet(path: &Path, batch: &datafusion::arrow::array::RecordBatch) {
    use datafusion::parquet::arrow::ArrowWriter;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    let file = std::fs::File::create(path).expect("create");
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
    w.write(batch).expect("write");
    w.close().expect("close");
}

/// The certified plan of `sql` by `operator` under `policy`, over data files
/// given as (path under the data directory, contents), and its exact bounded
/// aggregates: under fixed bounding keys when given, else fresh ones.
pub fn certified_over(
    policy: &str,
    files: &[(&str, datafusion::arrow::array::RecordBatch)],
    operator: &str,
    sql: &str,
    keys: Option<veil_engine::mechanisms::BoundingKeys>,
) -> (
    veil_engine::rewrite::CertifiedPlan,
    veil_sandbox::BoundedAggregates,
) {
    try_certified_over(policy, files, operator, sql, keys).expect("bounded")
}

/// [`certified_over`], or why the engine refused.
pub fn try_certified_over(
    policy: &str,
    files: &[(&str, datafusion::arrow::array::RecordBatch)],
    operator: &str,
    sql: &str,
    keys: Option<veil_engine::mechanisms::BoundingKeys>,
) -> Result<
    (
        veil_engine::rewrite::CertifiedPlan,
        veil_sandbox::BoundedAggregates,
    ),
    veil_engine::EngineError,
> {
    let dir = tempfile::tempdir().expect("tmp");
    for (path, batch) in files {
        write_parquet(&dir.path().join("data").join(path), batch);
    }
    std::fs::write(dir.path().join("policy.toml"), policy).expect("policy");
    let engine = veil::open_engine(
        &dir.path().join("policy.toml"),
        &dir.path().join("data"),
        &dir.path().join("state"),
        &veil::Execution::InProcess,
    )
    .expect("engine");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(engine.exact_bounded_aggregates_for_tests(
        operator,
        sql,
        chrono::Utc::now().fixed_offset(),
        keys,
    ))
}

/// Replaces one column of a batch.
pub fn replace_column(
    batch: datafusion::arrow::array::RecordBatch,
    name: &str,
    array: datafusion::arrow::array::ArrayRef,
) -> datafusion::arrow::array::RecordBatch {
    let idx = batch.schema().index_of(name).expect("column");
    let mut columns = batch.columns().to_vec();
    columns[idx] = array;
    datafusion::arrow::array::RecordBatch::try_new(batch.schema(), columns).expect("batch")
}

/// Asserts a call failed with `code` and a message containing every `needle`.
pub fn assert_refused(
    r: Result<Fetched, CallError>,
    code: tonic::Code,
    needles: &[&str],
) -> CallError {
    match r {
        Ok(_) => panic!("expected a refusal with {code:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "{}", e.message);
            for n in needles {
                assert!(e.message.contains(n), "`{n}` missing from: {}", e.message);
            }
            e
        }
    }
}

/// A record batch of named, nullable columns.
pub fn batch(
    columns: Vec<(&str, datafusion::arrow::array::ArrayRef)>,
) -> datafusion::arrow::array::RecordBatch {
    use datafusion::arrow::datatypes::{Field, Schema};
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    datafusion::arrow::array::RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("batch")
}

/// A text column.
pub fn texts<'a>(values: impl Iterator<Item = &'a str>) -> datafusion::arrow::array::ArrayRef {
    Arc::new(datafusion::arrow::array::StringArray::from_iter_values(
        values,
    ))
}

/// An Int64 column.
pub fn ints(values: impl Iterator<Item = i64>) -> datafusion::arrow::array::ArrayRef {
    Arc::new(datafusion::arrow::array::Int64Array::from_iter_values(
        values,
    ))
}

/// Runs the `veil` binary: exit code, standard output, standard error.
#[allow(clippy::disallowed_methods)] // tests drive the binary as a user would
pub fn veil_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .output()
        .expect("run veil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The example policy with op-ndrc's grant (G-2026-002, 0.5 ε per query)
/// given another total budget.
pub fn example_policy_with_ndrc_budget(budget: &str) -> String {
    let p = example_policy();
    let edited = p.replacen(
        "  budget = 2.0\n  per_query_max = 0.5\n  [grant.pricing]\n  model = \"free\"\n\n[[grant]]\nid = \"G-2025-009\"",
        &format!("  budget = {budget}\n  per_query_max = 0.5\n  [grant.pricing]\n  model = \"free\"\n\n[[grant]]\nid = \"G-2025-009\""),
        1,
    );
    assert_ne!(edited, p, "the example policy changed");
    edited
}
