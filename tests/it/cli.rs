//! The security officer's tools, through the real `veil` binary.

use crate::support::{example_policy, veil_cli};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn policy_check_accepts_the_example_and_reports_every_problem_of_a_broken_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = write(&dir, "good.toml", &example_policy());
    let (code, out, _) = veil_cli(&["policy", "check", &good]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ok — policy bj-public-data") && out.contains("sha256 "),
        "{out}"
    );

    let broken = write(
        &dir,
        "broken.toml",
        &example_policy()
            .replacen(
                "purpose_detail = \"小微企业",
                "purpose_detial = \"小微企业",
                1,
            )
            .replacen("price_cny = 3.20", "price_cny = 9.20", 1),
    );
    let (code, _, err) = veil_cli(&["policy", "check", &broken]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean `purpose_detail`?"), "{err}");
    assert!(err.contains("above the published cap"), "{err}");
    assert!(
        err.contains("broken.toml:"),
        "diagnostics name file, line and column: {err}"
    );
    assert!(err.contains("2 problems found"), "{err}");
}

#[test]
fn explain_schema_and_diff() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = write(&dir, "old.toml", &example_policy());
    let (code, out, _) = veil_cli(&[
        "policy",
        "explain",
        "--policy",
        &old,
        "--operator",
        "op-credit-01",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("G-2026-017") && out.contains("小微企业信贷风险评估"),
        "{out}"
    );
    let (code, out, _) = veil_cli(&[
        "policy",
        "explain",
        "--policy",
        &old,
        "--dataset",
        "pop.residents",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("op-univ-07") && out.contains("op-expired"),
        "{out}"
    );

    let (code, out, _) = veil_cli(&["policy", "schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(schema["properties"]["grant"].is_object(), "{out}");

    let new = write(
        &dir,
        "new.toml",
        &example_policy().replacen("budget = 10.0", "budget = 12.0", 1),
    );
    let (code, out, _) = veil_cli(&["policy", "diff", &old, &new]);
    assert_eq!(code, 0);
    assert!(
        out.contains("+ widened   grant G-2026-031 (op-univ-07) privacy budget: 10 → 12"),
        "{out}"
    );
}
