//! Process-level tests of the control plane: the real `flotilla console`
//! and a `flotilla router` (and `broker`) following it with `--console`.
//! Spaces, users and addresses are made through the REST API (a tiny
//! HTTP/1.1 client); clients then connect as those users and the router
//! must serve what the console says: a new user logs in, a new address
//! routes, spaces are isolated, rules are enforced, a deleted address
//! detaches its links, a deleted user's connections close, and when the
//! console goes away the router keeps its last configuration.
//!
//! Every wait is bounded by [`WAIT`]; things the watch applies
//! asynchronously are polled (retrying a login or an attach) with that
//! bound.

use std::time::{Duration, Instant};

use flotilla_amqp::client::{Client, ClientError};
use flotilla_amqp::connection::{Event, LinkId};
use flotilla_amqp::transport::HandshakeError;
use flotilla_amqp::types::definitions::{AmqpError, ErrorCondition};
use serde_json::{json, Value};

mod common;
use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn create_space(console: &ConsoleProc, name: &str) {
    console
        .expect(
            "POST",
            "/api/v1/addressspaces",
            Some(json!({"metadata": {"name": name}, "spec": {"authentication": {"anonymous": false}}})),
            201,
        )
        .await;
}

async fn create_address(console: &ConsoleProc, space: &str, name: &str, address: &str, kind: &str) {
    console
        .expect(
            "POST",
            &format!("/api/v1/addressspaces/{space}/addresses"),
            Some(json!({"metadata": {"name": name}, "spec": {"address": address, "type": kind}})),
            201,
        )
        .await;
}

async fn create_user(
    console: &ConsoleProc,
    space: &str,
    name: &str,
    password: &str,
    addresses: &[&str],
) {
    console
        .expect(
            "POST",
            &format!("/api/v1/addressspaces/{space}/users"),
            Some(json!({
                "metadata": {"name": name},
                "spec": {
                    "username": name,
                    "password": password,
                    "authorization": [{"addresses": addresses, "operations": ["send", "recv"]}],
                },
            })),
            201,
        )
        .await;
}

async fn delete(console: &ConsoleProc, path: &str) -> Value {
    console.expect("DELETE", path, None, 200).await
}

/// Connects as `user` (`name@space`) to `router`, retrying while the
/// component has not yet heard of the user from the console.
async fn login(router: &RouterProc, user: &str, password: &str, scram: bool) -> Client {
    let opts = router.user_opts(user, password, scram);
    within(&format!("{user} to be able to log in"), async {
        loop {
            match Client::connect(&opts).await {
                Ok(c) => return c,
                // Not known yet: SASL fails, or the Open is refused.
                Err(ClientError::Handshake(HandshakeError::AuthFailed(_)))
                | Err(ClientError::Closed(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{user}: {e}"),
            }
        }
    })
    .await
}

/// The condition a refused attach carries.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCondition {
    match r {
        Err(ClientError::Refused(Some(e))) => e.condition,
        other => panic!("expected the link to be refused with an error, got {other:?}"),
    }
}

fn is_not_found<T>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Refused(Some(e))) if e.condition == AmqpError::NotFound.into())
}

/// Attaches a sender to `address`, retrying while the address is not yet
/// known (`amqp:not-found`).
async fn sender_when_known(c: &mut Client, address: &str) -> LinkId {
    within(&format!("a sender to {address}"), async {
        loop {
            let r = c.open_sender(Some(address), false).await;
            if is_not_found(&r) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            return r.unwrap_or_else(|e| panic!("sender to {address}: {e}"));
        }
    })
    .await
}

/// Attaches a receiver (credit 10) to `address`, retrying while the
/// address is not yet known.
async fn receiver_when_known(c: &mut Client, address: &str) -> LinkId {
    within(&format!("a receiver from {address}"), async {
        loop {
            let r = c.open_receiver(Some(address), 10).await;
            if is_not_found(&r) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            return r
                .unwrap_or_else(|e| panic!("receiver from {address}: {e}"))
                .0;
        }
    })
    .await
}

/// Sends `body` on `tx` (of `a`) and receives it on `rx` (of `b`).
async fn send_and_receive(
    a: &mut Client,
    tx: LinkId,
    b: &mut Client,
    rx: LinkId,
    token: u64,
    body: &str,
) {
    let (state, got) = tokio::join!(send_message(a, tx, token, text(body)), recv_text(b, rx));
    assert!(is_accepted(&state), "{body}: {state:?}");
    assert_eq!(got, body);
}

/// Waits for the component to detach `link`; returns its error.
async fn detached(c: &mut Client, link: LinkId) -> (ErrorCondition, String) {
    next_event_where(c, "the link to be detached", |_, e| match e {
        Event::Detach {
            link: l,
            error: Some(e),
            ..
        } if l == link => Some((e.condition, e.description.unwrap_or_default())),
        Event::Detach {
            link: l,
            error: None,
            ..
        } if l == link => {
            panic!("the link was detached without an error")
        }
        Event::Close { error } => panic!("the connection closed instead: {error:?}"),
        _ => None,
    })
    .await
}

/// Waits for the component to close `c`'s connection; returns its error.
async fn closed(c: &mut Client) -> (ErrorCondition, String) {
    within("the connection to be closed", async {
        loop {
            match c.next_event().await {
                Ok(Event::Close { error: Some(e) }) => {
                    return (e.condition, e.description.unwrap_or_default())
                }
                Ok(Event::Close { error: None }) => panic!("closed without an error"),
                Ok(_) => {}
                Err(e) => panic!("the connection ended without a Close: {e}"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

/// The end-to-end, with our own client: everything the router
/// serves comes from the console.
#[tokio::test]
async fn a_router_serves_what_the_console_says() {
    let mut console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    router
        .wait_log("the router to follow the console", |log| {
            log.iter()
                .any(|l| l.contains("following the console"))
                .then_some(())
        })
        .await;

    // tenant-a: alice may use `orders`; `secret` exists but is not hers.
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "orders", "orders", "anycast").await;
    create_address(&console, "tenant-a", "secret", "secret", "anycast").await;
    create_address(&console, "tenant-a", "shared", "shared", "anycast").await;
    create_user(
        &console,
        "tenant-a",
        "alice",
        "wonderland",
        &["orders", "shared"],
    )
    .await;
    // tenant-b has its own `orders` and `shared`, and bob.
    create_space(&console, "tenant-b").await;
    create_address(&console, "tenant-b", "orders", "orders", "anycast").await;
    create_address(&console, "tenant-b", "shared", "shared", "anycast").await;
    create_user(
        &console,
        "tenant-b",
        "bob",
        "builder",
        &["orders", "shared", "late"],
    )
    .await;

    // alice logs in (PLAIN, and SCRAM-SHA-256) and uses `orders`.
    let mut alice_rx = login(&router, "alice@tenant-a", "wonderland", false).await;
    let mut alice_tx = login(&router, "alice@tenant-a", "wonderland", true).await;
    let rx = receiver_when_known(&mut alice_rx, "orders").await;
    let tx = sender_when_known(&mut alice_tx, "orders").await;
    send_and_receive(&mut alice_tx, tx, &mut alice_rx, rx, 1, "order 1").await;

    // A wrong password is still refused.
    let wrong = Client::connect(&router.user_opts("alice@tenant-a", "looking-glass", false)).await;
    assert!(
        matches!(
            wrong,
            Err(ClientError::Handshake(HandshakeError::AuthFailed(_)))
        ),
        "{:?}",
        wrong.err()
    );

    // Outside her rules: refused, whether the address exists or not.
    assert_eq!(
        refusal(alice_tx.open_sender(Some("secret"), false).await),
        AmqpError::UnauthorizedAccess.into()
    );
    assert_eq!(
        refusal(alice_rx.open_receiver(Some("secret"), 1).await),
        AmqpError::UnauthorizedAccess.into()
    );
    assert_eq!(
        refusal(alice_tx.open_sender(Some("elsewhere"), false).await),
        AmqpError::UnauthorizedAccess.into()
    );

    // tenant-b's `orders` sees nothing of tenant-a's: bob's receiver is
    // attached while alice sends, and the first thing it gets is bob's.
    let mut bob = login(&router, "bob@tenant-b", "builder", false).await;
    let bob_rx = receiver_when_known(&mut bob, "orders").await;
    send_and_receive(&mut alice_tx, tx, &mut alice_rx, rx, 2, "order 2").await;
    let mut bob2 = login(&router, "bob@tenant-b", "builder", true).await;
    let bob_tx = sender_when_known(&mut bob2, "orders").await;
    send_and_receive(&mut bob2, bob_tx, &mut bob, bob_rx, 1, "for tenant-b").await;
    // With a receiver for `shared` only in tenant-b, a sender to `shared`
    // in tenant-a gets no credit (anycast credit comes from receivers).
    let shared_rx = receiver_when_known(&mut bob, "shared").await;
    let shared_tx = sender_when_known(&mut alice_tx, "shared").await;
    // A refused attach is a round trip: credit would have come before it.
    refusal(alice_tx.open_sender(Some("secret"), false).await);
    assert_eq!(
        credit(&alice_tx, shared_tx),
        0,
        "a receiver in tenant-b gives no credit to a sender in tenant-a"
    );
    let bob_shared_tx = sender_when_known(&mut bob2, "shared").await;
    send_and_receive(
        &mut bob2,
        bob_shared_tx,
        &mut bob,
        shared_rx,
        2,
        "shared in b",
    )
    .await;

    // A new address works soon after the API call.
    let made = Instant::now();
    create_address(&console, "tenant-b", "late", "late", "anycast").await;
    let late_rx = receiver_when_known(&mut bob, "late").await;
    let applied = made.elapsed();
    eprintln!("a new address was usable {applied:?} after the API call");
    assert!(
        applied < Duration::from_secs(3),
        "a new address took {applied:?} to apply"
    );
    let late_tx = sender_when_known(&mut bob2, "late").await;
    send_and_receive(&mut bob2, late_tx, &mut bob, late_rx, 2, "late").await;

    // Deleting tenant-a's `orders` detaches alice's links with not-found;
    // tenant-b's `orders` is untouched.
    delete(&console, "/api/v1/addressspaces/tenant-a/addresses/orders").await;
    let (cond, why) = detached(&mut alice_rx, rx).await;
    assert_eq!(cond, AmqpError::NotFound.into(), "{why}");
    assert!(why.contains("was deleted"), "{why}");
    let (cond, why) = detached(&mut alice_tx, tx).await;
    assert_eq!(cond, AmqpError::NotFound.into(), "{why}");
    assert!(why.contains("orders"), "{why}");
    assert_eq!(
        refusal(alice_tx.open_sender(Some("orders"), false).await),
        AmqpError::NotFound.into(),
        "a new attach to the deleted address is refused"
    );
    send_and_receive(&mut bob2, bob_tx, &mut bob, bob_rx, 3, "still here").await;

    // Deleting alice closes her connections with unauthorized-access, and
    // she can no longer log in.
    delete(&console, "/api/v1/addressspaces/tenant-a/users/alice").await;
    for c in [&mut alice_rx, &mut alice_tx] {
        let (cond, why) = closed(c).await;
        assert_eq!(cond, AmqpError::UnauthorizedAccess.into(), "{why}");
        assert!(why.contains("alice"), "{why}");
    }
    let refused = Client::connect(&router.user_opts("alice@tenant-a", "wonderland", false)).await;
    assert!(refused.is_err(), "a deleted user logged in");

    // With the console gone, the router keeps the last configuration: the
    // links up stay up, and bob can still log in and use `orders`.
    console.kill();
    send_and_receive(&mut bob2, bob_tx, &mut bob, bob_rx, 4, "console away").await;
    let mut bob3 = within(
        "bob to log in without the console",
        Client::connect(&router.user_opts("bob@tenant-b", "builder", true)),
    )
    .await
    .expect("bob logs in while the console is away");
    let bob3_tx = bob3
        .open_sender(Some("orders"), false)
        .await
        .expect("bob sends to orders while the console is away");
    send_and_receive(&mut bob3, bob3_tx, &mut bob, bob_rx, 1, "new connection").await;
    let refused = Client::connect(&router.user_opts("alice@tenant-a", "wonderland", false)).await;
    assert!(
        refused.is_err(),
        "the deleted user came back with the console away"
    );
}

/// Replacing a user's rules through the API applies to links already
/// attached: a link the new rules no longer allow is detached.
#[tokio::test]
async fn narrowing_a_users_rules_detaches_links_it_no_longer_allows() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "orders", "orders", "anycast").await;
    create_address(&console, "tenant-a", "audit", "audit", "anycast").await;
    create_user(
        &console,
        "tenant-a",
        "carol",
        "pass-1",
        &["orders", "audit"],
    )
    .await;
    let mut carol = login(&router, "carol@tenant-a", "pass-1", false).await;
    let orders = receiver_when_known(&mut carol, "orders").await;
    let audit = receiver_when_known(&mut carol, "audit").await;

    let path = "/api/v1/addressspaces/tenant-a/users/carol";
    let mut user = console.expect("GET", path, None, 200).await;
    user["spec"]["authorization"] = json!([{"addresses": ["orders"], "operations": ["recv"]}]);
    console.expect("PUT", path, Some(user), 200).await;
    let (cond, why) = detached(&mut carol, audit).await;
    assert_eq!(cond, AmqpError::UnauthorizedAccess.into(), "{why}");
    // The link still allowed stays: a sender (as another user) reaches it.
    create_user(&console, "tenant-a", "dave", "pass-2", &["orders"]).await;
    let mut dave = login(&router, "dave@tenant-a", "pass-2", false).await;
    let tx = sender_when_known(&mut dave, "orders").await;
    send_and_receive(&mut dave, tx, &mut carol, orders, 1, "still allowed").await;
    // The old password still works (the keys were kept).
    login(&router, "carol@tenant-a", "pass-1", true).await;
}

/// Deleting a space closes its users' connections.
#[tokio::test]
async fn deleting_a_space_closes_its_connections() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "orders", "orders", "anycast").await;
    create_user(&console, "tenant-a", "alice", "wonderland", &["orders"]).await;
    let mut alice = login(&router, "alice@tenant-a", "wonderland", false).await;
    receiver_when_known(&mut alice, "orders").await;
    delete(&console, "/api/v1/addressspaces/tenant-a").await;
    let (cond, why) = closed(&mut alice).await;
    assert_eq!(cond, AmqpError::UnauthorizedAccess.into(), "{why}");
}

/// When the console comes back (same port, same store), the router
/// follows it again: a change made after the restart applies, and what
/// was there before stays.
#[tokio::test]
async fn a_router_follows_the_console_again_after_it_restarts() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "orders", "orders", "anycast").await;
    create_user(
        &console,
        "tenant-a",
        "alice",
        "wonderland",
        &["orders", "later"],
    )
    .await;
    let mut alice = login(&router, "alice@tenant-a", "wonderland", false).await;
    let rx = receiver_when_known(&mut alice, "orders").await;

    let console = console.restart().await;
    create_address(&console, "tenant-a", "later", "later", "anycast").await;
    let later_rx = receiver_when_known(&mut alice, "later").await;
    let mut alice2 = login(&router, "alice@tenant-a", "wonderland", true).await;
    let later_tx = sender_when_known(&mut alice2, "later").await;
    send_and_receive(&mut alice2, later_tx, &mut alice, later_rx, 1, "later").await;
    let tx = alice2
        .open_sender(Some("orders"), false)
        .await
        .expect("orders is still there");
    send_and_receive(&mut alice2, tx, &mut alice, rx, 2, "after the restart").await;
}

// ---------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------

/// A queue made through the API, reached through a router: both follow
/// the console; deleting the address detaches the routed links.
#[tokio::test]
async fn a_queue_through_router_and_broker_follows_the_console() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    let dir = TempDir::new("console-broker");
    let follow = console.follow_args();
    let args: Vec<&str> = follow.iter().map(String::as_str).collect();
    let _broker = broker_connected_to(&router, &dir, &args).await;
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "jobs", "jobs", "queue").await;
    create_user(&console, "tenant-a", "alice", "wonderland", &["jobs"]).await;

    let mut alice = login(&router, "alice@tenant-a", "wonderland", false).await;
    let tx = sender_when_known(&mut alice, "jobs").await;
    // Stored by the broker before anyone receives.
    let state = send_message(&mut alice, tx, 1, text("job 1")).await;
    assert!(is_accepted(&state), "{state:?}");
    let mut worker = login(&router, "alice@tenant-a", "wonderland", true).await;
    let rx = receiver_when_known(&mut worker, "jobs").await;
    assert_eq!(recv_text(&mut worker, rx).await, "job 1");

    delete(&console, "/api/v1/addressspaces/tenant-a/addresses/jobs").await;
    let (cond, why) = detached(&mut worker, rx).await;
    assert_eq!(cond, AmqpError::NotFound.into(), "{why}");
    let (cond, why) = detached(&mut alice, tx).await;
    assert_eq!(cond, AmqpError::NotFound.into(), "{why}");
}

/// A client of the broker itself (no router): a user made through the API
/// logs in and uses a queue; once deleted, it can no longer log in.
#[tokio::test]
async fn a_broker_serves_users_made_through_the_api() {
    let (console, _dir, broker) = broker_with_alice().await;

    let mut alice = login(&broker, "alice@tenant-a", "wonderland", false).await;
    let tx = sender_when_known(&mut alice, "jobs").await;
    let state = send_message(&mut alice, tx, 1, text("job 1")).await;
    assert!(is_accepted(&state), "{state:?}");
    let mut worker = login(&broker, "alice@tenant-a", "wonderland", true).await;
    let rx = receiver_when_known(&mut worker, "jobs").await;
    assert_eq!(recv_text(&mut worker, rx).await, "job 1");
    assert_eq!(
        refusal(worker.open_receiver(Some("other"), 1).await),
        AmqpError::UnauthorizedAccess.into(),
        "outside her rules"
    );
    let wrong = Client::connect(&broker.user_opts("alice@tenant-a", "looking-glass", true)).await;
    assert!(wrong.is_err(), "a wrong password logged in");

    delete(&console, "/api/v1/addressspaces/tenant-a/users/alice").await;
    within("alice's logins to be refused", async {
        while Client::connect(&broker.user_opts("alice@tenant-a", "wonderland", false))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A client of the broker itself (no router): a user and a queue made
/// through the API work; deleting the address detaches the link.
#[tokio::test]
async fn a_broker_detaches_links_to_a_deleted_address() {
    let (console, _dir, broker) = broker_with_alice().await;

    let mut alice = login(&broker, "alice@tenant-a", "wonderland", false).await;
    let tx = sender_when_known(&mut alice, "jobs").await;
    let mut worker = login(&broker, "alice@tenant-a", "wonderland", true).await;
    let rx = receiver_when_known(&mut worker, "jobs").await;
    send_and_receive(&mut alice, tx, &mut worker, rx, 1, "job 1").await;

    delete(&console, "/api/v1/addressspaces/tenant-a/addresses/jobs").await;
    let (cond, why) = detached(&mut worker, rx).await;
    assert_eq!(cond, AmqpError::NotFound.into(), "{why}");
}

/// A client of the broker itself: deleting the user closes its
/// connection.
#[tokio::test]
async fn a_broker_closes_a_deleted_users_connections() {
    let (console, _dir, broker) = broker_with_alice().await;
    let mut alice = login(&broker, "alice@tenant-a", "wonderland", false).await;
    sender_when_known(&mut alice, "jobs").await;

    delete(&console, "/api/v1/addressspaces/tenant-a/users/alice").await;
    // New logins see the deletion at once…
    within("alice's logins to be refused", async {
        while Client::connect(&broker.user_opts("alice@tenant-a", "wonderland", false))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // …and the connection already open must close.
    let (cond, why) = closed(&mut alice).await;
    assert_eq!(cond, AmqpError::UnauthorizedAccess.into(), "{why}");
}

/// A console, a broker following it, and in space `tenant-a` a queue
/// `jobs` and the user alice (password `wonderland`) who may use it.
async fn broker_with_alice() -> (ConsoleProc, TempDir, RouterProc) {
    let console = ConsoleProc::start().await;
    let (dir, broker) = broker_following(&console).await;
    create_space(&console, "tenant-a").await;
    create_address(&console, "tenant-a", "jobs", "jobs", "queue").await;
    create_user(&console, "tenant-a", "alice", "wonderland", &["jobs"]).await;
    (console, dir, broker)
}

async fn broker_following(console: &ConsoleProc) -> (TempDir, RouterProc) {
    let dir = TempDir::new("console-broker-direct");
    let follow = console.follow_args();
    let args: Vec<&str> = follow.iter().map(String::as_str).collect();
    let broker = start_broker(&dir, &args).await;
    (dir, broker)
}

/// A plan's quotas hold: the API refuses an address past the quota (403),
/// the router a connection, a link and a message past theirs
/// (`amqp:resource-limit-exceeded`).
#[tokio::test]
async fn quotas_refuse_what_the_plan_does_not_allow() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    console
        .expect(
            "POST",
            "/api/v1/addressspaces",
            Some(json!({"metadata": {"name": "tight"}, "spec": {
                "plan": "small", "authentication": {"anonymous": false},
                "quotas": {"addresses": 1, "connections": 1, "links": 2, "messageSize": 200}
            }})),
            201,
        )
        .await;
    create_address(&console, "tight", "one", "one", "anycast").await;
    let refused = console
        .expect(
            "POST",
            "/api/v1/addressspaces/tight/addresses",
            Some(
                json!({"metadata": {"name": "two"}, "spec": {"address": "two", "type": "anycast"}}),
            ),
            403,
        )
        .await;
    assert_eq!(refused["reason"], "QuotaExceeded", "{refused}");
    console
        .expect(
            "POST",
            "/api/v1/addressspaces",
            Some(json!({"metadata": {"name": "wrong"}, "spec": {"plan": "huge"}})),
            422,
        )
        .await;
    create_user(&console, "tight", "carol", "secret", &["one"]).await;

    let mut c = login(&router, "carol@tight", "secret", false).await;
    let rx = receiver_when_known(&mut c, "one").await;
    let tx = c
        .open_sender(Some("one"), false)
        .await
        .expect("second link");
    // A third link is past the quota.
    let third = c.open_receiver(Some("one"), 1).await;
    assert_eq!(
        refusal(third),
        AmqpError::ResourceLimitExceeded.into(),
        "a third link"
    );
    // The size quota is the link's announced max-message-size (past it the
    // router detaches the link, AMQP 1.0 §2.7.3, as for --max-message-size):
    // a small message goes; a client that reads the attach will not even
    // send a larger one.
    assert_eq!(
        c.conn.link(tx).map(|l| l.max_message_size),
        Some(200),
        "the quota is announced"
    );
    assert!(c.conn.send(tx, &text("fits"), false, 1));
    c.flush().await.expect("flush");
    assert_eq!(recv_text(&mut c, rx).await, "fits");
    assert!(!c.conn.send(tx, &text(&"x".repeat(500)), false, 2));
    // A second connection is past the quota.
    let opts = router.user_opts("carol@tight", "secret", false);
    match flotilla_amqp::client::Client::connect(&opts).await {
        Err(ClientError::Closed(Some(e))) => {
            assert_eq!(
                e.condition,
                AmqpError::ResourceLimitExceeded.into(),
                "{e:?}"
            )
        }
        Err(e) => panic!("a second connection: {e}"),
        Ok(_) => panic!("a second connection was let in"),
    }
}

/// A broker stops storing for a space at its `storedBytes` quota
/// (`amqp:resource-limit-exceeded`), and takes messages again once some
/// are consumed.
#[tokio::test]
async fn a_broker_refuses_messages_past_the_stored_bytes_quota() {
    let console = ConsoleProc::start().await;
    let (_dir, broker) = broker_following(&console).await;
    console
        .expect(
            "POST",
            "/api/v1/addressspaces",
            Some(json!({"metadata": {"name": "small"}, "spec": {
                "authentication": {"anonymous": false},
                "quotas": {"storedBytes": 2000}
            }})),
            201,
        )
        .await;
    create_address(&console, "small", "jobs", "jobs", "queue").await;
    create_user(&console, "small", "dave", "secret", &["jobs"]).await;
    let mut c = login(&broker, "dave@small", "secret", false).await;
    let tx = sender_when_known(&mut c, "jobs").await;
    // Keep sending 500-byte messages: the quota is counted every second,
    // so the refusal comes within a few seconds of passing it.
    let body = "y".repeat(500);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut accepted = 0;
    let refused = loop {
        assert!(
            Instant::now() < deadline,
            "never refused; {accepted} accepted"
        );
        match send_message(&mut c, tx, accepted, text(&body)).await {
            Some(flotilla_amqp::types::messaging::DeliveryState::Accepted(_)) => accepted += 1,
            Some(flotilla_amqp::types::messaging::DeliveryState::Rejected(r)) => break r,
            other => panic!("unexpected outcome {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        refused.error.map(|e| e.condition),
        Some(AmqpError::ResourceLimitExceeded.into())
    );
    assert!(accepted >= 4, "{accepted} accepted before the quota");
}

/// Live state: the console lists a client's connection, closes it on
/// request, and purges a queue through its broker.
#[tokio::test]
async fn the_console_lists_and_closes_connections_and_purges_queues() {
    let console = ConsoleProc::start().await;
    let router = RouterProc::spawn(console.follow_args(), None).await;
    let (_dir, _broker) = {
        let dir = TempDir::new("console-live-broker");
        let mut args = console.follow_args();
        args.extend(["--router".to_string(), format!("127.0.0.1:{}", router.amqp)]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let b = start_broker(&dir, &a).await;
        (dir, b)
    };
    create_space(&console, "live").await;
    create_address(&console, "live", "jobs", "jobs", "queue").await;
    create_user(&console, "live", "erin", "secret", &["jobs"]).await;
    let mut c = login(&router, "erin@live", "secret", false).await;
    let tx = sender_when_known(&mut c, "jobs").await;
    for i in 0..3 {
        assert!(is_accepted(&send_message(&mut c, tx, i, text("job")).await));
    }

    // The router's report lists the connection; the broker's the 3 messages.
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        assert!(Instant::now() < deadline, "the connection never listed");
        let v = console
            .expect("GET", "/api/v1/addressspaces/live/connections", None, 200)
            .await;
        if let Some(c) = v["items"].as_array().and_then(|i| i.first()).cloned() {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(conn["user"], "erin", "{conn}");
    loop {
        assert!(Instant::now() < deadline, "the queue depth never reported");
        let v = console
            .expect("GET", "/api/v1/addressspaces/live/metrics", None, 200)
            .await;
        if v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["address"] == "jobs" && m["stored"] == 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Purge: the broker drops them.
    console
        .expect(
            "POST",
            "/api/v1/addressspaces/live/addresses/jobs/purge",
            None,
            202,
        )
        .await;
    loop {
        assert!(Instant::now() < deadline, "the purge never happened");
        let v = console
            .expect("GET", "/api/v1/addressspaces/live/metrics", None, 200)
            .await;
        if v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["address"] == "jobs" && m["stored"] == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Close: the router closes the client's connection.
    let path = format!(
        "/api/v1/addressspaces/live/connections/{}/{}/close",
        conn["router"].as_str().expect("router id"),
        conn["id"]
    );
    console.expect("POST", &path, None, 202).await;
    let (cond, why) = closed(&mut c).await;
    assert_eq!(
        cond,
        flotilla_amqp::types::definitions::ConnectionError::ConnectionForced.into(),
        "{why}"
    );
}
