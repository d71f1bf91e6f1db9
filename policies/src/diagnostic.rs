//! Diagnostics for security officers: every problem of a policy file, each
//! with its file, line and column and a caret under the offending text,
//! rendered the way a compiler does.

use std::fmt;
use std::ops::Range;

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a path into the TOML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A key of a table.
    Key(String),
    /// An element of an array (of tables).
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_owned())
    }
}

impl From<String> for Seg {
    fn from(s: String) -> Self {
        Seg::Key(s)
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// A path into the document, e.g. `grant[2].scope[0].columns.district`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TomlPath(pub Vec<Seg>);

impl TomlPath {
    /// This path extended by one step.
    pub fn at(&self, seg: impl Into<Seg>) -> TomlPath {
        let mut p = self.0.clone();
        p.push(seg.into());
        TomlPath(p)
    }
}

impl fmt::Display for TomlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Builds a [`TomlPath`]: `path!("grant", 2, "scope")`.
#[macro_export]
macro_rules! path {
    ($($seg:expr),* $(,)?) => {
        $crate::diagnostic::TomlPath(vec![$($crate::diagnostic::Seg::from($seg)),*])
    };
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where in the document.
    pub path: TomlPath,
    /// Byte range in the file, when known.
    pub span: Option<Range<usize>>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A problem at a path.
    pub fn new(path: TomlPath, message: impl Into<String>) -> Self {
        Diagnostic {
            path,
            span: None,
            message: message.into(),
            help: None,
        }
    }

    /// Adds a fix.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Every problem found in one policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// File name as given (or `<policy>`).
    pub origin: String,
    /// The file's text.
    pub text: String,
    /// Problems in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// A single problem that has no place in the text (e.g. an unreadable file).
    pub fn whole_file(origin: &str, message: impl Into<String>) -> Self {
        PolicyError {
            origin: origin.to_owned(),
            text: String::new(),
            diagnostics: vec![Diagnostic::new(TomlPath::default(), message)],
        }
    }

    /// Renders every diagnostic; `styled` adds terminal colours.
    pub fn render(&self, styled: bool) -> String {
        let renderer = if styled {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let mut out = String::new();
        for d in &self.diagnostics {
            let title = Level::ERROR.primary_title(d.message.as_str());
            let mut groups = vec![match &d.span {
                Some(span) if !self.text.is_empty() => title.element(
                    Snippet::source(self.text.as_str())
                        .line_start(1)
                        .path(self.origin.as_str())
                        .fold(true)
                        .annotation(
                            AnnotationKind::Primary
                                .span(span.clone())
                                .label(d.path.to_string()),
                        ),
                ),
                _ => Group::with_title(title),
            }];
            if let Some(help) = &d.help {
                groups.push(Group::with_title(
                    Level::HELP.secondary_title(help.as_str()),
                ));
            }
            out.push_str(&renderer.render(&groups));
            out.push_str("\n\n");
        }
        let n = self.diagnostics.len();
        out.push_str(&format!(
            "{}: {n} problem{} found; the policy was not loaded\n",
            self.origin,
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

/// The span of the value (or, failing that, of the nearest enclosing value)
/// at `path` in a parsed document.
pub(crate) fn resolve(doc: &Spanned<DeTable<'_>>, path: &TomlPath) -> Range<usize> {
    let mut best = doc.span();
    let mut current: Option<&DeValue<'_>> = None;
    let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
    for seg in &path.0 {
        let next: Option<&Spanned<DeValue<'_>>> = match (seg, table, current) {
            (Seg::Key(k), Some(t), _) => t.get(k.as_str()),
            (Seg::Index(i), _, Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = next.span();
        current = Some(next.get_ref());
        table = match next.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    best
}

/// Removes the key whose key or value span is `span`; true if one was found.
pub(crate) fn remove_at(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let hit = table
        .iter()
        .find(|(k, v)| k.span() == *span || v.span() == *span)
        .map(|(k, _)| k.get_ref().to_string());
    if let Some(key) = hit {
        table.remove(key.as_str());
        return true;
    }
    for (_, v) in table.iter_mut() {
        if remove_in_value(v.get_mut(), span) {
            return true;
        }
    }
    false
}

/// Replaces the value whose span is `span`; true if one was found.
pub(crate) fn replace_at(
    table: &mut DeTable<'_>,
    span: &Range<usize>,
    value: DeValue<'static>,
) -> bool {
    for (_, v) in table.iter_mut() {
        if v.span() == *span {
            *v = Spanned::new(span.clone(), value);
            return true;
        }
        let found = match v.get_mut() {
            DeValue::Table(t) => replace_at(t, span, value.clone()),
            DeValue::Array(a) => a.iter_mut().any(|e| match e.get_mut() {
                DeValue::Table(t) => replace_at(t, span, value.clone()),
                _ => false,
            }),
            _ => false,
        };
        if found {
            return true;
        }
    }
    false
}

fn remove_in_value(v: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match v {
        DeValue::Table(t) => remove_at(t, span),
        DeValue::Array(a) => a.iter_mut().any(|e| remove_in_value(e.get_mut(), span)),
        _ => false,
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
