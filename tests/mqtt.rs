//! The MQTT gateway with rumqttc (a client not written here): a router, a
//! broker and a gateway as real processes on 127.0.0.1 port 0.

mod common;

use std::time::Duration;

use common::{broker_connected_to, within, RouterProc, TempDir};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

struct Stack {
    _router: RouterProc,
    _broker: RouterProc,
    gateway: RouterProc,
    _dir: TempDir,
}

async fn stack() -> Stack {
    let router = RouterProc::start(&[]).await;
    let dir = TempDir::new("mqtt");
    let broker = broker_connected_to(&router, &dir, &[]).await;
    let at = format!("127.0.0.1:{}", router.amqp);
    let gateway =
        RouterProc::spawn_component("mqtt-gateway", vec!["--router".into(), at], None).await;
    router
        .wait_log("the gateway's upstream connections", |log| {
            (log.iter().filter(|l| l.contains("gateway=true")).count() >= 2).then_some(())
        })
        .await;
    Stack {
        _router: router,
        _broker: broker,
        gateway,
        _dir: dir,
    }
}

fn options(port: u16, id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o
}

/// Polls until `want` returns something.
async fn until<T>(ev: &mut EventLoop, what: &str, mut want: impl FnMut(&Packet) -> Option<T>) -> T {
    within(what, async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = want(&p) {
                        return t;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{what}: {e}"),
            }
        }
    })
    .await
}

async fn subscribed(
    port: u16,
    id: &str,
    clean: bool,
    filter: &str,
    qos: QoS,
) -> (AsyncClient, EventLoop, bool) {
    let (c, mut ev) = AsyncClient::new(options(port, id, clean), 100);
    let present = until(&mut ev, "CONNACK", |p| match p {
        Packet::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    c.subscribe(filter, qos).await.expect("subscribe");
    until(&mut ev, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    (c, ev, present)
}

/// Publishes `n` messages at `qos` and drives the publisher until each is
/// acknowledged (QoS 1 and 2) or written (QoS 0).
async fn publish(port: u16, topic: &str, qos: QoS, bodies: Vec<Vec<u8>>) {
    let (c, mut ev) = AsyncClient::new(options(port, "rumqttc-pub", true), 1000);
    let n = bodies.len();
    let topic = topic.to_string();
    let sender = tokio::spawn(async move {
        for b in bodies {
            c.publish(topic.clone(), qos, false, b)
                .await
                .expect("publish");
        }
        c
    });
    let mut done = 0;
    within("the publisher's acknowledgements", async {
        while done < n {
            match ev.poll().await.expect("publisher connection") {
                Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
                    done += 1
                }
                Event::Outgoing(rumqttc::Outgoing::Publish(_)) if qos == QoS::AtMostOnce => {
                    done += 1
                }
                _ => {}
            }
        }
    })
    .await;
    let c = sender.await.expect("sender");
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

async fn received(ev: &mut EventLoop, n: usize) -> Vec<(String, Vec<u8>, QoS)> {
    let mut got = Vec::new();
    within("the subscriber's messages", async {
        while got.len() < n {
            if let Event::Incoming(Packet::Publish(p)) =
                ev.poll().await.expect("subscriber connection")
            {
                got.push((p.topic.clone(), p.payload.to_vec(), p.qos));
            }
        }
    })
    .await;
    got
}

#[tokio::test]
async fn each_qos_arrives_once_in_order_at_the_lower_qos() {
    let s = stack().await;
    let port = s.gateway.amqp;
    let (_c1, mut at1, _) =
        subscribed(port, "sub-q1", true, "plant/+/temp", QoS::AtLeastOnce).await;
    let (_c2, mut at2, _) = subscribed(port, "sub-q2", true, "plant/#", QoS::ExactlyOnce).await;
    for (qos, tag) in [
        (QoS::AtMostOnce, 0u8),
        (QoS::AtLeastOnce, 1),
        (QoS::ExactlyOnce, 2),
    ] {
        let bodies: Vec<Vec<u8>> = (0..50u8).map(|i| vec![tag, i]).collect();
        publish(port, "plant/a/temp", qos, bodies.clone()).await;
        let want = |q: QoS| -> Vec<(String, Vec<u8>, QoS)> {
            bodies
                .iter()
                .map(|b| ("plant/a/temp".to_string(), b.clone(), q))
                .collect()
        };
        let min = |a: QoS, b: QoS| if (a as u8) < (b as u8) { a } else { b };
        assert_eq!(
            received(&mut at1, 50).await,
            want(min(qos, QoS::AtLeastOnce))
        );
        assert_eq!(received(&mut at2, 50).await, want(qos));
    }
}

#[tokio::test]
async fn a_persistent_session_keeps_its_messages_while_away() {
    let s = stack().await;
    let port = s.gateway.amqp;
    let (c, mut ev, present) = subscribed(port, "keeper", false, "log/#", QoS::AtLeastOnce).await;
    assert!(!present);
    c.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
    drop((c, ev));
    let bodies: Vec<Vec<u8>> = (0..200u16).map(|i| i.to_be_bytes().to_vec()).collect();
    publish(port, "log/x", QoS::AtLeastOnce, bodies.clone()).await;
    let (_c, mut ev) = AsyncClient::new(options(port, "keeper", false), 100);
    let present = until(&mut ev, "CONNACK", |p| match p {
        Packet::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    assert!(present, "the session was kept");
    let got: Vec<Vec<u8>> = received(&mut ev, 200)
        .await
        .into_iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, bodies);
}
