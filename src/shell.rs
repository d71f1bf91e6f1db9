//! `veil shell`: an interactive SQL prompt with history and completion of
//! the granted table and column names.
//!
//! A statement ends with `;` (it may span lines). Commands start with `\`:
//! `\d` (catalog), `\budget`, `\dry SQL` (cost and accuracy only),
//! `\format table|csv|json`, `\q`.

use std::borrow::Cow;
use std::path::PathBuf;

use anyhow::Result;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::client::Client;
use crate::exit;
use crate::operator::render_catalog;
use crate::output::{self, Format};
use crate::session::Target;

/// SQL words offered beside table and column names (and the aggregates).
const KEYWORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "ORDER BY",
    "HAVING",
    "LIMIT",
    "JOIN",
    "ON",
    "AND",
    "OR",
    "NOT",
    "IN",
    "AS",
    "DISTINCT",
    "WITHIN GROUP",
    "DP_INTERVAL_LOW",
    "DP_INTERVAL_HIGH",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "ROUND",
    "FLOOR",
];

/// Completion of SQL words, dataset ids, table and column names.
struct Words(Vec<String>);

impl Completer for Words {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '.'))
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let prefix = line[start..pos].to_lowercase();
        if prefix.is_empty() {
            return Ok((start, Vec::new()));
        }
        let candidates = self
            .0
            .iter()
            .filter(|w| w.to_lowercase().starts_with(&prefix))
            .map(|w| Pair {
                display: w.clone(),
                replacement: w.clone(),
            })
            .collect();
        Ok((start, candidates))
    }
}

impl Hinter for Words {
    type Hint = String;
}
impl Highlighter for Words {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}
impl Validator for Words {}
impl Helper for Words {}

fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
        })?;
    Some(base.join("veil").join("history"))
}

/// Runs the shell until `\q` or end of input.
pub async fn run(target: &Target) -> Result<u8> {
    let mut client = Client::connect_target(target).await?;
    let tables = match client.tables().await {
        Ok(t) => t,
        Err(e) => return Ok(crate::operator::refused(&e)),
    };
    let mut words: Vec<String> = KEYWORDS
        .iter()
        .chain(veil_policy::AGGREGATES)
        .map(|k| (*k).to_owned())
        .collect();
    for (id, schema) in &tables {
        words.push(id.clone());
        words.extend(schema.fields().iter().map(|f| f.name().clone()));
    }
    words.sort();
    words.dedup();

    let mut editor: Editor<Words, rustyline::history::DefaultHistory> = Editor::new()?;
    editor.set_helper(Some(Words(words)));
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!(
        "veil shell on {}: end statements with `;`, `\\d` lists what you may query, `\\q` leaves",
        target.endpoint
    );
    let mut format = Format::Table;
    let mut statement = String::new();
    loop {
        let prompt = if statement.is_empty() {
            "veil> "
        } else {
            " ...> "
        };
        let line = match editor.readline(prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                statement.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if statement.is_empty() && trimmed.starts_with('\\') {
            let _ = editor.add_history_entry(trimmed);
            let (command, rest) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
            match command {
                "\\q" => break,
                "\\d" => print!("{}", render_catalog(&tables)),
                "\\budget" => {
                    crate::operator::budget(target).await?;
                }
                "\\dry" => match crate::client::estimate(target, rest).await {
                    Ok(e) => print!("{}", output::render_estimate(&e)),
                    Err(e) => {
                        crate::operator::refused(&e);
                    }
                },
                "\\format" => match rest.trim() {
                    "table" => format = Format::Table,
                    "csv" => format = Format::Csv,
                    "json" => format = Format::Json,
                    other => println!("unknown format `{other}`: table, csv or json"),
                },
                _ => println!("commands: \\d  \\budget  \\dry SQL  \\format table|csv|json  \\q"),
            }
            continue;
        }
        if !statement.is_empty() {
            statement.push('\n');
        }
        statement.push_str(&line);
        if !trimmed.ends_with(';') {
            continue;
        }
        let _ = editor.add_history_entry(statement.as_str());
        let sql = statement.trim().trim_end_matches(';').to_owned();
        statement.clear();
        match client.query(&sql).await {
            Ok(fetched) => print!("{}", output::render(&fetched, format)?),
            Err(e) => {
                crate::operator::refused(&e);
            }
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // The history holds query texts: readable by their owner only.
        if editor.save_history(h).is_ok() {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o600));
        }
    }
    Ok(exit::OK)
}
