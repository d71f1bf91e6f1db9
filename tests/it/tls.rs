//! TLS and mTLS with certificates made in the test (rcgen): the server's
//! certificate must chain to the CA the client trusts, and a client
//! certificate's subject names its operator.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use veil::client::{Client, Target, Tls};

use crate::support::*;

const SQL: &str = "SELECT district, COUNT(*) AS n FROM pop.residents GROUP BY district";

/// A CA able to sign server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("self-signed").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) for `common_name` in organisation `org`.
    fn sign_in(&self, common_name: &str, org: &str) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// A certificate and key (PEM) for `common_name`.
    fn sign(
        &self,
        common_name: &str,
        dns: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

fn server_tls(ca: &Ca, client_ca: Option<&Ca>) -> veil::ServerTls {
    let (cert_pem, key_pem) = ca.sign(
        "localhost",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    veil::ServerTls {
        cert_pem,
        key_pem,
        client_ca_pem: client_ca.map(|c| c.pem.clone().into_bytes()),
    }
}

/// The example policy with op-univ-07 also known by a certificate subject.
fn policy_with_mtls() -> String {
    let p = example_policy();
    let edited = p.replacen(
        "id = \"op-univ-07\"\norg = \"某某大学公共卫生学院\"\n",
        "id = \"op-univ-07\"\norg = \"某某大学公共卫生学院\"\nmtls = { subject = \"CN=op-univ-07, O=Univ\" }\n",
        1,
    );
    assert_ne!(edited, p, "the example policy changed");
    edited
}

/// `https://localhost:port`: the name the server certificate is for.
fn endpoint(f: &Fixture) -> String {
    format!("https://localhost:{}", f.server.addr.port())
}

fn target(endpoint: &str, token: &str, tls: Tls) -> Target {
    Target {
        endpoint: endpoint.to_owned(),
        token: token.to_owned(),
        tls: Some(tls),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_its_ca_and_nobody_else() {
    let ca = Ca::new("veil test CA");
    let f = Fixture::with_tls(&example_policy(), server_tls(&ca, None)).await;
    let trusted = Tls {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        identity: None,
    };
    let mut c = Client::connect_with(&endpoint(&f), Some(&trusted))
        .await
        .expect("connect over TLS");
    c.login("op-univ-07", "demo-token-op-univ-07")
        .await
        .expect("login");
    let r = c.query(SQL).await.expect("released");
    assert_eq!(column_strings(&r, "district").len(), 16);

    // A client trusting another CA refuses the server's certificate.
    let other = Ca::new("someone else");
    let wrong = target(
        &endpoint(&f),
        "demo-token-op-univ-07",
        Tls {
            ca_pem: Some(other.pem.clone().into_bytes()),
            identity: None,
        },
    );
    let refused = match Client::connect_target(&wrong).await {
        Ok(mut c) => c.query(SQL).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "an untrusted server certificate must fail");
    // Plain text gets no answer from a TLS server.
    let plain = match Client::connect(&format!("http://127.0.0.1:{}", f.server.addr.port())).await {
        Ok(mut c) => {
            c.with_bearer("demo-token-op-univ-07");
            c.query(SQL).await.is_err()
        }
        Err(_) => true,
    };
    assert!(plain, "plain text must fail");
    assert_eq!(f.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_names_the_operator_by_its_certificate_subject() {
    let ca = Ca::new("veil test CA");
    let clients = Ca::new("veil client CA");
    let f = Fixture::with_tls(&policy_with_mtls(), server_tls(&ca, Some(&clients))).await;
    let tls = |identity: (Vec<u8>, Vec<u8>)| Tls {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        identity: Some(identity),
    };
    let univ = clients.sign_in("op-univ-07", "Univ");

    // The certificate alone authenticates: no token, no handshake.
    let mut c = Client::connect_target(&target(&endpoint(&f), "", tls(univ.clone())))
        .await
        .expect("connect");
    c.query(SQL).await.expect("released to op-univ-07");
    assert_eq!(f.spent("G-2026-031", "epsilon"), 500_000);
    let budget = veil::client::budget(&target(&endpoint(&f), "", tls(univ.clone())))
        .await
        .expect("budget");
    assert_eq!(budget.operator_id, "op-univ-07");

    // A token of another operator on the same connection is refused.
    let mut mixed = Client::connect_target(&target(
        &endpoint(&f),
        "demo-token-op-ndrc",
        tls(univ.clone()),
    ))
    .await
    .expect("connect");
    assert_refused(
        mixed.query(SQL).await,
        tonic::Code::Unauthenticated,
        &["different operators"],
    );

    // A subject no operator has is refused, naming the subject.
    let stranger = clients.sign("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let mut s = Client::connect_target(&target(&endpoint(&f), "", tls(stranger)))
        .await
        .expect("connect");
    assert_refused(
        s.query(SQL).await,
        tonic::Code::Unauthenticated,
        &["CN=stranger"],
    );

    // One attribute whose value spells two is not the subject.
    let spoof = clients.sign(
        "op-univ-07, O=Univ",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let mut s = Client::connect_target(&target(&endpoint(&f), "", tls(spoof)))
        .await
        .expect("connect");
    assert_refused(
        s.query(SQL).await,
        tonic::Code::Unauthenticated,
        &["no operator"],
    );

    // A certificate from another CA does not get through the handshake.
    let forged = Ca::new("forger").sign("op-univ-07", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let refused = match Client::connect_target(&target(&endpoint(&f), "", tls(forged))).await {
        Ok(mut c) => c.query(SQL).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client certificate from an unknown CA must fail");

    // Tokens still work over the same server.
    let mut t = Client::connect_with(
        &endpoint(&f),
        Some(&Tls {
            ca_pem: Some(ca.pem.clone().into_bytes()),
            identity: None,
        }),
    )
    .await
    .expect("connect");
    t.with_bearer("demo-token-op-ndrc");
    t.query("SELECT district, COUNT(*) AS n FROM hrss.social_insurance GROUP BY district")
        .await
        .expect("released to op-ndrc");
    assert_eq!(f.charges(), 2);
}
