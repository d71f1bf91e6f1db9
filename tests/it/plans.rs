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
        "per_unit_aggregate",
        "op-univ-07",
        "WITH per AS (SELECT patient_id, district, COUNT(*) AS n, SUM(cost) AS spend \
         FROM wjw.outpatient_visits GROUP BY patient_id, district) \
         SELECT district, AVG(n) AS visits, AVG(spend) AS spend FROM per WHERE n > 1 GROUP BY district",
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
        let (stages, optimized, _) = f
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
    let (_, plan, _) = f
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
    let l0 = line_of(&plan, "__veil_position < __veil_run_start");
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

/// Rewriting is idempotent on certified plans: certifying a certified plan's
/// query again (fresh bounding keys and all) gives the same plan at every
/// stage, and DataFusion's optimizer, run again on an optimized certified
/// plan, finds nothing left to move; no cast in it can fail. Over every
/// accepted query of the corpus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_is_idempotent_on_certified_plans() {
    let f = Fixture::with_policy(&crate::slt::corpus_policy(), |_| {}).await;
    let now = chrono::Utc::now().fixed_offset();
    let mut certified = 0;
    for (operator, sql) in crate::slt::corpus_sql() {
        let Ok((stages, optimized, again)) = f
            .engine
            .certified_plans_for_tests(&operator, &sql, now)
            .await
        else {
            continue; // refused, or a public query
        };
        let (stages2, optimized2, _) = f
            .engine
            .certified_plans_for_tests(&operator, &sql, now)
            .await
            .expect("certified twice");
        assert_eq!(stages, stages2, "{sql}");
        assert_eq!(optimized, optimized2, "{sql}");
        assert_eq!(
            alpha(&optimized),
            alpha(&again),
            "the optimizer moved a certified plan again: {sql}"
        );
        // Types are coerced in the rewrite, which tries every cast: none in
        // the executor's plan can fail on a value.
        assert!(
            !optimized.replace("TRY_CAST(", "").contains("CAST("),
            "{sql}\n{optimized}"
        );
        certified += 1;
    }
    // 19 today; the rest of the corpus is refusals and public queries.
    assert!(certified >= 19, "only {certified} corpus queries certified");
}

/// A plan's text with common-subexpression aliases numbered by first
/// appearance: plans that differ only in those names are the same plan.
fn alpha(plan: &str) -> String {
    const ALIAS: &str = "__common_expr_";
    let mut names: Vec<String> = Vec::new();
    let mut out = String::new();
    let mut rest = plan;
    while let Some(at) = rest.find(ALIAS) {
        out.push_str(&rest[..at + ALIAS.len()]);
        rest = &rest[at + ALIAS.len()..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let name = rest[..digits].to_owned();
        let n = match names.iter().position(|x| *x == name) {
            Some(n) => n,
            None => {
                names.push(name);
                names.len() - 1
            }
        };
        out.push_str(&n.to_string());
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}
