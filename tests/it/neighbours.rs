//! Sensitivity, checked on neighbouring datasets: removing one privacy unit
//! changes the bounded aggregates by at most what the noise was calibrated
//! to. The bounding keys are fixed across the pair, as the DP argument fixes
//! the mechanism's randomness: for every key, the kept rows of the other
//! units do not move.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use proptest::prelude::*;
use veil_engine::mechanisms::{BoundingKeys, release};
use veil_engine::rewrite::CertifiedPlan;
use veil_sandbox::{BoundedAggregates, KeyValue};

use crate::support::certified_over;

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
  [[dataset.column]]
  name = "tag"
  level = "general_2"
  allow = ["group_by"]

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
  columns = { grp = ["group_by"], v = ["aggregate"], tag = ["group_by"] }
  [grant.limits]
  agg_functions = ["COUNT", "SUM", "AVG", "MEDIAN"]
  [grant.dp]
  accounting = "epsilon"
  budget = 100.0
  per_query_max = 1.0
  delta = 0.001
  [grant.pricing]
  model = "free"
"#;

const SQL: &str = "SELECT grp, COUNT(*), COUNT(v), COUNT(DISTINCT unit), SUM(v), AVG(v), MEDIAN(v) \
                   FROM t.events GROUP BY grp";

type Row = (i64, &'static str, Option<f64>);

fn batch(rows: &[Row]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("unit", DataType::Int64, false),
        Field::new("grp", DataType::Utf8, false),
        Field::new("v", DataType::Float64, true),
        Field::new("tag", DataType::Utf8, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            // Every unit's own tag: a key only that unit holds.
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| format!("u{}", r.0)),
            )),
        ],
    )
    .expect("batch")
}

/// One group's counts, fixed-point sums and rank histogram.
type Statistics = (Vec<i64>, Vec<i128>, Vec<i64>);

/// The certified plan of `sql` over `rows`, and its exact bounded aggregates.
fn certified(
    rows: &[Row],
    sql: &str,
    keys: Option<BoundingKeys>,
) -> (CertifiedPlan, BoundedAggregates) {
    certified_over(POLICY, &[("events.parquet", batch(rows))], "op", sql, keys)
}

/// The bounded aggregates of `rows` under fixed keys, by group.
fn bounded(rows: &[Row], keys: BoundingKeys) -> BTreeMap<Vec<KeyValue>, Statistics> {
    certified(rows, SQL, Some(keys))
        .1
        .groups
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
        let empty = (vec![0; 5], vec![0; 1], vec![]);
        let keys: std::collections::BTreeSet<_> = with.keys().chain(without.keys()).cloned().collect();
        let mut changed = 0;
        for key in keys {
            let (c1, s1, h1) = with.get(&key).unwrap_or(&empty);
            let (c0, s0, h0) = without.get(&key).unwrap_or(&empty);
            if (c1, s1, h1) != (c0, s0, h0) {
                changed += 1;
            }
            // COUNT(*), COUNT(v), COUNT(DISTINCT unit), AVG's count, and
            // the values of v clamped to its bounds.
            for (j, bound) in [MAX_ROWS, MAX_ROWS, 1, MAX_ROWS, MAX_ROWS].into_iter().enumerate() {
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

/// Per-unit counts and sums (`n` clamped to [0, 2·3], `s` to 2·3 times
/// [-5, 10], in fixed point [-300, 600]), summed over units per group.
const PER_UNIT_SQL: &str = "WITH per AS (SELECT unit, grp, COUNT(*) AS n, SUM(v) AS s \
                            FROM t.events GROUP BY unit, grp) \
                            SELECT grp, COUNT(*), SUM(n), SUM(s) FROM per GROUP BY grp";

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn per_unit_aggregates_move_within_their_derived_bounds(
        // Few units with many rows each, so per-unit counts and sums often
        // exceed their derived bounds.
        rows in prop::collection::vec(
            (0i64..3, prop::sample::select(vec!["a", "b", "z"]), prop::option::weighted(0.9, (-80i32..120).prop_map(|x| f64::from(x) / 10.0))),
            10..60,
        ),
        victim in 0i64..3,
        groups_key in any::<[u8; 16]>(),
        rows_key in any::<[u8; 16]>(),
    ) {
        let keys = BoundingKeys { groups: groups_key, rows: rows_key };
        let bounded = |rows: &[Row]| -> BTreeMap<Vec<KeyValue>, (Vec<i64>, Vec<i128>)> {
            certified(rows, PER_UNIT_SQL, Some(keys))
                .1
                .groups
                .into_iter()
                .map(|g| (g.key, (g.counts, g.sums)))
                .collect()
        };
        let with = bounded(&rows);
        let without: Vec<Row> = rows.iter().copied().filter(|r| r.0 != victim).collect();
        let without = bounded(&without);
        let empty = (vec![0; 3], vec![0; 2]);
        let groups: std::collections::BTreeSet<_> =
            with.keys().chain(without.keys()).cloned().collect();
        let mut changed = 0;
        for key in groups {
            let (c1, s1) = with.get(&key).unwrap_or(&empty);
            let (c0, s0) = without.get(&key).unwrap_or(&empty);
            changed += usize::from((c1, s1) != (c0, s0));
            let rows = c1[0] - c0[0];
            prop_assert!((0..=MAX_ROWS).contains(&rows), "COUNT(*) of {key:?} moved by {rows}");
            // The inner GROUP BY includes grp: one per-unit row per group,
            // clamped to the derived bounds.
            let per_unit_rows = i128::from(MAX_GROUPS * MAX_ROWS);
            let n = s1[0] - s0[0];
            prop_assert!((0..=per_unit_rows).contains(&n), "SUM(n) of {key:?} moved by {n}");
            let total = s1[1] - s0[1];
            prop_assert!(total.abs() <= per_unit_rows * MAX_ABS_FP, "SUM(s) of {key:?} moved by {total}");
        }
        prop_assert!(changed <= MAX_GROUPS as usize, "{changed} groups moved");
    }
}

/// Twelve ordinary units, and the victim (unit 0): three rows in group `a`
/// at the top of the bounds.
fn audit_rows(with_victim: bool) -> Vec<Row> {
    let mut rows: Vec<Row> = (1..=12)
        .flat_map(|u| {
            let g = ["a", "b", "c", "d"][u as usize % 4];
            [(u, g, Some(f64::from(u as i32 % 7))), (u, "a", Some(2.5))]
        })
        .collect();
    if with_victim {
        rows.extend([(0, "a", Some(10.0)); 3]);
    }
    rows
}

/// `n` releases of one cell (the row whose first column prints as `key`, or
/// the only row), as integers (`scale` × the value); `None` when the row is
/// not released.
fn releases(
    rows: &[Row],
    sql: &str,
    key: Option<&str>,
    column: usize,
    scale: f64,
    n: usize,
) -> Vec<Option<i64>> {
    // Bounding keys do not matter here: every unit keeps all its rows.
    let (plan, exact) = certified(rows, sql, None);
    let spec = plan.spec();
    let schema = Arc::new(spec.query.aggregate_schema.as_arrow().clone());
    (0..n)
        .map(|_| {
            let released = release(spec, &exact, schema.clone()).expect("release");
            let batch = released.batch();
            let row = match key {
                None => Some(0),
                Some(k) => {
                    let keys = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8)
                        .expect("text");
                    let keys = keys
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .expect("strings");
                    (0..batch.num_rows()).find(|r| keys.value(*r) == k)
                }
            };
            row.map(|r| {
                let v = datafusion::arrow::compute::cast(batch.column(column), &DataType::Float64)
                    .expect("f64");
                let v = v
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("f64")
                    .value(r);
                (v * scale).round() as i64
            })
        })
        .collect()
}

/// End-to-end audits (THREATS.md recipe, α = 1e-6 each): whole queries on
/// neighbouring datasets, the privacy loss bounded from below on one cell.
/// The grant charges ε = 1 (and δ = 0.001) per query.
#[test]
fn five_queries_keep_their_epsilon_end_to_end() {
    const N: usize = 20_000;
    let claimed = 1.0;
    for (name, sql, key, column, scale) in [
        (
            "count with public keys",
            "SELECT grp, COUNT(*) FROM t.events GROUP BY grp",
            Some("a"),
            1,
            1.0,
        ),
        (
            "sum",
            "SELECT grp, SUM(v) FROM t.events GROUP BY grp",
            Some("a"),
            1,
            10.0,
        ),
        (
            "average",
            "SELECT grp, AVG(v) FROM t.events GROUP BY grp",
            Some("a"),
            1,
            100.0,
        ),
        ("quantile", "SELECT MEDIAN(v) FROM t.events", None, 0, 10.0),
    ] {
        let sample = |with: bool| -> Vec<i64> {
            releases(&audit_rows(with), sql, key, column, scale, N)
                .into_iter()
                .map(|v| v.expect("a public key is always released"))
                .collect()
        };
        let (d0, d1) = (sample(false), sample(true));
        let mut both = d0.clone();
        both.extend(&d1);
        let thresholds = veil_engine::audit::spread_thresholds(&both, 60);
        let lb = veil_engine::audit::loss_lower_bound(&d0, &d1, 0.0, thresholds.clone()).max(
            veil_engine::audit::loss_lower_bound(&d1, &d0, 0.0, thresholds),
        );
        eprintln!("end-to-end audit, {name}: claimed ε = {claimed}, lower bound {lb:.4}");
        assert!(
            lb <= claimed,
            "{name}: ε lower bound {lb} exceeds {claimed}"
        );
        if name == "count with public keys" {
            assert!(lb > 0.1, "the audit sees the victim: {lb}");
        }
    }
    // Partition selection: the victim's own key exists only with the victim,
    // so the neighbour never releases it and the victim's side may release it
    // at most δ of the time (the event carries all the loss).
    let sql = "SELECT tag, COUNT(*) FROM t.events GROUP BY tag";
    let released = |with: bool| -> Vec<i64> {
        releases(&audit_rows(with), sql, Some("u0"), 1, 1.0, N)
            .into_iter()
            .map(|v| i64::from(v.is_some()))
            .collect()
    };
    let (d0, d1) = (released(false), released(true));
    assert!(
        d0.iter().all(|r| *r == 0),
        "a key nobody holds was released"
    );
    let hits = d1.iter().sum::<i64>() as usize;
    let low = veil_engine::audit::cp_lower(hits, N, veil_engine::audit::ALPHA);
    eprintln!(
        "end-to-end audit, partition selection: {hits}/{N} releases of a one-unit key, lower bound {low:.5} vs δ = 0.001"
    );
    assert!(
        low <= 0.001,
        "a one-unit key is released too often: {hits}/{N}"
    );
}

/// ±∞ and values beyond the decimal range are clamped to the bounds like any
/// other (counted as clamped), NaN is no value: left out like NULL.
#[test]
fn infinite_and_huge_values_are_clamped_and_nan_is_left_out() {
    let rows: Vec<Row> = vec![
        (1, "a", Some(f64::INFINITY)),
        (2, "a", Some(1e308)),
        (3, "a", Some(f64::NEG_INFINITY)),
        (4, "a", Some(f64::NAN)),
        (5, "a", Some(2.5)),
    ];
    let (plan, exact) = certified(&rows, "SELECT SUM(v), AVG(v) FROM t.events", None);
    let kinds: Vec<_> = plan.spec().counts.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            veil_engine::rewrite::CountKind::Summed(0),
            veil_engine::rewrite::CountKind::Clamped("v".into())
        ]
    );
    let [group] = exact.groups.as_slice() else {
        panic!("one group: {:?}", exact.groups);
    };
    // 10 + 10 - 5 + 2.5 in tenths; four values; three clamped.
    assert_eq!(group.sums, [175]);
    assert_eq!(group.counts, [4, 3]);
}

/// No group's fixed-point total can wrap: the bounds times max_rows times the
/// table's row count (its footer's, public metadata) must stay below 10^38,
/// or the query is refused before any data is read.
#[test]
fn sums_that_could_wrap_are_refused_up_front() {
    // v up to 10^36 in tenths is 10^37; times max_rows = 3 is 3·10^37.
    let policy = POLICY.replace("bounds = [-5, 10]", "bounds = [-5, 1e36]");
    let sum = |units: i64| {
        let rows: Vec<Row> = (0..units).map(|u| (u, "a", Some(1.0))).collect();
        crate::support::try_certified_over(
            &policy,
            &[("events.parquet", batch(&rows))],
            "op",
            "SELECT SUM(v) FROM t.events",
            None,
        )
    };
    assert!(sum(3).is_ok(), "9·10^37 fits");
    let refused = sum(4).expect_err("12·10^37 could wrap");
    assert_eq!(refused.code(), "UNAVAILABLE", "{refused}");
    assert!(refused.to_string().contains("38-digit"), "{refused}");
}
