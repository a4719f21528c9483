//! Mutual TLS between routers: with --tls-cert/--tls-key/--tls-ca, a router
//! joins the mesh only with a certificate the CA signed.

mod common;

use std::path::PathBuf;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

/// A CA and two certificates for 127.0.0.1: one it signed, one self-signed.
fn certs(dir: &TempDir) -> (PathBuf, (PathBuf, PathBuf), (PathBuf, PathBuf)) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(names.clone())
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    let rogue_key = KeyPair::generate().expect("key");
    let rogue = CertificateParams::new(names)
        .expect("params")
        .self_signed(&rogue_key)
        .expect("cert");
    (
        dir.write("ca.pem", &ca.pem()),
        (
            dir.write("router.pem", &cert.pem()),
            dir.write("router.key", &key.serialize_pem()),
        ),
        (
            dir.write("rogue.pem", &rogue.pem()),
            dir.write("rogue.key", &rogue_key.serialize_pem()),
        ),
    )
}

fn args(id: &str, cert: &(PathBuf, PathBuf), ca: &PathBuf, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "--router-id".to_string(),
        id.into(),
        "--tls-cert".into(),
        cert.0.display().to_string(),
        "--tls-key".into(),
        cert.1.display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ];
    a.extend(extra.iter().cloned());
    a
}

#[tokio::test]
async fn routers_with_certificates_from_the_ca_form_a_mesh_and_others_do_not() {
    let dir = TempDir::new("mesh-tls");
    let (ca, good, rogue) = certs(&dir);
    let ir = vec!["--inter-router".to_string(), "127.0.0.1:0".into()];
    let a = RouterProc::spawn(args("A", &good, &ca, &ir), None).await;
    let peer = vec![
        "--peer".to_string(),
        format!("127.0.0.1:{}", a.inter_router.expect("listener")),
    ];
    let b = RouterProc::spawn(args("B", &good, &ca, &peer), None).await;
    // The rogue trusts its own certificate, so it is its own CA.
    let x = RouterProc::spawn(args("X", &rogue, &rogue.0, &peer), None).await;
    a.wait_log("A to route to B", |log| {
        log.iter()
            .rev()
            .find(|l| l.contains("mesh routes"))
            .filter(|l| l.contains("\"B via B"))
            .map(|_| ())
    })
    .await;
    a.wait_log("A to refuse the rogue's TLS handshake", |log| {
        log.iter()
            .any(|l| l.contains("handshake failed"))
            .then_some(())
    })
    .await;

    // Traffic crosses the authenticated link.
    let mut rx = b.client().await;
    let (rl, _) = rx
        .open_receiver(Some("secured"), 10)
        .await
        .expect("receiver");
    rx.flush().await.expect("flush");
    let mut tx = a.client().await;
    let tl = tx
        .open_sender(Some("secured"), false)
        .await
        .expect("sender");
    let (state, got) = tokio::join!(
        send_message(&mut tx, tl, 1, text("over mutual TLS")),
        recv_text(&mut rx, rl)
    );
    assert_eq!(got, "over mutual TLS");
    assert!(is_accepted(&state), "{state:?}");
    let routes = a.log_text();
    assert!(
        !routes
            .lines()
            .filter(|l| l.contains("mesh routes"))
            .any(|l| l.contains("X via")),
        "the rogue never joins"
    );
    drop(x);
}
