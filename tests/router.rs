//! Process-level tests of `flotilla router`: each test spawns the real
//! binary on `127.0.0.1:0`, reads the bound port(s) from its `listening` log
//! line, talks to it over TCP with an independent client (fe2o3-amqp), our
//! own client (`flotilla_amqp::client`, where link credit must be observed
//! exactly) or hand-built frames (bad input), and kills it on drop.
//!
//! Every wait is bounded by [`WAIT`]; nothing sleeps to synchronise (the
//! only polling is [`eventually`], for things with no event to wait on).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp::Sendable;
use flotilla_amqp::client::{Client, ClientError, ClientOptions};
use flotilla_amqp::connection::Event;
use flotilla_amqp::frame::{self, Performative, TransferHeader, HEADER_AMQP};
use flotilla_amqp::message::{self, MessageParts};
use flotilla_amqp::transport::HandshakeError;
use flotilla_amqp::types::definitions::{
    AmqpError, ConnectionError, Error as AmqpErrorBody, ErrorCondition, Handle, LinkError,
    ReceiverSettleMode, Role, SenderSettleMode,
};
// fe2o3-amqp and our engine share these types (fe2o3-amqp-types).
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, Message, Outcome, Properties, Source, Target,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod common;
use common::*;

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// Two tenants with an `orders` address each and a user each; tenant-a also
/// has `secret`, which alice may not use, and alice may use `missing`, which
/// is not declared.
const TENANTS_CONFIG: &str = "\
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-b}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: a-orders}
spec: {addressSpace: tenant-a, address: orders, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: a-secret}
spec: {addressSpace: tenant-a, address: secret, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: b-orders}
spec: {addressSpace: tenant-b, address: orders, type: anycast}
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: alice}
spec:
  addressSpace: tenant-a
  username: alice
  password: wonderland
  authorization: [{addresses: [orders, missing], operations: [send, recv]}]
---
apiVersion: flotilla.dev/v1
kind: MessagingUser
metadata: {name: bob}
spec:
  addressSpace: tenant-b
  username: bob
  password: builder
  authorization: [{addresses: [orders], operations: [send, recv]}]
";

/// Round trips on one fe2o3 connection, in a task, until stopped: the
/// "another client" that must keep working while something else misbehaves.
struct SteadyTraffic {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl SteadyTraffic {
    async fn start(router: &RouterProc) -> Self {
        let mut fe = router.fe2o3("steady").await;
        let mut rx = fe.receiver("steady-rx", "steady").await;
        let mut tx = fe.sender("steady-tx", "steady").await;
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (d, s, f) = (done.clone(), stop.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let _fe = fe;
            let r: Result<(), String> = async {
                // Pacing only, so the loop does not hog the CPU other tests share.
                let mut pace = tokio::time::interval(Duration::from_millis(5));
                let mut i = 0u64;
                while !s.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let body = format!("steady-{i}");
                    let fut = tx
                        .send_batchable(body.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    let got = rx.recv::<String>().await.map_err(|e| e.to_string())?;
                    rx.accept(&got).await.map_err(|e| e.to_string())?;
                    if got.body() != &body {
                        return Err(format!("sent {body:?}, received {:?}", got.body()));
                    }
                    match fut.await.map_err(|e| e.to_string())? {
                        Outcome::Accepted(_) => {}
                        o => return Err(format!("{body}: {o:?}")),
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                *f.lock().unwrap() = Some(e);
            }
        });
        let t = SteadyTraffic {
            done,
            stop,
            failed,
            task,
        };
        t.assert_progress().await;
        t
    }

    /// Waits for a few more successful round trips.
    async fn assert_progress(&self) {
        let from = self.done.load(Ordering::Relaxed);
        eventually("steady traffic to make progress", || {
            self.done.load(Ordering::Relaxed) >= from + 3 || self.failed.lock().unwrap().is_some()
        })
        .await;
        if let Some(e) = self.failed.lock().unwrap().as_ref() {
            panic!("steady traffic failed: {e}");
        }
    }

    async fn finish(self) {
        self.assert_progress().await;
        self.stop.store(true, Ordering::Relaxed);
        within("steady traffic to stop", self.task)
            .await
            .expect("steady traffic task");
    }
}

/// The condition of a refused attach.
fn refusal(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCondition {
    match r {
        Err(ClientError::Refused(Some(e))) => e.condition,
        other => panic!("expected the link to be refused with an error, got {other:?}"),
    }
}

fn condition_of(e: &Option<AmqpErrorBody>) -> Option<&ErrorCondition> {
    e.as_ref().map(|e| &e.condition)
}

// ---------------------------------------------------------------------------
// Anycast
// ---------------------------------------------------------------------------

#[tokio::test]
async fn anycast_delivers_unsettled_and_presettled_messages_exactly_once_in_order() {
    let router = RouterProc::start(&[]).await;
    let mut fe = router.fe2o3("anycast").await;
    let mut rx = fe.receiver("orders-rx", "orders").await;
    let mut tx = fe.sender("orders-tx", "orders").await;

    let unsettled = numbered("unsettled", 100);
    let (outcomes, got) = tokio::join!(
        send_all(&mut tx, &unsettled),
        recv_n(&mut rx, unsettled.len())
    );
    assert_eq!(
        got, unsettled,
        "unsettled messages arrive once each, in order"
    );
    assert_all_accepted(&outcomes);

    let presettled = numbered("presettled", 100);
    for b in &presettled {
        let s = Sendable::builder().message(b.clone()).settled(true).build();
        let o = within("a pre-settled send", tx.send(s))
            .await
            .expect("send");
        assert!(matches!(o, Outcome::Accepted(_)));
    }
    // A last unsettled message: whatever arrives before it is all there was.
    let end = within("send end", tx.send_batchable("end".to_string()))
        .await
        .expect("send");
    let got = recv_n(&mut rx, presettled.len() + 1).await;
    let mut expected = presettled.clone();
    expected.push("end".into());
    assert_eq!(
        got, expected,
        "pre-settled messages arrive once each, in order"
    );
    let end = within("the last outcome", end).await;
    assert!(matches!(end, Ok(Outcome::Accepted(_))), "{end:?}");
}

#[tokio::test]
async fn anycast_shares_messages_between_two_receivers_without_duplicates() {
    const N: usize = 200;
    let router = RouterProc::start(&[]).await;
    let (tx_seen, mut seen) = mpsc::unbounded_channel();
    let mut collectors = Vec::new();
    let mut conns = Vec::new();
    for id in 0..2 {
        let mut fe = router.fe2o3(&format!("worker-{id}")).await;
        let r = fe.receiver("work-rx", "work").await;
        // Its credit must be in place before the burst, or the first
        // receiver rightly takes everything.
        fe.round_trip().await;
        collectors.push(spawn_collector(id, r, tx_seen.clone()));
        conns.push(fe);
    }
    let mut fe = router.fe2o3("producer").await;
    let mut tx = fe.sender("work-tx", "work").await;
    let bodies = numbered("job", N);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);

    let mut got: Vec<(usize, String)> = Vec::new();
    while got.len() < N {
        got.push(
            within("the work items", seen.recv())
                .await
                .expect("collectors run"),
        );
    }
    // Per receiver, messages arrive in the order they were routed. Send
    // markers until each receiver has seen one: any duplicate of a work item
    // would have reached that receiver before its marker.
    assert_each_delivered_once(&mut tx, &mut seen, &mut got, &bodies, 100).await;
    for id in 0..2 {
        assert!(
            got.iter().any(|(who, _)| *who == id),
            "receiver {id} got none of the {N} messages"
        );
    }
    for c in collectors {
        c.abort();
    }
}

#[tokio::test]
async fn sender_gets_credit_only_while_a_receiver_exists() {
    let router = RouterProc::with_config(MULTICAST_CONFIG, &[]).await;
    // An undeclared address (anycast in the default space) and a multicast one.
    for address in ["lonely", "prices"] {
        let mut a = router.client().await;
        let sender = a.open_sender(Some(address), false).await.expect("attach");
        round_trip(&mut a).await;
        assert_eq!(
            credit(&a, sender),
            0,
            "{address}: no receiver, so no credit"
        );

        let mut b = router.client().await;
        let (receiver, _) = b.open_receiver(Some(address), 10).await.expect("attach");
        next_event_where(&mut a, "credit once a receiver exists", |c, e| {
            matches!(e, Event::Flow { link } if link == sender && credit(c, sender) > 0)
                .then_some(())
        })
        .await;

        let (state, got) = tokio::join!(
            send_message(&mut a, sender, 0, text("hello")),
            recv_text(&mut b, receiver)
        );
        assert!(is_accepted(&state), "{address}: {state:?}");
        assert_eq!(got, "hello");

        b.conn.detach(receiver, None);
        b.flush().await.expect("flush");
        next_event_where(
            &mut a,
            "credit withdrawn after the receiver left",
            |c, e| {
                matches!(e, Event::Flow { link } if link == sender && credit(c, sender) == 0)
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn receiver_outcomes_reach_the_sender() {
    let router = RouterProc::start(&[]).await;
    let mut fe = router.fe2o3("outcomes").await;
    let mut rx = fe.receiver("rx", "outcomes").await;
    let mut tx = fe.sender("tx", "outcomes").await;

    assert_outcomes_relayed(&mut tx, &mut rx).await;
}

#[tokio::test]
async fn unsettled_deliveries_of_a_detaching_receiver_are_released_to_the_sender() {
    const N: usize = 20;
    const ACCEPT: usize = 5;
    let router = RouterProc::start(&[]).await;
    let mut fe_rx = router.fe2o3("leaver").await;
    let rx = fe_rx.receiver("rx", "handover").await;
    let mut fe_tx = router.fe2o3("producer").await;
    let mut tx = fe_tx.sender("tx", "handover").await;

    assert_unaccepted_released_on_detach(&mut tx, rx, N, ACCEPT).await;
}

#[tokio::test]
async fn unsettled_deliveries_of_a_lost_receiver_connection_are_released_to_the_sender() {
    const N: u64 = 3;
    let router = RouterProc::start(&[]).await;
    let mut r = router.client().await;
    let (rx, _) = r.open_receiver(Some("fragile"), 10).await.expect("attach");
    let mut s = router.client().await;
    let tx = s.open_sender(Some("fragile"), false).await.expect("attach");
    await_credit(&mut s, tx).await;
    for i in 0..N {
        assert!(s.conn.send(tx, &text(&format!("m-{i}")), false, i));
    }
    s.flush().await.expect("flush");
    let mut received = 0;
    next_event_where(&mut r, "the messages, left unsettled", |_, e| {
        if matches!(e, Event::Delivery { link, .. } if link == rx) {
            received += 1;
        }
        (received == N).then_some(())
    })
    .await;
    // The socket closes with no Close: the receiver's process died.
    drop(r);

    let mut released = Vec::new();
    next_event_where(&mut s, "released outcomes", |_, e| {
        if let Event::Outcome { token, state, .. } = e {
            assert!(
                matches!(state, Some(DeliveryState::Released(_))),
                "message {token}: {state:?}"
            );
            released.push(token);
        }
        (released.len() as u64 == N).then_some(())
    })
    .await;
    released.sort();
    assert_eq!(released, (0..N).collect::<Vec<_>>());
}

#[tokio::test]
async fn sender_and_receiver_with_the_same_link_name_on_one_session_both_work() {
    let router = RouterProc::start(&[]).await;
    let mut c = router.client().await;
    let ch = c.channel();
    let sender = c.conn.attach(
        ch,
        "twin",
        Role::Sender,
        Some(Default::default()),
        Some(Target {
            address: Some("twins".into()),
            ..Default::default()
        }),
        SenderSettleMode::Unsettled,
        ReceiverSettleMode::First,
    );
    let receiver = c.conn.attach(
        ch,
        "twin",
        Role::Receiver,
        Some(Source {
            address: Some("twins".into()),
            ..Default::default()
        }),
        Some(Default::default()),
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let (link, attach) = next_event_where(&mut c, "both attaches answered", |_, e| match e {
            Event::Attach {
                link,
                attach,
                reply: true,
            } => Some((link, attach)),
            Event::Detach { link, error, .. } => panic!("link {link:?} refused: {error:?}"),
            _ => None,
        })
        .await;
        assert!(
            attach.source.is_some() && attach.target.is_some(),
            "link {link:?} refused: {attach:?}"
        );
        answered.push(link);
    }
    answered.sort();
    let mut expected = vec![sender, receiver];
    expected.sort();
    assert_eq!(answered, expected);

    c.conn.flow(receiver, 10, false);
    await_credit(&mut c, sender).await;
    assert!(c.conn.send(sender, &text("to myself"), false, 7));
    let d = next_event_where(&mut c, "the message", |_, e| match e {
        Event::Delivery { link, delivery } if link == receiver => Some(delivery),
        Event::Outcome { link, .. } if link == sender => panic!("outcome before delivery"),
        _ => None,
    })
    .await;
    assert_eq!(
        message::body_bytes(&d.payload).as_deref(),
        Some(&b"to myself"[..])
    );
    c.conn.settle(d.id, DeliveryState::Accepted(Accepted {}));
    let state = next_event_where(&mut c, "the outcome", |_, e| match e {
        Event::Outcome {
            link,
            token: 7,
            state,
            ..
        } if link == sender => Some(state),
        _ => None,
    })
    .await;
    assert!(is_accepted(&state), "{state:?}");
}

#[tokio::test]
async fn slow_receiver_holds_a_sender_to_link_capacity() {
    const CAPACITY: u32 = 10;
    let router = RouterProc::start(&["--link-capacity", "10"]).await;
    let mut r = router.client().await;
    let (rx, _) = r.open_receiver(Some("slow"), 0).await.expect("attach");
    let mut s = router.client().await;
    let tx = s.open_sender(Some("slow"), false).await.expect("attach");
    await_credit(&mut s, tx).await;
    assert_eq!(
        credit(&s, tx),
        CAPACITY,
        "a sender's window is --link-capacity"
    );

    let bodies = numbered("held", CAPACITY as usize);
    for (i, b) in bodies.iter().enumerate() {
        assert!(s.conn.send(tx, &text(b), false, i as u64));
    }
    s.flush().await.expect("flush");
    round_trip(&mut s).await;
    assert_eq!(
        credit(&s, tx),
        0,
        "the router holds a full window for a receiver without credit: no more credit"
    );

    r.conn.flow(rx, CAPACITY, false);
    let mut got = Vec::new();
    for _ in &bodies {
        got.push(recv_text(&mut r, rx).await);
    }
    assert_eq!(got, bodies);
    let mut accepted = 0;
    next_event_where(&mut s, "outcomes and fresh credit", |c, e| {
        if let Event::Outcome { state, .. } = e {
            assert!(is_accepted(&state), "{state:?}");
            accepted += 1;
        }
        (accepted == bodies.len() && credit(c, tx) > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn drain_delivers_what_waits_then_uses_up_the_credit() {
    let router = RouterProc::start(&[]).await;
    let mut r = router.client().await;
    let (rx, _) = r.open_receiver(Some("drained"), 0).await.expect("attach");
    let mut s = router.client().await;
    let tx = s.open_sender(Some("drained"), false).await.expect("attach");
    await_credit(&mut s, tx).await;
    for (i, b) in ["one", "two"].iter().enumerate() {
        assert!(s.conn.send(tx, &text(b), false, i as u64));
    }
    s.flush().await.expect("flush");
    round_trip(&mut s).await;

    r.conn.flow(rx, 5, true);
    let mut got = Vec::new();
    next_event_where(&mut r, "the drained Flow", |c, e| match e {
        Event::Delivery { link, delivery } if link == rx => {
            got.push(message::body_bytes(&delivery.payload).expect("body"));
            None
        }
        Event::Flow { link } if link == rx && c.conn.link(rx).is_some_and(|l| l.credit == 0) => {
            Some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    let l = r.conn.link(rx).expect("link");
    assert_eq!(
        l.delivery_count, 5,
        "the unused credit is consumed by advancing the delivery-count (AMQP 1.0 §2.6.7)"
    );
}

#[tokio::test]
async fn anonymous_relay_routes_by_to_and_settles_what_it_cannot_route() {
    let router = RouterProc::start(&[]).await;
    let mut owner = router.client().await;
    let (inbox, dynamic) = owner
        .open_receiver(None, 10)
        .await
        .expect("dynamic receiver");
    let dynamic = dynamic.expect("the router names the dynamic node");
    let mut s = router.client().await;
    let relay = s.open_sender(None, false).await.expect("relay attach");

    let to = |to: Option<&str>| {
        message::encode_message(&MessageParts {
            to,
            body: b"routed",
            text: true,
            ..Default::default()
        })
    };
    let (state, got) = tokio::join!(
        send_message(&mut s, relay, 0, to(Some(&dynamic))),
        recv_text(&mut owner, inbox)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "routed");

    let state = send_message(&mut s, relay, 1, to(Some("nobody-home"))).await;
    assert!(
        matches!(state, Some(DeliveryState::Released(_))),
        "no receiver: released, got {state:?}"
    );
    let state = send_message(&mut s, relay, 2, to(None)).await;
    assert!(
        matches!(&state, Some(DeliveryState::Rejected(r)) if r.error.is_some()),
        "no `to`: rejected with an error, got {state:?}"
    );
    let state = send_message(&mut s, relay, 3, to(Some("$dynamic/no-such-node"))).await;
    assert!(
        matches!(&state, Some(DeliveryState::Rejected(r))
            if condition_of(&r.error) == Some(&AmqpError::NotFound.into())),
        "unknown dynamic node: rejected not-found, got {state:?}"
    );

    // Only the link that made a dynamic node may consume from it.
    assert_eq!(
        refusal(s.open_receiver(Some(&dynamic), 1).await),
        AmqpError::UnauthorizedAccess.into()
    );
}

#[tokio::test]
async fn large_messages_arrive_intact_through_a_small_session_window() {
    let router = RouterProc::start(&[]).await;
    // Four transfer frames at a time: large deliveries span many windows.
    let mut narrow = Fe::connect_with_window(router.amqp, "narrow", 4).await;
    let mut rx = narrow.receiver("rx", "bulk").await;
    let mut fe = router.fe2o3("bulk-sender").await;
    let mut tx = fe.sender("tx", "bulk").await;

    let bodies: Vec<String> = [300_000usize, 10, 1_000_000, 70_000]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let c = char::from(b'a' + i as u8);
            std::iter::repeat_n(c, *n).collect()
        })
        .chain(numbered("small", 50))
        .collect();
    let (outcomes, got) = tokio::join!(send_all(&mut tx, &bodies), recv_n(&mut rx, bodies.len()));
    assert_all_accepted(&outcomes);
    assert_eq!(got.len(), bodies.len());
    for (i, (g, b)) in got.iter().zip(&bodies).enumerate() {
        assert!(
            g == b,
            "message {i}: {} bytes arrived, {} sent",
            g.len(),
            b.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Multicast and request/reply
// ---------------------------------------------------------------------------

#[tokio::test]
async fn multicast_gives_every_receiver_every_message_once() {
    const N: usize = 50;
    let router = RouterProc::with_config(MULTICAST_CONFIG, &[]).await;
    let (tx_seen, mut seen) = mpsc::unbounded_channel();
    let mut conns = Vec::new();
    let mut collectors = Vec::new();
    for id in 0..3 {
        let mut fe = router.fe2o3(&format!("watcher-{id}")).await;
        let r = fe.receiver("prices-rx", "prices").await;
        collectors.push(spawn_collector(id, r, tx_seen.clone()));
        conns.push(fe);
    }
    let mut fe = router.fe2o3("ticker").await;
    let mut tx = fe.sender("prices-tx", "prices").await;
    let mut bodies = numbered("price", N);
    bodies.push("end".into());
    assert_all_accepted(&send_all(&mut tx, &bodies).await);

    // Each receiver's copies arrive in order; "end" is the last one sent.
    let mut per: Vec<Vec<String>> = vec![Vec::new(); 3];
    while per
        .iter()
        .any(|p| p.last().map(String::as_str) != Some("end"))
    {
        let (id, body) = within("every receiver's copies", seen.recv())
            .await
            .expect("collectors run");
        per[id].push(body);
    }
    for (id, got) in per.iter().enumerate() {
        assert_eq!(
            got, &bodies,
            "receiver {id} gets every message once, in order"
        );
    }
    for c in collectors {
        c.abort();
    }
}

#[tokio::test]
async fn request_reply_through_dynamic_reply_addresses_reaches_only_the_requester() {
    const REQUESTS: usize = 5;
    let router = RouterProc::start(&[]).await;
    let mut server = router.fe2o3("server").await;
    let mut requests = server.receiver("service-rx", "service").await;
    let mut replies = server.relay_sender("replies").await;
    let server_task = tokio::spawn(async move {
        let _server = server;
        loop {
            let d = requests.recv::<String>().await.expect("request");
            requests.accept(&d).await.expect("accept request");
            let reply_to = d
                .message()
                .properties
                .as_ref()
                .and_then(|p| p.reply_to.clone())
                .expect("request has reply-to");
            let reply = Message::builder()
                .properties(Properties::builder().to(reply_to).build())
                .value(format!("re: {}", d.body()))
                .build();
            let o = replies.send(reply).await.expect("reply");
            assert!(matches!(o, Outcome::Accepted(_)), "reply outcome {o:?}");
        }
    });

    let client = |name: &'static str| {
        let port = router.amqp;
        async move {
            let mut fe = Fe::connect(port, name).await;
            let (mut inbox, reply_to) = fe.dynamic_receiver("inbox").await;
            assert!(reply_to.starts_with("$dynamic/"), "{reply_to}");
            let mut tx = fe.sender("requests", "service").await;
            let requests: Vec<Message<_>> = (0..REQUESTS)
                .map(|i| {
                    Message::builder()
                        .properties(Properties::builder().reply_to(reply_to.clone()).build())
                        .value(format!("{name}-{i}"))
                        .build()
                })
                .collect();
            let pending = send_unsettled(&mut tx, &requests).await;
            let got = recv_n(&mut inbox, REQUESTS).await;
            assert_all_accepted(&outcomes(pending).await);
            let expected: Vec<String> = (0..REQUESTS).map(|i| format!("re: {name}-{i}")).collect();
            assert_eq!(got, expected, "{name} gets exactly its own replies");
        }
    };
    tokio::join!(client("alpha"), client("beta"));
    server_task.abort();
}

// ---------------------------------------------------------------------------
// Authentication, authorization and tenancy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn users_authenticate_are_confined_to_their_rules_and_tenants_are_isolated() {
    let router = RouterProc::with_config(TENANTS_CONFIG, &[]).await;

    // A space without anonymous access refuses anonymous clients: at SASL
    // when its hostname names the space, else at Open.
    let anon = Client::connect(&ClientOptions {
        vhost: Some("tenant-a".into()),
        ..router.opts()
    })
    .await;
    match anon {
        Err(ClientError::Handshake(HandshakeError::AuthFailed(_))) => {}
        Err(ClientError::Closed(Some(e))) => {
            assert_eq!(e.condition, AmqpError::UnauthorizedAccess.into())
        }
        other => panic!("anonymous client of tenant-a: {:?}", other.err()),
    }

    // PLAIN: a wrong password is refused during SASL.
    let wrong = Client::connect(&router.user_opts("alice@tenant-a", "looking-glass", false)).await;
    assert!(
        matches!(
            wrong,
            Err(ClientError::Handshake(HandshakeError::AuthFailed(_)))
        ),
        "wrong password: {:?}",
        wrong.err()
    );

    // And during SCRAM.
    let wrong = Client::connect(&router.user_opts("alice@tenant-a", "looking-glass", true)).await;
    assert!(
        matches!(
            wrong,
            Err(ClientError::Handshake(HandshakeError::AuthFailed(_)))
        ),
        "wrong password (SCRAM): {:?}",
        wrong.err()
    );

    // A user cannot open a connection into another tenant's space.
    let foreign = Client::connect(&ClientOptions {
        vhost: Some("tenant-b".into()),
        ..router.user_opts("alice@tenant-a", "wonderland", false)
    })
    .await;
    match foreign {
        Err(ClientError::Handshake(HandshakeError::AuthFailed(_))) => {}
        Err(ClientError::Closed(Some(e))) => {
            assert_eq!(e.condition, AmqpError::UnauthorizedAccess.into())
        }
        other => panic!("alice into tenant-b: {:?}", other.err()),
    }

    // PLAIN with the right password, as user@space.
    let mut alice = within(
        "alice (PLAIN)",
        Client::connect(&router.user_opts("alice@tenant-a", "wonderland", false)),
    )
    .await
    .expect("alice logs in with PLAIN");
    let alice_tx = alice
        .open_sender(Some("orders"), false)
        .await
        .expect("alice may send to orders");

    // Outside her rules: unauthorized-access; allowed but undeclared: not-found.
    assert_eq!(
        refusal(alice.open_sender(Some("secret"), false).await),
        AmqpError::UnauthorizedAccess.into()
    );
    assert_eq!(
        refusal(alice.open_receiver(Some("secret"), 1).await),
        AmqpError::UnauthorizedAccess.into()
    );
    assert_eq!(
        refusal(alice.open_sender(Some("missing"), false).await),
        AmqpError::NotFound.into()
    );

    // Tenant B has its own `orders`; its receiver is not a receiver for A.
    let bob = router.user_opts("bob@tenant-b", "builder", false);
    let bob_login = || within("bob (PLAIN)", Client::connect(&bob));
    let mut bob_rx_client = bob_login().await.expect("bob logs in");
    let (bob_rx, _) = bob_rx_client
        .open_receiver(Some("orders"), 10)
        .await
        .expect("bob receives");
    // The refused attach is a round trip: credit for alice's sender would
    // have arrived before its answer.
    refusal(alice.open_sender(Some("secret"), false).await);
    assert_eq!(
        credit(&alice, alice_tx),
        0,
        "a receiver in tenant-b gives no credit to a sender in tenant-a"
    );

    // SCRAM-SHA-256, naming the space by hostname instead of user@space.
    let mut alice2 = within(
        "alice (SCRAM)",
        Client::connect(&ClientOptions {
            vhost: Some("tenant-a".into()),
            ..router.user_opts("alice", "wonderland", true)
        }),
    )
    .await
    .expect("alice logs in with SCRAM");
    let (alice_rx, _) = alice2
        .open_receiver(Some("orders"), 10)
        .await
        .expect("alice receives");

    let (state, got) = tokio::join!(
        send_message(&mut alice, alice_tx, 1, text("for tenant-a")),
        recv_text(&mut alice2, alice_rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "for tenant-a");
    let mut bob_tx_client = bob_login().await.expect("bob logs in");
    let bob_tx = bob_tx_client
        .open_sender(Some("orders"), false)
        .await
        .expect("bob sends");
    let (state, got) = tokio::join!(
        send_message(&mut bob_tx_client, bob_tx, 1, text("for tenant-b")),
        recv_text(&mut bob_rx_client, bob_rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(
        got, "for tenant-b",
        "tenant-b's receiver sees only tenant-b's messages"
    );
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn amqps_listener_carries_messages_over_tls() {
    let dir = TempDir::new("tls");
    let (ca, cert, key) = write_tls_files(&dir);
    let mut args = vec!["--amqps".to_string(), "127.0.0.1:0".into()];
    args.extend(tls_args(&cert, &key));
    let router = RouterProc::spawn(args, Some(dir)).await;
    let port = router.amqps.expect("amqps listener");
    let opts = tls_opts(port, &ca);
    assert!(opts.tls);

    let mut rx_client = within("TLS client", Client::connect(&opts))
        .await
        .expect("TLS connect");
    let mut tx_client = within("TLS client", Client::connect(&opts))
        .await
        .expect("TLS connect");
    let (rx, _) = rx_client
        .open_receiver(Some("secure"), 10)
        .await
        .expect("attach");
    let tx = tx_client
        .open_sender(Some("secure"), false)
        .await
        .expect("attach");
    let (state, got) = tokio::join!(
        send_message(&mut tx_client, tx, 0, text("over tls")),
        recv_text(&mut rx_client, rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "over tls");

    // The amqps listener does not speak plain AMQP.
    let plain = Client::connect(&ClientOptions {
        tls: false,
        ..opts.clone()
    })
    .await;
    assert!(plain.is_err(), "plain AMQP on the amqps port must fail");
}

/// One listener takes plain AMQP, `amqps` and the AMQP TLS header
/// (AMQP 1.0 §5.2.1) when it has a certificate.
#[tokio::test]
async fn the_amqp_port_upgrades_to_tls_with_the_tls_header() {
    let dir = TempDir::new("tls-header");
    let (ca, cert, key) = write_tls_files(&dir);
    let router = RouterProc::spawn(tls_args(&cert, &key), Some(dir)).await;
    let header = ClientOptions {
        tls_header: true,
        ..tls_opts(router.amqp, &ca)
    };
    let direct = tls_opts(router.amqp, &ca);
    let plain = router.opts();
    let mut rx_client = within("TLS-header client", Client::connect(&header))
        .await
        .expect("TLS via the header");
    let mut tx_client = within("amqps client", Client::connect(&direct))
        .await
        .expect("TLS from the first byte");
    let mut plain_client = within("plain client", Client::connect(&plain))
        .await
        .expect("plain AMQP");
    let (rx, _) = rx_client
        .open_receiver(Some("upgraded"), 10)
        .await
        .expect("attach");
    rx_client.flush().await.expect("flush");
    for (i, c) in [&mut tx_client, &mut plain_client].into_iter().enumerate() {
        let tx = c
            .open_sender(Some("upgraded"), false)
            .await
            .expect("attach");
        let (state, got) = tokio::join!(
            send_message(c, tx, 0, text(&format!("hello {i}"))),
            recv_text(&mut rx_client, rx)
        );
        assert!(is_accepted(&state), "{state:?}");
        assert_eq!(got, format!("hello {i}"));
    }
}

// ---------------------------------------------------------------------------
// Bad input: each while another client keeps working
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_protocol_header_is_answered_with_a_supported_header_then_closed() {
    let router = RouterProc::start(&[]).await;
    let steady = SteadyTraffic::start(&router).await;
    for header in [*b"AMQP\x01\x01\x00\x0a", *b"GET / HT"] {
        let mut raw = RawConn::connect(router.amqp).await;
        raw.write(&header).await;
        let answer = raw
            .read_header()
            .await
            .unwrap_or_else(|| panic!("no protocol header in answer to {header:?}"));
        assert!(
            answer.starts_with(b"AMQP") && answer[5..] == [1, 0, 0],
            "answer to {header:?} is an AMQP 1.0 header: {answer:?}"
        );
        assert!(
            raw.next_frame().await.is_none(),
            "socket closed after the header"
        );
        steady.assert_progress().await;
    }
    steady.finish().await;
}

#[tokio::test]
async fn garbage_frame_closes_the_connection_with_a_decode_or_framing_error() {
    let router = RouterProc::start(&[]).await;
    let steady = SteadyTraffic::start(&router).await;
    let mut raw = RawConn::open(router.amqp, None).await;
    raw.write(&[0, 0, 0, 12, 2, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef])
        .await;
    let error = raw.expect_close().await;
    let c = condition_of(&error);
    assert!(
        c == Some(&AmqpError::DecodeError.into())
            || c == Some(&ConnectionError::FramingError.into()),
        "{error:?}"
    );
    steady.finish().await;
}

#[tokio::test]
async fn oversized_frame_closes_the_connection_with_a_framing_error() {
    let router = RouterProc::start(&[]).await;
    let steady = SteadyTraffic::start(&router).await;
    let mut raw = RawConn::open(router.amqp, None).await;
    // Only the header of a 100 000-byte frame: more than max-frame-size 65536.
    let mut header = 100_000u32.to_be_bytes().to_vec();
    header.extend_from_slice(&[2, 0, 0, 0]);
    raw.write(&header).await;
    let error = raw.expect_close().await;
    assert_eq!(
        condition_of(&error),
        Some(&ConnectionError::FramingError.into()),
        "{error:?}"
    );
    steady.finish().await;
}

#[tokio::test]
async fn attach_without_a_session_closes_the_connection_with_not_allowed() {
    let router = RouterProc::start(&[]).await;
    let steady = SteadyTraffic::start(&router).await;
    let mut raw = RawConn::open(router.amqp, None).await;
    raw.write(&encode(5, sender_attach("orphan", 0, "nowhere")))
        .await;
    let error = raw.expect_close().await;
    assert_eq!(
        condition_of(&error),
        Some(&AmqpError::NotAllowed.into()),
        "{error:?}"
    );
    steady.finish().await;
}

#[tokio::test]
async fn refused_open_is_the_last_frame_the_router_sends() {
    let router = RouterProc::with_config(TENANTS_CONFIG, &[]).await;
    let mut raw = RawConn::connect(router.amqp).await;
    // Open naming a space that refuses anonymous clients, and a Begin right
    // behind it, as clients pipeline them.
    raw.write(&HEADER_AMQP).await;
    let mut out = encode(0, open_performative(Some("tenant-a")));
    out.extend_from_slice(&encode(0, begin_performative()));
    raw.write(&out).await;
    assert_eq!(raw.read_header().await, Some(HEADER_AMQP));
    let error = raw.expect_close().await;
    assert_eq!(
        condition_of(&error),
        Some(&AmqpError::UnauthorizedAccess.into()),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn message_larger_than_max_message_size_detaches_the_sending_link() {
    let router = RouterProc::start(&["--max-message-size", "1000"]).await;
    let mut receiver = router.client().await;
    let (rx, _) = receiver
        .open_receiver(Some("big"), 10)
        .await
        .expect("attach");

    // A message under the limit goes through.
    let mut small = router.client().await;
    let tx = small.open_sender(Some("big"), false).await.expect("attach");
    let (state, got) = tokio::join!(
        send_message(&mut small, tx, 0, text(&"x".repeat(500))),
        recv_text(&mut receiver, rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got.len(), 500);

    // Both clients we have refuse to send over the announced limit, so the
    // oversized transfer is hand-built.
    let mut raw = RawConn::open(router.amqp, None).await;
    raw.write(&encode(0, begin_performative())).await;
    raw.write(&encode(0, sender_attach("huge", 0, "big"))).await;
    let mut attached = false;
    loop {
        match raw.next_performative().await {
            Performative::Attach(a) => {
                assert_eq!(
                    a.max_message_size,
                    Some(1000),
                    "the router announces its limit"
                );
                attached = true;
            }
            Performative::Flow(f) if f.handle.is_some() && f.link_credit.unwrap_or(0) > 0 => break,
            _ => {}
        }
    }
    assert!(attached);
    let payload = text(&"y".repeat(5000));
    let mut out = BytesMut::new();
    frame::encode_transfer(
        &mut out,
        0,
        &TransferHeader {
            handle: 0,
            first: Some((0, b"t0")),
            message_format: 0,
            settled: false,
            more: false,
        },
        &payload,
    );
    raw.write(&out).await;
    let detach = loop {
        match raw.next_performative().await {
            Performative::Detach(d) => break d,
            Performative::Close(c) => panic!("connection closed instead: {c:?}"),
            _ => {}
        }
    };
    assert_eq!(detach.handle, Handle(0));
    assert!(detach.closed);
    assert_eq!(
        detach.error.as_ref().map(|e| &e.condition),
        Some(&LinkError::MessageSizeExceeded.into()),
        "{detach:?}"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_until_one_closes() {
    let router = RouterProc::start(&["--max-connections", "2"]).await;
    let first = router.client().await;
    let _second = router.client().await;
    // A third is refused with a reason: an Open, then a Close with
    // `amqp:resource-limit-exceeded` (not a bare TCP close).
    let third = within("the third connection", Client::connect(&router.opts())).await;
    match third {
        Err(ClientError::Closed(Some(e))) => {
            assert_eq!(e.condition, AmqpError::ResourceLimitExceeded.into())
        }
        other => panic!("a third connection: {:?}", other.err()),
    }

    first.close().await;
    within("a connection after one closed", async {
        loop {
            match Client::connect(&router.opts()).await {
                Ok(c) => break c,
                // The router counts the closed connection down when its task ends.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn silent_client_is_closed_after_the_idle_timeout() {
    let router = RouterProc::start(&["--idle-timeout", "1"]).await;
    let mut raw = RawConn::open(router.amqp, None).await;
    let announced = raw.peer_open.as_ref().and_then(|o| o.idle_time_out);
    // Announcing less than it tolerates is fine; more would cut off a peer
    // that heartbeats at the announced rate.
    assert!(
        announced.is_some_and(|ms| ms > 0 && ms <= 1000),
        "the router announces an idle timeout of at most 1 s, got {announced:?}"
    );
    let error = raw.expect_close().await;
    assert_eq!(
        condition_of(&error),
        Some(&AmqpError::ResourceLimitExceeded.into()),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_closes_connections_and_exits_zero() {
    let mut router = RouterProc::start(&[]).await;
    let mut c = router.client().await;
    c.open_receiver(Some("anything"), 10).await.expect("attach");

    router.sigterm();

    let error = next_event_where(&mut c, "the router's Close", |_, e| match e {
        Event::Close { error } => Some(error),
        _ => None,
    })
    .await;
    assert_eq!(
        condition_of(&error),
        Some(&ConnectionError::ConnectionForced.into()),
        "{error:?}"
    );

    let mut exit = None;
    let child = &mut router.child;
    eventually("the router to exit", || {
        exit = child.try_wait().expect("try_wait");
        exit.is_some()
    })
    .await;
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exit status {exit:?}");
}

#[tokio::test]
async fn sigterm_releases_waiting_deliveries_to_their_senders_before_closing() {
    let router = RouterProc::start(&[]).await;
    let mut r = router.client().await;
    r.open_receiver(Some("parked"), 0).await.expect("attach");
    let mut s = router.client().await;
    let tx = s.open_sender(Some("parked"), false).await.expect("attach");
    await_credit(&mut s, tx).await;
    assert!(s.conn.send(tx, &text("parked"), false, 42));
    s.flush().await.expect("flush");
    // The router has queued the message (its receiver has no credit).
    round_trip(&mut s).await;

    router.sigterm();

    let mut outcome = None;
    next_event_where(&mut s, "the router's Close", |_, e| match e {
        Event::Outcome {
            token: 42, state, ..
        } => {
            outcome = Some(state);
            None
        }
        Event::Close { .. } => Some(()),
        _ => None,
    })
    .await;
    assert!(
        matches!(outcome, Some(Some(DeliveryState::Released(_)))),
        "the waiting delivery is released before the Close, got {outcome:?}"
    );
}
