//! Truncated joins (截断关联): two private tables joined on a key other than
//! their privacy unit, under a policy's `[[truncated_join]]`, checked on
//! small random datasets where keys repeat on both sides, so an untruncated
//! join would let one unit move the result without bound.
//!
//! - Neighbours: removing one unit from both tables moves the counts by at
//!   most S = 2·M·(C₁ + C₂) joined rows in total over all groups, and the
//!   sum by S times the largest bound (`truncation_bounds` in the rewrite).
//! - Semantics: when no unit and no key exceeds the bounds, the result is
//!   exactly the plain inner join's, computed here by nested loops.
//! - Refusals: undeclared keys, a third table, distinct units, and group keys
//!   without a public domain.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::RecordBatch;
use proptest::prelude::*;
use veil_engine::mechanisms::BoundingKeys;
use veil_sandbox::KeyValue;

use crate::support::{batch, certified_over, ints, texts, try_certified_over};

/// Rows kept per key value on each side.
const M: i64 = 2;
/// Rows one unit may have: jobs (1 group × 2 rows), visits (2 × 1).
const C_JOBS: i64 = 2;
const C_VISITS: i64 = 2;
/// Joined rows one unit can change.
const S: i64 = 2 * M * (C_JOBS + C_VISITS);
/// Few units and keys, so units have many rows and keys repeat on both
/// sides: without either truncation the neighbour test fails.
const UNITS: i64 = 4;
/// `wage` lies in [0, 100] (integers).
const HI: i128 = 100;

const POLICY: &str = r#"
[policy]
id = "truncated-joins"
version = "1"
grading_scheme = "GB/T 43697-2024"

[[dataset]]
id = "t.jobs"
name = "测试就业"
owner = "测试单位"
level = "general_4"
share = "conditional"
open = "none"
source = { path = "jobs.parquet" }
privacy_unit = { column = "person", kind = "natural_person", max_groups = 1, max_rows = 2 }
  [[dataset.column]]
  name = "person"
  level = "general_4"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "employer"
  level = "general_2"
  allow = ["join"]
  [[dataset.column]]
  name = "wage"
  level = "general_3"
  allow = ["aggregate"]
  bounds = [0, 100]

[[dataset]]
id = "t.visits"
name = "测试就诊"
owner = "测试单位"
level = "general_4"
share = "conditional"
open = "none"
source = { path = "visits.parquet" }
privacy_unit = { column = "patient", kind = "natural_person", max_groups = 2, max_rows = 1 }
  [[dataset.column]]
  name = "patient"
  level = "general_4"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "hospital"
  level = "general_2"
  allow = ["join"]
  [[dataset.column]]
  name = "district"
  level = "general_2"
  allow = ["group_by", "filter_literal"]
  domain = ["d1", "d2", "d3"]
  [[dataset.column]]
  name = "ward"
  level = "general_2"
  allow = ["group_by"]

[[truncated_join]]
datasets = ["t.jobs", "t.visits"]
on = ["employer", "hospital"]
max_matches = 2
reason = "医院职工与该院门诊的关联"

[[operator]]
id = "op"
org = "测试"
tokens = ["sha256:a381f01f50cde42394d12c7f97c700c86764ec88a08641784c33d849ba20e844"]

[[grant]]
id = "G"
channel = "sharing"
grantee = "op"
purpose = "public_governance"
purpose_detail = "截断关联测试"
valid_from = 2026-01-01T00:00:00+08:00
valid_until = 2030-12-31T23:59:59+08:00
  [[grant.scope]]
  dataset = "t.jobs"
  columns = { person = ["join"], employer = ["join"], wage = ["aggregate"] }
  [[grant.scope]]
  dataset = "t.visits"
  row_filter = "district <> 'd3'"
  columns = { patient = ["join"], hospital = ["join"], district = ["group_by", "filter_literal"], ward = ["group_by"] }
  [grant.limits]
  agg_functions = ["COUNT", "SUM"]
  [grant.dp]
  accounting = "epsilon"
  budget = 100.0
  per_query_max = 1.0
  [grant.pricing]
  model = "free"
"#;

const SQL: &str = "SELECT v.district, COUNT(*), SUM(j.wage) \
                   FROM t.jobs j JOIN t.visits v ON j.employer = v.hospital \
                   GROUP BY v.district";

/// A job: unit, employer, wage (beyond 100 is clamped).
type Job = (i64, &'static str, i64);
/// A visit: unit, hospital, district (`d3` is cut by the grant's row filter).
type Visit = (i64, &'static str, &'static str);

fn files(jobs: &[Job], visits: &[Visit]) -> Vec<(&'static str, RecordBatch)> {
    vec![
        (
            "jobs.parquet",
            batch(vec![
                ("person", ints(jobs.iter().map(|j| j.0))),
                ("employer", texts(jobs.iter().map(|j| j.1))),
                ("wage", ints(jobs.iter().map(|j| j.2))),
            ]),
        ),
        (
            "visits.parquet",
            batch(vec![
                ("patient", ints(visits.iter().map(|v| v.0))),
                ("hospital", texts(visits.iter().map(|v| v.1))),
                ("district", texts(visits.iter().map(|v| v.2))),
                ("ward", texts(visits.iter().map(|_| "w"))),
            ]),
        ),
    ]
}

/// Per district: COUNT(*) and the count of clamped wages; the sum of wages.
type Statistics = (Vec<i64>, Vec<i128>);

fn bounded(
    jobs: &[Job],
    visits: &[Visit],
    keys: BoundingKeys,
) -> BTreeMap<Vec<KeyValue>, Statistics> {
    certified_over(POLICY, &files(jobs, visits), "op", SQL, Some(keys))
        .1
        .groups
        .into_iter()
        .map(|g| (g.key, (g.counts, g.sums)))
        .collect()
}

fn jobs(rows: usize) -> impl Strategy<Value = Vec<Job>> {
    let employer = prop::sample::select(vec!["h1", "h1", "h2", "x"]);
    prop::collection::vec((0i64..UNITS, employer, 0i64..130), 0..rows)
}

fn visits(rows: usize) -> impl Strategy<Value = Vec<Visit>> {
    let hospital = prop::sample::select(vec!["h1", "h1", "h2", "y"]);
    let district = prop::sample::select(vec!["d1", "d2", "d3"]);
    prop::collection::vec((0i64..UNITS, hospital, district), 0..rows)
}

fn bounding_keys() -> impl Strategy<Value = BoundingKeys> {
    (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(groups, rows)| BoundingKeys { groups, rows })
}

/// Moves of COUNT(*), clamped wages and SUM(wage), in total over all
/// districts, when `victim` is removed from both tables.
fn total_moves(
    jobs: &[Job],
    visits: &[Visit],
    victim: i64,
    keys: BoundingKeys,
) -> (i64, i64, i128) {
    let with = bounded(jobs, visits, keys);
    let jobs: Vec<Job> = jobs.iter().copied().filter(|j| j.0 != victim).collect();
    let visits: Vec<Visit> = visits.iter().copied().filter(|v| v.0 != victim).collect();
    let without = bounded(&jobs, &visits, keys);
    let empty = (vec![0; 2], vec![0; 1]);
    let groups: BTreeSet<_> = with.keys().chain(without.keys()).cloned().collect();
    let (mut rows, mut clamped, mut sum) = (0, 0, 0);
    for key in groups {
        let (c1, s1) = with.get(&key).unwrap_or(&empty);
        let (c0, s0) = without.get(&key).unwrap_or(&empty);
        rows += (c1[0] - c0[0]).abs();
        clamped += (c1[1] - c0[1]).abs();
        sum += (s1[0] - s0[0]).abs();
    }
    (rows, clamped, sum)
}

/// Data built against each truncation: without the per-key one, the
/// victim's two jobs would meet ten visits each; without the per-unit one,
/// its ten jobs at ten employers would meet two visits each. Either way 20
/// joined rows > S = 16.
#[test]
fn adversarial_neighbours_stay_within_the_bound() {
    const EMPLOYERS: [&str; 10] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"];
    let keys = BoundingKeys {
        groups: [1; 16],
        rows: [2; 16],
    };
    let crowded_key: (Vec<Job>, Vec<Visit>) = (
        vec![(0, "h1", 50), (0, "h1", 60)],
        (1..=10).map(|u| (u, "h1", "d1")).collect(),
    );
    let busy_unit: (Vec<Job>, Vec<Visit>) = (
        EMPLOYERS.iter().map(|e| (0, *e, 50)).collect(),
        (1..=20)
            .map(|u| (u, EMPLOYERS[(u as usize) % 10], "d2"))
            .collect(),
    );
    for (jobs, visits) in [crowded_key, busy_unit] {
        let (rows, clamped, sum) = total_moves(&jobs, &visits, 0, keys);
        assert!(rows > 0, "the victim is seen");
        assert!(
            rows <= S && clamped <= S && sum <= i128::from(S) * HI,
            "moved {rows} rows, {sum} wages"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn removing_one_unit_moves_the_joined_rows_within_the_truncation_bound(
        jobs in jobs(40),
        visits in visits(40),
        victim in 0i64..UNITS,
        keys in bounding_keys(),
    ) {
        let (rows, clamped, sum) = total_moves(&jobs, &visits, victim, keys);
        prop_assert!(rows <= S, "COUNT(*) moved by {rows} in total");
        prop_assert!(clamped <= S, "clamped wages moved by {clamped} in total");
        prop_assert!(sum <= i128::from(S) * HI, "SUM(wage) moved by {sum} in total");
    }

    #[test]
    fn within_the_bounds_a_truncated_join_is_the_plain_join(
        jobs in jobs(7),
        visits in visits(7),
        keys in bounding_keys(),
    ) {
        let visits: Vec<Visit> = visits.into_iter().filter(|v| v.2 != "d3").collect();
        prop_assume!(at_most(jobs.iter().map(|j| j.0), C_JOBS));
        prop_assume!(at_most(visits.iter().map(|v| v.0), C_VISITS));
        prop_assume!(at_most(jobs.iter().map(|j| j.1), M));
        prop_assume!(at_most(visits.iter().map(|v| v.1), M));

        let mut expected: BTreeMap<Vec<KeyValue>, Statistics> = BTreeMap::new();
        for (_, employer, wage) in &jobs {
            for (_, _, district) in visits.iter().filter(|v| v.1 == *employer) {
                let key = vec![KeyValue::Text((*district).to_owned())];
                let (counts, sums) = expected.entry(key).or_insert((vec![0; 2], vec![0]));
                counts[0] += 1;
                counts[1] += i64::from(i128::from(*wage) > HI);
                sums[0] += i128::from(*wage).min(HI);
            }
        }
        let got: BTreeMap<_, _> = bounded(&jobs, &visits, keys)
            .into_iter()
            .filter(|(_, (counts, _))| counts[0] > 0)
            .collect();
        prop_assert_eq!(got, expected);
    }
}

/// Whether no value occurs more than `n` times.
fn at_most<T: Ord>(values: impl Iterator<Item = T>, n: i64) -> bool {
    let mut counts = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_insert(0) += 1;
    }
    counts.values().all(|&c| c <= n)
}

fn refusal(sql: &str) -> String {
    match try_certified_over(POLICY, &files(&[], &[]), "op", sql, None) {
        Ok(_) => panic!("accepted: {sql}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn only_the_declared_shape_is_accepted() {
    // The declared key, but the other way round: accepted.
    certified_over(
        POLICY,
        &files(&[], &[]),
        "op",
        "SELECT v.district, COUNT(*) FROM t.visits v JOIN t.jobs j ON v.hospital = j.employer \
         GROUP BY v.district",
        None,
    );
    for (sql, code, needle) in [
        (
            "SELECT v.district, COUNT(*) FROM t.jobs j JOIN t.visits v ON j.person = v.patient \
             GROUP BY v.district",
            "JOIN_NOT_ALLOWED",
            "[[truncated_join]]",
        ),
        (
            "SELECT v.district, COUNT(*) FROM t.jobs j JOIN t.visits v ON j.employer = v.hospital \
             JOIN t.visits w ON w.patient = v.patient GROUP BY v.district",
            "JOIN_NOT_ALLOWED",
            "exactly its two tables",
        ),
        (
            "SELECT v.district, COUNT(DISTINCT j.person) FROM t.jobs j \
             JOIN t.visits v ON j.employer = v.hospital GROUP BY v.district",
            "UNSUPPORTED_SHAPE",
            "COUNT(*)",
        ),
        (
            "SELECT v.ward, COUNT(*) FROM t.jobs j JOIN t.visits v ON j.employer = v.hospital \
             GROUP BY v.ward",
            "UNSUPPORTED_SHAPE",
            "public domains",
        ),
    ] {
        let message = refusal(sql);
        assert!(
            message.contains(code) && message.contains(needle),
            "{sql}: {message}"
        );
    }
}

/// Truncation ranks each side's rows by their unit column, which a
/// row-level unit need not have unique (or at all): such a side is refused.
#[test]
fn a_side_whose_unit_is_the_row_is_refused() {
    // Both sides: the policy declares truncation between one kind of unit.
    let policy = POLICY
        .replacen(
            r#"privacy_unit = { column = "person", kind = "natural_person", max_groups = 1, max_rows = 2 }"#,
            r#"privacy_unit = { column = "person", kind = "row", max_groups = 1, max_rows = 1 }"#,
            1,
        )
        .replacen(
            r#"privacy_unit = { column = "patient", kind = "natural_person", max_groups = 2, max_rows = 1 }"#,
            r#"privacy_unit = { column = "patient", kind = "row", max_groups = 1, max_rows = 1 }"#,
            1,
        );
    assert_eq!(
        policy.matches(r#"kind = "row""#).count(),
        2,
        "the test policy changed"
    );
    match try_certified_over(&policy, &files(&[], &[]), "op", SQL, None) {
        Ok(_) => panic!("a truncated join of a row-level table was certified"),
        Err(e) => {
            let text = e.to_string();
            assert_eq!(e.code(), "UNSUPPORTED_SHAPE", "{text}");
            assert!(
                text.contains("`t.") && text.contains(r#"kind = "row""#),
                "{text}"
            );
        }
    }
}
