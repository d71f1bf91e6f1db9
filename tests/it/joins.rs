//! Joins, checked on small random datasets: two private tables joined on the
//! privacy unit (through a declared foreign key) and a public table joined on
//! a non-unique key, so joins multiply a unit's rows both ways.
//!
//! - Neighbours: removing one unit from every private table moves each
//!   statistic by at most what the noise is calibrated to, and at most
//!   `max_groups` groups; bounding happens after the join, or this fails.
//! - Semantics: when no unit exceeds the bounds, the bounded aggregates are
//!   exactly those of the plain inner join, computed here by nested loops.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, Float64Array, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use proptest::prelude::*;
use veil_engine::mechanisms::{BoundingKeys, release};
use veil_sandbox::KeyValue;

use crate::support::{batch, certified_over, ints, texts};

/// The loosest of the joined tables' declarations: events' (2, 3).
const MAX_GROUPS: usize = 2;
const MAX_ROWS: i64 = 3;
/// `v` lies in [-5, 10] with one decimal.
const LO_FP: i128 = -50;
const HI_FP: i128 = 100;

const POLICY: &str = r#"
[policy]
id = "joins"
version = "1"
grading_scheme = "GB/T 43697-2024"

[[dataset]]
id = "t.people"
name = "测试人口"
owner = "测试单位"
level = "general_4"
share = "conditional"
open = "none"
source = { path = "people.parquet" }
privacy_unit = { column = "person", kind = "natural_person", max_groups = 1, max_rows = 1 }
  [[dataset.column]]
  name = "person"
  level = "general_4"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "region"
  level = "general_2"
  allow = ["group_by"]
  domain = ["r1", "r2"]

[[dataset]]
id = "t.events"
name = "测试事件"
owner = "测试单位"
level = "general_4"
share = "conditional"
open = "none"
source = { path = "events.parquet" }
privacy_unit = { column = "pid", kind = "natural_person", max_groups = 2, max_rows = 3 }
foreign_keys = [{ column = "pid", references = "t.people" }]
  [[dataset.column]]
  name = "pid"
  level = "general_4"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "kind"
  level = "general_2"
  allow = ["join"]
  [[dataset.column]]
  name = "v"
  level = "general_3"
  allow = ["aggregate"]
  bounds = [-5, 10]
  precision = 1

[[dataset]]
id = "t.kinds"
name = "测试类别"
owner = "测试单位"
level = "general_1"
share = "unconditional"
open = "unconditional"
source = { path = "kinds.parquet" }
  [[dataset.column]]
  name = "code"
  level = "general_1"
  allow = ["join", "group_by"]
  [[dataset.column]]
  name = "label"
  level = "general_1"
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
purpose_detail = "连接测试"
valid_from = 2026-01-01T00:00:00+08:00
valid_until = 2030-12-31T23:59:59+08:00
  [[grant.scope]]
  dataset = "t.people"
  columns = { person = ["join"], region = ["group_by"] }
  [[grant.scope]]
  dataset = "t.events"
  columns = { pid = ["join"], kind = ["join"], v = ["aggregate"] }
  [[grant.scope]]
  dataset = "t.kinds"
  columns = { code = ["join", "group_by"], label = ["group_by"] }
  [grant.limits]
  agg_functions = ["COUNT", "SUM"]
  [grant.dp]
  accounting = "epsilon"
  budget = 100.0
  per_query_max = 1.0
  [grant.pricing]
  model = "free"
"#;

const SQL: &str = "SELECT k.label, p.region, COUNT(*), COUNT(DISTINCT e.pid), SUM(e.v) \
                   FROM t.events e JOIN t.people p ON e.pid = p.person \
                   JOIN t.kinds k ON e.kind = k.code GROUP BY k.label, p.region";

/// The public table: `k2` appears twice, so its events join two labels.
const KINDS: &[(&str, &str)] = &[
    ("k1", "A"),
    ("k2", "B"),
    ("k2", "C"),
    ("k3", "C"),
    ("k4", "D"),
];

/// An event: unit, kind code (`k5` matches nothing), value.
type Event = (i64, &'static str, Option<f64>);
/// A person row: unit, region (a unit may have none, or two rows).
type Person = (i64, &'static str);

fn files(events: &[Event], people: &[Person]) -> Vec<(&'static str, RecordBatch)> {
    vec![
        (
            "events.parquet",
            batch(vec![
                ("pid", ints(events.iter().map(|e| e.0))),
                ("kind", texts(events.iter().map(|e| e.1))),
                (
                    "v",
                    Arc::new(Float64Array::from_iter(events.iter().map(|e| e.2))),
                ),
            ]),
        ),
        (
            "people.parquet",
            batch(vec![
                ("person", ints(people.iter().map(|p| p.0))),
                ("region", texts(people.iter().map(|p| p.1))),
            ]),
        ),
        (
            "kinds.parquet",
            batch(vec![
                ("code", texts(KINDS.iter().map(|k| k.0))),
                ("label", texts(KINDS.iter().map(|k| k.1))),
            ]),
        ),
    ]
}

/// Per group: COUNT(*), COUNT(DISTINCT unit), clamped values of v; and the
/// fixed-point sum of v.
type Statistics = (Vec<i64>, Vec<i128>);

fn bounded(
    events: &[Event],
    people: &[Person],
    keys: BoundingKeys,
) -> BTreeMap<Vec<KeyValue>, Statistics> {
    certified_over(POLICY, &files(events, people), "op", SQL, Some(keys))
        .1
        .groups
        .into_iter()
        .map(|g| (g.key, (g.counts, g.sums)))
        .collect()
}

/// The plain inner join's rows: (label, region, unit, v in fixed point).
fn joined(events: &[Event], people: &[Person]) -> Vec<(String, String, i64, Option<i128>)> {
    let mut out = Vec::new();
    for (unit, kind, v) in events {
        for (_, region) in people.iter().filter(|p| p.0 == *unit) {
            for (_, label) in KINDS.iter().filter(|k| k.0 == *kind) {
                let fp = v.map(|v| (v * 10.0).round() as i128);
                out.push((label.to_string(), region.to_string(), *unit, fp));
            }
        }
    }
    out
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let kind = prop::sample::select(vec!["k1", "k2", "k3", "k5"]);
    let v = prop::option::weighted(0.9, (-80i32..120).prop_map(|x| f64::from(x) / 10.0));
    prop::collection::vec((0i64..6, kind, v), 0..30)
}

fn people() -> impl Strategy<Value = Vec<Person>> {
    let region = prop::sample::select(vec!["r1", "r2"]);
    prop::collection::vec((0i64..6, region), 0..9)
}

fn bounding_keys() -> impl Strategy<Value = BoundingKeys> {
    (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(groups, rows)| BoundingKeys { groups, rows })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn removing_one_unit_from_every_table_moves_each_statistic_within_its_sensitivity(
        events in events(),
        people in people(),
        victim in 0i64..6,
        keys in bounding_keys(),
    ) {
        let with = bounded(&events, &people, keys);
        let events: Vec<Event> = events.iter().copied().filter(|e| e.0 != victim).collect();
        let people: Vec<Person> = people.iter().copied().filter(|p| p.0 != victim).collect();
        let without = bounded(&events, &people, keys);
        let empty = (vec![0; 3], vec![0; 1]);
        let groups: BTreeSet<_> = with.keys().chain(without.keys()).cloned().collect();
        let mut changed = 0;
        for key in groups {
            let (c1, s1) = with.get(&key).unwrap_or(&empty);
            let (c0, s0) = without.get(&key).unwrap_or(&empty);
            if (c1, s1) != (c0, s0) {
                changed += 1;
            }
            for (j, bound) in [MAX_ROWS, 1, MAX_ROWS].into_iter().enumerate() {
                let d = c1[j] - c0[j];
                prop_assert!((0..=bound).contains(&d), "count {j} of {key:?} moved by {d}");
            }
            let ds = s1[0] - s0[0];
            prop_assert!(ds.abs() <= i128::from(MAX_ROWS) * HI_FP, "sum of {key:?} moved by {ds}");
        }
        prop_assert!(changed <= MAX_GROUPS, "{changed} groups moved");
    }

    #[test]
    fn a_per_unit_aggregate_joined_outside_moves_within_its_derived_bounds(
        events in events(),
        people in people(),
        victim in 0i64..6,
        keys in bounding_keys(),
    ) {
        // Events per unit (clamped to [0, 2·3]) joined to the unit's people
        // rows, summed per region.
        const PER_UNIT: &str = "SELECT p.region, COUNT(*), SUM(e.n) FROM \
            (SELECT pid, COUNT(*) AS n FROM t.events GROUP BY pid) e \
            JOIN t.people p ON e.pid = p.person GROUP BY p.region";
        let run = |events: &[Event], people: &[Person]| -> BTreeMap<Vec<KeyValue>, Statistics> {
            certified_over(POLICY, &files(events, people), "op", PER_UNIT, Some(keys))
                .1
                .groups
                .into_iter()
                .map(|g| (g.key, (g.counts, g.sums)))
                .collect()
        };
        let with = run(&events, &people);
        let events: Vec<Event> = events.iter().copied().filter(|e| e.0 != victim).collect();
        let people: Vec<Person> = people.iter().copied().filter(|p| p.0 != victim).collect();
        let without = run(&events, &people);
        let empty = (vec![0; 2], vec![0; 1]);
        let groups: BTreeSet<_> = with.keys().chain(without.keys()).cloned().collect();
        let mut changed = 0;
        for key in groups {
            let (c1, s1) = with.get(&key).unwrap_or(&empty);
            let (c0, s0) = without.get(&key).unwrap_or(&empty);
            changed += usize::from((c1, s1) != (c0, s0));
            let rows = c1[0] - c0[0];
            prop_assert!((0..=MAX_ROWS).contains(&rows), "COUNT(*) of {key:?} moved by {rows}");
            let n = s1[0] - s0[0];
            let per_unit = i128::from(MAX_ROWS) * (MAX_GROUPS as i128);
            prop_assert!((0..=i128::from(MAX_ROWS) * per_unit).contains(&n), "SUM(n) of {key:?} moved by {n}");
        }
        prop_assert!(changed <= MAX_GROUPS, "{changed} groups moved");
    }

    #[test]
    fn within_the_bounds_a_join_aggregates_exactly_like_the_plain_join(
        events in events(),
        people in people(),
        keys in bounding_keys(),
    ) {
        let rows = joined(&events, &people);
        let mut per_pair: BTreeMap<(i64, String, String), i64> = BTreeMap::new();
        for (label, region, unit, _) in &rows {
            *per_pair.entry((*unit, label.clone(), region.clone())).or_default() += 1;
        }
        let mut groups_per_unit: BTreeMap<i64, usize> = BTreeMap::new();
        for (unit, _, _) in per_pair.keys() {
            *groups_per_unit.entry(*unit).or_default() += 1;
        }
        prop_assume!(per_pair.values().all(|&n| n <= MAX_ROWS));
        prop_assume!(groups_per_unit.values().all(|&g| g <= MAX_GROUPS));

        let mut expected: BTreeMap<Vec<KeyValue>, Statistics> = BTreeMap::new();
        for (label, region, _, v) in &rows {
            let key = vec![KeyValue::Text(label.clone()), KeyValue::Text(region.clone())];
            let (counts, sums) = expected.entry(key).or_insert((vec![0; 3], vec![0]));
            counts[0] += 1;
            if let Some(v) = v {
                sums[0] += (*v).clamp(LO_FP, HI_FP);
                counts[2] += i64::from(!(LO_FP..=HI_FP).contains(v));
            }
        }
        for (_, label, region) in per_pair.keys() {
            let key = vec![KeyValue::Text(label.clone()), KeyValue::Text(region.clone())];
            expected.get_mut(&key).expect("group").0[1] += 1;
        }
        prop_assert_eq!(bounded(&events, &people, keys), expected);
    }
}

/// End-to-end audit (THREATS.md recipe, α = 1e-6) of a join: a count per
/// region over events joined to people, on neighbouring datasets where the
/// victim has rows in both tables (3 events × 2 people rows = 6 joined rows,
/// bounded to max_rows = 3). The grant charges ε = 1 per query.
#[test]
fn a_join_keeps_its_epsilon_end_to_end() {
    const N: usize = 20_000;
    let claimed = 1.0;
    let sql = "SELECT p.region, COUNT(*) FROM t.events e JOIN t.people p ON e.pid = p.person \
               GROUP BY p.region";
    let sample = |with_victim: bool| -> Vec<i64> {
        let mut events: Vec<Event> = (1..=12).map(|u| (u, "k1", Some(1.0))).collect();
        let mut people: Vec<Person> = (1..=12)
            .map(|u| (u, if u % 2 == 0 { "r1" } else { "r2" }))
            .collect();
        if with_victim {
            events.extend([(0, "k1", Some(10.0)); 3]);
            people.extend([(0, "r1"); 2]);
        }
        let (plan, exact) = certified_over(POLICY, &files(&events, &people), "op", sql, None);
        let spec = plan.spec();
        let schema = Arc::new(spec.query.aggregate_schema.as_arrow().clone());
        (0..N)
            .map(|_| {
                let released = release(spec, &exact, schema.clone()).expect("release");
                let batch = released.batch();
                let regions = batch.column(0).as_string::<i32>();
                let row = (0..batch.num_rows())
                    .find(|r| regions.value(*r) == "r1")
                    .expect("a public key is always released");
                datafusion::arrow::compute::cast(batch.column(1), &DataType::Int64)
                    .expect("integers")
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .value(row)
            })
            .collect()
    };
    let (d0, d1) = (sample(false), sample(true));
    let mut both = d0.clone();
    both.extend(&d1);
    let thresholds = veil_engine::audit::spread_thresholds(&both, 60);
    let lb = veil_engine::audit::loss_lower_bound(&d0, &d1, 0.0, thresholds.clone()).max(
        veil_engine::audit::loss_lower_bound(&d1, &d0, 0.0, thresholds),
    );
    eprintln!("end-to-end audit, join count: claimed ε = {claimed}, lower bound {lb:.4}");
    assert!(lb <= claimed, "ε lower bound {lb} exceeds {claimed}");
    assert!(lb > 0.1, "the audit sees the victim: {lb}");
}

/// A row-level unit's rows are bounded by nothing but themselves: read
/// alone, each row is one contribution; joined, a row could be repeated and
/// the unit column need not be unique (or exist), so the join is refused
/// before any data is read, with the rule and a fix.
#[test]
fn a_table_whose_unit_is_the_row_is_refused_in_joins_and_answered_alone() {
    let policy = POLICY.replacen(
        r#"privacy_unit = { column = "pid", kind = "natural_person", max_groups = 2, max_rows = 3 }
foreign_keys = [{ column = "pid", references = "t.people" }]"#,
        r#"privacy_unit = { column = "pid", kind = "row", max_groups = 1, max_rows = 1 }"#,
        1,
    );
    assert!(
        policy.contains(r#"kind = "row""#),
        "the test policy changed"
    );
    // Two events share pid 1: one unit column value, two units.
    let events: Vec<Event> = vec![(1, "k1", Some(1.0)), (1, "k2", Some(2.0)), (2, "k2", None)];
    let files = files(&events, &[(1, "r1")]);
    let joined = "SELECT k.label, COUNT(*) FROM t.events e JOIN t.kinds k ON e.kind = k.code \
                  GROUP BY k.label";
    match crate::support::try_certified_over(&policy, &files, "op", joined, None) {
        Err(e) => {
            assert_eq!(e.code(), "UNSUPPORTED_SHAPE", "{e}");
            let text = e.to_string();
            assert!(
                text.contains("`t.events`") && text.contains(r#"kind = "row""#),
                "{text}"
            );
        }
        Ok(_) => panic!("a join of a row-level table was certified"),
    }
    let (_, exact) = certified_over(&policy, &files, "op", "SELECT COUNT(*) FROM t.events", None);
    assert!(
        !exact.groups.is_empty(),
        "read alone, the table is answered"
    );
}
