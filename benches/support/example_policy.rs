//! The bundled example policy, copied next to a benchmark's data with one
//! grant's budget raised so that a run never exhausts it.

use std::path::{Path, PathBuf};

/// Writes `dir/policy.toml`: the example policy with the budget line
/// `budget` (which must occur) replaced by `raised`.
pub fn with_budget(dir: &Path, budget: &str, raised: &str) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/beijing/policy.toml"),
    )
    .expect("example policy");
    assert!(
        text.contains(budget),
        "the example policy has no `{budget}`"
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text.replace(budget, raised)).expect("policy");
    path
}
