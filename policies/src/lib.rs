//! veil's policy language: what each operator may learn, from which data, for
//! what purpose, until when, with what privacy budget and at what price.
//!
//! Security officers (安全管理员) write TOML; [`Policy::from_toml`] reads it into
//! a [`raw::RawPolicy`] (exactly what serde saw), then validates and resolves it
//! into a [`Policy`], reporting every problem at once.
//!
//! ```
//! let text = r#"
//! [policy]
//! id = "tiny"
//! version = "1"
//! "#;
//! let policy = veil_policy::Policy::from_toml(text).unwrap();
//! assert_eq!(policy.id, "tiny");
//! assert_eq!(policy.hash.len(), 64);
//! ```

mod model;
pub mod raw;
mod validate;

use std::fmt;
use std::path::Path;

pub use model::*;

/// One problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where: the table the problem is in (`grant \`G-1\` scope \`x\``).
    pub at: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// All problems found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// Every problem, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {}: {}", d.at, d.message)?;
        }
        Ok(())
    }
}

impl PolicyError {
    fn single(at: &str, message: String) -> Self {
        PolicyError {
            diagnostics: vec![Diagnostic {
                at: at.to_owned(),
                message,
            }],
        }
    }
}

impl Policy {
    /// Parses and validates a policy from TOML text.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let raw: raw::RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::single("file", e.to_string()))?;
        validate::resolve(&raw)
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::single(&path.display().to_string(), e.to_string()))?;
        Policy::from_toml(&text).map_err(|mut e| {
            for d in &mut e.diagnostics {
                d.at = format!("{}: {}", path.display(), d.at);
            }
            e
        })
    }
}

#[cfg(test)]
mod tests;
