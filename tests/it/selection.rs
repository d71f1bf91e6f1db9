//! DP partition selection: GROUP BY a column without a public domain releases
//! only the keys whose noisy distinct-unit count reaches `max(τ, k)`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, StringArray};
use veil_engine::meta;

use crate::support::*;

/// `gender` loses its public domain and op-univ-07's grant gains a δ.
fn selection_policy() -> String {
    let policy = example_policy()
        .replacen("  domain = [\"男\", \"女\"]\n", "", 1)
        .replacen(
            "  accounting = \"epsilon\"                         # pure ε: discrete Laplace noise\n",
            "  accounting = \"epsilon\"\n  delta = 1e-6\n",
            1,
        );
    assert!(
        policy.contains("delta = 1e-6"),
        "the example policy changed"
    );
    policy
}

const SQL: &str = "SELECT gender, COUNT(*) AS n FROM pop.residents GROUP BY gender";

/// Gives the first resident a gender nobody else has and, with `nulls`, the
/// next two none (the generator declares gender NOT NULL; the copy allows it).
fn lonely_gender(data: &std::path::Path, nulls: bool) {
    rewrite_parquet(&data.join("pop/residents.parquet"), |b| {
        let original = b.column_by_name("gender").expect("gender");
        let as_text = datafusion::arrow::compute::cast(
            original,
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .expect("text");
        let mut values: Vec<Option<String>> = as_text
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect();
        values[0] = Some("未说明".to_owned());
        if nulls {
            values[1] = None;
            values[2] = None;
        }
        let edited =
            datafusion::arrow::compute::cast(&StringArray::from(values), original.data_type())
                .expect("cast back");
        let fields: Vec<_> = b
            .schema()
            .fields()
            .iter()
            .map(|f| {
                f.as_ref()
                    .clone()
                    .with_nullable(f.is_nullable() || f.name() == "gender")
            })
            .collect();
        let nullable = datafusion::arrow::array::RecordBatch::try_new(
            Arc::new(datafusion::arrow::datatypes::Schema::new(fields)),
            b.columns().to_vec(),
        )
        .expect("batch");
        replace_column(nullable, "gender", Arc::new(edited))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_a_domain_pass_partition_selection() {
    // One resident gets a gender nobody else has, two get NULL.
    let f = Fixture::with_policy(&selection_policy(), |data| lonely_gender(data, true)).await;

    let now = chrono::Utc::now().fixed_offset();
    let estimate = f
        .engine
        .estimate("op-univ-07", SQL, now)
        .await
        .expect("dry run");
    assert_eq!(estimate.rows, None, "the released keys depend on the data");
    let threshold = estimate.threshold.expect("a selection threshold");

    let r = f.query("op-univ-07", SQL).await.expect("answered");
    // The lonely key passes with probability below the query's δ (5e-8,
    // below: this test's false-alarm rate); NULL is never a key; both
    // populous keys pass, sorted.
    assert_eq!(column_strings(&r, "gender"), vec!["女", "男"]);
    let md = r.schema.metadata();
    assert_eq!(
        md.get(meta::KEYS).map(String::as_str),
        Some("partition_selection")
    );
    let tau: u64 = md.get(meta::TAU).expect("τ").parse().expect("integer");
    let applied: u64 = md
        .get(meta::THRESHOLD)
        .expect("threshold")
        .parse()
        .expect("integer");
    assert_eq!(applied, threshold, "the dry run predicts the threshold");
    let policy = f.engine.policy();
    let grant = policy
        .grants
        .iter()
        .find(|g| g.grantee == "op-univ-07")
        .expect("grant");
    assert_eq!(applied, tau.max(u64::from(policy.min_group_size(grant))));
    // τ is set for the query's share of the grant's δ, δ · per_query /
    // budget = 1e-6 · 0.5 / 10, so that a window's queries spend at most δ
    // on selection together; the distinct-unit count has noise of scale 6
    // (ε = 0.5 over three statistics, one group per resident).
    let at = |delta: f64| {
        veil_engine::mechanisms::selection_threshold(
            veil_engine::accounting::Mechanism::DiscreteLaplace,
            &dashu::rational::RBig::from(6u8),
            1,
            delta,
        )
        .expect("τ")
    };
    assert_eq!(tau, at(1e-6 * 0.5 / 10.0));
    assert!(tau > at(1e-6), "a query does not spend the whole δ");
    assert_eq!(md.get(meta::TRUNCATED).map(String::as_str), Some("false"));
    // One key ("未说明") was found but not released. The count of keys found
    // has noise of scale 6 (ε = 0.5 over three statistics, one unit in one
    // key), so beyond 100 only with probability e^(-99/6) < 1e-7.
    let suppressed: u64 = md
        .get(meta::SUPPRESSED)
        .expect("suppressed")
        .parse()
        .expect("n");
    assert!(suppressed <= 100, "{suppressed}");
    // The noisy counts are close to the exact ones.
    let exact = exact_counts(&f.data().join("pop/residents.parquet"), "gender").await;
    for (key, n) in column_strings(&r, "gender").iter().zip(column_f64(&r, "n")) {
        let truth = exact[key] as f64;
        assert!((n - truth).abs() < 200.0, "{key}: {n} vs {truth}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_selection_needs_a_delta() {
    // The same policy without δ: refused before any data is read.
    let policy = selection_policy().replacen("  delta = 1e-6\n", "", 1);
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let e = assert_refused(
        f.query("op-univ-07", SQL).await,
        tonic::Code::InvalidArgument,
        &["[GROUP_KEY_WITHOUT_DOMAIN]", "gender", "δ"],
    );
    drop(e);
    assert_eq!(f.charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_warns_when_no_group_can_pass() {
    // A minimum group size larger than the dataset: nothing can be released.
    let policy = selection_policy().replacen(
        "  [grant.limits]\n  agg_functions = [\"COUNT\", \"SUM\", \"AVG\", \"VAR_POP\"",
        "  [grant.limits]\n  min_group_size = 1000000\n  agg_functions = [\"COUNT\", \"SUM\", \"AVG\", \"VAR_POP\"",
        1,
    );
    assert!(
        policy.contains("min_group_size = 1000000"),
        "the example policy changed"
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let now = chrono::Utc::now().fixed_offset();
    let e = f
        .engine
        .estimate("op-univ-07", SQL, now)
        .await
        .expect("dry run");
    assert_eq!(e.threshold, Some(1_000_000));
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("no group can be released")),
        "{:?}",
        e.warnings
    );
    // A reasonable threshold raises no warning.
    let f = Fixture::with_policy(&selection_policy(), |_| {}).await;
    let e = f
        .engine
        .estimate("op-univ-07", SQL, now)
        .await
        .expect("dry run");
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zcdp_grants_with_a_delta_select_partitions_too() {
    // op-credit-01's ρ grant gains δ; pay_month loses its public domain.
    let policy = example_policy()
        .replacen(
            "  accounting = \"rho\"                             # zCDP: discrete Gaussian noise\n",
            "  accounting = \"rho\"\n  delta = 1e-7\n",
            1,
        )
        .replacen("  name = \"pay_month\"\n  level = \"general_2\"\n  allow = [\"group_by\", \"filter_literal\"]\n  domain = [", "  name = \"pay_month\"\n  level = \"general_2\"\n  allow = [\"group_by\", \"filter_literal\"]\n  old_domain = [", 1);
    let policy = {
        // Drop the (renamed) domain list, which spans several lines.
        let start = policy.find("  old_domain = [").expect("renamed domain");
        let end = start + policy[start..].find(']').expect("end of list") + 1;
        format!("{}{}", &policy[..start], &policy[end..])
    };
    assert!(
        policy.contains("delta = 1e-7"),
        "the example policy changed"
    );
    let f = Fixture::with_policy(&policy, |_| {}).await;
    let r = f
        .query(
            "op-credit-01",
            "SELECT pay_month, COUNT(*) AS n FROM hrss.social_insurance GROUP BY pay_month",
        )
        .await
        .expect("answered");
    let md = r.schema.metadata();
    assert_eq!(
        md.get(meta::KEYS).map(String::as_str),
        Some("partition_selection")
    );
    assert_eq!(md.get(meta::UNIT).map(String::as_str), Some("rho"));
    // Every month of 2024–2025 has thousands of people: all pass, in order.
    let months = column_strings(&r, "n").len();
    assert_eq!(months, 24, "{:?}", column_strings(&r, "pay_month"));
    let keys = column_strings(&r, "pay_month");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_groups_can_be_folded_into_an_other_row() {
    let policy = selection_policy().replacen(
        "  delta = 1e-6\n",
        "  delta = 1e-6\n  other_row = true\n",
        1,
    );
    let f = Fixture::with_policy(&policy, |data| lonely_gender(data, false)).await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT gender, COUNT(*) AS n, COUNT(DISTINCT person_id) AS people FROM pop.residents GROUP BY gender",
        )
        .await
        .expect("answered");
    // The lonely key is folded into __other__, last; its distinct-unit count
    // (the statistic that selected the keys) is not released.
    assert_eq!(column_strings(&r, "gender"), vec!["女", "男", "__other__"]);
    let people = column_strings(&r, "people");
    assert_eq!(people[2], "NULL");
    assert_ne!(column_strings(&r, "n")[2], "NULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_zcdp_the_other_row_has_noise_widened_by_the_root_of_max_groups() {
    // A ρ grant with an __other__ row; residents may count in 4 groups, so
    // the merged cell's noise is twice the cells' (NoisePlan::for_merged_cell).
    let policy = selection_policy()
        .replacen(
            "  accounting = \"epsilon\"\n  delta = 1e-6\n",
            "  accounting = \"rho\"\n  delta = 1e-6\n  other_row = true\n",
            1,
        )
        .replacen(
            "privacy_unit = { column = \"person_id\", kind = \"natural_person\", max_groups = 1, max_rows = 1 }",
            "privacy_unit = { column = \"person_id\", kind = \"natural_person\", max_groups = 4, max_rows = 1 }",
            1,
        );
    assert!(policy.contains("accounting = \"rho\"\n  delta = 1e-6\n  other_row"));
    assert!(policy.contains("max_groups = 4, max_rows = 1 }"));
    let f = Fixture::with_policy(&policy, |data| lonely_gender(data, false)).await;
    let r = f
        .query(
            "op-univ-07",
            "SELECT gender, COUNT(*) AS n, DP_INTERVAL_LOW(COUNT(*)) AS lo, \
             DP_INTERVAL_HIGH(COUNT(*)) AS hi FROM pop.residents GROUP BY gender",
        )
        .await
        .expect("answered");
    assert_eq!(column_strings(&r, "gender"), vec!["女", "男", "__other__"]);
    let width: Vec<f64> = column_f64(&r, "hi")
        .iter()
        .zip(column_f64(&r, "lo"))
        .map(|(h, l)| h - l)
        .collect();
    assert!((width[0] - width[1]).abs() < 1e-9, "{width:?}");
    // Discrete noise: integer half-widths, so about (not exactly) twice.
    let ratio = width[2] / width[0];
    assert!((1.7..2.3).contains(&ratio), "{width:?}");
}
