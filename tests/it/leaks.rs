//! No raw value in any error or log line: the data carries sentinel values,
//! and every response message and every log line of the server is searched
//! for them.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::{ArrayRef, Float64Array, StringArray};
use tonic::Code;

use crate::support::*;

const SENTINEL_TEXT: &str = "SENTINEL-诊断-7731";
const SENTINEL_ID: &str = "SENTINEL-PID-4242";
const SENTINEL_NUMBER: f64 = 4242.4242;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of this test process (all levels).
fn logs() -> &'static Buffer {
    static LOGS: OnceLock<Buffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    })
}

fn plant_sentinels(data: &std::path::Path) {
    rewrite_parquet(&data.join("wjw/outpatient_visits.parquet"), |b| {
        let n = b.num_rows();
        let text: ArrayRef = Arc::new(StringArray::from(vec![SENTINEL_TEXT; n]));
        let ids: ArrayRef = Arc::new(StringArray::from(vec![SENTINEL_ID; n]));
        let cost: ArrayRef = Arc::new(Float64Array::from(
            (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        SENTINEL_NUMBER
                    } else {
                        f64::NAN
                    }
                })
                .collect::<Vec<_>>(),
        ));
        let b = replace_column(b, "diagnosis_text", text);
        let b = replace_column(b, "patient_id", ids);
        replace_column(b, "cost", cost)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_value_reaches_errors_or_logs() {
    let logs = logs();
    let f = Fixture::with_policy(&example_policy(), plant_sentinels).await;
    let mut messages = Vec::new();
    let queries = [
        // Accepted: sums over NaN and sentinel values.
        "SELECT district, SUM(cost) AS c, AVG(cost) AS a FROM wjw.outpatient_visits GROUP BY district",
        "SELECT icd10_chapter, COUNT(*) FROM wjw.outpatient_visits WHERE visit_month >= '2025-01' GROUP BY icd10_chapter",
        // Refused at plan time, naming the columns that hold the sentinels.
        "SELECT diagnosis_text FROM wjw.outpatient_visits",
        "SELECT diagnosis_text, COUNT(*) FROM wjw.outpatient_visits GROUP BY diagnosis_text",
        "SELECT patient_id, COUNT(*) FROM wjw.outpatient_visits GROUP BY patient_id",
        "SELECT COUNT(*) FROM wjw.outpatient_visits WHERE cost > 4000",
        "SELECT MAX(cost) FROM wjw.outpatient_visits",
        "SELECT cost FROM wjw.outpatient_visits",
    ];
    for sql in queries {
        match f.query("op-univ-07", sql).await {
            Ok(r) => {
                for field in r.schema.fields() {
                    messages.extend(field.metadata().values().cloned());
                }
                messages.extend(r.schema.metadata().values().cloned());
            }
            Err(e) => messages.push(e.message),
        }
    }
    // A data file that cannot be read, holding a sentinel: the uniform error.
    std::fs::write(
        f.data().join("wjw/outpatient_visits.parquet"),
        SENTINEL_TEXT.as_bytes(),
    )
    .expect("corrupt");
    let e = assert_refused(
        f.query(
            "op-univ-07",
            "SELECT district, COUNT(*) FROM wjw.outpatient_visits GROUP BY district",
        )
        .await,
        Code::Internal,
        &["[EXECUTION_FAILED]"],
    );
    messages.push(e.message);
    let logged = String::from_utf8_lossy(&logs.0.lock().expect("lock")).into_owned();
    assert!(
        logged.contains("query refused"),
        "the server logs decisions: {logged}"
    );
    let sentinel_number = format!("{SENTINEL_NUMBER}");
    for text in messages.iter().chain(std::iter::once(&logged)) {
        for s in [SENTINEL_TEXT, SENTINEL_ID, sentinel_number.as_str()] {
            assert!(!text.contains(s), "raw value `{s}` leaked into: {text}");
        }
    }
}
