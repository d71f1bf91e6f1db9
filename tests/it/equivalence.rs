//! The universal oracle (THREATS.md): on neighbouring datasets, one person
//! removed from every private dataset, every query of the slt corpus, accepted
//! or refused, must be observably the same except for its noisy numbers:
//! success or failure, error code and text, rows, keys and their order, types,
//! NULL pattern, and every piece of metadata that is not itself noisy.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use veil_engine::broker::Answer;
use veil_engine::meta;

use crate::slt::{corpus_policy, corpus_sql};
use crate::support::*;

/// Removes every row of the first resident from each private dataset.
fn remove_one_person(data: &std::path::Path) {
    let mut victim = String::new();
    rewrite_parquet(&data.join("pop/residents.parquet"), |b| {
        let ids = b.column_by_name("person_id").expect("person_id");
        let ids =
            datafusion::arrow::compute::cast(ids, &datafusion::arrow::datatypes::DataType::Utf8)
                .expect("text");
        victim = ids.as_string::<i32>().value(0).to_owned();
        keep_others(b, "person_id", &victim)
    });
    rewrite_parquet(&data.join("hrss/social_insurance.parquet"), |b| {
        keep_others(b, "person_id", &victim)
    });
    rewrite_parquet(&data.join("wjw/outpatient_visits.parquet"), |b| {
        keep_others(b, "patient_id", &victim)
    });
}

fn keep_others(
    b: datafusion::arrow::array::RecordBatch,
    column: &str,
    victim: &str,
) -> datafusion::arrow::array::RecordBatch {
    let ids = datafusion::arrow::compute::cast(
        b.column_by_name(column).expect("id"),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .expect("text");
    let keep: BooleanArray = ids
        .as_string::<i32>()
        .iter()
        .map(|id| Some(id != Some(victim)))
        .collect();
    datafusion::arrow::compute::filter_record_batch(&b, &keep).expect("filter")
}

/// Everything about an answer that must not depend on one person.
#[derive(Debug, PartialEq)]
enum Observed {
    Refused(String),
    Answered {
        schema: Arc<Schema>,
        metadata: BTreeMap<String, String>,
        fields: Vec<BTreeMap<String, String>>,
        keys: Vec<Vec<String>>,
        nulls: Vec<Vec<bool>>,
    },
}

/// Metadata whose values are noisy or differ per request by design.
const VARYING: &[&str] = &[
    meta::REQUEST,
    meta::REMAINING,
    meta::SUPPRESSED,
    meta::CLAMPED,
    // Signed over entries that hold the time and the noisy answer's hash.
    meta::AUDIT_CHECKPOINT,
];

fn observe(result: Result<Answer, veil_engine::EngineError>) -> Observed {
    let answer = match result {
        Err(e) => {
            // Request ids are fresh per request.
            let text = e.to_string();
            let text = match text.find("(request ") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            return Observed::Refused(text);
        }
        Ok(a) => a,
    };
    let stable = |md: &std::collections::HashMap<String, String>| -> BTreeMap<String, String> {
        // AVG's interval is computed from its noisy sum and count.
        let noisy_interval = md
            .get(meta::AGGREGATE)
            .is_some_and(|a| a.starts_with("AVG("));
        md.iter()
            .map(|(k, v)| {
                let varying =
                    VARYING.contains(&k.as_str()) || (noisy_interval && k.as_str() == meta::CI95);
                (k.clone(), if varying { "~".to_owned() } else { v.clone() })
            })
            .collect()
    };
    let key_columns: Vec<usize> = answer
        .schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f.metadata().contains_key(meta::KEYS)
                || !answer.schema.metadata().contains_key(meta::UNIT)
        })
        .map(|(i, _)| i)
        .collect();
    let mut keys = Vec::new();
    let mut nulls = Vec::new();
    let options = FormatOptions::default();
    for batch in &answer.batches {
        for row in 0..batch.num_rows() {
            keys.push(
                key_columns
                    .iter()
                    .map(|c| {
                        ArrayFormatter::try_new(batch.column(*c).as_ref(), &options)
                            .expect("formatter")
                            .value(row)
                            .to_string()
                    })
                    .collect(),
            );
            nulls.push(batch.columns().iter().map(|c| c.is_null(row)).collect());
        }
    }
    Observed::Answered {
        metadata: stable(answer.schema.metadata()),
        fields: answer
            .schema
            .fields()
            .iter()
            .map(|f| stable(f.metadata()))
            .collect(),
        schema: Arc::new(Schema::new(
            answer
                .schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_metadata(Default::default()))
                .collect::<Vec<_>>(),
        )),
        keys,
        nulls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbouring_datasets_differ_only_in_noisy_numbers() {
    let with = Fixture::with_policy(&corpus_policy(), |_| {}).await;
    let without = Fixture::with_policy(&corpus_policy(), remove_one_person).await;
    let corpus = corpus_sql();
    assert!(corpus.len() >= 30, "{} statements", corpus.len());
    let now = chrono::Utc::now().fixed_offset();
    for (operator, sql) in corpus {
        let a = observe(with.engine.run(&operator, &sql, now).await);
        let b = observe(without.engine.run(&operator, &sql, now).await);
        assert_eq!(a, b, "{operator}: {sql}");
    }
}

/// Sets the first rows' wage bases to non-finite or huge values, or removes
/// those rows.
fn poison_wages(remove: bool) -> impl FnOnce(&std::path::Path) {
    move |data: &std::path::Path| {
        rewrite_parquet(&data.join("hrss/social_insurance.parquet"), |b| {
            let poison = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e308, -1e308];
            if remove {
                let keep: BooleanArray =
                    (0..b.num_rows()).map(|r| Some(r >= poison.len())).collect();
                return datafusion::arrow::compute::filter_record_batch(&b, &keep).expect("filter");
            }
            let wages = datafusion::arrow::compute::cast(
                b.column_by_name("wage_base").expect("wage_base"),
                &datafusion::arrow::datatypes::DataType::Float64,
            )
            .expect("f64");
            let wages: datafusion::arrow::array::Float64Array = wages
                .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
                .iter()
                .enumerate()
                .map(|(r, w)| poison.get(r).copied().or(w))
                .collect();
            let wages = datafusion::arrow::compute::cast(
                &wages,
                b.column_by_name("wage_base")
                    .expect("wage_base")
                    .data_type(),
            )
            .expect("back");
            replace_column(b, "wage_base", wages)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_infinite_values_cannot_be_told_from_missing_rows() {
    // Attack family A: NaN and ±inf injected into a summed column must not
    // make a query fail or show (NaN is left out like NULL; ±inf and huge
    // values are clamped to the bounds, so only noisy numbers differ).
    let poisoned = Fixture::with_policy(&corpus_policy(), poison_wages(false)).await;
    let removed = Fixture::with_policy(&corpus_policy(), poison_wages(true)).await;
    let now = chrono::Utc::now().fixed_offset();
    for sql in [
        "SELECT district, SUM(wage_base), AVG(wage_base) FROM hrss.social_insurance GROUP BY district",
        "SELECT SUM(wage_base) AS s, AVG(wage_base) AS a FROM hrss.social_insurance",
        "SELECT pay_month, COUNT(*), SUM(wage_base) FROM hrss.social_insurance GROUP BY pay_month",
    ] {
        let a = observe(poisoned.engine.run("op-credit-01", sql, now).await);
        let b = observe(removed.engine.run("op-credit-01", sql, now).await);
        assert!(matches!(a, Observed::Answered { .. }), "{sql}: {a:?}");
        assert_eq!(a, b, "{sql}");
    }
}
