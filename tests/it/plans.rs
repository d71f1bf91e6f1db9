//! The rewrite, stage by stage (insta snapshots under `tests/it/snapshots/`),
//! and what DataFusion's optimizer may and may not do to a certified plan.

use crate::support::*;

const QUERIES: &[(&str, &str, &str)] = &[
    (
        "public_keys_with_group_bounding",
        "op-credit-01",
        "SELECT district, COUNT(*) AS n, SUM(wage_base) AS total, AVG(wage_base) AS mean \
         FROM hrss.social_insurance WHERE pay_month = '2025-06' GROUP BY district",
    ),
    (
        "quantile_and_variance",
        "op-univ-07",
        "SELECT gender, MEDIAN(age) AS m, STDDEV_POP(age) AS s FROM pop.residents GROUP BY gender",
    ),
    (
        "no_group_by",
        "op-ndrc",
        "SELECT COUNT(DISTINCT person_id) AS people FROM hrss.social_insurance",
    ),
    (
        "join_public_key",
        "op-credit-01",
        "SELECT e.industry_code, AVG(s.wage_base) AS mean FROM hrss.social_insurance s \
         JOIN samr.enterprises e ON s.employer_uscc = e.uscc GROUP BY e.industry_code",
    ),
    (
        "join_on_the_unit",
        "op-univ-07",
        "SELECT r.gender, COUNT(*) AS visits FROM wjw.outpatient_visits v \
         JOIN pop.residents r ON v.patient_id = r.person_id WHERE r.age > 60 GROUP BY r.gender",
    ),
];

/// Position of the first line containing `needle`.
fn line_of(plan: &str, needle: &str) -> usize {
    plan.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in\n{plan}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_of_the_rewrite_is_pinned() {
    let f = Fixture::start().await;
    let now = chrono::Utc::now().fixed_offset();
    for (name, operator, sql) in QUERIES {
        let (stages, optimized) = f
            .engine
            .certified_plans_for_tests(operator, sql, now)
            .await
            .expect("certified");
        assert_eq!(
            stages.iter().map(|s| s.0).collect::<Vec<_>>(),
            veil_engine::rewrite::stage_names()
        );
        for (stage, plan) in &stages {
            insta::assert_snapshot!(format!("{name}__{stage}"), plan, sql);
        }
        insta::assert_snapshot!(format!("{name}__optimized"), optimized, sql);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optimizer_keeps_filters_below_and_limits_out_of_the_bounding() {
    let f = Fixture::start().await;
    let now = chrono::Utc::now().fixed_offset();
    let (_, plan) = f
        .engine
        .certified_plans_for_tests(
            "op-credit-01",
            "SELECT district, SUM(wage_base) AS total FROM hrss.social_insurance \
             WHERE pay_month = '2025-06' GROUP BY district HAVING SUM(wage_base) > 0 \
             ORDER BY total DESC LIMIT 3",
            now,
        )
        .await
        .expect("certified");
    // Top to bottom: release aggregate, L0 filter, window, per-(unit, group)
    // sample aggregate, then the operator's and the grant's predicates.
    let release = line_of(&plan, "Aggregate: groupBy=[[__veil_key0]]");
    let l0 = line_of(&plan, "__veil_group_rank <=");
    let window = line_of(&plan, "WindowAggr");
    let sample = line_of(&plan, "veil_bounded_sample");
    let predicate = line_of(&plan, "pay_month = ");
    assert!(
        release < l0 && l0 < window && window < sample && sample < predicate,
        "{plan}"
    );
    // HAVING, ORDER BY and LIMIT are post-processing of the release: none of
    // them reaches the executor's plan.
    for absent in ["Limit:", "Sort:", "Filter: sum("] {
        assert!(!plan.contains(absent), "`{absent}` in\n{plan}");
    }
}
