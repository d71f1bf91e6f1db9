//! The catalog: what each dataset looks like, and the hand-built DataFusion
//! sessions that plan and execute queries.
//!
//! Operators plan against a session whose tables are [`EmptyTable`]s holding
//! only the columns their grant exposes: planning can never touch data.
//! Execution sessions read Parquet through an object store confined to the
//! data directory; there is no `file://` store, no table factory, no table
//! function and no information_schema.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemoryCatalogProviderList, MemorySchemaProvider,
    SchemaProvider, TableProvider,
};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::functions::core::planner::CoreFunctionPlanner;
use datafusion::functions_aggregate::planner::AggregateFunctionPlanner;
use datafusion::logical_expr::planner::ExprPlanner;
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::prelude::SessionConfig;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;
use veil_policy::{DomainValue, Grant, Policy};

use crate::error::{EngineError, Result, Rule};

/// Catalog name every session uses.
pub const CATALOG: &str = "veil";
/// URL scheme of the data directory's object store.
const DATA_SCHEME: &str = "veil-data";

/// Scalar functions an operator's SQL may call. Everything else DataFusion
/// ships (file readers, regexes, crypto, random) is absent from the session.
pub const ALLOWED_SCALAR_FUNCTIONS: &[&str] = &[
    "abs", "ceil", "floor", "round", "trunc", "coalesce", "nullif", "greatest", "least",
];
/// Aggregate functions the planner knows; the policy narrows them further.
pub const ALLOWED_AGGREGATE_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "median",
    "percentile_cont",
    "approx_percentile_cont",
    "var_pop",
    "stddev_pop",
];

/// Datasets' file schemas and the data directory.
#[derive(Debug)]
pub struct Catalog {
    data_dir: PathBuf,
    schemas: BTreeMap<String, SchemaRef>,
    units: BTreeMap<String, String>,
    rows: BTreeMap<String, u64>,
    /// Distinct values of public tables' columns used as group keys.
    public_values: Mutex<BTreeMap<(String, String), PublicValues>>,
    /// The execution session, built on first use; each job gets a clone
    /// (sharing its runtime, so Parquet footers are parsed once) with its own
    /// alias generator, so that its optimized plan names expressions as a
    /// fresh session would.
    execution: std::sync::OnceLock<SessionState>,
}

/// A public column's sorted distinct values.
type PublicValues = Arc<Vec<DomainValue>>;

/// At most this many distinct values of a public column serve as keys.
const MAX_PUBLIC_KEYS: usize = 1_000_000;

impl Catalog {
    /// Reads each dataset's schema from its Parquet footer (metadata only).
    pub fn open(policy: &Policy, data_dir: &Path) -> Result<Catalog> {
        let data_dir = data_dir.canonicalize().map_err(|e| {
            EngineError::Unavailable(format!(
                "data directory {} is not readable: {e}",
                data_dir.display()
            ))
        })?;
        let mut schemas = BTreeMap::new();
        let mut rows = BTreeMap::new();
        for ds in policy.datasets.values() {
            if ds.format != veil_policy::SourceFormat::Parquet {
                return Err(EngineError::Unavailable(format!(
                    "dataset `{}`: only Parquet sources are supported by the engine so far",
                    ds.id
                )));
            }
            let path = data_dir.join(&ds.source_path);
            let file = File::open(&path).map_err(|e| {
                EngineError::Unavailable(format!(
                    "dataset `{}`: cannot open {}: {e}",
                    ds.id,
                    path.display()
                ))
            })?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
                EngineError::Unavailable(format!(
                    "dataset `{}`: {} is not a Parquet file: {e}",
                    ds.id,
                    path.display()
                ))
            })?;
            let schema = builder.schema().clone();
            rows.insert(
                ds.id.clone(),
                u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0),
            );
            for col in &ds.columns {
                if schema.field_with_name(&col.name).is_err() {
                    return Err(EngineError::Unavailable(format!(
                        "dataset `{}`: column `{}` declared in the policy is missing from {}",
                        ds.id,
                        col.name,
                        path.display()
                    )));
                }
            }
            schemas.insert(ds.id.clone(), schema);
        }
        let units = policy
            .datasets
            .values()
            .filter_map(|d| d.unit.as_ref().map(|u| (d.id.clone(), u.column.clone())))
            .collect();
        Ok(Catalog {
            data_dir,
            schemas,
            units,
            rows,
            public_values: Mutex::new(BTreeMap::new()),
            execution: std::sync::OnceLock::new(),
        })
    }

    /// A dataset's row count as its Parquet footer declares it: catalog
    /// metadata, like the schema, used for dry-run warnings and to size a
    /// query's execution (`execute`).
    pub fn declared_rows(&self, dataset: &str) -> Option<u64> {
        self.rows.get(dataset).copied()
    }

    /// The distinct non-NULL values of a public dataset's text or integer
    /// column, sorted: the public key set of a GROUP BY on it. Public data is
    /// not private, so the broker may read it; read once, then cached (data
    /// files do not change while a catalog lives).
    pub fn public_values(
        &self,
        policy: &Policy,
        dataset: &str,
        column: &str,
    ) -> Result<PublicValues> {
        let key = (dataset.to_owned(), column.to_owned());
        if let Some(v) = self.public_values.lock().map_err(internal)?.get(&key) {
            return Ok(v.clone());
        }
        let ds = policy
            .datasets
            .get(dataset)
            .filter(|d| d.is_public())
            .ok_or_else(|| EngineError::Internal(format!("`{dataset}` is not public")))?;
        let unsupported = || {
            EngineError::rejected(
                Rule::UnsupportedShape,
                format!(
                    "`{dataset}.{column}` is neither text nor an integer; group by a public table's text or integer columns"
                ),
            )
        };
        let path = self.data_dir.join(&ds.source_path);
        let file = File::open(&path).map_err(|e| {
            EngineError::Unavailable(format!(
                "dataset `{dataset}`: cannot open {}: {e}",
                path.display()
            ))
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(internal)?;
        let index = builder.schema().index_of(column).map_err(internal)?;
        let data_type = builder.schema().field(index).data_type().clone();
        let target = if data_type.is_integer() {
            DataType::Int64
        } else if matches!(
            data_type,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            DataType::Utf8
        } else {
            return Err(unsupported());
        };
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        let reader = builder.with_projection(mask).build().map_err(internal)?;
        let mut values = BTreeSet::new();
        for batch in reader {
            let batch = batch.map_err(internal)?;
            let array = cast(batch.column(0), &target).map_err(internal)?;
            if let Some(ints) = array.as_primitive_opt::<Int64Type>() {
                values.extend(ints.iter().flatten().map(DomainValue::Int));
            } else {
                let text = array.as_string::<i32>();
                values.extend(
                    text.iter()
                        .flatten()
                        .map(|s| DomainValue::Text(s.to_owned())),
                );
            }
            if values.len() > MAX_PUBLIC_KEYS {
                return Err(EngineError::rejected(
                    Rule::ResultTooLarge,
                    format!(
                        "`{dataset}.{column}` holds more than {MAX_PUBLIC_KEYS} distinct values"
                    ),
                ));
            }
        }
        let values = Arc::new(values.into_iter().collect::<Vec<_>>());
        self.public_values
            .lock()
            .map_err(internal)?
            .insert(key, values.clone());
        Ok(values)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file schema of a dataset.
    pub fn file_schema(&self, dataset: &str) -> Result<SchemaRef> {
        self.schemas
            .get(dataset)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("dataset `{dataset}` has no schema")))
    }

    /// The schema an operator sees of a dataset under a grant: granted columns only.
    pub fn granted_schema(&self, grant: &Grant, dataset: &str) -> Result<SchemaRef> {
        let file = self.file_schema(dataset)?;
        let scope = grant
            .scope(dataset)
            .ok_or_else(|| EngineError::Internal(format!("grant lacks dataset `{dataset}`")))?;
        let mut fields: Vec<_> = file
            .fields()
            .iter()
            .filter(|f| scope.columns.contains_key(f.name()))
            .cloned()
            .collect();
        // The privacy unit is in scope for COUNT(DISTINCT unit) whatever the
        // grant says (POLICY.md); every other use of it is checked as usual.
        if let Some(unit) = self.units.get(dataset)
            && !scope.columns.contains_key(unit)
            && let Ok(f) = file.field_with_name(unit)
        {
            fields.push(Arc::new(f.clone()));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// A session for planning an operator's SQL: only granted tables and
    /// columns, backed by empty tables.
    pub fn planning_state(&self, grant: &Grant) -> Result<SessionState> {
        let catalog = MemoryCatalogProvider::new();
        for scope in &grant.scopes {
            let (schema_name, table) = scope
                .dataset
                .split_once('.')
                .ok_or_else(|| EngineError::Internal("dataset id without schema".into()))?;
            let schema = match catalog.schema(schema_name) {
                Some(s) => s,
                None => {
                    let s: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
                    catalog
                        .register_schema(schema_name, s.clone())
                        .map_err(internal)?;
                    s
                }
            };
            let provider: Arc<dyn TableProvider> =
                Arc::new(EmptyTable::new(self.granted_schema(grant, &scope.dataset)?));
            schema
                .register_table(table.to_owned(), provider)
                .map_err(internal)?;
        }
        let list = MemoryCatalogProviderList::new();
        datafusion::catalog::CatalogProviderList::register_catalog(
            &list,
            CATALOG.to_owned(),
            Arc::new(catalog),
        );
        Ok(hardened_planning_builder()?
            .with_catalog_list(Arc::new(list))
            .build())
    }

    /// A session that executes certified plans: reads only the data
    /// directory (see [`execution_state`]).
    pub fn execution_state(&self) -> Result<SessionState> {
        let shared = match self.execution.get() {
            Some(state) => state,
            None => {
                let state = execution_state(&self.data_dir, None)?;
                self.execution.get_or_init(|| state)
            }
        };
        let mut state = shared.clone();
        state.execution_props_mut().alias_generator =
            Arc::new(datafusion::common::alias::AliasGenerator::new());
        Ok(state)
    }

    /// A table provider that reads a dataset's Parquet file with `schema`
    /// (a subset of the file's columns).
    pub fn data_table(
        &self,
        policy: &Policy,
        dataset: &str,
        schema: SchemaRef,
    ) -> Result<Arc<dyn TableProvider>> {
        let ds = policy
            .datasets
            .get(dataset)
            .ok_or_else(|| EngineError::Internal(format!("unknown dataset `{dataset}`")))?;
        let url = ListingTableUrl::parse(format!("{DATA_SCHEME}://data/{}", ds.source_path))
            .map_err(internal)?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Arc::new(ListingTable::try_new(config).map_err(internal)?))
    }
}

/// A session that executes certified plans: its only object store is the
/// data directory, it resolves only the functions a certified plan may name
/// (plans arrive as bytes, `plan_codec`, and resolve built-ins here by
/// name), it never spills to disk, and with `memory_limit` its operators
/// fail cleanly (ResourcesExhausted) instead of growing past it.
pub fn execution_state(data_dir: &Path, memory_limit: Option<usize>) -> Result<SessionState> {
    let registry = ConfinedStores {
        data: Some(Arc::new(
            LocalFileSystem::new_with_prefix(data_dir).map_err(internal)?,
        )),
    };
    let window = SessionStateDefaults::default_window_functions()
        .into_iter()
        .filter(|f| crate::plan_codec::EXECUTOR_WINDOW_FUNCTIONS.contains(&f.name()))
        .collect();
    Ok(session_builder(
        registry,
        scalar_functions(crate::plan_codec::EXECUTOR_SCALAR_FUNCTIONS),
        window,
        memory_limit,
    )?
    .build())
}

/// The hand-built planning session, before tables are added: allow-listed
/// scalar and aggregate functions only, no window or table functions, no
/// object store, no information_schema.
pub fn hardened_planning_builder() -> Result<SessionStateBuilder> {
    let planners: Vec<Arc<dyn ExprPlanner>> = vec![
        Arc::new(CoreFunctionPlanner::default()),
        Arc::new(AggregateFunctionPlanner),
    ];
    let scalar = scalar_functions(&[])
        .into_iter()
        .chain(crate::dp_interval::functions())
        .collect();
    Ok(
        session_builder(ConfinedStores { data: None }, scalar, vec![], None)?
            .with_expr_planners(planners),
    )
}

/// The default scalar functions an operator may call, and `extra` ones.
fn scalar_functions(extra: &[&str]) -> Vec<Arc<datafusion::logical_expr::ScalarUDF>> {
    SessionStateDefaults::default_scalar_functions()
        .into_iter()
        .filter(|f| ALLOWED_SCALAR_FUNCTIONS.contains(&f.name()) || extra.contains(&f.name()))
        .collect()
}

/// A hand-built session: veil's configuration, the given object stores and
/// functions (with the allow-listed aggregates), no table functions.
fn session_builder(
    stores: ConfinedStores,
    scalar: Vec<Arc<datafusion::logical_expr::ScalarUDF>>,
    window: Vec<Arc<datafusion::logical_expr::WindowUDF>>,
    memory_limit: Option<usize>,
) -> Result<SessionStateBuilder> {
    let aggregate = SessionStateDefaults::default_aggregate_functions()
        .into_iter()
        .filter(|f| ALLOWED_AGGREGATE_FUNCTIONS.contains(&f.name()))
        .collect();
    Ok(SessionStateBuilder::new()
        .with_config(session_config())
        .with_runtime_env(
            memory_limit
                .into_iter()
                .fold(
                    RuntimeEnvBuilder::new()
                        .with_object_store_registry(Arc::new(stores))
                        .with_disk_manager_builder(
                            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
                        ),
                    |b, limit| b.with_memory_limit(limit, 1.0),
                )
                .build_arc()
                .map_err(internal)?,
        )
        .with_scalar_functions(scalar)
        .with_aggregate_functions(aggregate)
        .with_window_functions(window)
        .with_table_function_list(vec![]))
}

fn session_config() -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(false)
        .with_default_catalog_and_schema(CATALOG, "public")
        // Two streams: at 1M rows the benchmark query ran in 96 ms with two
        // partitions and 127 to 137 ms with one (benches/engine.rs, runs
        // alternated in one session).
        .with_target_partitions(2);
    let options = config.options_mut();
    options.execution.parquet.schema_force_view_types = false;
    options.sql_parser.map_string_types_to_utf8view = false;
    options.sql_parser.enable_ident_normalization = true;
    // One pass of the logical optimizer: a second left every certified plan
    // of the corpus unchanged (tests/it/plans.rs pins the optimized plans and
    // that optimizing them again changes nothing), and each pass cost about
    // 0.4 ms of a small query's 4 ms of planning in the executor.
    options.optimizer.max_passes = 1;
    config
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(e.to_string())
}

/// The only object-store registry veil uses: at most one store, for the data
/// directory under `veil-data://data/`. Planning sessions get none at all.
#[derive(Debug)]
struct ConfinedStores {
    data: Option<Arc<dyn ObjectStore>>,
}

impl ObjectStoreRegistry for ConfinedStores {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        None
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        match &self.data {
            Some(store) if url.scheme() == DATA_SCHEME && url.host_str() == Some("data") => {
                Ok(store.clone())
            }
            _ => Err(datafusion::error::DataFusionError::Plan(format!(
                "no object store for scheme `{}`",
                url.scheme()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::object_store::ObjectStoreUrl;

    use super::*;

    fn sorted(names: impl Iterator<Item = String>) -> Vec<String> {
        let mut v: Vec<String> = names.collect();
        v.sort();
        v
    }

    /// Pins what an operator's session can call. A DataFusion upgrade that
    /// renames, drops or adds a function (say, a new file reader) fails here.
    #[test]
    fn the_planning_session_registers_exactly_the_allow_list() {
        let state = hardened_planning_builder().expect("builder").build();
        // Registered names include aliases (avg is also `mean`): pin them all.
        let scalar = sorted(state.scalar_functions().keys().cloned());
        assert_eq!(
            scalar,
            [
                "abs",
                "ceil",
                "coalesce",
                "dp_interval_high",
                "dp_interval_low",
                "floor",
                "greatest",
                "least",
                "nullif",
                "round",
                "trunc"
            ]
        );
        let aggregate = sorted(state.aggregate_functions().keys().cloned());
        assert_eq!(
            aggregate,
            [
                "approx_percentile_cont",
                "avg",
                "count",
                "max",
                "mean",
                "median",
                "min",
                "percentile_cont",
                "quantile_cont",
                "stddev_pop",
                "sum",
                "var_pop",
                "var_population"
            ]
        );
        assert!(state.window_functions().is_empty());
        assert!(
            state.table_functions().is_empty(),
            "no read_parquet, range, generate_series …"
        );
        assert!(
            state.table_factories().is_empty(),
            "no CREATE EXTERNAL TABLE factories"
        );
        assert!(!state.config().options().catalog.information_schema);
        assert!(
            state
                .runtime_env()
                .object_store(ObjectStoreUrl::local_filesystem())
                .is_err(),
            "planning sessions reach no file system"
        );
    }

    #[test]
    fn the_executor_session_registers_only_what_certified_plans_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let policy = veil_policy::Policy::from_toml("[policy]\nid = \"p\"\nversion = \"1\"\n")
            .expect("policy");
        let state = Catalog::open(&policy, dir.path())
            .expect("catalog")
            .execution_state()
            .expect("state");
        let scalar = sorted(state.scalar_functions().keys().cloned());
        assert_eq!(
            scalar,
            [
                "abs",
                "ceil",
                "coalesce",
                "floor",
                "get_field",
                "greatest",
                "least",
                "nullif",
                "round",
                "trunc"
            ]
        );
        let aggregate = sorted(state.aggregate_functions().keys().cloned());
        assert!(
            aggregate.contains(&"sum".to_owned()) && !aggregate.contains(&"array_agg".to_owned())
        );
        let window = sorted(state.window_functions().keys().cloned());
        assert_eq!(window, ["rank", "row_number"]);
        assert!(state.table_functions().is_empty());
    }

    #[test]
    fn the_data_store_serves_only_its_own_url() {
        let dir = tempfile::tempdir().expect("tmp");
        let stores = ConfinedStores {
            data: Some(Arc::new(
                LocalFileSystem::new_with_prefix(dir.path()).expect("fs"),
            )),
        };
        assert!(
            stores
                .get_store(&Url::parse("veil-data://data/x.parquet").expect("url"))
                .is_ok()
        );
        for other in [
            "file:///etc/passwd",
            "veil-data://other/x",
            "s3://bucket/x",
            "http://127.0.0.1/x",
        ] {
            assert!(
                stores.get_store(&Url::parse(other).expect("url")).is_err(),
                "{other}"
            );
        }
    }
}
