//! TLS on the broker: its own listener takes `amqps`, and its connection
//! to a router (as a route container) runs over TLS too.

mod common;

use common::*;
use flotilla_amqp::client::Client;

const CONFIG: &str = "apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: secure}
spec: {address: secure, type: queue}
";

#[tokio::test]
async fn the_broker_listens_with_tls_and_reaches_its_router_over_tls() {
    let dir = TempDir::new("broker-tls");
    let (ca, cert, key) = write_tls_files(&dir);
    let config = dir.write("config.yaml", CONFIG);
    // The router and the broker share the certificate and the config.
    let mut shared = tls_args(&cert, &key);
    shared.extend(["--config".into(), config.display().to_string()]);
    let router = RouterProc::spawn(shared.clone(), None).await;
    let data = TempDir::new("broker-tls-data");
    let to_router = [
        "--router".to_string(),
        format!("localhost:{}", router.amqp),
        "--router-ca".into(),
        ca.display().to_string(),
    ];
    let args: Vec<&str> = shared
        .iter()
        .chain(&to_router)
        .map(String::as_str)
        .collect();
    let broker = start_broker(&data, &args).await;
    await_broker_at(&router).await;

    // Through the router: the broker took the link over TLS.
    let mut p = router.client().await;
    let tx = p
        .open_sender(Some("secure"), false)
        .await
        .expect("producer");
    assert!(is_accepted(
        &send_message(&mut p, tx, 0, text("sealed")).await
    ));

    // Directly from the broker, over amqps.
    let mut c = within("amqps client", Client::connect(&tls_opts(broker.amqp, &ca)))
        .await
        .expect("TLS to the broker");
    let (rx, _) = c.open_receiver(Some("secure"), 10).await.expect("consumer");
    assert_eq!(recv_text(&mut c, rx).await, "sealed");
}
