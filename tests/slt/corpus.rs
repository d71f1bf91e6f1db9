//! The sqllogictest corpus's files and conventions, shared by the test
//! (`tests/it/slt.rs`) and the planning benchmark (`benches/engine.rs`).

use std::path::PathBuf;

/// The corpus files, in name order.
pub fn files() -> Vec<PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/slt")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    files
}

/// The operator a `SET veil.operator = '<id>'` statement switches to.
pub fn operator_switch(sql: &str) -> Option<String> {
    let op = sql.trim().strip_prefix("SET veil.operator = ")?;
    Some(
        op.trim_matches(|c| c == '\'' || c == ';' || c == ' ')
            .to_owned(),
    )
}
