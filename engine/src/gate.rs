//! The SQL gate: what reaches DataFusion's planner at all.
//!
//! Before planning, a query must be small, parse as exactly one `SELECT`, stay
//! within a nesting depth (enforced by the parser's recursion limit) and a node
//! budget, and contain no recursive CTE. Every decision here depends on the
//! text alone.

use datafusion::common::ScalarValue;
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{self, SetExpr, Statement};
use datafusion::sql::sqlparser::ast::{visit_expressions, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use std::ops::ControlFlow;

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

/// Refuses a query text longer than [`MAX_QUERY_BYTES`].
pub fn check_size(sql: &str) -> Result<()> {
    if sql.len() > MAX_QUERY_BYTES {
        return Err(EngineError::rejected(
            Rule::QueryTooComplex,
            format!(
                "the query text is {} bytes; the limit is {MAX_QUERY_BYTES}",
                sql.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the text and AST of a query.
pub fn gate(sql: &str) -> Result<GatedQuery> {
    check_size(sql)?;
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

/// Binds a prepared statement's parameters: every placeholder (`?` in
/// order, or `$1`, `$2`, …) of `sql` becomes the literal of its value, in
/// the syntax tree, never by pasting text. The result is ordinary SQL that
/// then goes through [`gate`] like any statement (and is what the audit log
/// records).
pub fn bind(sql: &str, params: &[ScalarValue]) -> Result<String> {
    check_size(sql)?;
    let mut statements = Parser::new(&GenericDialect {})
        .with_recursion_limit(MAX_DEPTH)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| {
            EngineError::rejected(Rule::InvalidSql, format!("the query does not parse: {e}"))
        })?;
    let mut positional = 0usize;
    let mut used = vec![false; params.len()];
    let outcome = visit_expressions_mut(&mut statements, |expr| {
        let ast::Expr::Value(v) = expr else {
            return ControlFlow::Continue(());
        };
        let ast::Value::Placeholder(name) = &v.value else {
            return ControlFlow::Continue(());
        };
        let index = if name == "?" {
            positional += 1;
            positional - 1
        } else {
            match name.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n >= 1 => n - 1,
                _ => {
                    return ControlFlow::Break(EngineError::rejected(
                        Rule::InvalidSql,
                        format!("placeholder `{name}` is not supported; use `?` or `$1`, `$2`, …"),
                    ));
                }
            }
        };
        let Some(value) = params.get(index) else {
            return ControlFlow::Break(EngineError::rejected(
                Rule::InvalidSql,
                format!(
                    "the statement uses parameter {} but {} were bound",
                    index + 1,
                    params.len()
                ),
            ));
        };
        used[index] = true;
        match literal(value) {
            Ok(e) => {
                *expr = e;
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(e),
        }
    });
    if let ControlFlow::Break(e) = outcome {
        return Err(e);
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        return Err(EngineError::rejected(
            Rule::InvalidSql,
            format!(
                "{} parameters were bound but the statement does not use parameter {}",
                params.len(),
                unused + 1
            ),
        ));
    }
    // Nothing bound: the text stays exactly as the operator wrote it.
    if used.is_empty() {
        return Ok(sql.to_owned());
    }
    Ok(statements
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("; "))
}

/// How many distinct parameters a statement takes (`?` each count, `$n`
/// count up to the largest n); 0 for text that does not parse.
pub fn parameter_count(sql: &str) -> usize {
    let Ok(statements) = Parser::new(&GenericDialect {})
        .with_recursion_limit(MAX_DEPTH)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
    else {
        return 0;
    };
    let (mut positional, mut numbered) = (0usize, 0usize);
    let _ = visit_expressions(&statements, |e| {
        if let ast::Expr::Value(v) = e
            && let ast::Value::Placeholder(name) = &v.value
        {
            match name.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => numbered = numbered.max(n),
                None => positional += 1,
            }
        }
        ControlFlow::<()>::Continue(())
    });
    positional.max(numbered)
}

/// The SQL literal of a parameter value.
fn literal(value: &ScalarValue) -> Result<ast::Expr> {
    use ast::Value as V;
    // A negative number is parenthesized: after a unary minus in the
    // statement (`-?`), `-5` would otherwise print as `--5`, a comment.
    let number = |s: String| {
        let n = ast::Expr::value(V::Number(s.clone(), false));
        Ok(if s.starts_with('-') {
            ast::Expr::Nested(Box::new(n))
        } else {
            n
        })
    };
    let date = |days: i64| {
        let text = i32::try_from(days)
            .ok()
            .and_then(|d| chrono::NaiveDate::from_num_days_from_ce_opt(d.checked_add(719_163)?))
            .map(|d| d.format("%Y-%m-%d").to_string())
            .ok_or_else(|| {
                EngineError::rejected(Rule::InvalidSql, "a date parameter is out of range")
            })?;
        Ok(ast::Expr::TypedString(ast::TypedString {
            data_type: ast::DataType::Date,
            value: V::SingleQuotedString(text).with_empty_span(),
            uses_odbc_syntax: false,
        }))
    };
    match value {
        v if v.is_null() => Ok(ast::Expr::value(V::Null)),
        ScalarValue::Boolean(Some(b)) => Ok(ast::Expr::value(V::Boolean(*b))),
        ScalarValue::Int8(Some(i)) => number(i.to_string()),
        ScalarValue::Int16(Some(i)) => number(i.to_string()),
        ScalarValue::Int32(Some(i)) => number(i.to_string()),
        ScalarValue::Int64(Some(i)) => number(i.to_string()),
        ScalarValue::UInt8(Some(i)) => number(i.to_string()),
        ScalarValue::UInt16(Some(i)) => number(i.to_string()),
        ScalarValue::UInt32(Some(i)) => number(i.to_string()),
        ScalarValue::UInt64(Some(i)) => number(i.to_string()),
        ScalarValue::Float32(Some(x)) if x.is_finite() => number(format!("{x:?}")),
        ScalarValue::Float64(Some(x)) if x.is_finite() => number(format!("{x:?}")),
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Ok(ast::Expr::value(V::SingleQuotedString(s.clone()))),
        ScalarValue::Date32(Some(d)) => date(i64::from(*d)),
        ScalarValue::Date64(Some(ms)) => date(ms.div_euclid(86_400_000)),
        other => Err(EngineError::rejected(
            Rule::InvalidSql,
            format!(
                "parameters of type {} are not supported; bind integers, finite floats, text, booleans or dates",
                other.data_type()
            ),
        )),
    }
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
    let placeholder = visit_expressions(q, |e| match e {
        ast::Expr::Value(v) if matches!(v.value, ast::Value::Placeholder(_)) => {
            ControlFlow::Break(v.value.to_string())
        }
        _ => ControlFlow::Continue(()),
    });
    if let ControlFlow::Break(name) = placeholder {
        return Err(EngineError::rejected(
            Rule::InvalidSql,
            format!(
                "parameter `{name}` is not bound; bind parameters through a Flight SQL prepared statement"
            ),
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
    fn parameters_bind_as_literals_in_the_tree() {
        let bound = bind(
            "SELECT COUNT(*) FROM t WHERE a >= ? AND b = ? AND c = ?",
            &[
                ScalarValue::Int64(Some(30)),
                ScalarValue::Utf8(Some("x' OR '1'='1".into())),
                ScalarValue::Float64(Some(0.1)),
            ],
        )
        .expect("binds");
        assert_eq!(
            bound,
            "SELECT COUNT(*) FROM t WHERE a >= 30 AND b = 'x'' OR ''1''=''1' AND c = 0.1"
        );
        // The quote stays inside one literal: the bound text is one SELECT
        // with the same shape.
        assert_eq!(rule_of(&bound), None);
        let numbered = bind(
            "SELECT COUNT(*) FROM t WHERE a = $2 OR b = $1 OR c = $2",
            &[
                ScalarValue::Boolean(Some(true)),
                ScalarValue::Date32(Some(0)),
            ],
        )
        .expect("binds");
        assert_eq!(
            numbered,
            "SELECT COUNT(*) FROM t WHERE a = DATE '1970-01-01' OR b = true OR c = DATE '1970-01-01'"
        );
    }

    #[test]
    fn negative_and_extreme_parameters_stay_one_literal() {
        let bound = bind(
            "SELECT COUNT(*) FROM t WHERE a = -? AND b = 1",
            &[ScalarValue::Int64(Some(-5))],
        )
        .expect("binds");
        assert_eq!(bound, "SELECT COUNT(*) FROM t WHERE a = -(-5) AND b = 1");
        assert_eq!(rule_of(&bound), None);
        let rule = |v: ScalarValue| rule_of_bind("SELECT COUNT(*) FROM t WHERE d = ?", &[v]);
        assert_eq!(
            rule(ScalarValue::Date64(Some(i64::MIN))),
            Some(Rule::InvalidSql)
        );
        assert_eq!(
            rule(ScalarValue::Date32(Some(i32::MAX))),
            Some(Rule::InvalidSql)
        );
        assert_eq!(rule(ScalarValue::Date64(Some(86_400_000))), None);
    }

    #[test]
    fn a_statement_without_parameters_keeps_its_text() {
        let sql = "select  COUNT(*) from t where note = '?'";
        assert_eq!(bind(sql, &[]).expect("binds"), sql);
        assert_eq!(
            rule_of_bind("SELECT COUNT(*) FROM t WHERE a = ?", &[]),
            Some(Rule::InvalidSql),
            "a placeholder without a value is still refused"
        );
    }

    fn rule_of_bind(sql: &str, params: &[ScalarValue]) -> Option<Rule> {
        match bind(sql, params) {
            Err(EngineError::Rejected { rule, .. }) => Some(rule),
            _ => None,
        }
    }

    #[test]
    fn parameters_are_counted() {
        assert_eq!(parameter_count("SELECT COUNT(*) FROM t"), 0);
        assert_eq!(
            parameter_count("SELECT COUNT(*) FROM t WHERE a = ? AND b = ?"),
            2
        );
        assert_eq!(
            parameter_count("SELECT COUNT(*) FROM t WHERE a = $2 OR b = $1"),
            2
        );
        assert_eq!(parameter_count("not sql ?"), 0);
    }

    #[test]
    fn parameter_mismatches_are_rejected() {
        let rule = rule_of_bind;
        let one = [ScalarValue::Int64(Some(1))];
        assert_eq!(
            rule("SELECT COUNT(*) FROM t WHERE a = ? AND b = ?", &one),
            Some(Rule::InvalidSql)
        );
        assert_eq!(rule("SELECT COUNT(*) FROM t", &one), Some(Rule::InvalidSql));
        assert_eq!(
            rule("SELECT COUNT(*) FROM t WHERE a = $0", &one),
            Some(Rule::InvalidSql)
        );
        assert_eq!(
            rule(
                "SELECT COUNT(*) FROM t WHERE a = ?",
                &[ScalarValue::Float64(Some(f64::NAN))]
            ),
            Some(Rule::InvalidSql)
        );
        assert_eq!(
            rule(
                "SELECT COUNT(*) FROM t WHERE a = ?",
                &[ScalarValue::Binary(Some(vec![1]))]
            ),
            Some(Rule::InvalidSql)
        );
        // Unbound placeholders never reach the planner.
        assert_eq!(
            rule_of("SELECT COUNT(*) FROM t WHERE a = ?"),
            Some(Rule::InvalidSql)
        );
        assert_eq!(
            rule_of("SELECT COUNT(*) FROM t WHERE a = $1"),
            Some(Rule::InvalidSql)
        );
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
