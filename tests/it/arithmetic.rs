//! Attack family: make the query fail, or not, depending on one person's
//! value. Arithmetic on private values is total (division by zero and
//! unconvertible casts give NULL; the smallest integer divided by -1 and its
//! absolute value wrap; rounding works on doubles), so neighbouring datasets
//! answer alike.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, Int32Array};
use datafusion::arrow::datatypes::Int32Type;

use crate::support::*;

/// Residents' ages with no one aged 40, plus (or not) one person aged 40.
fn ages_edit(with_forty: bool) -> impl FnOnce(&std::path::Path) {
    move |data: &std::path::Path| {
        rewrite_parquet(&data.join("pop/residents.parquet"), |b| {
            let ages: Int32Array = b
                .column_by_name("age")
                .expect("age")
                .as_primitive::<Int32Type>()
                .iter()
                .enumerate()
                .map(|(i, a)| match a {
                    _ if with_forty && i == 0 => Some(40),
                    Some(40) => Some(41),
                    other => other,
                })
                .collect();
            replace_column(b, "age", Arc::new(ages))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_would_break_arithmetic_cannot_be_detected() {
    let without = Fixture::with_policy(&example_policy(), ages_edit(false)).await;
    let with = Fixture::with_policy(&example_policy(), ages_edit(true)).await;
    let queries = [
        // Division and remainder by zero for the person aged 40 only.
        "SELECT COUNT(*) AS n FROM pop.residents WHERE age / (age - 40) > 0",
        "SELECT COUNT(*) AS n FROM pop.residents WHERE age % (age - 40) = 0",
        // A cast that overflows for ages above 32 (and one that never does).
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST(age * 1000 AS SMALLINT) > 0",
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST((age - 40) * 1000 AS SMALLINT) = 0",
        // Integer overflow wraps in DataFusion: it never fails a query.
        "SELECT COUNT(*) AS n FROM pop.residents WHERE (age - 39) * 9223372036854775807 > 0",
        // The smallest integer for the person aged 40 only, divided by -1,
        // or its absolute value (both overflow in DataFusion's kernels).
        "SELECT COUNT(*) AS n FROM pop.residents WHERE (age - 40 + (-9223372036854775807 - 1)) / (age - 41 + 40 - age) > 0",
        "SELECT COUNT(*) AS n FROM pop.residents WHERE (age - 40 + (-9223372036854775807 - 1)) % (age - 41 + 40 - age) = 0",
        "SELECT COUNT(*) AS n FROM pop.residents WHERE abs(age - 40 + (-9223372036854775807 - 1)) >= 0",
        // Rounding the largest integer to tens overflows; the others round down.
        "SELECT COUNT(*) AS n FROM pop.residents WHERE round(9223372036854775807 - (age - 40) * (age - 40) * 100, -1) > 0",
        // Text compared with a number: DataFusion's type coercion casts the
        // text, and 'x' is no number.
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CASE WHEN age = 40 THEN 'x' ELSE '1' END = 1",
        // Decimal arithmetic is checked in arrow: it overflows for 40 only.
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST(CASE WHEN age = 40 THEN 99999999999999999999999999999999999999 ELSE 0 END AS DECIMAL(38, 0)) * 10 > 0",
        // A pattern taken from the data, which compiles for all but 40
        // (refused alike on both neighbours).
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST(age AS VARCHAR) ~ CASE WHEN age = 40 THEN '(' ELSE 'x' END",
        // A timestamp beyond chrono's range for 40 only: formatting it as
        // text fails, even in TRY_CAST (refused alike on both neighbours).
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST(CAST(CASE WHEN age = 40 THEN 9223372036854775807 ELSE 0 END AS TIMESTAMP(0)) AS VARCHAR) = 'x'",
        // Timestamp arithmetic is checked: it overflows for 40 only
        // (refused alike on both neighbours).
        "SELECT COUNT(*) AS n FROM pop.residents WHERE CAST(CASE WHEN age = 40 THEN '2250-01-01' ELSE '2000-01-01' END AS TIMESTAMP) + INTERVAL '100 years' > CAST('2000-01-01' AS TIMESTAMP)",
    ];
    let mut differing = Vec::new();
    let now = chrono::Utc::now().fixed_offset();
    for sql in queries {
        // The executor's analyzer coerces types again: it must find no cast
        // left to add, and the optimized plan holds none that can fail.
        if let Ok((_, optimized, _)) = without
            .engine
            .certified_plans_for_tests("op-univ-07", sql, now)
            .await
        {
            assert!(
                !optimized.replace("TRY_CAST(", "").contains("CAST("),
                "{sql}\n{optimized}"
            );
        }
        let a = without.query("op-univ-07", sql).await;
        let b = with.query("op-univ-07", sql).await;
        match (&a, &b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.schema.fields(), b.schema.fields(), "{sql}");
                let keys = |s: &datafusion::arrow::datatypes::Schema| {
                    let mut k: Vec<String> = s.metadata().keys().cloned().collect();
                    k.sort();
                    k
                };
                assert_eq!(keys(&a.schema), keys(&b.schema), "{sql}");
                assert_eq!(column_f64(a, "n").len(), column_f64(b, "n").len(), "{sql}");
            }
            // Refused before any data is read: alike on both.
            (Err(a), Err(b))
                if a.to_string() == b.to_string()
                    && !a.to_string().contains("EXECUTION_FAILED") => {}
            _ => differing.push(format!(
                "{sql}: {:?} / {:?}",
                a.as_ref().err(),
                b.as_ref().err()
            )),
        }
    }
    assert!(
        differing.is_empty(),
        "answers differ between neighbours:\n{}",
        differing.join("\n")
    );
}
