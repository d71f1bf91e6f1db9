//! How answers are shown and saved: aligned tables with ± intervals for
//! people; CSV, JSON lines, Parquet and Arrow IPC for programs, with the
//! accuracy and budget metadata kept (in the file's schema where the format
//! has one, and in a `<file>.meta.json` sidecar).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use veil_engine::meta;

use crate::client::Fetched;

/// Output formats of `veil query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table, values with ± 95% intervals, and a footer with the
    /// cost, remaining budget, τ and suppressed groups.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per row.
    Json,
    /// Apache Parquet; veil's metadata stays in the file's Arrow schema.
    Parquet,
    /// Arrow IPC file; veil's metadata stays in its schema.
    Arrow,
}

impl Format {
    /// Binary formats are not written to a terminal.
    fn is_binary(self) -> bool {
        matches!(self, Format::Parquet | Format::Arrow)
    }
}

/// Encodes a result in a format.
pub fn encode(f: &Fetched, format: Format) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Table => out = render_table(f)?.into_bytes(),
        Format::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in &f.batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
            let refs: Vec<&RecordBatch> = f.batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
        }
        Format::Parquet => {
            let mut w =
                datafusion::parquet::arrow::ArrowWriter::try_new(&mut out, f.schema.clone(), None)?;
            for b in &f.batches {
                w.write(b)?;
            }
            w.close()?;
        }
        Format::Arrow => {
            let mut w = datafusion::arrow::ipc::writer::FileWriter::try_new(&mut out, &f.schema)?;
            for b in &f.batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(out)
}

/// Renders a result for a terminal (the table format).
pub fn render(f: &Fetched, format: Format) -> Result<String> {
    Ok(String::from_utf8(encode(f, format)?)?)
}

/// The sidecar of a machine-format file: `<file>.meta.json`.
pub fn sidecar_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".meta.json");
    PathBuf::from(name)
}

/// veil's metadata of an answer as JSON: the schema's (cost, budget,
/// threshold, audit receipt) and each column's (mechanism, scale, interval).
pub fn metadata_json(f: &Fetched) -> serde_json::Value {
    let columns: serde_json::Map<String, serde_json::Value> = f
        .schema
        .fields()
        .iter()
        .map(|field| {
            (
                field.name().clone(),
                serde_json::json!({
                    "type": field.data_type().to_string(),
                    "metadata": field.metadata(),
                }),
            )
        })
        .collect();
    serde_json::json!({
        "rows": f.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        "metadata": f.schema.metadata(),
        "columns": columns,
    })
}

/// Writes a result to `out` (standard output when `None`), with the
/// metadata sidecar beside every file in a machine format.
pub fn write(f: &Fetched, format: Format, out: Option<&Path>) -> Result<()> {
    let bytes = encode(f, format)?;
    match out {
        Some(path) => {
            std::fs::write(path, &bytes)?;
            if format != Format::Table {
                std::fs::write(
                    sidecar_path(path),
                    serde_json::to_vec_pretty(&metadata_json(f))?,
                )?;
            }
        }
        None => {
            if format.is_binary() && std::io::stdout().is_terminal() {
                bail!("{format:?} output is binary: write it to a file with -o FILE");
            }
            use std::io::Write as _;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

fn render_table(f: &Fetched) -> Result<String> {
    let schema = &f.schema;
    let headers: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let half_widths: Vec<Option<f64>> = schema
        .fields()
        .iter()
        .map(|f| f.metadata().get(meta::CI95).and_then(|v| v.parse().ok()))
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let options = FormatOptions::default().with_null("NULL");
    for batch in &f.batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<_, _>>()?;
        for r in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .enumerate()
                    .map(|(i, fmt)| {
                        let mut v = fmt.value(r).to_string();
                        if let Ok(x) = v.parse::<f64>()
                            && batch.column(i).data_type().is_floating()
                        {
                            v = format!("{x:.2}");
                        }
                        match half_widths[i] {
                            Some(h) if !batch.column(i).is_null(r) => format!("{v} ± {}", short(h)),
                            _ => v,
                        }
                    })
                    .collect(),
            );
        }
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| display_width(&r[i]))
                .chain(std::iter::once(display_width(&headers[i])))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - display_width(c))))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  "));
    };
    line(&headers, &mut out);
    line(
        &widths.iter().map(|w| "─".repeat(*w)).collect::<Vec<_>>(),
        &mut out,
    );
    for r in &rows {
        line(r, &mut out);
    }
    let md: &HashMap<String, String> = schema.metadata();
    if let (Some(cost), Some(unit)) = (md.get(meta::COST), md.get(meta::UNIT)) {
        let _ = writeln!(
            out,
            "  {} rows · cost {cost} {unit} · remaining {} of {} · grant {}",
            rows.len(),
            md.get(meta::REMAINING).map(String::as_str).unwrap_or("?"),
            md.get(meta::TOTAL).map(String::as_str).unwrap_or("?"),
            md.get(meta::GRANT).map(String::as_str).unwrap_or("?"),
        );
        if let Some(t) = md.get(meta::THRESHOLD) {
            let _ = writeln!(
                out,
                "  groups chosen by DP partition selection: noisy distinct units ≥ {t} (τ = {}); about {} groups suppressed{}",
                md.get(meta::TAU).map(String::as_str).unwrap_or("?"),
                md.get(meta::SUPPRESSED).map(String::as_str).unwrap_or("?"),
                if md.get(meta::TRUNCATED).is_some_and(|t| t == "true") {
                    "; more groups passed than the grant's row cap and were left out"
                } else {
                    ""
                }
            );
        }
        let clamped: Vec<String> = schema
            .fields()
            .iter()
            .filter_map(|f| {
                let n = f.metadata().get(meta::CLAMPED)?;
                let what = f.metadata().get(meta::AGGREGATE).unwrap_or(f.name());
                Some(format!("{what} ≈ {n}"))
            })
            .collect();
        if !clamped.is_empty() {
            let _ = writeln!(
                out,
                "  values outside the declared bounds, clamped (noisy): {}",
                clamped.join(", ")
            );
        }
        let _ = writeln!(out, "  ± is the half-width of a 95% interval of the noise");
    } else {
        let _ = writeln!(
            out,
            "  {} rows · public data, no budget charged",
            rows.len()
        );
    }
    Ok(out)
}

fn short(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Terminal width of a string: CJK characters take two columns.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            if ('\u{1100}'..='\u{FFDC}').contains(&c)
                && !c.is_ascii()
                && c != '±'
                && c != '─'
                && c != '·'
            {
                2
            } else {
                1
            }
        })
        .sum()
}

/// Renders a dry run for people.
pub fn render_estimate(e: &veil_proto::v1::CostEstimate) -> String {
    let mut out = String::new();
    if e.unit.is_empty() {
        let _ = writeln!(
            out,
            "dry run: public data under grant {}: exact answer, no budget charged",
            e.grant_id
        );
        return out;
    }
    let _ = writeln!(
        out,
        "dry run: grant {} would charge {:.6} {} ({:.6} remaining){}{}",
        e.grant_id,
        e.cost,
        e.unit,
        e.remaining,
        e.rows.map(|r| format!("; {r} rows")).unwrap_or_default(),
        if e.exceeds_budget {
            " — REFUSED: not enough budget"
        } else {
            ""
        }
    );
    for w in &e.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    if let Some(t) = e.selection_threshold {
        let _ = writeln!(
            out,
            "  keys without a public domain: only groups whose noisy distinct-unit count reaches {t} are released"
        );
    }
    for a in &e.aggregates {
        match a.half_width_95 {
            Some(h) => {
                let _ = writeln!(
                    out,
                    "  {:<16} {:<22} {:<18} scale {:<12.4} ± {:.4} (95%)",
                    a.column, a.aggregate, a.mechanism, a.scale, h
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {:<16} {:<22} {:<18} interval known only after the release",
                    a.column, a.aggregate, a.mechanism
                );
            }
        }
    }
    out
}
