//! The sqllogictest corpus (`tests/slt/*.slt`): every accepted query shape and
//! every rejection rule, run through the engine.
//!
//! Conventions of the corpus:
//! - `statement ok` of `SET veil.operator = '<id>'` picks the operator for
//!   the following records (default `op-univ-07`); nothing else is a
//!   statement.
//! - Group keys and public (exact) results print as values; every noisy cell,
//!   and everything computed from one, prints as `~`.
//! - Refusals print as `[RULE_CODE] message`, so `statement error` and
//!   `query error` match the rule code.
//!
//! Each file runs on a fresh engine over the generated example data with the
//! example policy, budgets raised so a file never runs out and op-univ-07's
//! answers capped at 100 rows. Every column of every private answer must be
//! labelled as a group key, a noisy aggregate or post-processing of them.

use std::sync::Arc;

use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Runner};
use veil_engine::broker::Engine;
use veil_engine::meta;

use crate::support::*;

#[path = "../slt/corpus.rs"]
mod corpus;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

struct Veil {
    engine: Arc<Engine>,
    operator: String,
}

#[async_trait::async_trait]
impl AsyncDB for Veil {
    type Error = Refused;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, Refused> {
        if let Some(op) = corpus::operator_switch(sql) {
            self.operator = op;
            return Ok(DBOutput::StatementComplete(0));
        }
        let answer = self
            .engine
            .run(&self.operator, sql, chrono::Utc::now().fixed_offset())
            .await
            .map_err(|e| Refused(e.to_string()))?;
        let private = answer.schema.metadata().contains_key(meta::UNIT);
        // Every column of a private answer says where it comes from: a group
        // key, a noisy aggregate (its mechanism), or post-processing of them.
        for f in answer.schema.fields() {
            let md = f.metadata();
            assert!(
                !private || md.contains_key(meta::KEYS) || md.contains_key(meta::MECHANISM),
                "unlabelled column `{}` in {sql}",
                f.name()
            );
        }
        let exact: Vec<bool> = answer
            .schema
            .fields()
            .iter()
            .map(|f| !private || f.metadata().contains_key(meta::KEYS))
            .collect();
        let mut rows = Vec::new();
        for batch in &answer.batches {
            let options = FormatOptions::default().with_null("NULL");
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Refused(e.to_string()))?;
            for r in 0..batch.num_rows() {
                rows.push(
                    formatters
                        .iter()
                        .zip(&exact)
                        .map(|(f, exact)| {
                            if *exact {
                                f.value(r).to_string()
                            } else {
                                "~".to_owned()
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; answer.schema.fields().len()],
            rows,
        })
    }

    async fn shutdown(&mut self) {}
}

/// Every statement and query of the corpus (refused ones included), with
/// the operator it runs as.
pub(crate) fn corpus_sql() -> Vec<(String, String)> {
    use sqllogictest::Record;
    let mut out = Vec::new();
    for file in corpus::files() {
        let mut operator = "op-univ-07".to_owned();
        for record in sqllogictest::parse_file::<DefaultColumnType>(&file).expect("slt") {
            let sql = match record {
                Record::Statement { sql, .. } | Record::Query { sql, .. } => sql,
                _ => continue,
            };
            match corpus::operator_switch(&sql) {
                Some(op) => operator = op,
                None => out.push((operator.clone(), sql)),
            }
        }
    }
    out
}

/// The example policy with every grant's budget raised, and op-univ-07's
/// answers capped at 100 rows.
pub(crate) fn corpus_policy() -> String {
    let mut out = String::new();
    for line in example_policy().lines() {
        if line.starts_with("  budget = ") {
            out.push_str("  budget = 100000.0");
        } else if line.starts_with("budget = {") {
            // Dataset budgets too.
            out.push_str("budget = { accounting = \"rho\", total = 100000.0 }");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    let capped = out.replacen(
        "  [grant.limits]\n  agg_functions = [\"COUNT\", \"SUM\", \"AVG\", \"VAR_POP\"",
        "  [grant.limits]\n  max_result_rows = 100\n  agg_functions = [\"COUNT\", \"SUM\", \"AVG\", \"VAR_POP\"",
        1,
    );
    assert_ne!(capped, out, "the example policy changed");
    capped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slt_corpus_passes() {
    let files = corpus::files();
    assert!(files.len() >= 4, "the corpus is missing: {files:?}");
    for file in files {
        let f = Fixture::with_policy(&corpus_policy(), |_| {}).await;
        let engine = f.engine.clone();
        let mut runner = Runner::new(move || {
            let engine = engine.clone();
            async move {
                Ok(Veil {
                    engine,
                    operator: "op-univ-07".to_owned(),
                })
            }
        });
        if let Err(e) = runner.run_file_async(&file).await {
            panic!("{}:\n{}", file.display(), e.display(true));
        }
    }
}
