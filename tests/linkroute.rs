//! Link routing to a broker (`flotilla broker --router`): a client attached
//! to a router, or to another router of its mesh, reaches the broker's
//! queues and topics as if it were attached to the broker itself. Each
//! test spawns real `flotilla router` and `flotilla broker` processes on
//! `127.0.0.1:0` and checks what a client relies on through the routers:
//! exact count and order, outcomes and redelivery, credit and drain,
//! nothing accepted lost across `kill -9` of the broker (issue #4), links
//! detached (not hung) when the broker goes, address spaces kept apart,
//! topic subscriptions (durable ones across a crash), large messages.
//!
//! Every wait is bounded ([`common::WAIT`]); nothing sleeps to synchronise
//! (attaches that the mesh cannot route yet are retried until a deadline).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use common::*;
use fe2o3_amqp::link::SenderAttachError;
use flotilla_amqp::client::{Client, ClientError, ClientOptions};
use flotilla_amqp::connection::{Delivery, Event, LinkId};
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody, ErrorCondition};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Modified};

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// A router config declaring each of `queues` (in the default space) as a
/// queue: the router routes links to them to a broker.
fn queues_config(queues: &[&str]) -> String {
    queues
        .iter()
        .map(|q| {
            format!(
                "apiVersion: flotilla.dev/v1\nkind: Address\nmetadata: {{name: {q}}}\nspec: {{address: {q}, type: queue}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

// ---------------------------------------------------------------------------
// Our own client through a router
// ---------------------------------------------------------------------------

fn condition_is(e: &AmqpErrorBody, c: AmqpError) -> bool {
    matches!(&e.condition, ErrorCondition::AmqpError(x) if *x == c)
}

fn refused_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused(Some(b)) if condition_is(b, AmqpError::NotFound))
}

/// Attaches a sender to `address`, retrying (bounded by [`WAIT`]) while
/// the router refuses it: no broker reachable yet (the mesh floods where
/// brokers are), or the route just closed under a broker that died.
async fn routed_sender(c: &mut Client, address: &str) -> LinkId {
    within("a routed sender", async {
        loop {
            match c.open_sender(Some(address), false).await {
                Ok(link) => return link,
                Err(ClientError::Refused(_)) => {}
                Err(e) => panic!("routed sender to {address}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Like [`routed_sender`], for a receiver granting `credit`.
async fn routed_receiver(c: &mut Client, address: &str, credit: u32) -> LinkId {
    within("a routed receiver", async {
        loop {
            match c.open_receiver(Some(address), credit).await {
                Ok((link, _)) => return link,
                Err(ClientError::Refused(_)) => {}
                Err(e) => panic!("routed receiver from {address}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A client of `router` with a sender routed to `address` that has sent
/// `bodies`, each accepted.
async fn routed_producer(
    router: &RouterProc,
    address: &str,
    bodies: &[String],
) -> (Client, LinkId) {
    let mut p = router.client().await;
    let tx = routed_sender(&mut p, address).await;
    send_accepted(&mut p, tx, bodies).await;
    (p, tx)
}

/// A client of `router` with a receiver routed from `address`, granting
/// `credit`.
async fn routed_consumer(router: &RouterProc, address: &str, credit: u32) -> (Client, LinkId) {
    let mut c = router.client().await;
    let rx = routed_receiver(&mut c, address, credit).await;
    (c, rx)
}

/// Sends `bodies` and asserts each was accepted.
async fn send_accepted(c: &mut Client, link: LinkId, bodies: &[String]) {
    for (i, s) in send_texts(c, link, bodies).await.iter().enumerate() {
        assert!(is_accepted(s), "{}: {s:?}", bodies[i]);
    }
}

/// Grants `credit` on `link` with drain set and returns the bodies (each
/// accepted) of what arrives before the drain's answer: the credit used
/// up, the delivery-count advanced by all of it (AMQP 1.0 §2.6.7).
async fn drain_texts(c: &mut Client, link: LinkId, credit: u32) -> Vec<String> {
    let dc = c.conn.link(link).expect("link").delivery_count;
    c.conn.flow(link, credit, true);
    c.flush().await.expect("flush");
    let mut got = Vec::new();
    within("what is there, then the drain's answer", async {
        loop {
            match c.next_event().await.expect("consumer's connection") {
                Event::Delivery { link: l, delivery } if l == link => {
                    let body = flotilla_amqp::message::body_bytes(&delivery.payload).expect("text");
                    got.push(String::from_utf8(body).expect("utf-8"));
                    c.conn
                        .settle(delivery.id, DeliveryState::Accepted(Accepted {}));
                }
                Event::Flow { link: l } if l == link => {
                    let state = c.conn.link(link).expect("link");
                    if state.credit == 0 && state.delivery_count == dc.wrapping_add(credit) {
                        break;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    got
}

/// The next delivery on `link`, left unsettled.
async fn next_delivery(c: &mut Client, link: LinkId) -> Delivery {
    next_event_where(c, "a delivery", |_, e| match e {
        Event::Delivery { link: l, delivery } if l == link => Some(delivery),
        Event::Detach { link: l, error, .. } if l == link => {
            panic!("the receiving link was detached: {error:?}")
        }
        _ => None,
    })
    .await
}

/// The error the peer detached `link` with (its detach must come).
async fn detach_error(c: &mut Client, link: LinkId, what: &str) -> Option<AmqpErrorBody> {
    next_event_where(c, what, |_, e| match e {
        Event::Detach { link: l, error, .. } if l == link => Some(error),
        _ => None,
    })
    .await
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Zero-config: a client asks for a queue by terminus capability. Before a
/// broker connects the router refuses with `amqp:not-found`; then every
/// message is accepted only once stored (it survives `kill -9` of the
/// broker right after), arrives once and in order through the router, and
/// the consumer's outcomes reach the broker: released comes back
/// unchanged (AMQP 1.0 §3.4.4: the delivery-count of a released message
/// is not incremented), modified (delivery-failed) comes back with the
/// header's delivery-count 1.
#[tokio::test]
async fn a_queue_behind_one_router_keeps_count_order_and_outcomes() {
    let router = RouterProc::start(&[]).await;
    let mut fe = router.fe2o3("lr-one-producer").await;
    match fe.queue_sender("too-early", "orders").await {
        Err(SenderAttachError::RemoteClosedWithError(e)) => {
            assert!(condition_is(&e, AmqpError::NotFound), "{e:?}")
        }
        Err(e) => panic!("expected amqp:not-found, got {e:?}"),
        Ok(_) => panic!("attached to a queue with no broker behind the router"),
    }

    let dir = TempDir::new("lr-one");
    let mut b = broker_connected_to(&router, &dir, &[]).await;
    b.wait_log("the broker to say it is connected", |log| {
        log.iter()
            .any(|l| l.contains("connected to router"))
            .then_some(())
    })
    .await;
    let mut tx = fe
        .queue_sender("orders-in", "orders")
        .await
        .expect("queue sender attach");
    let bodies = numbered("order", 50);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);

    // Accepted means stored: kill -9 now, nothing is lost.
    b.kill();
    await_no_broker_at(&router).await;
    let _b = broker_connected_to(&router, &dir, &[]).await;

    let mut fc = router.fe2o3("lr-one-consumer").await;
    let mut rx = fc
        .manual_receiver("orders-out", "orders", Some("queue"))
        .await;
    let d = recv_one(&mut rx).await;
    assert_eq!((d.body().as_str(), delivery_count(&d)), ("order-0", 0));
    within("release", rx.release(&d)).await.expect("release");
    let d = recv_one(&mut rx).await;
    assert_eq!(
        (d.body().as_str(), delivery_count(&d)),
        ("order-0", 0),
        "released: delivered again first, not counted as a failed attempt"
    );
    let failed = Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    };
    within("modify", rx.modify(&d, failed))
        .await
        .expect("modify");
    let d = recv_one(&mut rx).await;
    assert_eq!(
        (d.body().as_str(), delivery_count(&d)),
        ("order-0", 1),
        "modified (delivery-failed): delivered again with delivery-count 1"
    );
    assert!(
        !d.message()
            .header
            .as_ref()
            .is_some_and(|h| h.first_acquirer),
        "a redelivery is not to the first acquirer"
    );
    within("accept", rx.accept(&d)).await.expect("accept");

    within("set credit", rx.set_credit(100))
        .await
        .expect("credit");
    assert_eq!(
        recv_n(&mut rx, 49).await,
        bodies[1..].to_vec(),
        "the rest, in order"
    );

    // Nothing else is left: a marker sent now is next.
    let mut tx = fe
        .queue_sender("orders-marker", "orders")
        .await
        .expect("queue sender attach");
    assert_all_accepted(&send_all(&mut tx, &["end".to_string()]).await);
    assert_eq!(
        recv_accept(&mut rx).await,
        "end",
        "no duplicates before the marker"
    );
}

/// A mesh of two routers: the broker is attached to B; a producer and a
/// consumer on A reach its queue hop by hop, and get every message once,
/// in order.
#[tokio::test]
async fn a_queue_behind_another_router_of_the_mesh_keeps_count_and_order() {
    let config = queues_config(&["orders"]);
    let (a, b) = two_routers(Some(&config)).await;
    let dir = TempDir::new("lr-mesh");
    let _broker = broker_connected_to(&b, &dir, &[]).await;
    assert!(
        live_brokers(&a.log_lines()).is_empty(),
        "the broker is attached to B only"
    );

    let bodies = numbered("mesh-order", 300);
    let (mut p, tx) = routed_producer(&a, "orders", &bodies).await;

    let (mut c, rx) = routed_consumer(&a, "orders", 50).await;
    let mut got = Vec::new();
    while got.len() < bodies.len() {
        got.push(recv_text(&mut c, rx).await);
        // Credit 50 at a time, topped up as it is used.
        if credit(&c, rx) == 0 {
            c.conn.flow(rx, 50, false);
        }
    }
    assert_eq!(got, bodies, "every message once, in order, across the mesh");
    send_accepted(&mut p, tx, &["end".to_string()]).await;
    if credit(&c, rx) == 0 {
        c.conn.flow(rx, 1, false);
    }
    assert_eq!(recv_text(&mut c, rx).await, "end", "nothing after the last");
}

/// One producer of the crash test: sends through the router, re-sends
/// whatever was not accepted (released, rejected, or unsettled when its
/// link was detached), and remembers every attempt.
struct CrashProducer {
    tag: &'static str,
    c: Client,
    link: Option<LinkId>,
    next_id: usize,
    next_token: u64,
    in_flight: BTreeMap<u64, String>,
    unsent: VecDeque<String>,
    accepted: BTreeSet<String>,
    attempts: HashMap<String, u32>,
    /// Why attempts were not accepted, by message: an outcome (`released`,
    /// `rejected`, …) or `in doubt` (unsettled when the link was detached).
    not_accepted: HashMap<String, Vec<String>>,
    /// Outcomes seen on the current link.
    outcomes: usize,
}

impl CrashProducer {
    fn new(tag: &'static str, c: Client) -> Self {
        CrashProducer {
            tag,
            c,
            link: None,
            next_id: 0,
            next_token: 0,
            in_flight: BTreeMap::new(),
            unsent: VecDeque::new(),
            accepted: BTreeSet::new(),
            attempts: HashMap::new(),
            not_accepted: HashMap::new(),
            outcomes: 0,
        }
    }

    async fn attach(&mut self) {
        assert!(self.link.is_none(), "{}: attached already", self.tag);
        self.link = Some(routed_sender(&mut self.c, "crash").await);
        self.outcomes = 0;
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Outcome {
                link,
                token,
                state,
                settled: true,
            } if Some(link) == self.link => {
                self.outcomes += 1;
                let body = self
                    .in_flight
                    .remove(&token)
                    .unwrap_or_else(|| panic!("{}: outcome for unknown token {token}", self.tag));
                if is_accepted(&state) {
                    self.accepted.insert(body);
                } else {
                    let why = match &state {
                        Some(DeliveryState::Released(_)) => "released".to_string(),
                        other => format!("{other:?}"),
                    };
                    self.not_accepted.entry(body.clone()).or_default().push(why);
                    self.unsent.push_front(body);
                }
            }
            Event::Detach { link, .. } if Some(link) == self.link => {
                // Whatever is still unsettled goes again.
                self.link = None;
                for (_, body) in std::mem::take(&mut self.in_flight).into_iter().rev() {
                    self.not_accepted
                        .entry(body.clone())
                        .or_default()
                        .push("in doubt".to_string());
                    self.unsent.push_front(body);
                }
            }
            Event::Close { error } => panic!("{}: the router closed: {error:?}", self.tag),
            _ => {}
        }
    }

    async fn pump_until(&mut self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let what = format!("{}: {what}", self.tag);
        within(&what, async {
            while !done(self) {
                let e = self.c.next_event().await.expect("producer's connection");
                self.handle(e);
            }
        })
        .await;
    }

    /// Sends what is waiting (re-sends first), as far as credit goes.
    fn send_what_credit_allows(&mut self) {
        let Some(link) = self.link else { return };
        while credit(&self.c, link) > 0 {
            let Some(body) = self.unsent.pop_front() else {
                break;
            };
            let token = self.next_token;
            self.next_token += 1;
            assert!(self.c.conn.send(link, &text(&body), false, token));
            *self.attempts.entry(body.clone()).or_default() += 1;
            self.in_flight.insert(token, body);
        }
    }

    /// Adds `n` new messages and sends what credit allows.
    async fn send_burst(&mut self, n: usize) {
        for _ in 0..n {
            self.unsent
                .push_back(format!("{}-{}", self.tag, self.next_id));
            self.next_id += 1;
        }
        self.pump_until("credit", |p| {
            p.link.is_none() || p.link.is_some_and(|l| credit(&p.c, l) > 0)
        })
        .await;
        self.send_what_credit_allows();
        self.c.flush().await.expect("flush");
    }

    /// Waits for `n` more outcomes (fewer if fewer are in flight).
    async fn collect(&mut self, n: usize) {
        let target = self.outcomes + n.min(self.in_flight.len());
        self.pump_until("outcomes", |p| p.outcomes >= target || p.link.is_none())
            .await;
    }

    /// The broker was killed: the router detaches our link.
    async fn after_kill(&mut self) {
        self.pump_until("the link detached after the kill", |p| p.link.is_none())
            .await;
    }

    /// Sends everything not yet accepted, until it is.
    async fn finish(&mut self) {
        while !self.unsent.is_empty() || !self.in_flight.is_empty() {
            if self.link.is_none() {
                self.attach().await;
            }
            self.send_burst(0).await;
            self.pump_until("every outcome", |p| {
                p.in_flight.is_empty() || p.link.is_none()
            })
            .await;
        }
    }
}

/// Issue #4 behind a router: three producers send durable messages through
/// the router while the broker is killed with SIGKILL 20 times at changing
/// moments (sometimes while it starts, before or as it reaches the
/// router) and restarted on the same journal. Each producer keeps its
/// connection to the router and re-sends what was not accepted. At the end
/// every accepted message is there; copies exist only of messages sent
/// more than once (counted, allowed).
#[tokio::test]
async fn nothing_accepted_through_the_router_is_lost_across_twenty_kill_9s() {
    let router = RouterProc::with_config(&queues_config(&["crash"]), &[]).await;
    crash_through(&router, &router, 20).await;
}

/// The same across a mesh: the broker is behind B, the producers and the
/// consumer on A.
#[tokio::test]
async fn nothing_accepted_across_the_mesh_is_lost_across_ten_kill_9s() {
    let config = queues_config(&["crash"]);
    let (a, b) = two_routers(Some(&config)).await;
    crash_through(&a, &b, 10).await;
}

/// Issue #4's crash test: producers on `clients`, the broker behind
/// `brokers` (the same router, or another of its mesh), `rounds` kills.
async fn crash_through(clients: &RouterProc, brokers: &RouterProc, rounds: usize) {
    let started = std::time::Instant::now();
    let dir = TempDir::new("lr-crash");
    let mut producers = [
        CrashProducer::new("p0", clients.client().await),
        CrashProducer::new("p1", clients.client().await),
        CrashProducer::new("p2", clients.client().await),
    ];
    let mut early_kills = 0;
    for round in 0..rounds {
        if round % 6 == 5 {
            // Killed while starting: just after it listens, as it recovers
            // and connects to the router.
            let mut early = broker_behind(brokers, &dir, &[]).await;
            early.kill();
            early_kills += 1;
        }
        let mut b = broker_connected_to(brokers, &dir, &[]).await;
        for p in &mut producers {
            p.attach().await;
        }
        let burst = 10 + (round * 37) % 150;
        for p in &mut producers {
            p.send_burst(burst).await;
        }
        // A different moment each round: before any outcome, after a few,
        // about half, all of one producer's.
        let wait_for = [0, 1, burst / 4, burst / 2, burst][round % 5];
        producers[round % 3].collect(wait_for).await;
        b.kill();
        for p in &mut producers {
            p.after_kill().await;
        }
        await_no_broker_at(brokers).await;
    }

    let _b = broker_connected_to(brokers, &dir, &[]).await;
    for p in &mut producers {
        p.finish().await;
    }
    producers[0].unsent.push_back("end".to_string());
    producers[0].finish().await;

    let attempts: usize = producers
        .iter()
        .map(|p| p.attempts.values().map(|n| *n as usize).sum::<usize>())
        .sum();
    let mut c = clients.client().await;
    let rx = routed_receiver(&mut c, "crash", attempts as u32 + 1).await;
    let mut got: HashMap<String, u32> = HashMap::new();
    within("every stored message, then the marker", async {
        loop {
            let body = recv_text(&mut c, rx).await;
            if body == "end" {
                break;
            }
            *got.entry(body).or_default() += 1;
        }
    })
    .await;

    let mut lost = Vec::new();
    let mut duplicates = Vec::new();
    let mut accepted = 0;
    for p in &producers {
        accepted += p.accepted.len();
        lost.extend(
            p.accepted
                .iter()
                .filter(|a| *a != "end" && !got.contains_key(*a))
                .cloned(),
        );
    }
    for (body, n) in &got {
        let p = producers
            .iter()
            .find(|p| body.starts_with(&format!("{}-", p.tag)))
            .unwrap_or_else(|| panic!("{body} was never sent"));
        let sent = p.attempts.get(body).copied().unwrap_or(0);
        assert!(sent >= 1, "{body} was never sent");
        assert!(
            *n <= sent,
            "{body} received {n} times but sent {sent} times"
        );
        if *n > 1 {
            let why = p.not_accepted.get(body).cloned().unwrap_or_default();
            duplicates.push((body.clone(), *n, why));
        }
    }
    lost.sort();
    assert!(lost.is_empty(), "accepted but lost: {lost:?}");
    let resent: usize = producers
        .iter()
        .map(|p| p.attempts.values().filter(|n| **n > 1).count())
        .sum();
    let stored_unaccepted = got
        .keys()
        .filter(|b| !producers.iter().any(|p| p.accepted.contains(*b)))
        .count();
    duplicates.sort();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for p in &producers {
        for w in p.not_accepted.values().flatten() {
            *reasons.entry(w.clone()).or_default() += 1;
        }
    }
    let stored_though_released = duplicates
        .iter()
        .filter(|(_, _, why)| why.iter().all(|w| w == "released"))
        .count();
    eprintln!(
        "crash through {}: {} kills ({early_kills} while starting), {attempts} sends, \
         {accepted} accepted, {resent} messages re-sent, {stored_unaccepted} stored without being \
         accepted (attempts not accepted: {reasons:?}), {} received more than once (each sent \
         more than once; {stored_though_released} of them only ever settled `released`, yet \
         stored), e.g. {:?}; {:?}",
        if clients.name == brokers.name {
            "the router"
        } else {
            "the mesh"
        },
        rounds + early_kills,
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)],
        started.elapsed()
    );
    assert!(accepted > 0, "some messages were accepted");
}

/// The broker's connection to the router drops (`kill -9`): links routed
/// to it are detached with an error, not left hanging; attaches are
/// refused `amqp:not-found` while it is gone; once it is back, the same
/// client connections attach again and nothing stored was lost.
#[tokio::test]
async fn links_to_a_broker_that_dies_are_detached_and_attach_again_after_restart() {
    let router = RouterProc::with_config(&queues_config(&["outage", "outage-idle"]), &[]).await;
    let dir = TempDir::new("lr-outage");
    let mut b = broker_connected_to(&router, &dir, &[]).await;

    let bodies = numbered("held", 10);
    let (mut p, tx) = routed_producer(&router, "outage", &bodies).await;
    // A consumer holds five unsettled; an fe2o3 consumer waits on an
    // empty queue.
    let (mut c, rx) = routed_consumer(&router, "outage", 5).await;
    for b in &bodies[..5] {
        let d = next_delivery(&mut c, rx).await;
        let body = flotilla_amqp::message::body_bytes(&d.payload).expect("text");
        assert_eq!(body, b.as_bytes());
    }
    let mut fe = router.fe2o3("lr-outage-fe").await;
    let mut idle = fe.manual_receiver("idle", "outage-idle", None).await;
    within("credit", idle.set_credit(10)).await.expect("credit");

    b.kill();
    let e = detach_error(&mut c, rx, "the consumer's link to be detached").await;
    let e = e.expect("the consumer's link is detached with an error");
    eprintln!("consumer detached: {}", flotilla_amqp::client::describe(&e));
    let e = detach_error(&mut p, tx, "the producer's link to be detached").await;
    assert!(e.is_some(), "the producer's link is detached with an error");
    let r = within("fe2o3's receive to fail", idle.recv::<String>()).await;
    assert!(r.is_err(), "fe2o3 receiver: {r:?}");

    await_no_broker_at(&router).await;
    let refused = within(
        "an attach while the broker is down",
        c.open_receiver(Some("outage"), 1),
    )
    .await
    .expect_err("no broker behind the router");
    assert!(refused_not_found(&refused), "{refused}");

    let _b = broker_connected_to(&router, &dir, &[]).await;
    let rx = routed_receiver(&mut c, "outage", 20).await;
    assert_eq!(
        recv_texts(&mut c, rx, 10).await,
        bodies,
        "the same connection attaches again: every stored message, in order"
    );
    let tx = routed_sender(&mut p, "outage").await;
    send_accepted(&mut p, tx, &["after".to_string()]).await;
    assert_eq!(recv_text(&mut c, rx).await, "after");
}

/// Credit through the router: a consumer granting one credit at a time
/// gets one message at a time (a drain with no credit, answered by the
/// broker, would arrive after anything sent beyond it); a drain with
/// credit left ends with the delivery-count advanced by all of it.
#[tokio::test]
async fn credit_and_drain_pass_through_the_router() {
    let router = RouterProc::with_config(&queues_config(&["credit"]), &[]).await;
    let dir = TempDir::new("lr-credit");
    let _b = broker_connected_to(&router, &dir, &[]).await;
    let bodies = numbered("one", 5);
    let (mut p, tx) = routed_producer(&router, "credit", &bodies).await;

    let (mut c, rx) = routed_consumer(&router, "credit", 0).await;
    for b in &bodies {
        c.conn.flow(rx, 1, false);
        assert_eq!(&recv_text(&mut c, rx).await, b);
        assert_eq!(credit(&c, rx), 0);
        // A round trip to the broker: drain, with no credit to use.
        let dc = c.conn.link(rx).expect("link").delivery_count;
        c.conn.flow(rx, 0, true);
        next_event_where(&mut c, "the drain's answer", |_, e| match e {
            Event::Flow { link } if link == rx => Some(()),
            Event::Delivery { link, delivery } if link == rx => panic!(
                "a delivery beyond the credit granted: {:?}",
                flotilla_amqp::message::body_bytes(&delivery.payload)
            ),
            _ => None,
        })
        .await;
        assert_eq!(c.conn.link(rx).expect("link").delivery_count, dc);
    }

    // Two messages, three credit, drain: two arrive, then the third credit
    // is used up by advancing the delivery-count (AMQP 1.0 §2.6.7).
    let more = numbered("drain", 2);
    send_accepted(&mut p, tx, &more).await;
    let got = drain_texts(&mut c, rx, 3).await;
    assert_eq!(got, more, "what was there arrives before the drain ends");

    // fe2o3 (which fails a receive beyond its credit): one at a time, then
    // a drain on an empty queue leaves the link usable.
    let mut fe = router.fe2o3("lr-credit-fe").await;
    let mut r = fe.manual_receiver("credit-fe", "credit", None).await;
    let third = numbered("fe", 3);
    send_accepted(&mut p, tx, &third).await;
    for b in &third {
        let d = recv_one(&mut r).await;
        assert_eq!(d.body(), b);
        within("accept", r.accept(&d)).await.expect("accept");
    }
    within("drain", r.drain()).await.expect("drain");
    send_accepted(&mut p, tx, &["after-drain".to_string()]).await;
    let d = recv_one(&mut r).await;
    assert_eq!(d.body(), "after-drain");
    within("accept", r.accept(&d)).await.expect("accept");
}

/// Two address spaces, each with a queue `orders` on the same broker
/// behind the router (one admits anonymous clients, the other a user):
/// what is sent in one is received only there. A client of the broker
/// itself in `tenant-a` sees tenant-a's queue, the one the router routed
/// to.
#[tokio::test]
async fn address_spaces_keep_their_own_queues_on_the_broker() {
    const TENANTS: &str = "\
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-a}
spec: {authentication: {anonymous: true}}
---
apiVersion: flotilla.dev/v1
kind: AddressSpace
metadata: {name: tenant-b}
spec: {authentication: {anonymous: false}}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: a-orders}
spec: {addressSpace: tenant-a, address: orders, type: queue}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: b-orders}
spec: {addressSpace: tenant-b, address: orders, type: queue}
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
    let router = RouterProc::with_config(TENANTS, &[]).await;
    let dir = TempDir::new("lr-tenants");
    let config = dir.write("flotilla.yaml", TENANTS);
    let broker =
        broker_connected_to(&router, &dir, &["--config", &config.display().to_string()]).await;

    let connect = |o: ClientOptions| async move {
        within("a tenant's client to connect", Client::connect(&o))
            .await
            .expect("connect")
    };
    let a_opts = ClientOptions {
        vhost: Some("tenant-a".into()),
        ..router.opts()
    };
    let b_opts = router.user_opts("bob@tenant-b", "builder", false);
    let (mut pa, mut pb) = (connect(a_opts.clone()).await, connect(b_opts.clone()).await);
    let (ta, tb) = (
        routed_sender(&mut pa, "orders").await,
        routed_sender(&mut pb, "orders").await,
    );
    let (for_a, for_b) = (numbered("for-a", 10), numbered("for-b", 10));
    send_accepted(&mut pa, ta, &for_a).await;
    send_accepted(&mut pb, tb, &for_b).await;
    send_accepted(&mut pa, ta, &["a-end".to_string()]).await;
    send_accepted(&mut pb, tb, &["b-end".to_string()]).await;

    let (mut ca, mut cb) = (connect(a_opts).await, connect(b_opts).await);
    let ra = routed_receiver(&mut ca, "orders", 100).await;
    let rb = routed_receiver(&mut cb, "orders", 100).await;
    let mut want_a = for_a.clone();
    want_a.push("a-end".into());
    let mut want_b = for_b.clone();
    want_b.push("b-end".into());
    assert_eq!(
        recv_texts(&mut ca, ra, 11).await,
        want_a,
        "tenant-a sees only its own"
    );
    assert_eq!(
        recv_texts(&mut cb, rb, 11).await,
        want_b,
        "tenant-b sees only its own"
    );

    // The broker's own listener, tenant-a: the same queue (the routed
    // consumer leaves first; anything it had will be released back).
    ca.close().await;
    send_accepted(&mut pa, ta, &["a-direct".to_string()]).await;
    let direct = ClientOptions {
        vhost: Some("tenant-a".into()),
        ..broker.opts()
    };
    let mut d = connect(direct).await;
    let (dr, _) = within("a direct consumer", d.open_receiver(Some("orders"), 10))
        .await
        .expect("direct consumer");
    assert_eq!(recv_text(&mut d, dr).await, "a-direct");
    send_accepted(&mut pb, tb, &["b-last".to_string()]).await;
    assert_eq!(recv_text(&mut cb, rb).await, "b-last");
}

// ---------------------------------------------------------------------------
// Topics through the router
// ---------------------------------------------------------------------------

/// Two clients subscribe to a topic through the router with the same link
/// name (link names are unique per container, not across clients): each
/// has its own subscription and gets every message.
#[tokio::test]
async fn topic_subscribers_through_the_router_each_get_every_message() {
    let router = RouterProc::start(&[]).await;
    let dir = TempDir::new("lr-topic");
    let _b = broker_connected_to(&router, &dir, &[]).await;
    let mut f1 = router.fe2o3("lr-topic-sub-1").await;
    let s1 = f1.subscriber("news-sub", "news", false).await;
    let mut f2 = router.fe2o3("lr-topic-sub-2").await;
    let s2 = f2.subscriber("news-sub", "news", false).await;
    let mut fp = router.fe2o3("lr-topic-pub").await;
    let mut tx = fp.topic_sender("news-pub", "news").await;
    let bodies = numbered("news", 10);
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    spawn_collector(0, s1, seen_tx.clone());
    spawn_collector(1, s2, seen_tx);
    // Markers until each subscriber has seen one: whatever it was given
    // of the ten arrived before.
    let mut got: [Vec<String>; 2] = Default::default();
    send_markers_until_both_saw_one(&mut tx, &mut seen, 10, |id, body, marked| {
        if !marked {
            got[id].push(body);
        }
    })
    .await;
    assert_eq!(
        got,
        [bodies.clone(), bodies],
        "each subscriber gets every message"
    );
}

/// A durable subscription made through the router (named by the client's
/// container id and link name, which the router passes on) keeps what is
/// published while its subscriber is away, across `kill -9` of the broker.
#[tokio::test]
async fn a_durable_subscription_through_the_router_survives_kill_9() {
    let router = RouterProc::start(&[]).await;
    let dir = TempDir::new("lr-durable-sub");
    let mut b = broker_connected_to(&router, &dir, &[]).await;
    let mut fs = router.fe2o3("lr-durable-client").await;
    let sub = fs.subscriber("audit", "events", true).await;
    let mut fp = router.fe2o3("lr-events-pub").await;
    let mut tx = fp.topic_sender("events-pub", "events").await;
    let away = publish_while_durable_subscriber_is_away(&mut tx, sub).await;

    b.kill();
    await_no_broker_at(&router).await;
    let _b = broker_connected_to(&router, &dir, &[]).await;
    let mut sub = fs.subscriber("audit", "events", true).await;
    let mut tx = fp.topic_sender("events-pub-2", "events").await;
    assert_durable_subscriber_gets_only(&mut sub, &away, &mut tx).await;
}

/// The mesh: the broker is behind B, the consumer on A. A drain crosses
/// both routers; when the broker dies the consumer's link on A is
/// detached with an error; after a restart it attaches again.
#[tokio::test]
async fn drain_and_broker_loss_cross_the_mesh() {
    let config = queues_config(&["far"]);
    let (a, b) = two_routers(Some(&config)).await;
    let dir = TempDir::new("lr-mesh-drain");
    let mut broker = broker_connected_to(&b, &dir, &[]).await;

    let bodies = numbered("far", 2);
    let (mut p, tx) = routed_producer(&a, "far", &bodies).await;
    let (mut c, rx) = routed_consumer(&a, "far", 0).await;
    let got = drain_texts(&mut c, rx, 5).await;
    assert_eq!(got, bodies);

    c.conn.flow(rx, 5, false);
    c.flush().await.expect("flush");
    broker.kill();
    let e = detach_error(&mut c, rx, "the consumer's link on A to be detached").await;
    assert!(e.is_some(), "detached with an error");
    let e = detach_error(&mut p, tx, "the producer's link on A to be detached").await;
    assert!(e.is_some(), "detached with an error");

    let _broker = broker_connected_to(&b, &dir, &[]).await;
    let tx = routed_sender(&mut p, "far").await;
    let rx = routed_receiver(&mut c, "far", 5).await;
    send_accepted(&mut p, tx, &["again".to_string()]).await;
    // Acknowledgements are not synced before the broker answers (by
    // design: a lost one costs a redelivery), so the two may come again.
    loop {
        let body = recv_text(&mut c, rx).await;
        if body == "again" {
            break;
        }
        assert!(bodies.contains(&body), "unexpected {body}");
    }
}

/// Messages much larger than a frame cross the route whole: split into
/// many transfers on each hop, stored once, delivered intact.
#[tokio::test]
async fn large_messages_cross_the_route_whole() {
    let router = RouterProc::start(&[]).await;
    let dir = TempDir::new("lr-large");
    let _b = broker_connected_to(&router, &dir, &[]).await;
    let mut fe = router.fe2o3("lr-large").await;
    let mut tx = fe
        .queue_sender("large-in", "large")
        .await
        .expect("queue sender attach");
    let bodies: Vec<String> = (0..3)
        .map(|i| format!("{i}:{}", "x".repeat(300_000 * (i + 1))))
        .collect();
    assert_all_accepted(&send_all(&mut tx, &bodies).await);
    let mut rx = fe
        .manual_receiver("large-out", "large", Some("queue"))
        .await;
    within("credit", rx.set_credit(10)).await.expect("credit");
    let got = recv_n(&mut rx, 3).await;
    for (g, b) in got.iter().zip(&bodies) {
        assert!(
            g == b,
            "a body of {} bytes came back as {} bytes",
            b.len(),
            g.len()
        );
    }
}

/// A message held unsettled by a consumer that detaches is, for the
/// broker, a failed attempt (as when the consumer is attached to the
/// broker itself): delivered again with delivery-count 1, and after
/// `--max-deliveries` such attempts moved to the dead-letter queue, so a
/// message that kills its consumers does not circulate for ever. Through
/// the router the detach must reach the broker with the delivery still
/// unsettled, not settled `released` on the consumer's behalf.
#[tokio::test]
async fn a_message_abandoned_through_the_router_counts_towards_dead_lettering() {
    let router = RouterProc::start(&[]).await;
    let dir = TempDir::new("lr-abandon");
    let _b = broker_connected_to(&router, &dir, &["--max-deliveries", "2"]).await;
    let mut fe = router.fe2o3("lr-abandon").await;
    let mut tx = fe
        .queue_sender("poison-in", "payments")
        .await
        .expect("queue sender attach");
    let bodies = vec!["poison".to_string(), "fine".to_string()];
    assert_all_accepted(&send_all(&mut tx, &bodies).await);

    // Consumers on one session take the first message and leave without
    // settling it (the broker sees each detach before the next credit).
    let mut counts = Vec::new();
    for attempt in 0..2 {
        let mut gone = fe
            .manual_receiver(&format!("gone-{attempt}"), "payments", Some("queue"))
            .await;
        let d = recv_one(&mut gone).await;
        counts.push((d.body().clone(), delivery_count(&d)));
        within("close", gone.close()).await.expect("close");
    }
    let mut rx = fe.manual_receiver("after", "payments", Some("queue")).await;
    let d = recv_one(&mut rx).await;
    counts.push((d.body().clone(), delivery_count(&d)));
    assert_eq!(
        counts,
        [
            ("poison".to_string(), 0),
            ("poison".to_string(), 1),
            ("fine".to_string(), 0)
        ],
        "abandoned twice: counted, then dead-lettered (as on the broker itself)"
    );
}

/// Placement from config: with two brokers behind a router, a queue
/// pinned to one (`spec.broker`) is held by that one — for two queues
/// pinned to different brokers, so at least one is not where hashing
/// would put it.
#[tokio::test]
async fn a_queue_pinned_to_a_broker_is_held_by_it() {
    const PINNED: &str = "apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: pinned-1}
spec: {address: pinned-1, type: queue, broker: b1}
---
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: pinned-2}
spec: {address: pinned-2, type: queue, broker: b2}
";
    let router = RouterProc::with_config(PINNED, &[]).await;
    let cfg = TempDir::new("pinned-config");
    let config = cfg.write("config.yaml", PINNED);
    let config = config.display().to_string();
    let (d1, d2) = (TempDir::new("pinned-b1"), TempDir::new("pinned-b2"));
    let b1 = broker_behind(&router, &d1, &["--container-id", "b1", "--config", &config]).await;
    let b2 = broker_behind(&router, &d2, &["--container-id", "b2", "--config", &config]).await;
    router
        .wait_log("both brokers", |log| {
            (live_brokers(log).len() == 2).then_some(())
        })
        .await;
    for (address, broker) in [("pinned-1", &b1), ("pinned-2", &b2)] {
        let mut p = router.client().await;
        let tx = p.open_sender(Some(address), false).await.expect("producer");
        for i in 0..3 {
            let body = format!("{address}-{i}");
            assert!(is_accepted(&send_message(&mut p, tx, i, text(&body)).await));
        }
        // The pinned broker holds them: a consumer connected to it
        // directly gets all three.
        let mut c = broker.client().await;
        let (rx, _) = c.open_receiver(Some(address), 10).await.expect("consumer");
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(recv_text(&mut c, rx).await);
        }
        let want: Vec<String> = (0..3).map(|i| format!("{address}-{i}")).collect();
        assert_eq!(got, want, "{address} on its broker");
    }
}
