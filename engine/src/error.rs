//! The engine's one error type, grouped by who is at fault.
//!
//! Messages name the rule, the column and a fix, never a cell value. Anything
//! that can depend on data becomes [`EngineError::ExecutionFailed`], which
//! carries no detail at all.

use std::fmt;

/// A policy or language rule a query broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// Only one SELECT statement is accepted.
    SingleSelect,
    /// The query text is too large or too deeply nested.
    QueryTooComplex,
    /// The SQL does not parse or does not plan.
    InvalidSql,
    /// A private column's value would appear in the output.
    ProjectPrivateColumn,
    /// GROUP BY an identifier column.
    GroupByIdentifier,
    /// A column is used in a way its grant does not allow.
    ColumnUseNotGranted,
    /// A column is not visible to the operator at all.
    ColumnNotGranted,
    /// The aggregate function is not allowed or not supported.
    AggregateNotAllowed,
    /// A GROUP BY column has no declared public domain.
    GroupKeyWithoutDomain,
    /// The query shape is not supported (yet).
    UnsupportedShape,
    /// Tables are combined in a way that cannot bound a unit's contribution.
    JoinNotAllowed,
    /// The query touches no private data but needs no DP; still governed.
    ResultTooLarge,
}

impl Rule {
    /// Stable code shown to operators and recorded in audit entries.
    pub fn code(self) -> &'static str {
        match self {
            Rule::SingleSelect => "SINGLE_SELECT",
            Rule::QueryTooComplex => "QUERY_TOO_COMPLEX",
            Rule::InvalidSql => "INVALID_SQL",
            Rule::ProjectPrivateColumn => "PROJECT_PRIVATE_COLUMN",
            Rule::GroupByIdentifier => "GROUP_BY_IDENTIFIER",
            Rule::ColumnUseNotGranted => "COLUMN_USE_NOT_GRANTED",
            Rule::ColumnNotGranted => "COLUMN_NOT_GRANTED",
            Rule::AggregateNotAllowed => "AGGREGATE_NOT_ALLOWED",
            Rule::GroupKeyWithoutDomain => "GROUP_KEY_WITHOUT_DOMAIN",
            Rule::UnsupportedShape => "UNSUPPORTED_SHAPE",
            Rule::JoinNotAllowed => "JOIN_NOT_ALLOWED",
            Rule::ResultTooLarge => "RESULT_TOO_LARGE",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Everything that can stop a query.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The operator's query breaks a rule; decided before any data is read.
    #[error("[{rule}] {message}")]
    Rejected {
        /// The rule.
        rule: Rule,
        /// What is wrong and how to fix it; names columns, never values.
        message: String,
    },
    /// No grant covers the query.
    #[error("[NO_GRANT] {0}")]
    NoGrant(#[from] veil_policy::GrantRefusal),
    /// The grant's privacy budget cannot pay for the query.
    #[error(
        "[BUDGET_EXHAUSTED] {owner} cannot pay {cost} {unit}: {remaining} {unit} of {budget} remain; the budget is kept, ask the data owner for more or wait for the window to refresh"
    )]
    BudgetExhausted {
        /// Whose budget: ``grant `G` `` or ``the global budget of dataset `D` ``.
        owner: String,
        /// Cost of the query.
        cost: f64,
        /// Remaining budget.
        remaining: f64,
        /// Total budget.
        budget: f64,
        /// `epsilon` or `rho`.
        unit: &'static str,
    },
    /// Execution failed; the reason may depend on data, so none is given.
    #[error(
        "[EXECUTION_FAILED] the query could not be executed; its charge stands (request {request})"
    )]
    ExecutionFailed {
        /// Correlation id for the server log.
        request: String,
    },
    /// The server's environment failed (ledger, files); data-independent.
    #[error("[UNAVAILABLE] {0}")]
    Unavailable(String),
    /// A bug in veil.
    #[error("[INTERNAL] {0}")]
    Internal(String),
}

impl EngineError {
    /// A store the engine cannot record in (`what`: the ledger or the audit
    /// log), which admits nothing until it is fixed: fail closed.
    pub fn closed(what: &str, why: impl std::fmt::Display) -> EngineError {
        EngineError::Unavailable(format!(
            "{what}: {why}; no query is admitted until it is fixed"
        ))
    }

    /// Shorthand for a rejection.
    pub fn rejected(rule: Rule, message: impl Into<String>) -> Self {
        EngineError::Rejected {
            rule,
            message: message.into(),
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Rejected { rule, .. } => rule.code(),
            EngineError::NoGrant(_) => "NO_GRANT",
            EngineError::BudgetExhausted { .. } => "BUDGET_EXHAUSTED",
            EngineError::ExecutionFailed { .. } => "EXECUTION_FAILED",
            EngineError::Unavailable(_) => "UNAVAILABLE",
            EngineError::Internal(_) => "INTERNAL",
        }
    }
}

/// Result alias.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
