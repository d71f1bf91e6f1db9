//! The running server follows edits of its policy file: a revocation takes
//! effect within two seconds, and a broken edit keeps the last valid policy.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::*;

const QUERY: &str = "SELECT district, COUNT(*) FROM pop.residents GROUP BY district";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_takes_effect_within_two_seconds_and_broken_edits_are_ignored() {
    let f = Fixture::start().await;
    let path = f.dir.path().join("policy.toml");
    let _watcher = veil::watch_policy(f.engine.clone(), path.clone());
    f.query("op-univ-07", QUERY)
        .await
        .expect("granted at first");
    let original_hash = f.engine.policy().hash.clone();

    // A broken edit: the server keeps serving under the last valid policy.
    std::fs::write(&path, example_policy().replace("[[grant]]", "[[grnat]]")).expect("write");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(f.engine.policy().hash, original_hash);
    f.query("op-univ-07", QUERY)
        .await
        .expect("still served under the last valid policy");

    // Revoke op-univ-07's grant by ending it in the past.
    let revoked = example_policy().replace(
        "valid_from = 2026-03-01T00:00:00+08:00\nvalid_until = 2030-02-28T23:59:59+08:00",
        "valid_from = 2026-03-01T00:00:00+08:00\nvalid_until = 2026-03-02T00:00:00+08:00",
    );
    assert_ne!(revoked, example_policy());
    let edited_at = Instant::now();
    std::fs::write(&path, revoked).expect("write");
    loop {
        match f.query("op-univ-07", QUERY).await {
            Err(e) if e.code == Code::PermissionDenied => {
                assert!(e.message.contains("expired"), "{}", e.message);
                break;
            }
            Ok(_) | Err(_) => {
                assert!(
                    edited_at.elapsed() < Duration::from_secs(2),
                    "revocation not applied within 2 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(edited_at.elapsed() < Duration::from_secs(2));
    assert_ne!(f.engine.policy().hash, original_hash);
    // Other operators are unaffected.
    f.query(
        "op-ndrc",
        "SELECT district, COUNT(*) FROM hrss.social_insurance GROUP BY district",
    )
    .await
    .expect("other grants still served");
}
