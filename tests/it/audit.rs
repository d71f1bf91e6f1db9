//! The audit log through the real server and the `veil audit` commands:
//! every query, admitted or refused, has an entry; receipts prove inclusion;
//! export round-trips; and every kind of tampering stops `veil audit verify`
//! and the server's start.

use std::path::Path;

use tonic::Code;
use veil_engine::audit_log::{self, Checkpoint, InclusionProof};
use veil_engine::meta;

use crate::support::*;

/// A fixture after three queries: released, refused, public.
async fn audited() -> (Fixture, Vec<u64>) {
    let f = Fixture::start().await;
    let released = f
        .query(
            "op-ndrc",
            "SELECT district, COUNT(*) FROM hrss.social_insurance GROUP BY district",
        )
        .await
        .expect("released");
    assert_refused(
        f.query("op-ndrc", "SELECT person_id FROM hrss.social_insurance")
            .await,
        Code::PermissionDenied,
        &[],
    );
    let public = f
        .query("op-ndrc", "SELECT COUNT(*) FROM samr.enterprises")
        .await
        .expect("public");
    let index = |r: &veil::client::Fetched| -> u64 {
        r.schema.metadata()[meta::AUDIT_INDEX]
            .parse()
            .expect("index")
    };
    (f, vec![index(&released), index(&public)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_is_audited_and_receipts_prove_inclusion() {
    let (f, receipts) = audited().await;
    let state = f.dir.path().join("state");
    assert_eq!(receipts, vec![0, 2], "the refusal is entry 1");
    let entries: Vec<_> = audit_log::entries(&state)
        .expect("entries")
        .into_iter()
        .map(|(s, _)| s.entry)
        .collect();
    let decisions: Vec<&str> = entries.iter().map(|e| e.decision.as_str()).collect();
    assert_eq!(decisions, ["released", "refused", "released"]);
    assert!((entries[0].cost - 0.5).abs() < 1e-12);
    assert_eq!(entries[0].grant.as_deref(), Some("G-2026-002"));
    assert_eq!(entries[0].datasets, ["hrss.social_insurance"]);
    assert!(entries[0].result_hash.is_some());
    assert_eq!(entries[1].rule.as_deref(), Some("PROJECT_PRIVATE_COLUMN"));
    assert!(entries.iter().all(|e| e.policy == f.engine.policy().hash));

    let (code, out, err) = veil_cli(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 entries, 3 signed checkpoints"), "{out}");
    for i in receipts {
        let (code, out, err) = veil_cli(&[
            "audit",
            "prove",
            "--state",
            state.to_str().expect("utf8"),
            &i.to_string(),
        ]);
        assert_eq!(code, 0, "{err}");
        let proof: InclusionProof = serde_json::from_str(&out).expect("proof json");
        assert!(audit_log::check_proof(&proof));
        // Signed by the key published beside the log.
        let public = std::fs::read_to_string(state.join("audit.pub")).expect("pub");
        let key = ed25519_dalek::VerifyingKey::from_bytes(
            &hex::decode(public.trim())
                .expect("hex")
                .try_into()
                .expect("32 bytes"),
        )
        .expect("key");
        let c = &proof.checkpoint;
        let sig = ed25519_dalek::Signature::from_slice(&hex::decode(&c.signature).expect("hex"))
            .expect("signature");
        key.verify_strict(
            Checkpoint::message(c.size, &c.root, &c.time).as_bytes(),
            &sig,
        )
        .expect("valid signature");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_round_trips_as_jsonl_and_parquet() {
    let (f, _) = audited().await;
    let state = f.dir.path().join("state");
    let s = state.to_str().expect("utf8");
    let jsonl = f.dir.path().join("audit.jsonl");
    let (code, _, err) = veil_cli(&[
        "audit",
        "export",
        "--state",
        s,
        "-o",
        jsonl.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&jsonl).expect("jsonl");
    let stored: Vec<audit_log::Stored> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("entry"))
        .collect();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].index, 2);
    let parquet = f.dir.path().join("audit.parquet");
    let (code, _, err) = veil_cli(&[
        "audit",
        "export",
        "--state",
        s,
        "--format",
        "parquet",
        "-o",
        parquet.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&parquet).expect("open"),
        )
        .expect("parquet")
        .build()
        .expect("reader");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 3);
    // --since in the future exports nothing.
    let (code, out, _) = veil_cli(&[
        "audit",
        "export",
        "--state",
        s,
        "--since",
        "2999-01-01T00:00:00+08:00",
    ]);
    assert_eq!((code, out.as_str()), (0, ""));
}

/// Rewrites the audit log's lines.
fn tamper(state: &Path, f: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let path = state.join("audit.log");
    let text = std::fs::read(&path).expect("read");
    let mut lines: Vec<Vec<u8>> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    f(&mut lines);
    let mut out = lines.join(&b'\n');
    out.push(b'\n');
    std::fs::write(&path, out).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_stops_verification_and_the_server() {
    type Attack = fn(&mut Vec<Vec<u8>>);
    let attacks: [(&str, Attack); 4] = [
        ("flip a byte", |lines| {
            let l = &mut lines[1];
            let at = l.iter().position(|b| *b == b'p').expect("a letter");
            l[at] = b'q';
        }),
        ("delete an entry", |lines| {
            lines.remove(1);
        }),
        ("truncate the tail", |lines| {
            lines.pop();
        }),
        ("swap two entries", |lines| lines.swap(0, 2)),
    ];
    for (name, attack) in attacks {
        let (f, _) = audited().await;
        let state = f.dir.path().join("state");
        tamper(&state, attack);
        let (code, _, err) =
            veil_cli(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
        assert_eq!(code, 1, "{name}: verify must fail");
        assert!(err.contains("TAMPERED"), "{name}: {err}");
        let refused = veil::open_engine(
            &f.dir.path().join("policy.toml"),
            &f.data(),
            &state,
            &veil::Execution::InProcess,
        )
        .expect_err(name);
        assert!(
            refused.to_string().contains("tampering detected"),
            "{name}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn officers_see_every_budget_beside_a_running_server() {
    let (f, _) = audited().await;
    let (code, out, err) = veil_cli(&[
        "budget",
        "--policy",
        f.dir.path().join("policy.toml").to_str().expect("utf8"),
        "--state",
        f.dir.path().join("state").to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let line = |budget: &str| {
        out.lines()
            .find(|l| l.starts_with(budget))
            .unwrap_or_else(|| panic!("no {budget} in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("grant:G-2026-002")[1..4],
        ["0.500000", "2.000000", "epsilon"]
    );
    let visits = line("dataset:wjw.outpatient_visits");
    assert_eq!(visits[1..4], ["0.000000", "20.000000", "rho"]);
    assert_ne!(visits[4], "never", "a yearly budget says when it refreshes");
    assert_eq!(line("grant:G-2026-031")[4], "never");
    // Operators ask the server (veil.v1 GetBudget).
    let endpoint = f.server.endpoint();
    let (code, out, err) = veil_cli(&[
        "budget",
        "--endpoint",
        &endpoint,
        "--token",
        "demo-token-op-ndrc",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("grant G-2026-002")
            && out.contains("1.500000 of     2.000000 epsilon remaining\n"),
        "{out}"
    );
    let (code, out, err) = veil_cli(&[
        "budget",
        "--endpoint",
        &endpoint,
        "--token",
        "demo-token-op-credit-01",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("grant G-2026-017") && out.contains(", refreshes 20"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_may_keep_its_query_text_out_of_the_log() {
    let f = Fixture::start().await;
    let sql = "SELECT district, SUM(wage_base) FROM hrss.social_insurance GROUP BY district";
    f.query("op-credit-01", sql).await.expect("released");
    let (entry, _) = audit_log::entries(&f.dir.path().join("state"))
        .expect("entries")
        .remove(0);
    assert_eq!(
        entry.entry.query, None,
        "G-2026-017 says audit_query_text = false"
    );
    assert_eq!(entry.entry.query_hash, veil_engine::broker::query_hash(sql));
}
