//! Predicates in total form: no value can make them fail, since whether a
//! query fails must not depend on the data. Every predicate the rewrite
//! applies to private rows (the operator's, the grant's row filters, the
//! group keys' domains) passes through [`total`].

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::functions::core::expr_fn::nullif;
use datafusion::logical_expr::expr::{Cast, TryCast};
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Operator, lit, when};
use datafusion::optimizer::analyzer::type_coercion::TypeCoercionRewriter;

use super::df;
use crate::error::{EngineError, Result, Rule};

/// The total form of a predicate: no row can make it fail, since whether a
/// query fails must not depend on the data; or a refusal, before any data is
/// read, of what has no total form.
///
/// The predicate is first coerced as DataFusion's analyzer would, so that
/// the casts coercion needs are explicit here (the executor's analyzer then
/// finds nothing left to coerce). Then every operation that DataFusion may
/// fail on a value is replaced by one that gives a value or NULL:
/// - `x / y` becomes `CASE WHEN y = -1 THEN 0 - x ELSE x / NULLIF(y, 0) END`
///   and `x % y` becomes `CASE WHEN y = -1 THEN x % 1 ELSE x % NULLIF(y, 0)
///   END`: division by zero gives NULL, and the smallest integer divided by
///   -1 wraps (as `+`, `-` and `*` do) instead of failing;
/// - decimal arithmetic (`+ - * / %`), which arrow checks for overflow, is
///   computed in `DOUBLE`;
/// - `abs(x)` of an integer becomes `CASE WHEN x < 0 THEN 0 - x ELSE x END`
///   (the smallest integer stays itself); of a decimal, it takes a `DOUBLE`;
/// - `round`, `ceil`, `floor` and `trunc` take their value as `DOUBLE` (on
///   integers and decimals they can overflow) and give back their own type
///   (`TRY_CAST`);
/// - casts, those coercion added included, become `TRY_CAST` (NULL when a
///   value does not convert).
///
/// The literals these forms add have their operand's type, so coercing the
/// result again adds no cast. Unsigned operands can be neither the smallest
/// integer nor -1: their division keeps only the zero guard. Refused
/// ([`refuse_partial`]): arithmetic on dates and times, conversions of them
/// that fail even in `TRY_CAST`, `||` over values, patterns that are no
/// literal or do not compile, and operators DataFusion does not evaluate.
/// Idempotent: the forms above are recognised and only their operands are
/// made total again.
pub(super) fn total(e: Expr, schema: &DFSchema) -> Result<Expr> {
    let mut e = e;
    // Twice: a function whose value became DOUBLE may coerce its other
    // arguments anew; the second round changes nothing else.
    for _ in 0..2 {
        e = e
            .rewrite(&mut TypeCoercionRewriter::new(schema))
            .map_err(|err| EngineError::rejected(Rule::InvalidSql, err.strip_backtrace()))?
            .data;
        refuse_partial(&e, schema)?;
        e = total_form(e, schema).map_err(df)?;
    }
    Ok(e)
}

fn total_form(e: Expr, schema: &DFSchema) -> datafusion::common::Result<Expr> {
    e.transform_down(|e| {
        if let Some((op, x, y)) = total_division(&e, schema) {
            let (x, y) = (total_form(x, schema)?, total_form(y, schema)?);
            return Ok(Transformed::new(
                divide(op, x, y, schema)?,
                true,
                TreeNodeRecursion::Jump,
            ));
        }
        Ok(match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: op @ (Operator::Divide | Operator::Modulo),
                right,
            }) => Transformed::new(
                divide(
                    op,
                    total_form(*left, schema)?,
                    total_form(*right, schema)?,
                    schema,
                )?,
                true,
                TreeNodeRecursion::Jump,
            ),
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: op @ (Operator::Plus | Operator::Minus | Operator::Multiply),
                right,
            }) if decimal(&left, schema) || decimal(&right, schema) => {
                Transformed::yes(binary(as_double(*left), op, as_double(*right)))
            }
            Expr::ScalarFunction(mut f)
                if f.func.name() == "abs" && f.args.len() == 1 && decimal(&f.args[0], schema) =>
            {
                let x = f.args.remove(0);
                f.args.push(as_double(x));
                Transformed::yes(Expr::ScalarFunction(f))
            }
            Expr::ScalarFunction(f)
                if f.func.name() == "abs"
                    && f.args.len() == 1
                    && type_of(&f.args[0], schema).is_signed_integer() =>
            {
                let x = total_form(f.args.into_iter().next().expect("one argument"), schema)?;
                let zero = typed(0, &x, schema);
                Transformed::new(
                    when(x.clone().lt(zero.clone()), zero - x.clone()).otherwise(x)?,
                    true,
                    TreeNodeRecursion::Jump,
                )
            }
            // The rounded DOUBLE is tried back into the function's own type
            // (integer rounding stays integer division's operand, say).
            Expr::ScalarFunction(mut f)
                if ROUNDING.contains(&f.func.name())
                    && !f.args.is_empty()
                    && !is_double(&f.args[0]) =>
            {
                let own = type_of(&Expr::ScalarFunction(f.clone()), schema);
                let x = f.args.remove(0);
                f.args.insert(0, as_double(x));
                let rounded = Expr::ScalarFunction(f);
                Transformed::yes(match own {
                    DataType::Float64 | DataType::Null => rounded,
                    own => Expr::TryCast(TryCast::new(Box::new(rounded), own)),
                })
            }
            Expr::Cast(Cast { expr, field }) => {
                Transformed::yes(Expr::TryCast(TryCast::new(expr, field.data_type().clone())))
            }
            other => Transformed::no(other),
        })
    })
    .map(|t| t.data)
}

/// Functions that can overflow on an integer or decimal value.
const ROUNDING: &[&str] = &["round", "ceil", "floor", "trunc"];

/// Whether `e` is already a value taken as `DOUBLE`.
fn is_double(e: &Expr) -> bool {
    matches!(e, Expr::TryCast(c) if c.field.data_type() == &DataType::Float64)
}

/// `e` taken as `DOUBLE` (NULL where it does not convert).
fn as_double(e: Expr) -> Expr {
    if is_double(&e) {
        e
    } else {
        Expr::TryCast(TryCast::new(Box::new(e), DataType::Float64))
    }
}

/// The type of `e`; `Null` when it has none (a coerced predicate has).
fn type_of(e: &Expr, schema: &DFSchema) -> DataType {
    e.get_type(schema).unwrap_or(DataType::Null)
}

fn decimal(e: &Expr, schema: &DFSchema) -> bool {
    matches!(
        type_of(e, schema),
        DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..)
    )
}

fn unsigned(e: &Expr, schema: &DFSchema) -> bool {
    type_of(e, schema).is_unsigned_integer()
}

/// The integer `v` as a literal of `beside`'s type, so that coercion adds no
/// cast next to it (nor turns `beside` into another type).
fn typed(v: i64, beside: &Expr, schema: &DFSchema) -> Expr {
    let value = ScalarValue::Int64(Some(v));
    match value.cast_to(&type_of(beside, schema)) {
        Ok(typed) if !typed.is_null() => lit(typed),
        _ => lit(value),
    }
}

/// The total form of `x op y` for division or remainder.
fn divide(op: Operator, x: Expr, y: Expr, schema: &DFSchema) -> datafusion::common::Result<Expr> {
    let (x, y) = if decimal(&x, schema) || decimal(&y, schema) {
        (as_double(x), as_double(y))
    } else {
        (x, y)
    };
    let guarded = nullif(y.clone(), typed(0, &y, schema));
    // No unsigned operand can be the smallest integer or -1.
    if unsigned(&x, schema) || unsigned(&y, schema) {
        return Ok(binary(x, op, guarded));
    }
    let by_minus_one = match op {
        Operator::Divide => typed(0, &x, schema) - x.clone(),
        _ => binary(x.clone(), Operator::Modulo, typed(1, &x, schema)),
    };
    when(y.clone().eq(typed(-1, &y, schema)), by_minus_one).otherwise(binary(x, op, guarded))
}

fn binary(l: Expr, op: Operator, r: Expr) -> Expr {
    Expr::BinaryExpr(BinaryExpr::new(Box::new(l), op, Box::new(r)))
}

/// The operator and operands of an expression that is exactly [`divide`]'s
/// total form of them.
fn total_division(e: &Expr, schema: &DFSchema) -> Option<(Operator, Expr, Expr)> {
    let quotient = |e: &Expr| match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: op @ (Operator::Divide | Operator::Modulo),
            right,
        }) => match right.as_ref() {
            Expr::ScalarFunction(f) if f.func.name() == "nullif" && f.args.len() == 2 => {
                Some((*op, left.as_ref().clone(), f.args[0].clone()))
            }
            _ => None,
        },
        _ => None,
    };
    let (op, x, y) = match e {
        Expr::Case(case) => match (case.when_then_expr.as_slice(), &case.else_expr) {
            ([_], Some(otherwise)) => quotient(otherwise)?,
            _ => return None,
        },
        other => quotient(other)?,
    };
    (divide(op, x.clone(), y.clone(), schema).ok()? == *e).then_some((op, x, y))
}

/// Refuses what has no total form (see [`total`]). Patterns are compiled
/// here, once, by the kernels that would compile them for every batch.
fn refuse_partial(e: &Expr, schema: &DFSchema) -> Result<()> {
    let mut refusal = None;
    e.apply(|e| {
        refusal = match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                binary_refusal(left, *op, right, schema)
            }
            Expr::Negative(x) if type_of(x, schema).is_temporal() => Some(TEMPORAL.to_owned()),
            Expr::Cast(Cast { expr, field }) | Expr::TryCast(TryCast { expr, field }) => {
                cast_refusal(&type_of(expr, schema), field.data_type())
            }
            Expr::Like(like) if like.escape_char.is_some_and(|c| c != '\\') => {
                Some("LIKE takes no ESCAPE character but the backslash".to_owned())
            }
            Expr::SimilarTo(like) if like.escape_char.is_some() => {
                Some("SIMILAR TO takes no ESCAPE character".to_owned())
            }
            Expr::Like(like) => pattern_refusal(
                &like.pattern,
                if like.case_insensitive {
                    Pattern::ILike
                } else {
                    Pattern::Like
                },
            ),
            Expr::SimilarTo(like) => {
                pattern_refusal(&like.pattern, Pattern::Regex(like.case_insensitive))
            }
            _ => None,
        };
        Ok(match refusal {
            Some(_) => TreeNodeRecursion::Stop,
            None => TreeNodeRecursion::Continue,
        })
    })
    .map_err(df)?;
    match refusal {
        Some(message) => Err(EngineError::rejected(Rule::UnsupportedShape, message)),
        None => Ok(()),
    }
}

const TEMPORAL: &str = "arithmetic on dates and times can fail on a value and is not supported in predicates; compare the column with a date or time literal";

/// Arrow converts dates and times to text, timestamps to dates and times,
/// and into a time zone by formatting or checked arithmetic that fails (or
/// panics, in chrono) on out-of-range values even in `TRY_CAST`. Only the
/// conversions that give NULL there are kept: a date to a timestamp without
/// a zone, a timestamp to another unit in its own zone, a 64-bit date to a
/// 32-bit one. Dictionaries are judged by their values.
fn cast_refusal(from: &DataType, to: &DataType) -> Option<String> {
    use DataType::*;
    let values = match from {
        Dictionary(_, v) => v.as_ref(),
        RunEndEncoded(_, v) => v.data_type(),
        other => other,
    };
    let kept = match (values, to) {
        (Date32, Timestamp(_, None)) | (Date64, Date32) => true,
        (Timestamp(_, zone), Timestamp(_, other)) => zone == other,
        (from, to) => from == to,
    };
    (values.is_temporal() && !kept).then(|| {
        format!("converting {from} to {to} can fail on a value; compare the column with a literal of its own type")
    })
}

fn binary_refusal(left: &Expr, op: Operator, right: &Expr, schema: &DFSchema) -> Option<String> {
    use Operator::*;
    match op {
        And | Or | Eq | NotEq | Lt | LtEq | Gt | GtEq | IsDistinctFrom | IsNotDistinctFrom
        | BitwiseAnd | BitwiseOr | BitwiseXor | BitwiseShiftLeft | BitwiseShiftRight => None,
        // Literals alone are bounded by the query's size.
        StringConcat => (!(left.column_refs().is_empty() && right.column_refs().is_empty()))
            .then(|| "concatenating values (`||`) can overflow on long ones and is not supported in predicates".to_owned()),
        // Literals too: a failing constant is left to run time, where only
        // the rows that reach it evaluate it.
        Plus | Minus | Multiply | Divide | Modulo => (type_of(left, schema).is_temporal()
            || type_of(right, schema).is_temporal())
        .then(|| TEMPORAL.to_owned()),
        LikeMatch | NotLikeMatch => pattern_refusal(right, Pattern::Like),
        ILikeMatch | NotILikeMatch => pattern_refusal(right, Pattern::ILike),
        RegexMatch | RegexNotMatch => pattern_refusal(right, Pattern::Regex(false)),
        RegexIMatch | RegexNotIMatch => pattern_refusal(right, Pattern::Regex(true)),
        other => Some(format!(
            "the operator `{other}` is not supported in predicates"
        )),
    }
}

/// How a pattern is matched.
#[derive(Clone, Copy)]
enum Pattern {
    Like,
    ILike,
    /// A regular expression (`~`, `SIMILAR TO`); case-insensitive or not.
    Regex(bool),
}

/// Why a pattern is refused: it must be literal text (or NULL) that
/// compiles, since the kernels compile it for each batch they see and fail
/// on it only if they see one.
fn pattern_refusal(pattern: &Expr, how: Pattern) -> Option<String> {
    use datafusion::arrow::array::{Scalar, StringArray};
    use datafusion::arrow::compute::kernels::comparison::{ilike, like, regexp_is_match_scalar};
    let mut literal = pattern;
    while let Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) = literal {
        literal = expr;
    }
    let text = match literal {
        Expr::Literal(v, _) if v.is_null() => return None,
        Expr::Literal(
            ScalarValue::Utf8(Some(t))
            | ScalarValue::LargeUtf8(Some(t))
            | ScalarValue::Utf8View(Some(t)),
            _,
        ) => t,
        _ => return Some("patterns must be literal text".to_owned()),
    };
    // Not ASCII: case-insensitive matching of ASCII text may skip the
    // regular expression that other text needs.
    let one = StringArray::from(vec!["é"]);
    let compiled = match how {
        Pattern::Like => {
            like(&one, &Scalar::new(StringArray::from(vec![text.as_str()]))).map(|_| ())
        }
        Pattern::ILike => {
            ilike(&one, &Scalar::new(StringArray::from(vec![text.as_str()]))).map(|_| ())
        }
        Pattern::Regex(insensitive) => {
            regexp_is_match_scalar(&one, text, insensitive.then_some("i")).map(|_| ())
        }
    };
    compiled
        .err()
        .map(|_| "the pattern does not compile".to_owned())
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::common::DFSchema;
    use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
    use datafusion::functions::math::expr_fn::{abs, floor, round};
    use datafusion::logical_expr::{Expr, Operator, cast, col, lit};
    use datafusion::optimizer::analyzer::type_coercion::TypeCoercionRewriter;
    use proptest::prelude::*;

    use super::{ROUNDING, decimal, is_double, total, total_division, type_of};

    /// Integers of two widths, a decimal, a double, text and times (one
    /// dictionary-encoded).
    fn schema() -> DFSchema {
        DFSchema::try_from(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("c", DataType::Int32, true),
            Field::new("d", DataType::Decimal128(10, 2), true),
            Field::new("f", DataType::Float64, true),
            Field::new("u", DataType::UInt64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("day", DataType::Date32, true),
            Field::new(
                "days",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Date32)),
                true,
            ),
            Field::new("at", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
        ]))
        .expect("schema")
    }

    /// Comparisons of arithmetic over numeric columns and small literals,
    /// with casts, division, remainder, `abs` and rounding anywhere.
    fn expr() -> impl Strategy<Value = Expr> {
        let compared = || (numeric(), numeric()).prop_map(|(x, y)| x.gt(y));
        (compared(), compared(), any::<bool>())
            .prop_map(|(p, q, both)| if both { p.and(q) } else { p })
    }

    fn numeric() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            Just(col("a")),
            Just(col("b")),
            Just(col("c")),
            Just(col("d")),
            Just(col("f")),
            (-2i64..3).prop_map(lit),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x / y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x % y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x + y),
                (inner.clone(), inner.clone()).prop_map(|(x, y)| x * y),
                (
                    inner.clone(),
                    prop_oneof![Just(col("c")), (-2i64..3).prop_map(lit)]
                )
                    .prop_map(|(x, y)| round(vec![x, y])),
                inner.clone().prop_map(abs),
                inner.clone().prop_map(floor),
                (
                    inner,
                    prop_oneof![
                        Just(DataType::Int32),
                        Just(DataType::Int8),
                        Just(DataType::UInt64),
                        Just(DataType::Float32),
                        Just(DataType::Decimal128(5, 1)),
                    ]
                )
                    .prop_map(|(x, t)| cast(x, t)),
            ]
        })
    }

    /// Whether anything that can fail is left outside the total forms.
    fn fallible(e: &Expr) -> bool {
        let schema = schema();
        let mut found = false;
        // Each total division becomes its operands' comparison, to look
        // inside (a sum would itself be arithmetic on their types).
        let flat = e
            .clone()
            .transform_down(|e| {
                Ok(match total_division(&e, &schema) {
                    Some((_, x, y)) => Transformed::new(
                        x.is_null().and(y.is_null()),
                        true,
                        TreeNodeRecursion::Continue,
                    ),
                    None => Transformed::no(e),
                })
            })
            .expect("flatten")
            .data;
        flat.apply(|x| {
            found |= match x {
                Expr::BinaryExpr(b) => match b.op {
                    Operator::Divide | Operator::Modulo => true,
                    Operator::Plus | Operator::Minus | Operator::Multiply => {
                        decimal(&b.left, &schema) || decimal(&b.right, &schema)
                    }
                    _ => false,
                },
                Expr::Cast(_) => true,
                Expr::ScalarFunction(f) => {
                    (f.func.name() == "abs"
                        && (type_of(&f.args[0], &schema).is_signed_integer()
                            || decimal(&f.args[0], &schema)))
                        || (ROUNDING.contains(&f.func.name()) && !is_double(&f.args[0]))
                }
                _ => false,
            };
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        found
    }

    fn coerced(e: Expr) -> Expr {
        e.rewrite(&mut TypeCoercionRewriter::new(&schema()))
            .expect("coerced")
            .data
    }

    proptest! {
        /// Total, idempotent, and already coerced: the executor's analyzer
        /// adds no cast to it.
        #[test]
        fn the_total_form_is_idempotent_total_and_coerced(e in expr()) {
            let schema = schema();
            let once = total(e, &schema).expect("total");
            prop_assert_eq!(total(once.clone(), &schema).expect("total"), once.clone());
            prop_assert!(!fallible(&once), "{once}");
            prop_assert_eq!(coerced(once.clone()), once);
        }

        /// The invariant itself, run: DataFusion plans, optimizes and
        /// evaluates the total form over rows of extreme values without
        /// an error.
        #[test]
        fn the_total_form_runs_on_extreme_values(e in expr()) {
            let once = total(e, &schema()).expect("total");
            let ran = runs_on_extremes(once.clone());
            prop_assert!(ran.is_ok(), "{once}: {ran:?}");
        }
    }

    /// Filters rows of the smallest and largest integers, -1, 0, NaN,
    /// infinities and the largest decimals by `predicate`.
    fn runs_on_extremes(predicate: Expr) -> datafusion::common::Result<()> {
        use std::sync::Arc;

        use datafusion::arrow::array::{
            ArrayRef, Decimal128Array, Float64Array, Int32Array, Int64Array, RecordBatch,
        };
        use datafusion::common::DataFusionError;
        use datafusion::prelude::SessionContext;

        let (min, max) = (i64::MIN, i64::MAX);
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "a",
                Arc::new(Int64Array::from(vec![min, -1, 0, 1, max, min, 7, -7])),
            ),
            (
                "b",
                Arc::new(Int64Array::from(vec![-1, min, max, 0, -1, 0, min, 1])),
            ),
            (
                "c",
                Arc::new(Int32Array::from(vec![
                    i32::MIN,
                    -1,
                    0,
                    i32::MAX,
                    1,
                    i32::MIN,
                    -1,
                    5,
                ])),
            ),
            (
                "d",
                Arc::new(
                    Decimal128Array::from(vec![
                        9_999_999_999,
                        -9_999_999_999,
                        0,
                        1,
                        -1,
                        9_999_999_999,
                        50,
                        -50,
                    ])
                    .with_precision_and_scale(10, 2)?,
                ),
            ),
            (
                "f",
                Arc::new(Float64Array::from(vec![
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    0.0,
                    -0.0,
                    1e308,
                    -1e308,
                    5e-324,
                ])),
            ),
        ];
        let batch = RecordBatch::try_from_iter(columns)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        // veil's executor session: its configuration and optimizer.
        let dir = tempfile::tempdir().map_err(|e| DataFusionError::External(Box::new(e)))?;
        let state = crate::catalog::execution_state(dir.path(), None)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        runtime.block_on(async {
            SessionContext::new_with_state(state)
                .read_batch(batch)?
                .filter(predicate)?
                .collect()
                .await
                .map(drop)
        })
    }

    /// The check above can fail: DataFusion's own forms fail on the
    /// extremes.
    #[test]
    fn untotal_predicates_fail_on_extreme_values() {
        for e in [
            (col("a") / col("b")).gt(lit(0)),
            (col("a") % col("b")).gt(lit(0)),
            abs(col("a")).gt(lit(0)),
            (col("d") * col("d") * col("d") * col("d")).gt(lit(0)),
            cast(col("f"), DataType::Decimal128(10, 2)).gt(lit(0)),
        ] {
            assert!(runs_on_extremes(e.clone()).is_err(), "{e}");
            let once = total(e.clone(), &schema()).expect("total");
            runs_on_extremes(once.clone()).unwrap_or_else(|err| panic!("{once}: {err}"));
        }
    }

    /// A division written in the total form by the operator is itself
    /// total, but its operands are still made total.
    #[test]
    fn a_hand_written_total_form_keeps_no_fallible_operand() {
        let (x, y) = (abs(col("a")), col("b"));
        // SQL's integer literals are 64-bit, like the columns here.
        let written =
            datafusion::logical_expr::when(y.clone().eq(lit(-1i64)), lit(0i64) - x.clone())
                .otherwise(x / super::nullif(y, lit(0i64)))
                .expect("case");
        assert!(total_division(&written, &schema()).is_some());
        assert!(fallible(&written));
        assert!(!fallible(&total(written, &schema()).expect("total")));
    }

    /// Decimal arithmetic can overflow its type: it is computed in DOUBLE.
    #[test]
    fn decimal_arithmetic_is_computed_in_doubles() {
        let schema = schema();
        let once = total(col("d") / col("a"), &schema).expect("total");
        let Some((_, x, y)) = total_division(&once, &schema) else {
            panic!("a total division: {once}")
        };
        assert!(is_double(&x) && is_double(&y), "{once}");
        assert_eq!(total(once.clone(), &schema).expect("total"), once);
        let product = total((col("d") * col("d")).gt(lit(1)), &schema).expect("total");
        assert!(!fallible(&product), "{product}");
        // Integers keep integer division.
        let ints = total(col("a") / lit(2), &schema).expect("total");
        let Some((_, x, _)) = total_division(&ints, &schema) else {
            panic!("a total division: {ints}")
        };
        assert_eq!(x, col("a"));
    }

    /// Rounding takes a DOUBLE and gives back its own type: integer
    /// rounding stays an integer (for division, say).
    #[test]
    fn rounding_keeps_its_type() {
        let schema = schema();
        for e in [
            round(vec![col("a")]),
            round(vec![col("c"), lit(-1)]),
            floor(col("d")),
            round(vec![col("f")]),
        ] {
            let once = total(e.clone(), &schema).expect("total");
            assert_eq!(
                type_of(&once, &schema),
                type_of(&coerced(e.clone()), &schema),
                "{e}: {once}"
            );
            assert!(!fallible(&once), "{once}");
            assert_eq!(total(once.clone(), &schema).expect("total"), once);
        }
    }

    /// Unsigned values can neither be the smallest integer nor -1: their
    /// division keeps only the zero guard and `abs` stays, so no literal
    /// turns them into (checked) decimals.
    #[test]
    fn unsigned_operands_keep_their_type() {
        let schema = schema();
        let quotient = total(col("u") / col("u"), &schema).expect("total");
        assert!(!matches!(quotient, Expr::Case(_)), "{quotient}");
        assert_eq!(
            total_division(&quotient, &schema).map(|d| d.1),
            Some(col("u"))
        );
        assert_eq!(total(quotient.clone(), &schema).expect("total"), quotient);
        let product = total(abs(col("u")) * abs(col("u")), &schema).expect("total");
        assert_eq!(product, abs(col("u")) * abs(col("u")));
    }

    /// Casts that coercion would add later (text against numbers, dates
    /// against timestamps, a narrower integer against a wider one) are
    /// added here, as `TRY_CAST`.
    #[test]
    fn casts_that_coercion_adds_are_tried() {
        let schema = schema();
        for e in [
            col("s").eq(col("a")),
            col("s").lt(lit(3)),
            col("day").lt(col("at")),
            col("c").in_list(vec![lit(1), lit("x")], false),
            datafusion::functions::core::expr_fn::coalesce(vec![col("s"), col("a")]).eq(lit(1)),
            round(vec![col("f"), col("a")]).gt(lit(0)),
        ] {
            let once = total(e.clone(), &schema).expect("total");
            assert!(!fallible(&once), "{e}: {once}");
            assert_eq!(coerced(once.clone()), once, "{e}");
        }
    }

    /// What has no total form is refused before any data is read.
    #[test]
    fn what_has_no_total_form_is_refused() {
        let schema = schema();
        let like = |pattern: Expr| col("s").like(pattern);
        let regex = |pattern: Expr| super::binary(col("s"), Operator::RegexMatch, pattern);
        let concat = |x: Expr, y: Expr| super::binary(x, Operator::StringConcat, y);
        let date = || cast(lit("2026-01-01"), DataType::Date32);
        for (e, needle) in [
            (col("at") - col("at"), "dates and times"),
            // A failing constant would be left to the rows that reach it.
            (date() - date(), "dates and times"),
            (like(col("s")), "literal"),
            (regex(lit("(")), "compile"),
            (regex(col("s")), "literal"),
            (cast(col("at"), DataType::Utf8), "converting"),
            (cast(col("day"), DataType::Date64), "converting"),
            // Into a zone: chrono's offset arithmetic panics near its range.
            (
                cast(
                    col("at"),
                    DataType::Timestamp(TimeUnit::Second, Some("+08:00".into())),
                ),
                "converting",
            ),
            (cast(col("days"), DataType::Utf8), "converting"),
            (concat(col("s"), lit("x")), "concatenating"),
        ] {
            match total(e.clone().is_not_null(), &schema) {
                Err(err) => {
                    assert_eq!(err.code(), "UNSUPPORTED_SHAPE", "{e}: {err}");
                    assert!(err.to_string().contains(needle), "{e}: {err}");
                }
                Ok(t) => panic!("{e} has no total form, yet: {t}"),
            }
        }
        for e in [
            like(lit("北京%")),
            regex(lit("^[0-9]+$")),
            col("s").ilike(lit("a_c")),
            col("day").lt(col("at")),
            cast(col("at"), DataType::Timestamp(TimeUnit::Second, None)).is_not_null(),
            col("s").eq(concat(lit("a"), lit("b"))),
        ] {
            total(e.clone(), &schema).unwrap_or_else(|err| panic!("{e}: {err}"));
        }
    }
}
