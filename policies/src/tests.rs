use chrono::DateTime;

use super::*;

const EXAMPLE: &str = include_str!("../../examples/beijing/policy.toml");

fn at(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    DateTime::parse_from_rfc3339(s).expect("test timestamp")
}

fn messages(text: &str) -> Vec<String> {
    match Policy::from_toml(text) {
        Ok(_) => vec![],
        Err(e) => e.diagnostics.into_iter().map(|d| d.message).collect(),
    }
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
fn unknown_keys_are_errors() {
    let text = EXAMPLE.replacen(
        "purpose_detail = \"小微企业",
        "purpose_detial = \"小微企业",
        1,
    );
    let m = messages(&text);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains("unknown field `purpose_detial`"), "{m:?}");
}

#[test]
fn core_datasets_are_refused() {
    let text = EXAMPLE.replacen("level = \"general_4\"\nshare", "level = \"core\"\nshare", 1);
    assert!(messages(&text).iter().any(|m| m.contains("core data")));
}

#[test]
fn unbounded_dp_aggregates_are_refused() {
    let text = EXAMPLE.replacen("bounds = [0, 40000]\n", "", 1);
    assert!(
        messages(&text)
            .iter()
            .any(|m| m.contains("`wage_base`") && m.contains("no bounds")),
        "{:?}",
        messages(&text)
    );
}

#[test]
fn price_above_cap_is_refused() {
    let text = EXAMPLE.replacen("price_cny = 3.20", "price_cny = 9.20", 1);
    assert!(
        messages(&text)
            .iter()
            .any(|m| m.contains("above the published cap"))
    );
}

#[test]
fn grant_uses_must_be_allowed_by_dataset() {
    let text = EXAMPLE.replacen(
        "columns = { district = [\"group_by\", \"filter_literal\"], pay_month",
        "columns = { district = [\"project\", \"filter_literal\"], pay_month",
        1,
    );
    assert!(messages(&text).iter().any(|m| m.contains("uses [project]")));
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = EXAMPLE
        .replacen("price_cny = 3.20", "price_cny = 9.20", 1)
        .replacen("grantee = \"op-ndrc\"", "grantee = \"op-nobody\"", 1)
        .replacen("bounds = [0, 5000]\n", "", 1);
    assert_eq!(messages(&text).len(), 3, "{:?}", messages(&text));
}

#[test]
fn hash_ignores_comments_and_whitespace() {
    let a = Policy::from_toml(EXAMPLE).expect("valid");
    let edited = EXAMPLE
        .replace("# mandatory, applied to every query", "")
        .replace(" = ", "   =  ");
    let b = Policy::from_toml(&edited).expect("valid");
    assert_eq!(a.hash, b.hash);
    let c = Policy::from_toml(&EXAMPLE.replacen("budget = 2.0", "budget = 3.0", 1)).expect("valid");
    assert_ne!(a.hash, c.hash);
}
