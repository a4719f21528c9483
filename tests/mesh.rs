//! Process-level tests of the router mesh: each test spawns several real
//! `flotilla router` processes on `127.0.0.1:0`, joins them with
//! `--inter-router` listeners and `--peer` connections into a topology
//! (chain, ring, full mesh), waits until every router's latest
//! `mesh routes` log line lists every other router, and then checks what a
//! client relies on when its peer is attached to a different router:
//! delivery, credit, outcomes, multicast fan-out, request/reply, failover
//! and tenant isolation. Clients are fe2o3-amqp (one we did not write) and
//! our own `flotilla_amqp::client` (where credit must be seen exactly).
//!
//! Every wait is bounded ([`common::WAIT`]); nothing sleeps to synchronise.

use std::collections::BTreeMap;

use fe2o3_amqp::Sendable;
use flotilla_amqp::client::{Client, ClientOptions};
use flotilla_amqp::connection::{Event, LinkId};
use flotilla_amqp::types::messaging::{DeliveryState, Message, Outcome, Properties};
use tokio::sync::mpsc;

mod common;
use common::*;

// ---------------------------------------------------------------------------
// A config and routes (the mesh itself is built by `common::mesh`)
// ---------------------------------------------------------------------------

/// A second address space that admits anonymous clients, with an `orders`
/// address of its own (the default space keeps its zero-config `orders`).
const TENANT_X_CONFIG: &str = "\
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-x}
spec: {authentication: {anonymous: true}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: x-orders}
spec: {addressSpace: tenant-x, address: orders, type: anycast}
";

/// Waits until `router`'s latest routes no longer list `gone`.
async fn await_no_route(router: &RouterProc, gone: &str) {
    let what = format!("router {} to drop its route to {gone}", router.name);
    router
        .wait_log(&what, |log| {
            latest_routes(log)
                .filter(|r| !r.contains_key(gone))
                .map(|_| ())
        })
        .await
}

/// The current routes of `router` (its latest `mesh routes` line).
fn routes_now(router: &RouterProc) -> BTreeMap<String, (String, u64)> {
    latest_routes(&router.log_lines()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Our own client
// ---------------------------------------------------------------------------

/// Our client of `space` (an address space admitting anonymous clients).
async fn client_of(router: &RouterProc, space: &str) -> Client {
    let opts = ClientOptions {
        vhost: Some(space.into()),
        ..router.opts()
    };
    within("our client to connect", Client::connect(&opts))
        .await
        .expect("connect")
}

/// Waits until the router gives our sending `link` credit, from a Flow.
async fn await_flow_credit(c: &mut Client, link: LinkId, what: &str) {
    if credit(c, link) > 0 {
        return;
    }
    next_event_where(c, what, |c, e| {
        matches!(e, Event::Flow { link: l } if l == link && credit(c, link) > 0).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Anycast across hops
// ---------------------------------------------------------------------------

#[tokio::test]
async fn messages_cross_a_chain_of_routers_once_each_in_order_accepted_end_to_end() {
    const N: usize = 200;
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    let (a, c) = (&routers[0], &routers[2]);

    let mut receiver = c.client().await;
    // Credit for the N messages and the last one.
    let (rx, _) = receiver
        .open_receiver(Some("chain"), N as u32 + 1)
        .await
        .expect("attach");
    let mut sender = a.client().await;
    let tx = sender
        .open_sender(Some("chain"), false)
        .await
        .expect("attach");

    let bodies = numbered("m", N);
    let (states, got) = tokio::join!(
        send_texts(&mut sender, tx, &bodies),
        recv_texts(&mut receiver, rx, N)
    );
    assert_eq!(got, bodies, "every message arrives once, in order");
    assert_all_states_accepted(&states);

    // Nothing more follows: one last message is the next to arrive.
    let end = vec!["end".to_string()];
    let (states, got) = tokio::join!(
        send_texts(&mut sender, tx, &end),
        recv_text(&mut receiver, rx)
    );
    assert_eq!(got, "end", "no duplicate arrived after the {N} messages");
    assert_all_states_accepted(&states);
}

/// The same path with fe2o3-amqp at both ends: an independent client.
#[tokio::test]
async fn an_independent_clients_messages_cross_a_chain_of_routers_in_order() {
    const N: usize = 200;
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    let (a, c) = (&routers[0], &routers[2]);

    let mut fe_rx = c.fe2o3("chain-receiver").await;
    let mut rx = fe_rx.receiver("chain-rx", "chain").await;
    let mut fe_tx = a.fe2o3("chain-sender").await;
    // The attach completes at once; sends wait for the mesh's credit.
    let mut tx = fe_tx.sender("chain-tx", "chain").await;

    let mut bodies = numbered("m", N);
    bodies.push("end".into());
    let (outcomes, got) = tokio::join!(send_all(&mut tx, &bodies), recv_n(&mut rx, bodies.len()));
    assert_eq!(got, bodies, "every message arrives once, in order");
    assert_all_accepted(&outcomes);

    // Pre-settled messages, then an unsettled one: whatever arrives before
    // it is all there was.
    let presettled = numbered("presettled", N);
    for b in &presettled {
        let s = Sendable::builder().message(b.clone()).settled(true).build();
        let o = within("a pre-settled send", tx.send(s))
            .await
            .expect("send");
        assert!(matches!(o, Outcome::Accepted(_)));
    }
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
async fn large_messages_cross_a_chain_of_routers_intact() {
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    // Four transfer frames at a time: large deliveries span many windows.
    let mut narrow = Fe::connect_with_window(routers[2].amqp, "narrow", 4).await;
    let mut rx = narrow.receiver("rx", "bulk").await;
    let mut fe = routers[0].fe2o3("bulk-sender").await;
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

#[tokio::test]
async fn receiver_outcomes_reach_a_sender_two_routers_away() {
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    let mut fe_rx = routers[2].fe2o3("judge").await;
    let mut rx = fe_rx.receiver("rx", "outcomes").await;
    let mut fe_tx = routers[0].fe2o3("hopeful").await;
    let mut tx = fe_tx.sender("tx", "outcomes").await;

    assert_outcomes_relayed(&mut tx, &mut rx).await;
}

#[tokio::test]
async fn unsettled_deliveries_of_a_detaching_receiver_two_routers_away_are_released_to_the_sender()
{
    const N: usize = 20;
    const ACCEPT: usize = 5;
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    let mut fe_rx = routers[2].fe2o3("leaver").await;
    let rx = fe_rx.receiver("rx", "handover").await;
    let mut fe_tx = routers[0].fe2o3("producer").await;
    let mut tx = fe_tx.sender("tx", "handover").await;

    assert_unaccepted_released_on_detach(&mut tx, rx, N, ACCEPT).await;
}

#[tokio::test]
async fn anycast_in_a_ring_shares_messages_between_receivers_on_two_routers_without_duplicates() {
    const N: usize = 200;
    let routers = mesh(
        &["A", "B", "C", "D"],
        &[("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")],
        None,
    )
    .await;
    let (a, b, d) = (&routers[0], &routers[1], &routers[3]);

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut conns = Vec::new();
    let mut collectors = Vec::new();
    for (id, r) in [b, d].into_iter().enumerate() {
        let mut fe = r.fe2o3(&format!("worker-{id}")).await;
        let rx = fe.receiver("work-rx", "work").await;
        // Its credit is in place before anything is sent.
        fe.round_trip().await;
        collectors.push(spawn_collector(id, rx, seen_tx.clone()));
        conns.push(fe);
    }
    let mut fe = a.fe2o3("producer").await;
    let mut tx = fe.sender("work-tx", "work").await;

    // The receivers' addresses travel the mesh on their own time: probe
    // until each receiver has had a message, so both are known.
    let mut probed = [false; 2];
    for i in 0.. {
        assert!(i < 500, "probes never reached both receivers");
        if probed.iter().all(|p| *p) {
            break;
        }
        let o = within("a probe", tx.send(format!("probe-{i}"))).await;
        assert!(matches!(o, Ok(Outcome::Accepted(_))), "{o:?}");
        loop {
            let (id, body) = within("the probe", seen.recv())
                .await
                .expect("collectors run");
            probed[id] = true;
            if body == format!("probe-{i}") {
                break;
            }
        }
    }

    let bodies = numbered("job", N);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    let mut got: Vec<(usize, String)> = Vec::new();
    while got.len() < N {
        let (id, body) = within("the work items", seen.recv())
            .await
            .expect("collectors run");
        assert!(
            !body.starts_with("probe-"),
            "a probe after the work: {body}"
        );
        got.push((id, body));
    }
    // Per receiver, messages arrive in the order they were routed: send
    // markers until each receiver has seen one; a duplicate of a work item
    // would have reached that receiver before its marker.
    assert_each_delivered_once(&mut tx, &mut seen, &mut got, &bodies, 500).await;
    for (id, name) in ["B", "D"].iter().enumerate() {
        assert!(
            got.iter().any(|(who, _)| *who == id),
            "the receiver on {name} got none of the {N} messages"
        );
    }
    for c in collectors {
        c.abort();
    }
}

// ---------------------------------------------------------------------------
// Multicast
// ---------------------------------------------------------------------------

/// A multicast receiver on every router of the mesh `ids`/`links` and a
/// sender on the first: every receiver gets every message once, in order.
async fn multicast_reaches_every_router_once(ids: &[&str], links: &[(&str, &str)]) {
    const N: usize = 50;
    let routers = mesh(ids, links, Some(MULTICAST_CONFIG)).await;
    let n = routers.len();

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut conns = Vec::new();
    let mut collectors = Vec::new();
    for (id, r) in routers.iter().enumerate() {
        let mut fe = r.fe2o3(&format!("watcher-{id}")).await;
        let rx = fe.receiver("prices-rx", "prices").await;
        fe.round_trip().await;
        collectors.push(spawn_collector(id, rx, seen_tx.clone()));
        conns.push(fe);
    }
    let mut fe = routers[0].fe2o3("ticker").await;
    let mut tx = fe.sender("prices-tx", "prices").await;

    // Probe until every receiver has had a copy: each probe reaches the
    // receiver on the sender's router at once, the others once their
    // routers' addresses have reached it.
    let mut per: Vec<Vec<String>> = vec![Vec::new(); n];
    for i in 0.. {
        assert!(i < 1000, "probes never reached every receiver: {per:?}");
        if per.iter().all(|p| !p.is_empty()) {
            break;
        }
        let probe = format!("probe-{i}");
        let o = within("a probe", tx.send(probe.clone())).await;
        assert!(matches!(o, Ok(Outcome::Accepted(_))), "{o:?}");
        while per[0].last() != Some(&probe) {
            let (id, body) = within("the probe on the sender's router", seen.recv())
                .await
                .expect("collectors run");
            per[id].push(body);
        }
    }

    let mut bodies = numbered("price", N);
    bodies.push("end".into());
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    // Each receiver's copies arrive in order; "end" is the last one sent.
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
        let got: Vec<&String> = got.iter().filter(|b| !b.starts_with("probe-")).collect();
        let expected: Vec<&String> = bodies.iter().collect();
        assert_eq!(
            got, expected,
            "the receiver on router {} gets every message once, in order",
            ids[id]
        );
    }
    for c in collectors {
        c.abort();
    }
}

#[tokio::test]
async fn multicast_in_a_full_mesh_gives_every_receiver_on_every_router_every_message_once() {
    multicast_reaches_every_router_once(&["A", "B", "C"], &[("A", "B"), ("B", "C"), ("A", "C")])
        .await;
}

/// In a ring the far router is reached through one of two equal paths:
/// its receiver still gets one copy.
#[tokio::test]
async fn multicast_in_a_ring_gives_every_receiver_every_message_once() {
    multicast_reaches_every_router_once(
        &["A", "B", "C", "D"],
        &[("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")],
    )
    .await;
}

// ---------------------------------------------------------------------------
// Credit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sender_gets_credit_only_once_a_receiver_is_reachable_somewhere_in_the_mesh() {
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;
    let (a, c) = (&routers[0], &routers[2]);

    let mut s = a.client().await;
    let tx = s.open_sender(Some("lonely"), false).await.expect("attach");
    round_trip(&mut s).await;
    assert_eq!(credit(&s, tx), 0, "no receiver anywhere, so no credit");

    let mut r = c.client().await;
    let (rx, _) = r.open_receiver(Some("lonely"), 10).await.expect("attach");
    await_flow_credit(&mut s, tx, "credit once a receiver exists two hops away").await;

    let (state, got) = tokio::join!(
        send_message(&mut s, tx, 0, text("hello")),
        recv_text(&mut r, rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "hello");

    r.conn.detach(rx, None);
    r.flush().await.expect("flush");
    next_event_where(
        &mut s,
        "credit withdrawn after the remote receiver left",
        |c, e| matches!(e, Event::Flow { link } if link == tx && credit(c, tx) == 0).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn sender_loses_credit_when_the_router_between_it_and_the_receiver_dies() {
    let mut routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;

    let mut r = routers[2].client().await;
    let (_rx, _) = r.open_receiver(Some("cut-off"), 10).await.expect("attach");
    let mut s = routers[0].client().await;
    let tx = s.open_sender(Some("cut-off"), false).await.expect("attach");
    await_flow_credit(&mut s, tx, "credit for the receiver on C").await;

    routers[1].kill();
    await_no_route(&routers[0], "C").await;
    next_event_where(&mut s, "credit withdrawn once C is unreachable", |c, e| {
        matches!(e, Event::Flow { link } if link == tx && credit(c, tx) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_router_rejoins_the_mesh_and_carries_traffic_again() {
    // B connects to both A and C, so it can come back on new ports.
    let mut routers = mesh(&["A", "C", "B"], &[("A", "B"), ("B", "C")], None).await;
    let peers: Vec<u16> = routers[..2]
        .iter()
        .map(|r| r.inter_router.expect("inter-router listener"))
        .collect();

    let mut r = routers[1].client().await;
    let (rx, _) = r.open_receiver(Some("again"), 10).await.expect("attach");
    let mut s = routers[0].client().await;
    let tx = s.open_sender(Some("again"), false).await.expect("attach");
    let (state, got) = tokio::join!(
        send_message(&mut s, tx, 0, text("before")),
        recv_text(&mut r, rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "before");

    routers[2].kill();
    await_no_route(&routers[0], "C").await;
    await_no_route(&routers[1], "A").await;

    routers[2] = start_mesh_router("B", &peers, None, &[]).await;
    await_routes(&routers[0], &["B", "C"]).await;
    await_routes(&routers[1], &["A", "B"]).await;
    await_routes(&routers[2], &["A", "C"]).await;
    let (state, got) = tokio::join!(
        send_message(&mut s, tx, 1, text("after")),
        recv_text(&mut r, rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(got, "after");
}

/// Backpressure across the mesh: a receiver that takes nothing makes a
/// sender two routers away run out of credit, as it would on one router
/// (`slow_receiver_holds_a_sender_to_link_capacity` in tests/router.rs);
/// the routers between do not queue without bound.
#[tokio::test]
async fn a_stalled_receiver_two_routers_away_stops_the_sender() {
    const CAPACITY: u32 = 10;
    /// Far more than the routers' windows add up to: the sender must have
    /// stopped long before.
    const LIMIT: u64 = 20_000;
    /// No credit for this long: the sender has stopped. (Credit that is
    /// never coming has no event to wait for.)
    const QUIET: std::time::Duration = std::time::Duration::from_secs(2);
    let routers = mesh_with(
        &["A", "B", "C"],
        &[("A", "B"), ("B", "C")],
        None,
        &["--link-capacity", "10"],
    )
    .await;
    let mut r = routers[2].client().await;
    let (rx, _) = r.open_receiver(Some("stalled"), 0).await.expect("attach");
    let mut s = routers[0].client().await;
    let tx = s.open_sender(Some("stalled"), false).await.expect("attach");
    await_flow_credit(&mut s, tx, "credit for the receiver on C").await;
    assert_eq!(
        credit(&s, tx),
        CAPACITY,
        "a sender's window is --link-capacity"
    );

    let mut sent = 0u64;
    loop {
        while credit(&s, tx) > 0 {
            assert!(
                sent < LIMIT,
                "the sender never runs out of credit: {sent} messages taken for a receiver \
                 that has granted none"
            );
            assert!(s.conn.send(tx, &text(&format!("m-{sent}")), false, sent));
            sent += 1;
        }
        s.flush().await.expect("flush");
        let more = tokio::time::timeout(
            QUIET,
            next_event_where(&mut s, "more credit", |c, e| {
                matches!(e, Event::Flow { link } if link == tx && credit(c, tx) > 0).then_some(())
            }),
        )
        .await;
        if more.is_err() {
            break;
        }
    }

    // Once the receiver takes messages, all of them arrive, in order.
    r.conn.flow(rx, sent as u32, false);
    let mut got = Vec::new();
    for _ in 0..sent {
        got.push(recv_text(&mut r, rx).await);
    }
    let expected: Vec<String> = (0..sent).map(|i| format!("m-{i}")).collect();
    assert_eq!(got, expected);
}

// ---------------------------------------------------------------------------
// Request/reply
// ---------------------------------------------------------------------------

#[tokio::test]
async fn requests_and_replies_cross_the_mesh_through_dynamic_reply_addresses() {
    const REQUESTS: usize = 5;
    let routers = mesh(&["A", "B", "C"], &[("A", "B"), ("B", "C")], None).await;

    // The service: requests from `service`, replies by `to` through the
    // anonymous relay, both on C.
    let mut server = routers[2].fe2o3("server").await;
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

    // Requesters on A (two hops away) and on B (one hop).
    let client = |name: &'static str, port: u16| async move {
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
    };
    tokio::join!(
        client("on-a", routers[0].amqp),
        client("on-b", routers[1].amqp)
    );
    assert!(!server_task.is_finished(), "the service failed");
    server_task.abort();
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

/// Outcomes seen by a sender that keeps up to [`IN_FLIGHT`] unsettled
/// messages in flight.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    accepted: u64,
    released: u64,
    other: Vec<(u64, Option<DeliveryState>)>,
    /// Messages sent before the router was lost have tokens below this.
    lost_at: Option<u64>,
    accepted_after_loss: u64,
}

const IN_FLIGHT: u64 = 50;

impl Tally {
    fn settled(&self) -> u64 {
        self.accepted + self.released + self.other.len() as u64
    }

    /// Sends while there is credit (and `sending`), then handles one event.
    async fn step(&mut self, c: &mut Client, link: LinkId, sending: bool) {
        while sending && credit(c, link) > 0 && self.sent - self.settled() < IN_FLIGHT {
            let body = format!("m-{}", self.sent);
            assert!(c.conn.send(link, &text(&body), false, self.sent));
            self.sent += 1;
        }
        match c.next_event().await.expect("sender's connection") {
            Event::Outcome {
                link: l,
                token,
                state,
                settled: true,
            } if l == link => match state {
                Some(DeliveryState::Accepted(_)) => {
                    self.accepted += 1;
                    if self.lost_at.is_some_and(|k| token >= k) {
                        self.accepted_after_loss += 1;
                    }
                }
                Some(DeliveryState::Released(_)) => self.released += 1,
                other => self.other.push((token, other)),
            },
            Event::Detach { link: l, error, .. } if l == link => {
                panic!("the sending link was detached: {error:?}; {self:?}")
            }
            _ => {}
        }
    }
}

/// How the router on the path is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// `kill -9`: its sockets close, so its neighbours know at once.
    Killed,
    /// `kill -STOP`: its sockets stay open but it says nothing, so its
    /// neighbours know only when its HELLOs stop (3 s).
    Frozen,
}

/// Ring A-B-C-D, a receiver on C, a sender on A keeping [`IN_FLIGHT`]
/// unsettled messages in flight; the router A reaches C through is lost
/// under load. Traffic must continue on the other path and every delivery
/// must end accepted or released.
async fn fail_over(loss: Loss) {
    const BEFORE: u64 = 300;
    const AFTER: u64 = 300;
    let mut routers = mesh(
        &["A", "B", "C", "D"],
        &[("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")],
        None,
    )
    .await;

    let mut fe_rx = routers[2].fe2o3("receiver-on-c").await;
    let rx = fe_rx.receiver("rx", "failover").await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let collector = spawn_collector(0, rx, seen_tx);

    let mut s = routers[0].client().await;
    let tx = s
        .open_sender(Some("failover"), false)
        .await
        .expect("attach");
    await_flow_credit(&mut s, tx, "credit for the receiver on C").await;

    let mut tally = Tally::default();
    within("messages accepted before the loss", async {
        while tally.accepted < BEFORE {
            tally.step(&mut s, tx, true).await;
        }
    })
    .await;

    // Lose the router A reaches C through, under load.
    let hop = routes_now(&routers[0])
        .get("C")
        .map(|(hop, _)| hop.clone())
        .expect("A has a route to C");
    assert!(hop == "B" || hop == "D", "A reaches C through {hop}");
    let victim = if hop == "B" { 1 } else { 3 };
    tally.lost_at = Some(tally.sent);
    match loss {
        Loss::Killed => routers[victim].kill(),
        Loss::Frozen => routers[victim].signal("STOP"),
    }

    let what = format!("messages accepted after {hop} was {loss:?}");
    within(&what, async {
        while tally.accepted_after_loss < AFTER {
            tally.step(&mut s, tx, true).await;
        }
    })
    .await;
    // Stop sending; every delivery still in flight is settled one way or
    // the other.
    let drained = tokio::time::timeout(WAIT, async {
        while tally.settled() < tally.sent {
            tally.step(&mut s, tx, false).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "deliveries never settled (lost): {} sent, {tally:?}",
        tally.sent
    );
    assert!(tally.other.is_empty(), "unexpected outcomes: {tally:?}");
    assert_eq!(
        tally.accepted + tally.released,
        tally.sent,
        "every delivery is accepted or released: {tally:?}"
    );
    assert!(tally.accepted_after_loss > 0, "{tally:?}");

    // The receiver got (at least) every accepted message.
    let mut received = 0u64;
    within("the receiver to have every accepted message", async {
        while received < tally.accepted {
            seen.recv().await.expect("collector runs");
            received += 1;
        }
    })
    .await;
    collector.abort();
}

#[tokio::test]
async fn traffic_fails_over_to_the_other_path_when_a_router_on_the_path_is_killed() {
    fail_over(Loss::Killed).await;
}

#[tokio::test]
async fn traffic_fails_over_to_the_other_path_when_a_router_on_the_path_freezes() {
    fail_over(Loss::Frozen).await;
}

// ---------------------------------------------------------------------------
// Discovery and tenancy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_router_given_a_dns_name_as_peer_joins_the_mesh() {
    let a = RouterProc::start(&["--inter-router", "127.0.0.1:0", "--router-id", "A"]).await;
    let port = a.inter_router.expect("inter-router listener");
    let peer = format!("localhost:{port}");
    let b = RouterProc::start(&["--router-id", "B", "--peer", &peer]).await;
    await_routes(&b, &["A"]).await;
    await_routes(&a, &["B"]).await;

    // And it carries messages both ways.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let mut r = to.client().await;
        let (rx, _) = r.open_receiver(Some("found"), 10).await.expect("attach");
        let mut s = from.client().await;
        let tx = s.open_sender(Some("found"), false).await.expect("attach");
        let (state, got) = tokio::join!(
            send_message(&mut s, tx, 0, text("via localhost")),
            recv_text(&mut r, rx)
        );
        assert!(is_accepted(&state), "{state:?}");
        assert_eq!(got, "via localhost");
    }
}

#[tokio::test]
async fn address_spaces_stay_isolated_across_the_mesh() {
    const N: usize = 20;
    let routers = mesh(
        &["A", "B", "C"],
        &[("A", "B"), ("B", "C")],
        Some(TENANT_X_CONFIG),
    )
    .await;
    let (a, c) = (&routers[0], &routers[2]);

    // A receiver of tenant-x's `orders` on C; a tenant-x sender on A gets
    // credit, so A knows that receiver.
    let mut x_rx_client = client_of(c, "tenant-x").await;
    let (x_rx, _) = x_rx_client
        .open_receiver(Some("orders"), 100)
        .await
        .expect("tenant-x receives");
    let mut x_tx_client = client_of(a, "tenant-x").await;
    let x_tx = x_tx_client
        .open_sender(Some("orders"), false)
        .await
        .expect("tenant-x sends");
    await_flow_credit(&mut x_tx_client, x_tx, "tenant-x's sender to get credit").await;

    // The default space's `orders` has no receiver anywhere.
    let mut d_tx_client = a.client().await;
    let d_tx = d_tx_client
        .open_sender(Some("orders"), false)
        .await
        .expect("default space sends");
    round_trip(&mut d_tx_client).await;
    assert_eq!(
        credit(&d_tx_client, d_tx),
        0,
        "a receiver in tenant-x gives no credit to a sender in the default space"
    );

    // With a receiver of its own on C, the default space's messages go to it
    // alone.
    let mut d_rx_client = c.client().await;
    let (d_rx, _) = d_rx_client
        .open_receiver(Some("orders"), N as u32)
        .await
        .expect("default space receives");
    let bodies = numbered("default", N);
    let (states, got) = tokio::join!(
        send_texts(&mut d_tx_client, d_tx, &bodies),
        recv_texts(&mut d_rx_client, d_rx, N)
    );
    assert_all_states_accepted(&states);
    assert_eq!(got, bodies);

    let (state, got) = tokio::join!(
        send_message(&mut x_tx_client, x_tx, 0, text("for tenant-x")),
        recv_text(&mut x_rx_client, x_rx)
    );
    assert!(is_accepted(&state), "{state:?}");
    assert_eq!(
        got, "for tenant-x",
        "tenant-x's receiver sees only tenant-x's messages"
    );
}
