//! The broker (`flotilla broker`): durable queues on its own journal.
//! Messages accepted to a producer survive `kill -9`; consumers compete in
//! order; what comes back (released, or held by a consumer that left) is
//! delivered again.

mod common;

use std::collections::BTreeSet;

use common::*;
use flotilla_amqp::client::Client;
use flotilla_amqp::connection::Event;
use flotilla_amqp::types::messaging::{DeliveryState, Released};

async fn broker(dir: &TempDir) -> RouterProc {
    start_broker(dir, &[]).await
}

/// Sends `bodies` unsettled on a new link and returns those accepted.
async fn produce(c: &mut Client, queue: &str, bodies: &[impl AsRef<str>]) -> Vec<String> {
    let link = c.open_sender(Some(queue), false).await.expect("producer");
    let mut accepted = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        let b = b.as_ref();
        if is_accepted(&send_message(c, link, i as u64, text(b)).await) {
            accepted.push(b.to_string());
        }
    }
    accepted
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
        recv_texts(&mut c, link, 100).await,
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
    assert_eq!(recv_texts(&mut c, link, 10).await, bodies[..10].to_vec());
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
        recv_texts(&mut c, link, 10).await,
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
    let (a, bb) = tokio::join!(recv_texts(&mut c1, l1, 5), recv_texts(&mut c2, l2, 5));
    let all: BTreeSet<String> = a.iter().chain(&bb).cloned().collect();
    assert_eq!(all.len(), 10, "each message once: {a:?} {bb:?}");
    assert_eq!(all, bodies.into_iter().collect());
}

#[tokio::test]
async fn released_and_abandoned_messages_are_delivered_again() {
    let dir = TempDir::new("broker-redeliver");
    let b = broker(&dir).await;
    let mut p = b.client().await;
    produce(&mut p, "retry", &["first", "second"]).await;

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
    produce(&mut p, "crash", &["end"]).await;
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
    let mut b = start_broker(&dir, &["--max-deliveries", "2"]).await;
    let mut p = b.client().await;
    produce(&mut p, "payments", &["poison", "fine"]).await;
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
    let b = start_broker(&dir, &["--max-deliveries", "2"]).await;
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

/// Every subscriber of a topic gets every message, in order; one that
/// subscribes later gets only what is published after.
#[tokio::test]
async fn every_non_durable_subscriber_of_a_topic_gets_every_message() {
    let dir = TempDir::new("broker-topic");
    let b = broker(&dir).await;
    // The same link name on two connections: two subscriptions.
    let mut f1 = b.fe2o3("topic-sub-1").await;
    let mut s1 = f1.subscriber("news-sub", "news", false).await;
    let mut f2 = b.fe2o3("topic-sub-2").await;
    let mut s2 = f2.subscriber("news-sub", "news", false).await;
    let mut fp = b.fe2o3("topic-pub").await;
    let mut tx = fp.topic_sender("news-pub", "news").await;
    let bodies = numbered("news", 30);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    assert_eq!(recv_n(&mut s1, 30).await, bodies, "subscriber 1");
    assert_eq!(recv_n(&mut s2, 30).await, bodies, "subscriber 2");

    let mut f3 = b.fe2o3("topic-sub-3").await;
    let mut s3 = f3.subscriber("news-sub", "news", false).await;
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
    let sub = fs.subscriber("audit", "events", true).await;
    // A non-durable subscriber too: it ends with the broker.
    let mut ft = b.fe2o3("temp-client").await;
    let _temp = ft.subscriber("peek", "events", false).await;
    let mut fp = b.fe2o3("events-pub").await;
    let mut tx = fp.topic_sender("events-pub", "events").await;
    let away = publish_while_durable_subscriber_is_away(&mut tx, sub).await;
    b.kill();

    let b = broker(&dir).await;
    let mut fs = b.fe2o3("durable-client").await;
    let mut sub = fs.subscriber("audit", "events", true).await;
    let mut fp = b.fe2o3("events-pub").await;
    let mut tx = fp.topic_sender("events-pub", "events").await;
    assert_durable_subscriber_gets_only(&mut sub, &away, &mut tx).await;
}

/// An fe2o3 consumer that closes its link holding a message unsettled:
/// the message is delivered again, counted as a failed attempt (the
/// header's delivery-count is 1).
#[tokio::test]
async fn a_message_held_by_a_consumer_that_closes_is_delivered_again_counted() {
    let dir = TempDir::new("broker-abandon");
    let b = broker(&dir).await;
    let mut p = b.client().await;
    produce(&mut p, "held", &["only"]).await;
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
    assert_eq!((d.body().as_str(), delivery_count(&d)), ("only", 1));
}

/// Consumers that leave holding a message count as failed attempts: after
/// `--max-deliveries` of them it is dead-lettered.
#[tokio::test]
async fn a_message_abandoned_too_often_moves_to_the_dead_letter_queue() {
    let dir = TempDir::new("broker-abandon-dlq");
    let b = start_broker(&dir, &["--max-deliveries", "2"]).await;
    let mut p = b.client().await;
    produce(&mut p, "payments", &["poison", "fine"]).await;
    let mut fe = b.fe2o3("abandon-dlq").await;
    let mut counts = Vec::new();
    for attempt in 0..3 {
        let mut r = fe
            .manual_receiver(&format!("r-{attempt}"), "payments", None)
            .await;
        let d = recv_one(&mut r).await;
        counts.push((d.body().clone(), delivery_count(&d)));
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

#[tokio::test]
async fn consumed_messages_leave_the_journal_on_every_queue_task() {
    // Four queues over two queue tasks; past a 64 MiB segment of traffic
    // that is all consumed, the old segments are deleted (each task says
    // how far back it needs the journal, and the journal goes by the
    // lowest).
    let dir = TempDir::new("broker-retire");
    let b = start_broker(&dir, &["--queue-shards", "2"]).await;
    let body = "z".repeat(32 * 1024);
    let mut p = b.fe2o3("producer").await;
    let mut c = b.fe2o3("consumer").await;
    for q in ["q0", "q1", "q2", "q3"] {
        let mut tx = p.sender(&format!("tx-{q}"), q).await;
        let sent = numbered(&body, 600);
        assert_all_accepted(&send_all(&mut tx, &sent).await);
        let mut rx = c.receiver(&format!("rx-{q}"), q).await;
        let got = recv_n(&mut rx, 600).await;
        assert!(got == sent, "{q}: all 600, in order");
    }
    let segments = || {
        std::fs::read_dir(dir.path().join("journal"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                    .count()
            })
            .unwrap_or(0)
    };
    eventually("the consumed segments to be deleted", || segments() <= 1).await;
}
