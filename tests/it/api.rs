//! veil's own gRPC API beside Flight SQL: grants, audit receipts and proofs,
//! health and reflection.

use veil::client;
use veil_engine::audit_log;
use veil_engine::meta;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_grants_shows_the_callers_grants_in_structured_form() {
    let f = Fixture::start().await;
    let endpoint = f.server.endpoint();
    let r = client::grants(&client::Target::new(&endpoint, "demo-token-op-credit-01"))
        .await
        .expect("grants");
    assert_eq!(r.grants.len(), 1, "only the caller's own grants");
    let g = &r.grants[0];
    assert_eq!(g.id, "G-2026-017");
    assert_eq!(g.channel, "authorized_operation");
    assert!(g.in_force);
    assert_eq!(g.scopes.len(), 2);
    let hrss = &g.scopes[0];
    assert_eq!(hrss.row_filter.as_deref(), Some("pay_month >= '2024-01'"));
    let wage = hrss
        .columns
        .iter()
        .find(|c| c.name == "wage_base")
        .expect("wage_base");
    assert_eq!(wage.uses, ["aggregate"]);
    let dp = g.dp.as_ref().expect("dp");
    assert_eq!(dp.accounting, "rho");
    assert!((dp.per_query_max - 0.05).abs() < 1e-12);
    assert!(g.pricing.contains("3.20 CNY"), "{}", g.pricing);

    let expired = client::grants(&client::Target::new(&endpoint, "demo-token-op-expired"))
        .await
        .expect("grants");
    assert!(!expired.grants[0].in_force, "G-2025-009 ended in 2025");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_receipts_and_proofs_are_given_to_the_entrys_operator_only() {
    let f = Fixture::start().await;
    let endpoint = f.server.endpoint();
    let r = f
        .query(
            "op-univ-07",
            "SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district",
        )
        .await
        .expect("released");
    let index: u64 = r.schema.metadata()[meta::AUDIT_INDEX]
        .parse()
        .expect("index");
    let token = "demo-token-op-univ-07";

    let receipt = client::audit_receipt(&client::Target::new(&endpoint, token), index)
        .await
        .expect("receipt");
    let stored: audit_log::Stored = serde_json::from_str(&receipt.entry_json).expect("entry");
    assert_eq!(stored.index, index);
    assert_eq!(stored.entry.operator, "op-univ-07");
    assert_eq!(stored.entry.decision, "released");
    assert!(receipt.checkpoint.expect("checkpoint").size > index);

    let proof = client::prove_inclusion(&client::Target::new(&endpoint, token), index)
        .await
        .expect("proof");
    let c = proof.checkpoint.expect("checkpoint");
    let proof = audit_log::InclusionProof {
        index: proof.index,
        leaf: proof.leaf,
        path: proof.path,
        checkpoint: audit_log::Checkpoint {
            size: c.size,
            root: c.root,
            time: c.time,
            signature: c.signature,
        },
    };
    assert!(audit_log::check_proof(&proof), "the proof checks out");
    let mut forged = proof.clone();
    forged.leaf = hex::encode([7u8; 32]);
    assert!(!audit_log::check_proof(&forged), "a forged leaf does not");

    // Another operator cannot tell this entry from a missing one.
    for idx in [index, 999] {
        let e = client::audit_receipt(&client::Target::new(&endpoint, "demo-token-op-ndrc"), idx)
            .await
            .expect_err("not theirs");
        assert_eq!(e.code, tonic::Code::NotFound, "{}", e.message);
        let e = client::prove_inclusion(&client::Target::new(&endpoint, "demo-token-op-ndrc"), idx)
            .await
            .expect_err("not theirs");
        assert_eq!(e.code, tonic::Code::NotFound, "{}", e.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_without_credentials() {
    let f = Fixture::start().await;
    let channel = tonic::transport::Endpoint::from_shared(f.server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "arrow.flight.protocol.FlightService", "veil.v1.Veil"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(response)) = futures::StreamExt::next(&mut responses).await else {
        panic!("no reflection response");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"veil.v1.Veil".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}
