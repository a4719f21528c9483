//! The broker (`flotilla broker`): durable queues on its own journal.
//! Messages accepted to a producer survive `kill -9`; consumers compete in
//! order; what comes back (released, or held by a consumer that left) is
//! delivered again.

mod common;

use std::collections::BTreeSet;

use common::*;
use flotilla_amqp::client::Client;
use flotilla_amqp::connection::{Event, LinkId};
use flotilla_amqp::types::messaging::{DeliveryState, Released, Source, Target};

async fn broker(dir: &TempDir) -> RouterProc {
    RouterProc::spawn_component(
        "broker",
        vec!["--data-dir".into(), dir.path().display().to_string()],
        None,
    )
    .await
}

/// Sends `bodies` unsettled on a new link and returns those accepted.
async fn produce(c: &mut Client, queue: &str, bodies: &[String]) -> Vec<String> {
    let link = c.open_sender(Some(queue), false).await.expect("producer");
    let mut accepted = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        if is_accepted(&send_message(c, link, i as u64, text(b)).await) {
            accepted.push(b.clone());
        }
    }
    accepted
}

/// Receives `n` messages on `link`, accepting each.
async fn consume(c: &mut Client, link: LinkId, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(recv_text(c, link).await);
    }
    got
}

#[tokio::test]
async fn accepted_messages_survive_kill_9_and_arrive_in_order() {
    let dir = TempDir::new("broker-kill");
    let mut b = broker(&dir).await;
    let mut p = b.client().await;
    let bodies = numbered("durable", 100);
    assert_eq!(
        produce(&mut p, "orders", &bodies).await,
        bodies,
        "all accepted"
    );
    b.kill();

    let b = broker(&dir).await;
    let mut c = b.client().await;
    let (link, _) = c
        .open_receiver(Some("orders"), 200)
        .await
        .expect("consumer");
    assert_eq!(
        consume(&mut c, link, 100).await,
        bodies,
        "every accepted message, once, in order"
    );
}

#[tokio::test]
async fn acknowledged_messages_are_not_delivered_again_after_a_restart() {
    let dir = TempDir::new("broker-ack");
    let b = broker(&dir).await;
    let mut p = b.client().await;
    let bodies = numbered("once", 20);
    produce(&mut p, "jobs", &bodies).await;
    let mut c = b.client().await;
    let (link, _) = c.open_receiver(Some("jobs"), 10).await.expect("consumer");
    assert_eq!(consume(&mut c, link, 10).await, bodies[..10].to_vec());
    c.close().await;
    // A clean stop writes the acknowledgements before it exits.
    b.sigterm();
    let mut b = b;
    let status = within("the broker to exit", async {
        tokio::task::spawn_blocking(move || b.child.wait()).await
    })
    .await;
    assert!(status.expect("join").expect("wait").success());

    let b = broker(&dir).await;
    let mut c = b.client().await;
    let (link, _) = c.open_receiver(Some("jobs"), 20).await.expect("consumer");
    assert_eq!(
        consume(&mut c, link, 10).await,
        bodies[10..].to_vec(),
        "only the unacknowledged half comes back"
    );
}

#[tokio::test]
async fn competing_consumers_share_a_queue_without_duplicates() {
    let dir = TempDir::new("broker-compete");
    let b = broker(&dir).await;
    let mut c1 = b.client().await;
    let (l1, _) = c1.open_receiver(Some("work"), 5).await.expect("consumer");
    let mut c2 = b.client().await;
    let (l2, _) = c2.open_receiver(Some("work"), 5).await.expect("consumer");
    c1.flush().await.expect("flush");
    c2.flush().await.expect("flush");
    let mut p = b.client().await;
    let bodies = numbered("w", 10);
    produce(&mut p, "work", &bodies).await;
    let (a, bb) = tokio::join!(consume(&mut c1, l1, 5), consume(&mut c2, l2, 5));
    let all: BTreeSet<String> = a.iter().chain(&bb).cloned().collect();
    assert_eq!(all.len(), 10, "each message once: {a:?} {bb:?}");
    assert_eq!(all, bodies.into_iter().collect());
}

#[tokio::test]
async fn released_and_abandoned_messages_are_delivered_again() {
    let dir = TempDir::new("broker-redeliver");
    let b = broker(&dir).await;
    let mut p = b.client().await;
    produce(
        &mut p,
        "retry",
        &["first".to_string(), "second".to_string()],
    )
    .await;

    // Released by one consumer: the next delivery is the same message.
    let mut c = b.client().await;
    let (link, _) = c.open_receiver(Some("retry"), 1).await.expect("consumer");
    let d = next_event_where(&mut c, "a message", |_, e| match e {
        Event::Delivery { link: l, delivery } if l == link => Some(delivery),
        _ => None,
    })
    .await;
    c.conn.settle(d.id, DeliveryState::Released(Released {}));
    c.conn.flow(link, 1, false);
    assert_eq!(
        recv_text(&mut c, link).await,
        "first",
        "released: delivered again, still first"
    );

    // Held unsettled by a consumer that disconnects: delivered to the next.
    let mut gone = b.client().await;
    let (gl, _) = gone
        .open_receiver(Some("retry"), 1)
        .await
        .expect("consumer");
    next_event_where(&mut gone, "a message", |_, e| {
        matches!(e, Event::Delivery { link: l, .. } if l == gl).then_some(())
    })
    .await;
    drop(gone);
    c.conn.flow(link, 1, false);
    assert_eq!(recv_text(&mut c, link).await, "second");
}

/// The crash test of issue #4: a producer sends durable messages while the
/// broker is killed with SIGKILL at changing moments, 20 times; after each
/// restart the producer goes on. At the end every accepted message is
/// there (unaccepted ones may be too: counted, allowed).
#[tokio::test]
async fn nothing_accepted_is_lost_across_twenty_kill_9s() {
    let dir = TempDir::new("broker-crash");
    let mut accepted: Vec<String> = Vec::new();
    let mut sent = 0usize;
    for round in 0..20 {
        let mut b = broker(&dir).await;
        let mut p = b.client().await;
        let link = p.open_sender(Some("crash"), false).await.expect("producer");
        // A different number of messages in flight at each kill.
        let burst = 5 + (round * 7) % 40;
        let bodies: Vec<String> = (sent..sent + burst).map(|i| format!("c-{i}")).collect();
        sent += burst;
        await_credit(&mut p, link).await;
        for (i, body) in bodies.iter().enumerate() {
            assert!(
                p.conn.send(link, &text(body), false, i as u64),
                "credit for the burst"
            );
        }
        p.flush().await.expect("flush");
        // Collect outcomes for about half of them, then kill.
        let mut outcomes = 0;
        while outcomes < burst / 2 {
            let (token, state) = next_event_where(&mut p, "an outcome", |_, e| match e {
                Event::Outcome {
                    token,
                    state,
                    settled: true,
                    ..
                } => Some((token, state)),
                _ => None,
            })
            .await;
            if is_accepted(&state) {
                accepted.push(bodies[token as usize].clone());
            }
            outcomes += 1;
        }
        b.kill();
    }
    let b = broker(&dir).await;
    let mut c = b.client().await;
    let (link, _) = c
        .open_receiver(Some("crash"), sent as u32 + 1)
        .await
        .expect("consumer");
    let mut got = BTreeSet::new();
    // Everything stored is delivered; read until the accepted set is covered
    // and the queue is empty (a final probe marks the end).
    let mut p = b.client().await;
    produce(&mut p, "crash", &["end".to_string()]).await;
    loop {
        let body = recv_text(&mut c, link).await;
        if body == "end" {
            break;
        }
        assert!(got.insert(body.clone()), "{body} delivered twice");
    }
    let lost: Vec<&String> = accepted.iter().filter(|a| !got.contains(*a)).collect();
    assert!(lost.is_empty(), "accepted but lost: {lost:?}");
    let extra = got.len() - accepted.len();
    eprintln!(
        "{} accepted, {} stored without an outcome seen (allowed), {} sent",
        accepted.len(),
        extra,
        sent
    );
}

/// A message its consumers keep failing goes to the dead-letter queue
/// after `--max-deliveries` attempts, and stays there across a restart.
#[tokio::test]
async fn a_message_failed_too_often_moves_to_the_dead_letter_queue() {
    use flotilla_amqp::types::messaging::Modified;
    let dir = TempDir::new("broker-dlq");
    let args = |d: &TempDir| {
        vec![
            "--data-dir".to_string(),
            d.path().display().to_string(),
            "--max-deliveries".into(),
            "2".into(),
        ]
    };
    let mut b = RouterProc::spawn_component("broker", args(&dir), None).await;
    let mut p = b.client().await;
    produce(
        &mut p,
        "payments",
        &["poison".to_string(), "fine".to_string()],
    )
    .await;
    let mut c = b.client().await;
    let (link, _) = c
        .open_receiver(Some("payments"), 1)
        .await
        .expect("consumer");
    for attempt in 1..=2 {
        let d = next_event_where(&mut c, "a delivery", |_, e| match e {
            Event::Delivery { link: l, delivery } if l == link => Some(delivery),
            _ => None,
        })
        .await;
        let body = String::from_utf8(flotilla_amqp::message::body_bytes(&d.payload).expect("body"))
            .expect("utf-8");
        assert_eq!(
            body, "poison",
            "attempt {attempt}: the failed message comes first again"
        );
        let failed = Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        };
        c.conn.settle(d.id, DeliveryState::Modified(failed));
        c.conn.flow(link, 1, false);
    }
    assert_eq!(
        recv_text(&mut c, link).await,
        "fine",
        "the poison message left the queue"
    );
    let mut dl = b.client().await;
    let (dlink, _) = dl
        .open_receiver(Some("DLQ"), 10)
        .await
        .expect("DLQ consumer");
    let d = next_event_where(&mut dl, "the dead-lettered message", |_, e| match e {
        Event::Delivery { link: l, delivery } if l == dlink => Some(delivery),
        _ => None,
    })
    .await;
    assert_eq!(
        flotilla_amqp::message::body_bytes(&d.payload).expect("body"),
        b"poison"
    );
    drop(dl);
    b.kill();
    let b = RouterProc::spawn_component("broker", args(&dir), None).await;
    let mut dl = b.client().await;
    let (dlink, _) = dl
        .open_receiver(Some("DLQ"), 10)
        .await
        .expect("DLQ consumer");
    assert_eq!(
        recv_text(&mut dl, dlink).await,
        "poison",
        "dead letters are durable too"
    );
}

// ---------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------

fn topic_capability() -> Vec<fe2o3_amqp::types::primitives::Symbol> {
    vec![fe2o3_amqp::types::primitives::Symbol::from("topic")]
}

/// A sender to the topic `address` (by terminus capability, as JMS does).
async fn topic_sender(fe: &mut Fe, name: &str, address: &str) -> fe2o3_amqp::Sender {
    within(
        "topic sender attach",
        fe2o3_amqp::Sender::builder()
            .name(name)
            .target(
                Target::builder()
                    .address(address)
                    .capabilities(topic_capability())
                    .build(),
            )
            .attach(fe.session()),
    )
    .await
    .expect("topic sender attach")
}

/// A subscriber to the topic `address`: durable (named by the container
/// id and `name`, kept while detached) or for this link only.
async fn subscriber(fe: &mut Fe, name: &str, address: &str, durable: bool) -> fe2o3_amqp::Receiver {
    use flotilla_amqp::types::messaging::{TerminusDurability, TerminusExpiryPolicy};
    let mut source = Source::builder()
        .address(address)
        .capabilities(topic_capability());
    if durable {
        source = source
            .durable(TerminusDurability::UnsettledState)
            .expiry_policy(TerminusExpiryPolicy::Never);
    }
    within(
        "subscriber attach",
        fe2o3_amqp::Receiver::builder()
            .name(name)
            .source(source.build())
            .attach(fe.session()),
    )
    .await
    .expect("subscriber attach")
}

/// Every subscriber of a topic gets every message, in order; one that
/// subscribes later gets only what is published after.
#[tokio::test]
async fn every_non_durable_subscriber_of_a_topic_gets_every_message() {
    let dir = TempDir::new("broker-topic");
    let b = broker(&dir).await;
    // The same link name on two connections: two subscriptions.
    let mut f1 = b.fe2o3("topic-sub-1").await;
    let mut s1 = subscriber(&mut f1, "news-sub", "news", false).await;
    let mut f2 = b.fe2o3("topic-sub-2").await;
    let mut s2 = subscriber(&mut f2, "news-sub", "news", false).await;
    let mut fp = b.fe2o3("topic-pub").await;
    let mut tx = topic_sender(&mut fp, "news-pub", "news").await;
    let bodies = numbered("news", 30);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    assert_eq!(recv_n(&mut s1, 30).await, bodies, "subscriber 1");
    assert_eq!(recv_n(&mut s2, 30).await, bodies, "subscriber 2");

    let mut f3 = b.fe2o3("topic-sub-3").await;
    let mut s3 = subscriber(&mut f3, "news-sub", "news", false).await;
    assert_all_accepted(&send_all(&mut tx, &["late".to_string()]).await);
    for (i, s) in [&mut s1, &mut s2, &mut s3].into_iter().enumerate() {
        assert_eq!(
            recv_accept(s).await,
            "late",
            "subscriber {}: nothing else",
            i + 1
        );
    }
}

/// A durable subscription keeps what is published while its subscriber
/// is away, across `kill -9` of the broker; the subscriber (same
/// container id and link name) gets exactly that, in order.
#[tokio::test]
async fn a_durable_subscription_survives_kill_9_while_its_subscriber_is_away() {
    let dir = TempDir::new("broker-durable-sub");
    let mut b = broker(&dir).await;
    let mut fs = b.fe2o3("durable-client").await;
    let mut sub = subscriber(&mut fs, "audit", "events", true).await;
    // A non-durable subscriber too: it ends with the broker.
    let mut ft = b.fe2o3("temp-client").await;
    let _temp = subscriber(&mut ft, "peek", "events", false).await;
    let mut fp = b.fe2o3("events-pub").await;
    let mut tx = topic_sender(&mut fp, "events-pub", "events").await;
    let before = numbered("before", 5);
    assert_all_accepted(&send_all(&mut tx, &before).await);
    assert_eq!(recv_n(&mut sub, 5).await, before);
    // Detached, not closed: the subscription stays.
    within("detach", sub.detach())
        .await
        .map_err(|(_, e)| e)
        .expect("detach");

    let away = numbered("away", 10);
    assert_all_accepted(&send_all(&mut tx, &away).await);
    b.kill();

    let b = broker(&dir).await;
    let mut fs = b.fe2o3("durable-client").await;
    let mut sub = subscriber(&mut fs, "audit", "events", true).await;
    assert_eq!(
        recv_n(&mut sub, 10).await,
        away,
        "what was published while away, once, in order"
    );
    let mut fp = b.fe2o3("events-pub").await;
    let mut tx = topic_sender(&mut fp, "events-pub", "events").await;
    assert_all_accepted(&send_all(&mut tx, &["after".to_string()]).await);
    assert_eq!(
        recv_accept(&mut sub).await,
        "after",
        "nothing else was kept"
    );
}

/// An fe2o3 consumer that closes its link holding a message unsettled:
/// the message is delivered again, counted as a failed attempt (the
/// header's delivery-count is 1).
#[tokio::test]
async fn a_message_held_by_a_consumer_that_closes_is_delivered_again_counted() {
    let dir = TempDir::new("broker-abandon");
    let b = broker(&dir).await;
    let mut p = b.client().await;
    produce(&mut p, "held", &["only".to_string()]).await;
    let mut fe = b.fe2o3("abandon").await;
    let mut gone = fe.receiver("gone", "held").await;
    let d = within("a message", gone.recv::<String>())
        .await
        .expect("recv");
    assert_eq!(d.body(), "only");
    within("close", gone.close()).await.expect("close");
    let mut rx = fe.receiver("next", "held").await;
    let d = within("the message again", rx.recv::<String>())
        .await
        .expect("recv");
    let count = d.message().header.as_ref().map_or(0, |h| h.delivery_count);
    assert_eq!((d.body().as_str(), count), ("only", 1));
}

/// Consumers that leave holding a message count as failed attempts: after
/// `--max-deliveries` of them it is dead-lettered.
#[tokio::test]
async fn a_message_abandoned_too_often_moves_to_the_dead_letter_queue() {
    let dir = TempDir::new("broker-abandon-dlq");
    let args = vec![
        "--data-dir".to_string(),
        dir.path().display().to_string(),
        "--max-deliveries".into(),
        "2".into(),
    ];
    let b = RouterProc::spawn_component("broker", args, None).await;
    let mut p = b.client().await;
    produce(
        &mut p,
        "payments",
        &["poison".to_string(), "fine".to_string()],
    )
    .await;
    let mut fe = b.fe2o3("abandon-dlq").await;
    let mut counts = Vec::new();
    for attempt in 0..3 {
        let mut r = within(
            "receiver attach",
            fe2o3_amqp::Receiver::builder()
                .name(format!("r-{attempt}"))
                .source("payments")
                .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
                .attach(fe.session()),
        )
        .await
        .expect("attach");
        within("credit", r.set_credit(1)).await.expect("credit");
        let d = within("a message", r.recv::<String>()).await.expect("recv");
        let count = d.message().header.as_ref().map_or(0, |h| h.delivery_count);
        counts.push((d.body().clone(), count));
        within("close", r.close()).await.expect("close");
    }
    assert_eq!(
        counts,
        [
            ("poison".to_string(), 0),
            ("poison".to_string(), 1),
            ("fine".to_string(), 0)
        ]
    );
}
