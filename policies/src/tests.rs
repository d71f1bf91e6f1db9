//! Every loading rule, with a snapshot of the rendered diagnostic an officer
//! sees, plus the identity (hash) properties.

use chrono::DateTime;
use proptest::prelude::*;

use super::*;

const EXAMPLE: &str = include_str!("../../examples/beijing/policy.toml");

fn at(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    DateTime::parse_from_rfc3339(s).expect("test timestamp")
}

/// Applies `(from, to)` replacements, each of which must match.
fn edited(edits: &[(&str, &str)]) -> String {
    let mut text = EXAMPLE.to_owned();
    for (from, to) in edits {
        assert!(text.contains(from), "edit does not apply: {from}");
        text = text.replacen(from, to, 1);
    }
    text
}

fn rendered(text: &str) -> String {
    Policy::parse(text, "examples/beijing/policy.toml")
        .expect_err("the edit must break the policy")
        .render(false)
}

/// One rule: the edit yields exactly one diagnostic, whose rendering is pinned.
macro_rules! rule {
    ($name:ident, [$(($from:expr, $to:expr)),+ $(,)?]) => {
        #[test]
        fn $name() {
            let text = edited(&[$(($from, $to)),+]);
            let err = Policy::parse(&text, "examples/beijing/policy.toml").expect_err("must fail");
            assert_eq!(err.diagnostics.len(), 1, "{}", err.render(false));
            assert!(err.diagnostics[0].span.is_some(), "every diagnostic has a place");
            insta::assert_snapshot!(stringify!($name), rendered(&text));
        }
    };
}

rule!(
    duplicate_mtls_subject,
    [
        (
            "org = \"某某大学公共卫生学院\"\n",
            "org = \"某某大学公共卫生学院\"\nmtls = { subject = \"CN=shared, O=Univ\" }\n"
        ),
        (
            "org = \"北京市发展和改革委员会\"\n",
            "org = \"北京市发展和改革委员会\"\nmtls = { subject = \"CN=shared,O=Univ\" }\n"
        )
    ]
);
rule!(
    syntax_error,
    [("id = \"bj-public-data\"", "id = \"bj-public-data")]
);
rule!(
    unknown_key_with_suggestion,
    [("purpose_detail = \"小微企业", "purpose_detial = \"小微企业")]
);
rule!(
    wrong_type,
    [(
        "budget = 2.0\n  per_query_max = 0.05",
        "budget = \"lots\"\n  per_query_max = 0.05"
    )]
);
rule!(
    unknown_level_with_suggestion,
    [
        (
            "id = \"pop.residents\"\nname = \"常住人口基础信息\"",
            "id = \"pop.residents\"\nname = \"常住人口基础信息\"\n"
        ),
        (
            "level = \"general_4\"\nshare",
            "level = \"general4\"\nshare"
        )
    ]
);
rule!(
    core_dataset_refused,
    [("level = \"general_4\"\nshare", "level = \"core\"\nshare")]
);
rule!(
    column_above_dataset_level,
    [(
        "level = \"general_1\"\nshare = \"unconditional\"                          # 无条件共享\nopen = \"unconditional\"                           # 无条件开放\nsource = { path = \"geo/districts.parquet\" }\n  [[dataset.column]]\n  name = \"code\"\n  level = \"general_1\"",
        "level = \"general_1\"\nshare = \"unconditional\"                          # 无条件共享\nopen = \"unconditional\"                           # 无条件开放\nsource = { path = \"geo/districts.parquet\" }\n  [[dataset.column]]\n  name = \"code\"\n  level = \"general_2\""
    )]
);
rule!(
    uses_above_level_ceiling,
    [(
        "  name = \"age\"\n  level = \"general_3\"\n  allow = [\"aggregate\",",
        "  name = \"age\"\n  level = \"general_3\"\n  allow = [\"project\", \"aggregate\","
    )]
);
rule!(
    identifier_used_for_grouping,
    [(
        "  tags = [\"identifier\"]\n  allow = [\"join\"]",
        "  tags = [\"identifier\"]\n  allow = [\"join\", \"group_by\"]"
    )]
);
rule!(bad_bounds, [("bounds = [0, 110]", "bounds = [110, 0]")]);
rule!(
    private_dataset_without_unit,
    [(
        "privacy_unit = { column = \"person_id\", kind = \"natural_person\", max_groups = 1, max_rows = 1 }\n",
        ""
    )]
);
rule!(
    unit_column_not_declared,
    [(
        "column = \"patient_id\", kind",
        "column = \"patient\", kind"
    )]
);
rule!(
    unknown_grantee_with_suggestion,
    [("grantee = \"op-ndrc\"", "grantee = \"op-ndcr\"")]
);
rule!(
    unknown_dataset_with_suggestion,
    [(
        "  dataset = \"samr.enterprises\"\n  columns = { uscc = [\"project\", \"join\"]",
        "  dataset = \"samr.enterprise\"\n  columns = { uscc = [\"project\", \"join\"]"
    )]
);
rule!(
    unknown_column_with_suggestion,
    [(
        "columns = { person_id = [\"join\"], district = [\"group_by\"], gender",
        "columns = { person_id = [\"join\"], distrct = [\"group_by\"], gender"
    )]
);
rule!(
    grant_use_outside_allow,
    [(
        "columns = { person_id = [\"join\"], district = [\"group_by\"], gender",
        "columns = { person_id = [\"join\"], district = [\"project\"], gender"
    )]
);
rule!(dp_aggregate_without_bounds, [("bounds = [0, 5000]\n", "")]);
rule!(
    commercial_on_unregistered_dataset,
    [(
        "registration_id = \"BJ-GGSJ-DJ-2025-000118\"       # 公共数据资源登记编号\n",
        ""
    )]
);
rule!(price_above_cap, [("price_cny = 3.20", "price_cny = 9.20")]);
rule!(
    commercial_without_guided_price,
    [(
        "  model = \"guided_price\"                         # 政府指导价\n  unit = \"per_query\"\n  price_cny = 3.20\n  cap_cny = 5.00",
        "  model = \"free\""
    )]
);
rule!(
    overlapping_grants,
    [
        ("grantee = \"op-expired\"", "grantee = \"op-univ-07\""),
        (
            "valid_from = 2025-01-01T00:00:00+08:00\nvalid_until = 2025-12-31T23:59:59+08:00",
            "valid_from = 2027-01-01T00:00:00+08:00\nvalid_until = 2027-12-31T23:59:59+08:00"
        ),
        (
            "  model = \"guided_price\"\n  unit = \"per_query\"\n  price_cny = 1.00",
            "  model = \"guided_price\"\n  unit = \"per_query\"\n  price_cny = 1.50"
        )
    ]
);
rule!(
    row_filter_does_not_parse,
    [(
        "row_filter = \"pay_month >= '2024-01'\"",
        "row_filter = \"pay_month >=\""
    )]
);
rule!(
    row_filter_unknown_column,
    [(
        "row_filter = \"pay_month >= '2024-01'\"",
        "row_filter = \"paid_month >= '2024-01'\""
    )]
);
rule!(
    row_filter_with_subquery,
    [(
        "row_filter = \"pay_month >= '2024-01'\"",
        "row_filter = \"pay_month IN (SELECT 1)\""
    )]
);
rule!(
    validity_reversed,
    [(
        "valid_until = 2030-02-28T23:59:59+08:00",
        "valid_until = 2026-02-28T23:59:59+08:00"
    )]
);
rule!(
    token_not_a_hash,
    [(
        "tokens = [\"sha256:a381f01f50cde42394d12c7f97c700c86764ec88a08641784c33d849ba20e844\"]",
        "tokens = [\"demo-token-op-ndrc\"]"
    )]
);
rule!(
    duplicate_dataset,
    [("id = \"geo.districts\"", "id = \"samr.enterprises\"")]
);
rule!(
    important_data_for_welfare,
    [(
        "level = \"general_4\"\nshare = \"conditional\"                            # 有条件共享\nopen = \"none\"                                    # 不予开放\nsource = { path = \"wjw/",
        "level = \"important\"\nshare = \"conditional\"                            # 有条件共享\nopen = \"none\"                                    # 不予开放\nsource = { path = \"wjw/"
    )]
);
rule!(
    per_query_above_budget,
    [(
        "budget = 10.0\n  per_query_max = 0.5",
        "budget = 10.0\n  per_query_max = 20.0"
    )]
);
rule!(bad_window, [("window = \"P90D\"", "window = \"90 days\"")]);
rule!(
    bad_daily_hours,
    [(
        "purpose_detail = \"区域就业形势监测\"",
        "purpose_detail = \"区域就业形势监测\"\nhours = \"8am-6pm\""
    )]
);
rule!(
    escalation_unknown_dataset,
    [(
        "datasets = [\"hrss.social_insurance\", \"wjw.outpatient_visits\"]",
        "datasets = [\"hrss.social_insurance\", \"wjw.outpatient_visit\"]"
    )]
);
rule!(
    truncated_join_with_a_public_dataset,
    [(
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n",
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n\n[[truncated_join]]\ndatasets = [\"hrss.social_insurance\", \"samr.enterprises\"]\non = [\"employer_uscc\", \"uscc\"]\nmax_matches = 3\n"
    )]
);
rule!(
    truncated_join_unknown_column_with_suggestion,
    [(
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n",
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n\n[[truncated_join]]\ndatasets = [\"hrss.social_insurance\", \"wjw.outpatient_visits\"]\non = [\"district\", \"districts\"]\nmax_matches = 3\n"
    )]
);
rule!(
    truncated_join_without_a_bound,
    [(
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n",
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n\n[[truncated_join]]\ndatasets = [\"hrss.social_insurance\", \"wjw.outpatient_visits\"]\non = [\"district\", \"district\"]\nmax_matches = 0\n"
    )]
);
rule!(
    unknown_aggregate_with_suggestion,
    [("agg_functions = [\"COUNT\"]", "agg_functions = [\"CONT\"]")]
);

fn shuffle<T>(v: &mut [T], next: &mut dyn FnMut(usize) -> usize) {
    for i in (1..v.len()).rev() {
        let j = next(i + 1);
        v.swap(i, j);
    }
}

rule!(
    row_output_needs_an_open_dataset,
    [(
        "  name = \"district\"\n  level = \"general_2\"\n  allow = [\"group_by\", \"filter_literal\"]\n  domain = [\"东城区\", \"西城区\", \"朝阳区\", \"丰台区\", \"石景山区\", \"海淀区\", \"门头沟区\", \"房山区\",\n            \"通州区\", \"顺义区\", \"昌平区\", \"大兴区\", \"怀柔区\", \"平谷区\", \"密云区\", \"延庆区\"]\n  [[dataset.column]]\n  name = \"age\"",
        "  name = \"district\"\n  level = \"general_2\"\n  allow = [\"project\", \"group_by\", \"filter_literal\"]\n  domain = [\"东城区\", \"西城区\", \"朝阳区\", \"丰台区\", \"石景山区\", \"海淀区\", \"门头沟区\", \"房山区\",\n            \"通州区\", \"顺义区\", \"昌平区\", \"大兴区\", \"怀柔区\", \"平谷区\", \"密云区\", \"延庆区\"]\n  [[dataset.column]]\n  name = \"age\""
    )]
);
rule!(
    preset_scheme_cannot_be_redefined,
    [(
        "# ---------------------------------------------------------------- datasets",
        "[[level]]\nname = \"general_1\"\nrank = 0\nrow_output = \"always\"\ndp = \"none\"\npurposes = [\"public_governance\"]\n\n# ---------------------------------------------------------------- datasets"
    )]
);

/// A health-sector scheme declared as data: levels, ceilings and purposes.
const CUSTOM: &str = r#"
[policy]
id = "health"
version = "1"
grading_scheme = "health-3"

[[level]]
name = "open"
rank = 0
row_output = "always"
dp = "none"
purposes = ["public_governance", "public_welfare", "commercial"]

[[level]]
name = "sensitive"
rank = 1
row_output = "never"
min_group_size = 30
dp = "required"
purposes = ["public_governance", "public_welfare"]

[[level]]
name = "secret"
rank = 2
admitted = false
row_output = "never"
dp = "required"
purposes = []

[[dataset]]
id = "h.visits"
name = "就诊"
owner = "卫健委"
level = "sensitive"
share = "conditional"
open = "none"
source = { path = "v.parquet" }
privacy_unit = { column = "pid", kind = "natural_person", max_groups = 2, max_rows = 3 }
  [[dataset.column]]
  name = "pid"
  level = "sensitive"
  tags = ["identifier"]
  allow = ["join"]
  [[dataset.column]]
  name = "cost"
  level = "sensitive"
  allow = ["aggregate"]
  bounds = [0, 100]

[[operator]]
id = "uni"
org = "大学"

[[grant]]
id = "G1"
channel = "opening"
grantee = "uni"
purpose = "public_welfare"
valid_from = 2026-01-01T00:00:00+08:00
valid_until = 2027-01-01T00:00:00+08:00
  [[grant.scope]]
  dataset = "h.visits"
  columns = { cost = ["aggregate"] }
  [grant.dp]
  accounting = "epsilon"
  budget = 1.0
  per_query_max = 0.1
"#;

#[test]
fn custom_schemes_are_data() {
    let p = Policy::parse(CUSTOM, "health.toml").unwrap_or_else(|e| panic!("{}", e.render(false)));
    assert_eq!(p.scheme.name, "health-3");
    assert_eq!(p.scheme.names(), ["open", "sensitive", "secret"]);
    assert_eq!(
        p.min_group_size(&p.grants[0]),
        30,
        "the level's minimum group size applies"
    );
    // The level's purposes bind grants.
    let commercial = CUSTOM.replace("purpose = \"public_welfare\"", "purpose = \"commercial\"");
    let err = Policy::parse(&commercial, "health.toml").expect_err("purpose outside the level");
    assert!(
        err.render(false).contains(
            "is graded sensitive: it may only be granted for public_governance, public_welfare"
        ),
        "{}",
        err.render(false)
    );
    // An unadmitted level refuses its datasets; an unknown level is suggested.
    let secret = CUSTOM.replace("level = \"sensitive\"\nshare", "level = \"secret\"\nshare");
    assert!(
        Policy::parse(&secret, "h.toml")
            .expect_err("secret")
            .render(false)
            .contains("never admitted")
    );
    let typo = CUSTOM.replace(
        "level = \"sensitive\"\nshare",
        "level = \"sensitiv\"\nshare",
    );
    assert!(
        Policy::parse(&typo, "h.toml")
            .expect_err("typo")
            .render(false)
            .contains("did you mean `sensitive`?")
    );
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = edited(&[
        ("purpose_detail = \"小微企业", "purpose_detial = \"小微企业"),
        ("price_cny = 3.20", "price_cny = 9.20"),
        ("grantee = \"op-ndrc\"", "grantee = \"op-nobody\""),
        ("bounds = [0, 5000]\n", ""),
        ("budget = 10.0", "budget = \"ten\""),
    ]);
    let err = Policy::parse(&text, "p.toml").expect_err("broken");
    assert_eq!(err.diagnostics.len(), 5, "{}", err.render(false));
    let starts: Vec<usize> = err
        .diagnostics
        .iter()
        .map(|d| d.span.as_ref().expect("span").start)
        .collect();
    let mut sorted = starts.clone();
    sorted.sort();
    assert_eq!(starts, sorted, "diagnostics come in file order");
    insta::assert_snapshot!("all_at_once", err.render(false));
}

#[test]
fn example_policy_loads() {
    let p = Policy::from_toml(EXAMPLE).expect("example policy is valid");
    assert_eq!(p.id, "bj-public-data");
    assert_eq!(p.datasets.len(), 5);
    assert!(p.datasets["samr.enterprises"].is_public());
    assert!(!p.datasets["pop.residents"].is_public());
    assert_eq!(p.grants.len(), 4);
}

#[test]
fn tokens_authenticate_by_hash_only() {
    let p = Policy::from_toml(EXAMPLE).expect("valid");
    let op = p.authenticate(Some("op-univ-07"), "demo-token-op-univ-07");
    assert_eq!(op.map(|o| o.id.as_str()), Some("op-univ-07"));
    assert!(
        p.authenticate(Some("op-univ-07"), "demo-token-op-ndrc")
            .is_none()
    );
    assert!(p.authenticate(None, "demo-token-op-ndrc").is_some());
    assert!(p.authenticate(None, "wrong").is_none());
    assert!(
        !EXAMPLE.contains("demo-token-op"),
        "policy must store hashes only"
    );
}

#[test]
fn expired_and_missing_grants_are_refused_with_reason() {
    let p = Policy::from_toml(EXAMPLE).expect("valid");
    let now = at("2026-11-27T12:00:00+08:00");
    let g = p
        .grant_for("op-univ-07", &["pop.residents"], now)
        .expect("in force");
    assert_eq!(g.id, "G-2026-031");
    assert!(matches!(
        p.grant_for("op-expired", &["pop.residents"], now),
        Err(GrantRefusal::Expired { .. })
    ));
    assert!(matches!(
        p.grant_for("op-ndrc", &["pop.residents"], now),
        Err(GrantRefusal::NoGrant { dataset, .. }) if dataset == "pop.residents"
    ));
    assert!(matches!(
        p.grant_for(
            "op-univ-07",
            &["pop.residents"],
            at("2026-01-01T00:00:00+08:00")
        ),
        Err(GrantRefusal::NotYetValid { .. })
    ));
}

#[test]
fn unreadable_files_are_reported_without_a_span() {
    let err = Policy::load(std::path::Path::new("/nonexistent/policy.toml")).expect_err("missing");
    assert!(err.render(false).contains("cannot read the policy file"));
}

#[test]
fn the_json_schema_in_the_repository_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.schema.json");
    if std::env::var_os("VEIL_BLESS").is_some() {
        std::fs::write(path, json_schema()).expect("write schema");
    }
    let shipped = std::fs::read_to_string(path).expect("policies/policy.schema.json is shipped");
    assert_eq!(
        shipped,
        json_schema(),
        "regenerate with `veil policy schema > policies/policy.schema.json`"
    );
}

fn raw_example() -> raw::RawPolicy {
    parse_raw(EXAMPLE).0.expect("example parses")
}

#[test]
fn hash_ignores_comments_and_whitespace() {
    let a = Policy::from_toml(EXAMPLE).expect("valid");
    let b = Policy::from_toml(
        &EXAMPLE
            .replace("# mandatory, applied to every query", "")
            .replace(" = ", "   =  "),
    )
    .expect("valid");
    assert_eq!(a.hash, b.hash);
    let c = Policy::from_toml(&EXAMPLE.replacen("budget = 2.0", "budget = 3.0", 1)).expect("valid");
    assert_ne!(a.hash, c.hash);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// parse → canonical print → parse is the identity on the canonical form,
    /// and reordering any list whose order carries no meaning keeps the hash.
    #[test]
    fn canonical_form_round_trips_and_ignores_order(seed in any::<u64>()) {
        let raw = raw_example();
        let text = canonical::canonical_text(&raw);
        let again = parse_raw(&text).0.expect("canonical text parses");
        prop_assert_eq!(canonical::canonical_text(&again), text.clone());

        let mut shuffled = raw.clone();
        let mut s = seed;
        let mut next = move |n: usize| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as usize % n.max(1) };
        shuffle(&mut shuffled.datasets, &mut next);
        for d in &mut shuffled.datasets { shuffle(&mut d.columns, &mut next); }
        shuffle(&mut shuffled.operators, &mut next);
        shuffle(&mut shuffled.grants, &mut next);
        for g in &mut shuffled.grants { shuffle(&mut g.scopes, &mut next); }
        prop_assert_eq!(canonical::canonical_hash(&shuffled), canonical::canonical_hash(&raw));
        let reparsed = Policy::from_toml(&toml::to_string(&shuffled).expect("print")).expect("valid");
        prop_assert_eq!(reparsed.hash, Policy::from_toml(EXAMPLE).expect("valid").hash);
    }

    /// No input makes the loader panic; it answers with a policy or diagnostics.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Policy::parse(&text, "fuzz.toml") {
            let _ = e.render(false);
        }
    }

    /// Nor does a policy with random damage.
    #[test]
    fn damaged_policies_never_panic(cut in 0usize..EXAMPLE.len(), len in 0usize..64, junk in "[\\[\\]=\"a-z0-9 \n]{0,12}") {
        let mut text = EXAMPLE.as_bytes().to_vec();
        let end = (cut + len).min(text.len());
        text.splice(cut..end, junk.bytes());
        let text = String::from_utf8_lossy(&text);
        if let Err(e) = Policy::parse(&text, "damaged.toml") {
            let _ = e.render(false);
        }
    }
}

#[test]
fn a_truncated_join_is_declared_looked_up_and_explained() {
    let text = edited(&[(
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n",
        "reason = \"社保与就诊记录关联可推断个人健康与就业状况\"\n\n[[truncated_join]]\ndatasets = [\"hrss.social_insurance\", \"wjw.outpatient_visits\"]\non = [\"employer_uscc\", \"district\"]\nmax_matches = 3\nreason = \"测试\"\n",
    )]);
    let p = Policy::from_toml(&text).expect("valid");
    let insurance = ("hrss.social_insurance", "employer_uscc");
    let visits = ("wjw.outpatient_visits", "district");
    for (a, b) in [(insurance, visits), (visits, insurance)] {
        assert_eq!(p.truncated_join(a, b).map(|t| t.max_matches), Some(3));
    }
    assert!(
        p.truncated_join(insurance, ("wjw.outpatient_visits", "patient_id"))
            .is_none()
    );
    let now = at("2026-11-27T12:00:00+08:00");
    let shown = explain::explain_dataset(&p, "wjw.outpatient_visits", now).expect("known");
    assert!(
        shown.contains("may be joined with hrss.social_insurance on district = employer_uscc, each side truncated to 3 rows per key (截断关联): 测试"),
        "{shown}"
    );
}

#[test]
fn explain_says_what_an_operator_may_do() {
    let p = Policy::from_toml(EXAMPLE).expect("valid");
    let now = at("2026-11-27T12:00:00+08:00");
    let text = explain::explain_operator(&p, "op-univ-07", now).expect("known operator");
    for needle in [
        "G-2026-031",
        "public_welfare",
        "pop.residents",
        "group by: age, district, gender",
        "10 ε in total",
        "free, on condition",
        "in force",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    let expired = explain::explain_operator(&p, "op-expired", now).expect("known");
    assert!(expired.contains("EXPIRED"), "{expired}");
    let credit = explain::explain_operator(&p, "op-credit-01", now).expect("known");
    assert!(
        credit.contains("only rows where pay_month >= '2024-01'"),
        "{credit}"
    );
    assert!(
        credit.contains("3.20 CNY per_query, published cap 5.00 CNY"),
        "{credit}"
    );
    assert!(explain::explain_operator(&p, "nobody", now).is_none());
    let ds = explain::explain_dataset(&p, "hrss.social_insurance", now).expect("known dataset");
    assert!(
        ds.contains("op-credit-01") && ds.contains("op-ndrc") && !ds.contains("op-univ-07"),
        "{ds}"
    );
    // Joins on the person and escalations are spelled out for officers.
    assert!(
        ds.contains(
            "may be joined on the person (关联) with: pop.residents (on person_id = person_id)"
        ),
        "{ds}"
    );
    assert!(
        ds.contains("read together with wjw.outpatient_visits it is graded important"),
        "{ds}"
    );
    let visits = explain::explain_dataset(&p, "wjw.outpatient_visits", now).expect("known");
    assert!(
        visits.contains("pop.residents (on patient_id = person_id)"),
        "{visits}"
    );
    // Links chain: visits → residents ← insurance.
    assert!(
        visits.contains("hrss.social_insurance (on patient_id = person_id)"),
        "{visits}"
    );
    assert!(p.share_units("wjw.outpatient_visits", "hrss.social_insurance"));
    assert!(!p.share_units("wjw.outpatient_visits", "samr.enterprises"));
}

#[test]
fn diff_reports_effective_permission_changes() {
    let old = Policy::from_toml(EXAMPLE).expect("valid");
    assert!(diff::diff(&old, &old).is_empty());
    let new = Policy::from_toml(&edited(&[
        ("budget = 10.0", "budget = 20.0"),
        ("columns = { person_id = [\"join\"], district = [\"group_by\"], gender", "columns = { person_id = [\"join\"], district = [\"group_by\", \"filter_literal\"], gender"),
        ("valid_until = 2030-12-31T23:59:59+08:00\n  [[grant.scope]]\n  dataset = \"hrss.social_insurance\"\n  columns = { district", "valid_until = 2027-06-30T23:59:59+08:00\n  [[grant.scope]]\n  dataset = \"hrss.social_insurance\"\n  columns = { district"),
    ]))
    .expect("valid");
    let lines: Vec<String> = diff::diff(&old, &new)
        .iter()
        .map(|d| d.to_string())
        .collect();
    let joined = lines.join("\n");
    assert_eq!(lines.len(), 3, "{joined}");
    assert!(
        joined.contains("+ widened   grant G-2026-031 (op-univ-07) privacy budget: 10 → 20"),
        "{joined}"
    );
    assert!(joined.contains("+ widened   grant G-2026-031 (op-univ-07): pop.residents.district may now be used for filter_literal"), "{joined}");
    assert!(
        joined.contains("- narrowed  grant G-2026-002 (op-ndrc) ends"),
        "{joined}"
    );
}

#[test]
fn other_row_is_accepted_under_rho() {
    // The engine widens the __other__ row's noise by √max_groups under ρ.
    let p = Policy::from_toml(&edited(&[(
        "window = \"P90D\"",
        "window = \"P90D\"\n  other_row = true",
    )]))
    .expect("valid");
    let g = p
        .grants
        .iter()
        .find(|g| g.id == "G-2026-017")
        .expect("grant");
    assert!(g.dp.as_ref().is_some_and(|dp| dp.other_row));
}
