//! Every rejection rule of the foundation path: refused before any data is
//! read, with the rule and the column named, and nothing charged.

use tonic::Code;

use crate::support::*;

async fn refused(f: &Fixture, operator: &str, sql: &str, code: Code, needles: &[&str]) {
    let before = f.charges();
    assert_refused(f.query(operator, sql).await, code, needles);
    assert_eq!(
        f.charges(),
        before,
        "a refused query must not be charged: {sql}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_but_one_select_is_refused() {
    let f = Fixture::start().await;
    for sql in [
        "DELETE FROM pop.residents",
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
        "COPY (SELECT 1) TO '/tmp/out.csv'",
        "SELECT COUNT(*) FROM pop.residents; SELECT COUNT(*) FROM pop.residents",
        "EXPLAIN ANALYZE SELECT COUNT(*) FROM pop.residents",
        "SET datafusion.execution.batch_size = 1",
    ] {
        refused(
            &f,
            "op-univ-07",
            sql,
            Code::InvalidArgument,
            &["[SINGLE_SELECT]"],
        )
        .await;
    }
    assert_eq!(f.charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projecting_a_private_column_is_refused_naming_it() {
    let f = Fixture::start().await;
    refused(
        &f,
        "op-univ-07",
        "SELECT * FROM pop.residents",
        Code::PermissionDenied,
        &["[PROJECT_PRIVATE_COLUMN]", "`pop.residents.person_id`"],
    )
    .await;
    refused(
        &f,
        "op-univ-07",
        "SELECT age FROM pop.residents WHERE age > 90",
        Code::PermissionDenied,
        &["[PROJECT_PRIVATE_COLUMN]", "`pop.residents.age`"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouping_by_an_identifier_is_refused() {
    let f = Fixture::start().await;
    refused(
        &f,
        "op-credit-01",
        "SELECT employer_uscc, COUNT(*) FROM hrss.social_insurance GROUP BY employer_uscc",
        Code::PermissionDenied,
        &["[GROUP_BY_IDENTIFIER]", "employer_uscc"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ungranted_columns_are_refused_naming_them() {
    let f = Fixture::start().await;
    refused(
        &f,
        "op-univ-07",
        "SELECT hukou_type, COUNT(*) FROM pop.residents GROUP BY hukou_type",
        Code::PermissionDenied,
        &[
            "[COLUMN_NOT_GRANTED]",
            "`pop.residents.hukou_type`",
            "G-2026-031",
        ],
    )
    .await;
    refused(
        &f,
        "op-univ-07",
        "SELECT COUNT(*) FROM pop.residents WHERE hukou_type = '本市户籍'",
        Code::PermissionDenied,
        &["[COLUMN_NOT_GRANTED]", "hukou_type"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_outside_the_grant_are_refused() {
    let f = Fixture::start().await;
    // gender is granted for group_by only.
    refused(
        &f,
        "op-univ-07",
        "SELECT district, COUNT(*) FROM pop.residents WHERE gender = '女' GROUP BY district",
        Code::PermissionDenied,
        &["[COLUMN_USE_NOT_GRANTED]", "filter_literal", "gender"],
    )
    .await;
    // district is granted for group_by only on pop.residents: comparing it with
    // another column needs `filter`.
    refused(
        &f,
        "op-univ-07",
        "SELECT COUNT(*) FROM pop.residents WHERE district = gender",
        Code::PermissionDenied,
        &["[COLUMN_USE_NOT_GRANTED]", "filter"],
    )
    .await;
    // The unit is granted as a join key only: never compared with a value.
    refused(
        &f,
        "op-univ-07",
        "SELECT COUNT(*) FROM pop.residents WHERE person_id = 'x'",
        Code::PermissionDenied,
        &["[COLUMN_USE_NOT_GRANTED]", "granted: join"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_max_and_unlisted_aggregates_are_refused() {
    let f = Fixture::start().await;
    refused(
        &f,
        "op-univ-07",
        "SELECT MAX(age) FROM pop.residents",
        Code::PermissionDenied,
        &["[AGGREGATE_NOT_ALLOWED]", "percentile"],
    )
    .await;
    refused(
        &f,
        "op-univ-07",
        "SELECT COUNT(DISTINCT district) FROM pop.residents",
        Code::PermissionDenied,
        &["[AGGREGATE_NOT_ALLOWED]", "COUNT(DISTINCT person_id)"],
    )
    .await;
    // op-ndrc may only COUNT.
    refused(
        &f,
        "op-ndrc",
        "SELECT district, SUM(1) FROM hrss.social_insurance GROUP BY district",
        Code::PermissionDenied,
        &["[AGGREGATE_NOT_ALLOWED]", "SUM"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_keys_without_a_public_domain_are_refused() {
    let policy = example_policy().replacen("  domain = [\"男\", \"女\"]\n", "", 1);
    let f = Fixture::with_policy(&policy, |_| {}).await;
    refused(
        &f,
        "op-univ-07",
        "SELECT gender, COUNT(*) FROM pop.residents GROUP BY gender",
        Code::InvalidArgument,
        &["[GROUP_KEY_WITHOUT_DOMAIN]", "gender"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_missing_grants_are_refused() {
    let f = Fixture::start().await;
    refused(
        &f,
        "op-expired",
        "SELECT district, AVG(age) FROM pop.residents GROUP BY district",
        Code::PermissionDenied,
        &["[NO_GRANT]", "G-2025-009", "expired"],
    )
    .await;
    refused(
        &f,
        "op-ndrc",
        "SELECT district, COUNT(*) FROM pop.residents GROUP BY district",
        Code::PermissionDenied,
        &["[NO_GRANT]", "pop.residents"],
    )
    .await;
    refused(
        &f,
        "op-ndrc",
        "SELECT COUNT(*) FROM secret.table",
        Code::InvalidArgument,
        &["not in the catalog"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalated_combination_binds_the_grant() {
    // Visits joined with residents graded `important`: only public_governance
    // may use it, so op-univ-07 (public_welfare) may read each, not both.
    let policy = example_policy().replace(
        "[[escalation]]\n",
        "[[escalation]]\ndatasets = [\"wjw.outpatient_visits\", \"pop.residents\"]\nlevel = \"important\"\nreason = \"就诊与人口信息关联\"\n\n[[escalation]]\n",
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    refused(
        &f,
        "op-univ-07",
        "SELECT r.gender, COUNT(*) FROM wjw.outpatient_visits v \
         JOIN pop.residents r ON v.patient_id = r.person_id GROUP BY r.gender",
        Code::PermissionDenied,
        &[
            "[NO_GRANT]",
            "graded `important`",
            "就诊与人口信息关联",
            "G-2026-031",
        ],
    )
    .await;
    for sql in [
        "SELECT gender, COUNT(*) FROM pop.residents GROUP BY gender",
        "SELECT district, COUNT(*) FROM wjw.outpatient_visits GROUP BY district",
    ] {
        f.query("op-univ-07", sql)
            .await
            .expect("each alone is fine");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_joined_to_a_private_column_carries_its_policy() {
    // Even where the grant lets op-credit-01 group by and filter on the
    // public register's USCC, joined to social insurance's employer USCC (an
    // identifier, here granted for joins only) it is that identifier: one
    // group per employer, or one employer's rows.
    let policy = example_policy()
        .replace(
            "columns = { uscc = [\"project\", \"join\"], name = [\"project\"], industry_code = [\"project\", \"group_by\"]",
            "columns = { uscc = [\"project\", \"join\", \"group_by\", \"filter_literal\"], name = [\"project\"], industry_code = [\"project\", \"group_by\"]",
        );
    assert_ne!(policy, example_policy(), "the edit applies");
    let f = Fixture::with_policy(&policy, |_| {}).await;
    refused(
        &f,
        "op-credit-01",
        "SELECT e.uscc, COUNT(*) FROM hrss.social_insurance s \
         JOIN samr.enterprises e ON s.employer_uscc = e.uscc GROUP BY e.uscc",
        Code::PermissionDenied,
        &["[GROUP_BY_IDENTIFIER]", "employer_uscc"],
    )
    .await;
    refused(
        &f,
        "op-credit-01",
        "SELECT COUNT(*) FROM hrss.social_insurance s \
         JOIN samr.enterprises e ON s.employer_uscc = e.uscc WHERE e.uscc = '91110108MA01EXAMPL'",
        Code::PermissionDenied,
        &[
            "[COLUMN_USE_NOT_GRANTED]",
            "filter_literal",
            "employer_uscc",
        ],
    )
    .await;
}
