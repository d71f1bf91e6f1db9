//! The operator's commands: `veil login`, `catalog`, `grants`, `budget`,
//! `query`. Each returns the process exit code (see [`crate::exit`]).

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use datafusion::arrow::datatypes::Schema;
use veil_engine::listing::keys;

use crate::client::{self, CallError, Client};
use crate::exit;
use crate::output::{self, Format};
use crate::session::{self, Login, Target};

/// Reports a failed call on standard error; returns its exit code.
pub fn refused(e: &CallError) -> u8 {
    eprintln!("refused ({:?}): {}", e.code, e.message);
    exit::of(e.code)
}

/// A client authenticated as the target says.
async fn connect(target: &Target) -> Result<Client, CallError> {
    Client::connect_target(target).await.map_err(|e| CallError {
        code: tonic::Code::Unavailable,
        message: format!("{e:#}"),
    })
}

/// `veil login`: checks the credentials with a handshake and stores the
/// session token.
pub async fn login(
    endpoint: &str,
    operator: &str,
    token: &str,
    ca_cert: Option<&std::path::Path>,
) -> Result<u8> {
    let ca_cert = ca_cert.map(std::fs::canonicalize).transpose()?;
    let tls = match &ca_cert {
        Some(p) => Some(crate::client::Tls {
            ca_pem: Some(std::fs::read(p)?),
            identity: None,
        }),
        None => None,
    };
    let mut c = match Client::connect_with(endpoint, tls.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(exit::UNAVAILABLE);
        }
    };
    let expires = match c.login(operator, token).await {
        Ok(expires) => expires,
        Err(e) => return Ok(refused(&e)),
    };
    let session = c.token().unwrap_or_default().to_owned();
    let path = session::save(&Login {
        endpoint: endpoint.to_owned(),
        operator: operator.to_owned(),
        token: session,
        expires: expires.clone(),
        ca_cert,
    })?;
    println!(
        "logged in to {endpoint} as {operator}{}; saved to {}",
        expires.map(|e| format!(" until {e}")).unwrap_or_default(),
        path.display()
    );
    Ok(exit::OK)
}

/// Renders the catalog an operator may use.
pub fn render_catalog(tables: &[(String, Schema)]) -> String {
    let mut out = String::new();
    if tables.is_empty() {
        let _ = writeln!(
            out,
            "no dataset: none of your grants is in force (see `veil grants`)"
        );
    }
    for (id, schema) in tables {
        let md = schema.metadata();
        let get = |k: &str| md.get(k).map(String::as_str).unwrap_or("");
        let _ = writeln!(
            out,
            "{id}  {}  [{}{}] grants {}",
            get(keys::NAME),
            get(keys::LEVEL),
            if get(keys::PUBLIC) == "true" {
                ", public: exact answers"
            } else {
                ", differential privacy"
            },
            get(keys::GRANTS),
        );
        if let Some(f) = md.get(keys::ROW_FILTER) {
            let _ = writeln!(out, "  every query is filtered by: {f}");
        }
        for field in schema.fields() {
            let fm = field.metadata();
            let fget = |k: &str| fm.get(k).map(String::as_str);
            let mut notes = Vec::new();
            if md.get(keys::UNIT) == Some(field.name()) {
                notes.push("privacy unit: COUNT(DISTINCT) only".to_owned());
            }
            if let Some(b) = fget(keys::BOUNDS) {
                notes.push(format!("bounds [{}]", b.replace(',', ", ")));
            }
            if let Some(d) = fget(keys::DOMAIN_SIZE) {
                notes.push(format!("{d} public keys"));
            }
            if let Some(w) = fget(keys::BUCKET) {
                notes.push(format!("buckets of {w}"));
            }
            let _ = writeln!(
                out,
                "  {:<20} {:<10} {:<6} {:<40} {}",
                field.name(),
                field.data_type().to_string(),
                fget(keys::LEVEL).unwrap_or(""),
                fget(keys::USES).unwrap_or("").replace(',', " "),
                notes.join(" · ")
            );
        }
    }
    out
}

/// `veil catalog`.
pub async fn catalog(target: &Target) -> Result<u8> {
    let tables = match connect(target).await {
        Ok(mut c) => c.tables().await,
        Err(e) => Err(e),
    };
    match tables {
        Ok(t) => {
            print!("{}", render_catalog(&t));
            Ok(exit::OK)
        }
        Err(e) => Ok(refused(&e)),
    }
}

/// `veil grants`.
pub async fn grants(target: &Target) -> Result<u8> {
    let r = match client::grants(target).await {
        Ok(r) => r,
        Err(e) => return Ok(refused(&e)),
    };
    let mut out = String::new();
    for g in &r.grants {
        let _ = writeln!(
            out,
            "grant {}  {}  purpose {}{}",
            g.id,
            g.channel,
            g.purpose,
            g.purpose_detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  valid {} … {}{}{}",
            g.valid_from,
            g.valid_until,
            if g.in_force { "" } else { "  — NOT IN FORCE" },
            g.hours
                .as_ref()
                .map(|h| format!(", daily {h}"))
                .unwrap_or_default()
        );
        if let Some(dp) = &g.dp {
            let _ = writeln!(
                out,
                "  budget {} {} total, at most {} per query{}",
                dp.budget,
                dp.accounting,
                dp.per_query_max,
                dp.window
                    .as_ref()
                    .map(|w| format!(", refreshed every {w}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "  limits: min group {}, at most {} rows{}{}; pricing: {}",
            g.min_group_size,
            g.max_result_rows,
            g.max_queries_per_day
                .map(|n| format!(", {n} queries a day"))
                .unwrap_or_default(),
            if g.aggregate_functions.is_empty() {
                String::new()
            } else {
                format!(", aggregates {}", g.aggregate_functions.join(" "))
            },
            g.pricing
        );
        for s in &g.scopes {
            let _ = writeln!(
                out,
                "  {}{}",
                s.dataset,
                s.row_filter
                    .as_ref()
                    .map(|f| format!("  (filtered by {f})"))
                    .unwrap_or_default()
            );
            for c in &s.columns {
                let _ = writeln!(out, "    {:<20} {}", c.name, c.uses.join(" "));
            }
        }
    }
    print!("{out}");
    Ok(exit::OK)
}

/// `veil budget` for an operator.
pub async fn budget(target: &Target) -> Result<u8> {
    let budget = match client::budget(target).await {
        Ok(b) => b,
        Err(e) => return Ok(refused(&e)),
    };
    println!("operator {}", budget.operator_id);
    for g in budget.grants {
        println!(
            "  grant {:<14} {:>12.6} of {:>12.6} {} remaining{}",
            g.grant_id,
            g.remaining,
            g.total,
            g.unit,
            g.refreshes
                .map(|t| format!(", refreshes {t}"))
                .unwrap_or_default()
        );
    }
    Ok(exit::OK)
}

/// What `veil query` was asked.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// The statement.
    pub sql: String,
    /// Output format.
    pub format: Format,
    /// Output file (standard output when absent).
    pub out: Option<PathBuf>,
    /// Cost and accuracy only.
    pub dry_run: bool,
    /// Client-chosen request id.
    pub request_id: Option<String>,
}

/// `veil query`.
pub async fn query(target: &Target, o: &QueryOptions) -> Result<u8> {
    if o.dry_run {
        return Ok(match client::estimate(target, &o.sql).await {
            Ok(e) => {
                print!("{}", output::render_estimate(&e));
                exit::OK
            }
            Err(e) => refused(&e),
        });
    }
    let mut c = match connect(target).await {
        Ok(c) => c,
        Err(e) => return Ok(refused(&e)),
    };
    if let Some(id) = &o.request_id {
        c.with_request_id(id);
    }
    // A spinner while the server answers, a bar while rows stream in: on
    // standard error, and only on a terminal.
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner().with_message("waiting for the server");
        b.enable_steady_tick(Duration::from_millis(100));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress_bar = bar.clone();
    let mut progress = move |rows: u64, total: Option<u64>| {
        if let Some(t) = total
            && progress_bar.length().is_none()
        {
            progress_bar.set_length(t);
            progress_bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        }
        progress_bar.set_position(rows);
    };
    let answer = c.query_with_progress(&o.sql, &mut progress).await;
    bar.finish_and_clear();
    match answer {
        Ok(fetched) => {
            output::write(&fetched, o.format, o.out.as_deref())?;
            if let Some(path) = &o.out {
                eprintln!(
                    "wrote {} rows to {}{}",
                    fetched.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
                    path.display(),
                    if o.format == Format::Table {
                        String::new()
                    } else {
                        format!(" (metadata in {})", output::sidecar_path(path).display())
                    }
                );
            }
            Ok(exit::OK)
        }
        Err(e) => Ok(refused(&e)),
    }
}
