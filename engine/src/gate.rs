//! The SQL gate: what reaches DataFusion's planner at all.
//!
//! Before planning, a query must be small, parse as exactly one `SELECT`, stay
//! within a nesting depth (enforced by the parser's recursion limit) and a node
//! budget, and contain no recursive CTE. Every decision here depends on the
//! text alone.

use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{self, SetExpr, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{EngineError, Result, Rule};

/// Largest accepted query text, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 * 1024;
/// Deepest accepted nesting, as counted by the parser.
pub const MAX_DEPTH: usize = 64;
/// Most tokens (words, literals, operators) accepted in one query; this also
/// bounds the size of every tree built from it, flat OR chains included.
pub const MAX_TOKENS: usize = 8_192;

/// A statement that passed the gate.
#[derive(Debug, Clone)]
pub struct GatedQuery(pub(crate) DfStatement);

/// Checks the text and AST of a query.
pub fn gate(sql: &str) -> Result<GatedQuery> {
    if sql.len() > MAX_QUERY_BYTES {
        return Err(EngineError::rejected(
            Rule::QueryTooComplex,
            format!(
                "the query text is {} bytes; the limit is {MAX_QUERY_BYTES}",
                sql.len()
            ),
        ));
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql).tokenize().map_err(|e| {
        EngineError::rejected(Rule::InvalidSql, format!("the query does not parse: {e}"))
    })?;
    let significant = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if significant > MAX_TOKENS {
        return Err(EngineError::rejected(
            Rule::QueryTooComplex,
            format!("the query has {significant} tokens; the limit is {MAX_TOKENS}"),
        ));
    }
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&dialect)
        .with_recursion_limit(MAX_DEPTH)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("recursion") {
                EngineError::rejected(
                    Rule::QueryTooComplex,
                    format!("the query nests deeper than {MAX_DEPTH} levels"),
                )
            } else {
                EngineError::rejected(
                    Rule::InvalidSql,
                    format!("the query does not parse: {text}"),
                )
            }
        })?;
    if statements.len() != 1 {
        return Err(EngineError::rejected(
            Rule::SingleSelect,
            format!(
                "send exactly one SELECT statement; this text has {}",
                statements.len()
            ),
        ));
    }
    let Some(statement) = statements.pop_front() else {
        return Err(EngineError::Internal("parser returned no statement".into()));
    };
    let query = match &statement {
        DfStatement::Statement(s) => match s.as_ref() {
            Statement::Query(q) => q.clone(),
            other => return Err(not_a_select(statement_kind(other))),
        },
        DfStatement::CreateExternalTable(_) => return Err(not_a_select("CREATE EXTERNAL TABLE")),
        DfStatement::CopyTo(_) => return Err(not_a_select("COPY")),
        DfStatement::Explain(_) => return Err(not_a_select("EXPLAIN")),
        DfStatement::Reset(_) => return Err(not_a_select("RESET")),
    };
    check_query(&query)?;
    Ok(GatedQuery(statement))
}

fn check_query(q: &ast::Query) -> Result<()> {
    if let Some(with) = &q.with
        && with.recursive
    {
        return Err(EngineError::rejected(
            Rule::UnsupportedShape,
            "recursive CTEs (WITH RECURSIVE) are not accepted",
        ));
    }
    match q.body.as_ref() {
        SetExpr::Select(_) | SetExpr::Query(_) | SetExpr::SetOperation { .. } => Ok(()),
        SetExpr::Values(_) => Err(not_a_select("VALUES")),
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
            Err(not_a_select("a data modification"))
        }
        SetExpr::Table(_) => Err(not_a_select("TABLE")),
    }
}

fn statement_kind(s: &Statement) -> &'static str {
    match s {
        Statement::Explain { .. } | Statement::ExplainTable { .. } => "EXPLAIN/DESCRIBE",
        Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_) => {
            "a data modification"
        }
        Statement::Copy { .. } => "COPY",
        Statement::Set(_) => "SET",
        Statement::Prepare { .. } | Statement::Execute { .. } => "PREPARE/EXECUTE",
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. } => "SHOW",
        _ => "a statement other than SELECT",
    }
}

fn not_a_select(what: &str) -> EngineError {
    EngineError::rejected(
        Rule::SingleSelect,
        format!("{what} is not accepted; veil answers a single SELECT with aggregates"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(sql: &str) -> Option<Rule> {
        match gate(sql) {
            Err(EngineError::Rejected { rule, .. }) => Some(rule),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn one_select_passes() {
        assert_eq!(rule_of("SELECT COUNT(*) FROM pop.residents"), None);
    }

    #[test]
    fn everything_but_one_select_is_rejected() {
        for sql in [
            "SELECT 1; SELECT 2",
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "EXPLAIN ANALYZE SELECT COUNT(*) FROM pop.residents",
            "SET datafusion.execution.batch_size = 1",
            "INSERT INTO t VALUES (1)",
            "DROP TABLE pop.residents",
            "VALUES (1)",
            "DESCRIBE pop.residents",
            "PREPARE p AS SELECT 1",
            "",
        ] {
            assert_eq!(rule_of(sql), Some(Rule::SingleSelect), "{sql}");
        }
    }

    #[test]
    fn oversized_and_deep_queries_are_rejected() {
        let big = format!("SELECT {} FROM t", "1+".repeat(MAX_QUERY_BYTES));
        assert_eq!(rule_of(&big), Some(Rule::QueryTooComplex));
        let deep = format!("SELECT {}1{} FROM t", "(".repeat(200), ")".repeat(200));
        assert_eq!(rule_of(&deep), Some(Rule::QueryTooComplex));
        let wide = format!(
            "SELECT COUNT(*) FROM t WHERE {}",
            vec!["a = 1"; 5000].join(" OR ")
        );
        assert!(matches!(rule_of(&wide), Some(Rule::QueryTooComplex)));
    }

    #[test]
    fn recursive_ctes_are_rejected() {
        assert_eq!(
            rule_of("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT 1 FROM r) SELECT * FROM r"),
            Some(Rule::UnsupportedShape)
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The gate answers every input with a decision, never a panic.
        #[test]
        fn any_text_gets_a_decision(sql in ".{0,400}") {
            let _ = gate(&sql);
        }

        /// SQL-shaped noise too.
        #[test]
        fn sql_shaped_text_gets_a_decision(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("SELECT"), Just("FROM"), Just("WHERE"), Just("("), Just(")"), Just(","),
                    Just("COUNT(*)"), Just("pop.residents"), Just("AND"), Just("OR"), Just(";"),
                    Just("WITH"), Just("RECURSIVE"), Just("UNION"), Just("'x'"), Just("1"), Just("GROUP BY"),
                ],
                0..60,
            )
        ) {
            let _ = gate(&parts.join(" "));
        }
    }
}
