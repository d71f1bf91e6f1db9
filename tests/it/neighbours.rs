//! Sensitivity, checked on neighbouring datasets: removing one privacy unit
//! changes the bounded aggregates by at most what the noise was calibrated
//! to. The bounding keys are fixed across the pair, as the DP argument fixes
//! the mechanism's randomness: for every key, the kept rows of the other
//! units do not move.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use proptest::prelude::*;
use veil_engine::mechanisms::BoundingKeys;
use veil_sandbox::{BoundedAggregates, KeyValue};

const MAX_GROUPS: i64 = 2;
const MAX_ROWS: i64 = 3;
/// `v` lies in [-5, 10] with one decimal: at most 100 fixed-point units.
const MAX_ABS_FP: i128 = 100;

const POLICY: &str = r#"
[policy]
id = "neighbours"
version = "1"
grading_scheme = "GB/T 43697-2024"

[[dataset]]
id = "t.events"
name = "测试事件"
owner = "测试单位"
level = "general_4"
share = "conditional"
open = "none"
source = { path = "events.parquet" }
privacy_unit = { column = "unit", kind = "natural_person", max_groups = 2, max_rows = 3 }
  [[dataset.column]]
  name = "unit"
  level = "general_4"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "grp"
  level = "general_2"
  allow = ["group_by"]
  domain = ["a", "b", "c", "d"]
  [[dataset.column]]
  name = "v"
  level = "general_3"
  allow = ["aggregate"]
  bounds = [-5, 10]
  precision = 1

[[operator]]
id = "op"
org = "测试"
tokens = ["sha256:a381f01f50cde42394d12c7f97c700c86764ec88a08641784c33d849ba20e844"]

[[grant]]
id = "G"
channel = "sharing"
grantee = "op"
purpose = "public_governance"
purpose_detail = "邻近数据集测试"
valid_from = 2026-01-01T00:00:00+08:00
valid_until = 2030-12-31T23:59:59+08:00
  [[grant.scope]]
  dataset = "t.events"
  columns = { grp = ["group_by"], v = ["aggregate"] }
  [grant.limits]
  agg_functions = ["COUNT", "SUM", "AVG", "MEDIAN"]
  [grant.dp]
  accounting = "epsilon"
  budget = 100.0
  per_query_max = 1.0
  [grant.pricing]
  model = "free"
"#;

const SQL: &str = "SELECT grp, COUNT(*), COUNT(v), COUNT(DISTINCT unit), SUM(v), AVG(v), MEDIAN(v) \
                   FROM t.events GROUP BY grp";

type Row = (i64, &'static str, Option<f64>);

fn write(dir: &Path, rows: &[Row]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Int64, false),
        Field::new("grp", DataType::Utf8, false),
        Field::new("v", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
        ],
    )
    .expect("batch");
    std::fs::create_dir_all(dir).expect("dir");
    let file = std::fs::File::create(dir.join("events.parquet")).expect("file");
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("w");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

/// One group's counts, fixed-point sums and rank histogram.
type Statistics = (Vec<i64>, Vec<i128>, Vec<i64>);

/// The bounded aggregates of `rows` under fixed keys, by group.
fn bounded(rows: &[Row], keys: BoundingKeys) -> BTreeMap<Vec<KeyValue>, Statistics> {
    let dir = tempfile::tempdir().expect("tmp");
    write(&dir.path().join("data"), rows);
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let engine = veil::open_engine(
        &dir.path().join("policy.toml"),
        &dir.path().join("data"),
        &dir.path().join("state"),
    )
    .expect("engine");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let out: BoundedAggregates = rt
        .block_on(engine.exact_bounded_aggregates_for_tests(
            "op",
            SQL,
            chrono::Utc::now().fixed_offset(),
            Some(keys),
        ))
        .expect("bounded");
    out.groups
        .into_iter()
        .map(|g| (g.key, (g.counts, g.sums, g.histograms.concat())))
        .collect()
}

fn rows() -> impl Strategy<Value = Vec<Row>> {
    let grp = prop::sample::select(vec!["a", "b", "c", "d", "z"]);
    let v = prop::option::weighted(0.9, (-80i32..120).prop_map(|x| f64::from(x) / 10.0));
    prop::collection::vec((0i64..6, grp, v), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn removing_one_unit_moves_each_statistic_within_its_sensitivity(
        rows in rows(),
        victim in 0i64..6,
        groups_key in any::<[u8; 16]>(),
        rows_key in any::<[u8; 16]>(),
    ) {
        let keys = BoundingKeys { groups: groups_key, rows: rows_key };
        let with = bounded(&rows, keys);
        let without: Vec<Row> = rows.iter().copied().filter(|r| r.0 != victim).collect();
        let without = bounded(&without, keys);
        let empty = (vec![0; 4], vec![0; 1], vec![]);
        let keys: std::collections::BTreeSet<_> = with.keys().chain(without.keys()).cloned().collect();
        let mut changed = 0;
        for key in keys {
            let (c1, s1, h1) = with.get(&key).unwrap_or(&empty);
            let (c0, s0, h0) = without.get(&key).unwrap_or(&empty);
            if (c1, s1, h1) != (c0, s0, h0) {
                changed += 1;
            }
            // COUNT(*), COUNT(v), COUNT(DISTINCT unit), AVG's count.
            for (j, bound) in [MAX_ROWS, MAX_ROWS, 1, MAX_ROWS].into_iter().enumerate() {
                let d = c1.get(j).copied().unwrap_or(0) - c0.get(j).copied().unwrap_or(0);
                prop_assert!((0..=bound).contains(&d), "count {j} of {key:?} moved by {d}");
            }
            let ds = s1.first().copied().unwrap_or(0) - s0.first().copied().unwrap_or(0);
            prop_assert!(ds.abs() <= i128::from(MAX_ROWS) * MAX_ABS_FP, "sum of {key:?} moved by {ds}");
            // The median's histogram: at most max_rows values added.
            let l1: i64 = (0..h1.len().max(h0.len()))
                .map(|r| (h1.get(r).copied().unwrap_or(0) - h0.get(r).copied().unwrap_or(0)).abs())
                .sum();
            prop_assert!(l1 <= MAX_ROWS, "histogram of {key:?} moved by {l1}");
        }
        prop_assert!(changed <= MAX_GROUPS, "{changed} groups moved");
    }
}
