//! veil's policy language: what each operator may learn, from which data, for
//! what purpose, until when, with what privacy budget and at what price.
//!
//! Security officers (安全管理员) write TOML. [`Policy::parse`] reads it in
//! three passes, reporting every problem of all passes at once, each at its
//! line and column ([`PolicyError::render`] draws them like a compiler):
//!
//! 1. TOML syntax (all syntax errors, recovered);
//! 2. shape: [`raw::RawPolicy`] is exactly what serde reads; unknown keys
//!    and wrong types are errors, with "did you mean" suggestions;
//! 3. meaning: names resolve, uses stay within the dataset's allow list and
//!    the level's ceiling, prices within caps, grants do not overlap…
//!
//! ```
//! let text = r#"
//! [policy]
//! id = "tiny"
//! version = "1"
//! "#;
//! let policy = veil_policy::Policy::parse(text, "tiny.toml").unwrap();
//! assert_eq!(policy.id, "tiny");
//! assert_eq!(policy.hash.len(), 64);
//!
//! let broken = veil_policy::Policy::parse("[policy]\nid = \"x\"\nversoin = \"1\"\n", "x.toml").unwrap_err();
//! assert!(broken.render(false).contains("did you mean `version`?"));
//! ```

pub mod canonical;
pub mod diagnostic;
pub mod diff;
pub mod explain;
mod model;
pub mod raw;
mod validate;

use std::path::Path;

use serde::Deserialize;
use toml::de::DeTable;

pub use diagnostic::{Diagnostic, PolicyError, Seg, TomlPath};
pub use model::*;
pub use validate::{AGGREGATES, iso_duration_days};

/// Parses a policy's text into its raw form, collecting syntax and shape
/// problems (with spans).
pub fn parse_raw(text: &str) -> (Option<raw::RawPolicy>, Vec<Diagnostic>) {
    let (raw, problems, _) = parse_raw_repaired(text);
    (raw, problems)
}

/// Like [`parse_raw`], also returning the spans that were repaired to get
/// past shape errors (problems found inside them later are consequences).
fn parse_raw_repaired(
    text: &str,
) -> (
    Option<raw::RawPolicy>,
    Vec<Diagnostic>,
    Vec<std::ops::Range<usize>>,
) {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    let mut problems: Vec<Diagnostic> = syntax
        .iter()
        .map(|e| Diagnostic {
            path: TomlPath::default(),
            span: e.span(),
            message: e.message().trim().to_owned(),
            help: None,
        })
        .collect();
    if !problems.is_empty() {
        return (None, problems, vec![]);
    }
    let mut doc = doc;
    let mut repaired = Vec::new();
    // serde stops at the first shape error: record it, repair the document
    // (drop an unknown key, put a placeholder of the expected type in place of
    // a wrongly typed value) and go on, so that every such error is reported.
    for _ in 0..200 {
        match raw::RawPolicy::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => return (Some(raw), problems, repaired),
            Err(e) => {
                problems.push(shape_diagnostic(&e));
                let Some(span) = e.span() else {
                    return (None, problems, repaired);
                };
                let fixed = match placeholder(e.message()) {
                    Some(value) => diagnostic::replace_at(doc.get_mut(), &span, value),
                    None => diagnostic::remove_at(doc.get_mut(), &span),
                };
                if !fixed {
                    return (None, problems, repaired);
                }
                repaired.push(span);
            }
        }
    }
    (None, problems, repaired)
}

/// A value of the type serde expected, to stand in for a wrongly typed one.
fn placeholder(message: &str) -> Option<toml::de::DeValue<'static>> {
    let expected = message.split("expected ").nth(1)?.trim();
    let literal = if expected.starts_with("f64") || expected.starts_with("f32") {
        "1.0"
    } else if expected.starts_with('u')
        || expected.starts_with('i') && expected[1..].starts_with(|c: char| c.is_ascii_digit())
    {
        "1"
    } else if expected.contains("string") || expected.contains("str") {
        "\"placeholder\""
    } else if expected.starts_with("a boolean") || expected.starts_with("bool") {
        "false"
    } else if expected.contains("sequence") || expected.contains("array") {
        "[]"
    } else {
        return None;
    };
    toml::de::DeValue::parse(literal).ok().map(|mut v| {
        v.get_mut().make_owned();
        v.into_inner()
    })
}

/// Turns serde's message into an officer's: unknown keys get a suggestion.
fn shape_diagnostic(e: &toml::de::Error) -> Diagnostic {
    let message = e.message().trim().to_owned();
    let mut d = Diagnostic {
        path: TomlPath::default(),
        span: e.span(),
        message: message.clone(),
        help: None,
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        d.message = format!("unknown key `{field}`");
        d.help = Some(
            match diagnostic::suggest(field, candidates.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None if candidates.is_empty() => "this table takes no keys".into(),
                None => format!("this table takes: {}", candidates.join(", ")),
            },
        );
    }
    d
}

impl Policy {
    /// Parses and validates a policy; `origin` names it in diagnostics.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let (raw, mut problems, repaired) = parse_raw_repaired(text);
        let mut semantic = Vec::new();
        if let Some(r) = &raw {
            match validate::resolve(r) {
                Ok(mut p) if problems.is_empty() => {
                    p.hash = canonical::canonical_hash(r);
                    return Ok(p);
                }
                Ok(_) => {}
                Err(found) => semantic = found,
            }
        }
        // Place the meaning-level problems, which know their path, in the text.
        // Problems inside repaired values are consequences of a shape error
        // already reported: drop them.
        let (doc, _) = DeTable::parse_recoverable(text);
        for mut d in semantic {
            let span = diagnostic::resolve(&doc, &d.path);
            if !repaired
                .iter()
                .any(|r| r.start < span.end && span.start < r.end)
            {
                d.span = Some(span);
                problems.push(d);
            }
        }
        problems.sort_by_key(|d| d.span.as_ref().map(|s| s.start).unwrap_or(usize::MAX));
        Err(PolicyError {
            origin: origin.to_owned(),
            text: text.to_owned(),
            diagnostics: problems,
        })
    }

    /// Parses a policy from text, named `<policy>` in diagnostics.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "<policy>")
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyError::whole_file(&origin, format!("cannot read the policy file: {e}"))
        })?;
        Policy::parse(&text, &origin)
    }
}

/// The JSON Schema of the policy format, for editors (taplo, Even Better TOML).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(raw::RawPolicy);
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests;
