//! Helpers shared by the process-level tests (`tests/router.rs`,
//! `tests/mesh.rs`, `tests/broker.rs`, `tests/linkroute.rs`, …): bounded
//! waiting, the `flotilla router` (or `broker`) process (spawned
//! on `127.0.0.1:0`, its ports read from its `listening` log lines, killed
//! on drop), a broker behind a router, a mesh of routers, TLS files, and
//! clients: fe2o3-amqp (an AMQP 1.0 client we did not write) and our own
//! `flotilla_amqp::client`, where link credit must be observed exactly.
//!
//! Every wait is bounded by [`WAIT`]; nothing sleeps to synchronise (the
//! only polling is [`eventually`], for things with no event to wait on).

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::{Delivery as FeDelivery, DeliveryFut};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{SendError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::primitives::Symbol;
use fe2o3_amqp::{Connection, Receiver, Sendable, Sender, Session};
use flotilla_amqp::client::{Client, ClientOptions};
use flotilla_amqp::connection::{Event, LinkId};
use flotilla_amqp::message::{self, MessageParts};
// fe2o3-amqp and our engine share these types (fe2o3-amqp-types).
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody};
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, Modified, Outcome, SerializableBody, Source, Target,
    TerminusDurability, TerminusExpiryPolicy,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Runs `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// `prices` is multicast; everything else in `default` stays anycast.
pub const MULTICAST_CONFIG: &str = "\
apiVersion: flotilla.dev/v1
kind: Address
metadata: {name: prices}
spec: {address: prices, type: multicast}
";

// ---------------------------------------------------------------------------
// The router process
// ---------------------------------------------------------------------------

/// A unique scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "flotilla-router-test-{}-{n}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `flotilla router`, killed on drop. Its stderr is drained by a
/// thread into `log`, printed if the test fails.
pub struct RouterProc {
    pub child: Child,
    /// Its `--router-id`, or empty (names the log printed on failure).
    pub name: String,
    pub amqp: u16,
    pub amqps: Option<u16>,
    /// The inter-router listener's port, with `--inter-router`.
    pub inter_router: Option<u16>,
    log: Arc<Mutex<Vec<String>>>,
    /// The number of lines in `log`, bumped as each arrives.
    lines: watch::Receiver<usize>,
    _dir: Option<TempDir>,
}

/// An argument for the spawn helpers (never passed on): start the router
/// or broker without the suite's mesh secret.
pub const NO_MESH_SECRET: &str = "<no mesh secret>";

/// The mesh secret every router and broker of this test process shares
/// (written once, to a file under the temporary directory).
pub fn mesh_secret_file() -> PathBuf {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flotilla-test-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mesh secret directory");
        let path = dir.join("mesh-secret");
        std::fs::write(&path, "test-mesh-secret-0123456789abcdef").expect("write the mesh secret");
        path
    })
    .clone()
}

/// The port in a `listening proto="…" addr=HOST:PORT` line for `proto`.
pub fn listening_port(line: &str, proto: &str) -> Option<u16> {
    if !line.contains("listening") || !line.contains(&format!("proto=\"{proto}\"")) {
        return None;
    }
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))?;
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

impl RouterProc {
    /// `flotilla router --amqp 127.0.0.1:0 ARGS…`
    pub async fn start(args: &[&str]) -> Self {
        Self::spawn(args.iter().map(|s| s.to_string()).collect(), None).await
    }

    /// Like [`RouterProc::start`] with `--config` holding `yaml`.
    pub async fn with_config(yaml: &str, args: &[&str]) -> Self {
        let dir = TempDir::new("config");
        let path = dir.write("flotilla.yaml", yaml);
        let mut all = vec!["--config".to_string(), path.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Self::spawn(all, Some(dir)).await
    }

    pub async fn spawn(args: Vec<String>, dir: Option<TempDir>) -> Self {
        Self::spawn_component("router", args, dir).await
    }

    /// `flotilla COMPONENT --amqp 127.0.0.1:0 ARGS…` (`router` or `broker`),
    /// with the suite's mesh secret (as every installation has one) unless
    /// ARGS give their own or say [`NO_MESH_SECRET`].
    pub async fn spawn_component(component: &str, args: Vec<String>, dir: Option<TempDir>) -> Self {
        let mut args = args;
        if let Some(i) = args.iter().position(|a| a == NO_MESH_SECRET) {
            args.remove(i);
        } else if !args.iter().any(|a| a == "--mesh-secret-file") {
            args.push("--mesh-secret-file".into());
            args.push(mesh_secret_file().display().to_string());
        }
        let tls = args.iter().any(|a| a == "--amqps");
        let meshed = args.iter().any(|a| a == "--inter-router");
        let name = args
            .iter()
            .skip_while(|a| *a != "--router-id")
            .nth(1)
            .cloned()
            .unwrap_or_default();
        // The gateway's main listener is MQTT's (its port goes in `amqp`).
        let (flag, proto) = if component == "mqtt-gateway" {
            ("--mqtt", "mqtt")
        } else {
            ("--amqp", "amqp")
        };
        let mut child = spawn_flotilla(
            [component, flag, "127.0.0.1:0"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain(args.iter().map(std::ffi::OsStr::new)),
        );
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let (count_tx, lines) = watch::channel(0usize);
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line.clone());
                count_tx.send_modify(|n| *n += 1);
                let _ = tx.send(line);
            }
        });
        let mut router = RouterProc {
            child,
            name,
            amqp: 0,
            amqps: None,
            inter_router: None,
            log,
            lines,
            _dir: dir,
        };
        within("the router's listening line(s)", async {
            while router.amqp == 0
                || (tls && router.amqps.is_none())
                || (meshed && router.inter_router.is_none())
            {
                let Some(line) = rx.recv().await else {
                    panic!("router exited before listening:\n{}", router.log_text());
                };
                if let Some(p) = listening_port(&line, proto) {
                    router.amqp = p;
                }
                if let Some(p) = listening_port(&line, "amqps") {
                    router.amqps = Some(p);
                }
                if let Some(p) = listening_port(&line, "inter-router") {
                    router.inter_router = Some(p);
                }
            }
        })
        .await;
        router
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends the router signal `name` (`TERM`, `STOP`, …). A stopped router
    /// is still killed on drop.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}: {status}");
    }

    /// Kills the router with SIGKILL (no shutdown, sockets reset) and
    /// reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9 the router");
        self.child.wait().expect("reap the router");
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The log so far, a line each.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many lines of the log so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits, bounded by [`WAIT`], until `found` returns something for the
    /// log so far (checked again as each line arrives) and returns it.
    pub async fn wait_log<T>(
        &self,
        what: &str,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        let mut lines = self.lines.clone();
        within(what, async {
            loop {
                lines.borrow_and_update();
                if let Some(t) = found(&self.log.lock().unwrap()) {
                    return t;
                }
                if lines.changed().await.is_err() {
                    // The router closed its stderr: one last look.
                    lines.borrow_and_update();
                    if let Some(t) = found(&self.log.lock().unwrap()) {
                        return t;
                    }
                    panic!("router {} exited while waiting for {what}", self.name);
                }
            }
        })
        .await
    }

    /// Options for an anonymous client of our own.
    pub fn opts(&self) -> ClientOptions {
        ClientOptions::from_url(&format!("amqp://127.0.0.1:{}", self.amqp)).expect("valid url")
    }

    /// Options for a user of our own client (PLAIN unless `scram`).
    pub fn user_opts(&self, user: &str, password: &str, scram: bool) -> ClientOptions {
        ClientOptions {
            user: Some(user.into()),
            password: Some(password.into()),
            scram,
            ..self.opts()
        }
    }

    pub async fn client(&self) -> Client {
        within("our client to connect", Client::connect(&self.opts()))
            .await
            .expect("connect")
    }

    pub async fn fe2o3(&self, container: &str) -> Fe {
        Fe::connect(self.amqp, container).await
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- router log {} ----\n{}\n--------------------",
                self.name,
                self.log_text()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The broker, alone or behind a router
// ---------------------------------------------------------------------------

/// `flotilla broker --data-dir DIR ARGS…`
pub async fn start_broker(dir: &TempDir, args: &[&str]) -> RouterProc {
    let mut all = vec!["--data-dir".to_string(), dir.path().display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    RouterProc::spawn_component("broker", all, None).await
}

/// `flotilla broker --data-dir DIR --router ROUTER ARGS…`, without waiting
/// for the router to see it (see [`broker_connected_to`]).
pub async fn broker_behind(router: &RouterProc, dir: &TempDir, args: &[&str]) -> RouterProc {
    let at = format!("127.0.0.1:{}", router.amqp);
    let mut all = vec!["--router", at.as_str()];
    all.extend_from_slice(args);
    start_broker(dir, &all).await
}

/// [`broker_behind`], returned once `router` has it as a route container.
pub async fn broker_connected_to(router: &RouterProc, dir: &TempDir, args: &[&str]) -> RouterProc {
    let broker = broker_behind(router, dir, args).await;
    await_broker_at(router).await;
    broker
}

fn conn_id(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("conn.id="))
}

/// A router's broker connections still up, by `conn.id`, from its log.
pub fn live_brokers(log: &[String]) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for l in log {
        if l.contains("broker connected (route container)") {
            live.extend(conn_id(l).map(str::to_string));
        } else if l.contains("broker disconnected") {
            if let Some(id) = conn_id(l) {
                live.remove(id);
            }
        }
    }
    live
}

/// Waits until a broker is connected to `router` as a route container.
pub async fn await_broker_at(router: &RouterProc) {
    router
        .wait_log("a broker connected as a route container", |log| {
            (!live_brokers(log).is_empty()).then_some(())
        })
        .await;
}

/// Waits until `router` has seen its brokers' connections close.
pub async fn await_no_broker_at(router: &RouterProc) {
    router
        .wait_log("the broker's connection to close", |log| {
            live_brokers(log).is_empty().then_some(())
        })
        .await;
}

// ---------------------------------------------------------------------------
// A mesh of routers
// ---------------------------------------------------------------------------

/// Router `id` with an inter-router listener, connecting to the routers
/// listening on `peers` (inter-router ports), with `extra` arguments.
pub async fn start_mesh_router(
    id: &str,
    peers: &[u16],
    config: Option<&str>,
    extra: &[&str],
) -> RouterProc {
    let mut args = vec![
        "--inter-router".to_string(),
        "127.0.0.1:0".to_string(),
        "--router-id".to_string(),
        id.to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    for port in peers {
        args.push("--peer".into());
        args.push(format!("127.0.0.1:{port}"));
    }
    match config {
        Some(yaml) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            RouterProc::with_config(yaml, &args).await
        }
        None => RouterProc::spawn(args, None).await,
    }
}

/// Routers named by `ids`, started in order, each with an inter-router
/// listener; for every `(x, y)` in `links` the later-started of the two
/// connects to the other with `--peer`. Returns them in `ids` order once
/// every router has a route to every other.
pub async fn mesh(ids: &[&str], links: &[(&str, &str)], config: Option<&str>) -> Vec<RouterProc> {
    mesh_with(ids, links, config, &[]).await
}

/// [`mesh`] with `extra` arguments for every router.
pub async fn mesh_with(
    ids: &[&str],
    links: &[(&str, &str)],
    config: Option<&str>,
    extra: &[&str],
) -> Vec<RouterProc> {
    let mut routers: Vec<RouterProc> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut peers = Vec::new();
        for (x, y) in links {
            let other = match (*x == *id, *y == *id) {
                (true, false) => y,
                (false, true) => x,
                _ => continue,
            };
            if let Some(j) = ids[..i].iter().position(|p| p == other) {
                peers.push(routers[j].inter_router.expect("inter-router listener"));
            }
        }
        routers.push(start_mesh_router(id, &peers, config, extra).await);
    }
    for (i, r) in routers.iter().enumerate() {
        let others: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| *id)
            .collect();
        await_routes(r, &others).await;
    }
    routers
}

/// Routers `A` and `B` (which connects to A), both with `config`, once
/// each has a route to the other.
pub async fn two_routers(config: Option<&str>) -> (RouterProc, RouterProc) {
    let mut routers = mesh(&["A", "B"], &[("A", "B")], config).await;
    let b = routers.pop().expect("B");
    let a = routers.pop().expect("A");
    (a, b)
}

/// Router → (next hop, cost) from the last `mesh routes routes=[…]` line
/// in `log`, e.g. `routes=["B via B cost 1", "C via B cost 2"]`.
pub fn latest_routes(log: &[String]) -> Option<BTreeMap<String, (String, u64)>> {
    let line = log.iter().rev().find(|l| l.contains("mesh routes"))?;
    let list = line.split("routes=[").nth(1)?.rsplit_once(']')?.0;
    let mut routes = BTreeMap::new();
    for entry in list.split(", ").filter(|e| !e.is_empty()) {
        let words: Vec<&str> = entry.trim_matches('"').split_whitespace().collect();
        match words[..] {
            [to, "via", hop, "cost", cost] => {
                routes.insert(to.to_string(), (hop.to_string(), cost.parse().ok()?));
            }
            _ => panic!("unexpected route {entry:?} in {line:?}"),
        }
    }
    Some(routes)
}

/// Waits until `router`'s latest routes list every router in `expected`;
/// returns them.
pub async fn await_routes(
    router: &RouterProc,
    expected: &[&str],
) -> BTreeMap<String, (String, u64)> {
    let what = format!("router {} to have routes to {expected:?}", router.name);
    router
        .wait_log(&what, |log| {
            latest_routes(log).filter(|r| expected.iter().all(|e| r.contains_key(*e)))
        })
        .await
}

// ---------------------------------------------------------------------------
// fe2o3-amqp: an AMQP 1.0 client we did not write
// ---------------------------------------------------------------------------

/// One fe2o3 connection with one session.
pub struct Fe {
    _conn: ConnectionHandle<()>,
    session: SessionHandle<()>,
}

impl Fe {
    pub async fn connect(port: u16, container: &str) -> Fe {
        Self::connect_with_window(port, container, fe2o3_amqp::session::DEFAULT_WINDOW).await
    }

    /// Connects with a session that takes `incoming_window` transfer frames
    /// at a time.
    pub async fn connect_with_window(port: u16, container: &str, incoming_window: u32) -> Fe {
        let url = format!("amqp://127.0.0.1:{port}");
        let mut conn = within(
            "fe2o3 to connect",
            Connection::open(container.to_string(), url.as_str()),
        )
        .await
        .expect("fe2o3 connect");
        let session = within(
            "fe2o3 session",
            Session::builder()
                .incoming_window(incoming_window)
                .begin(&mut conn),
        )
        .await
        .expect("fe2o3 begin");
        Fe {
            _conn: conn,
            session,
        }
    }

    pub async fn sender(&mut self, name: &str, address: &str) -> Sender {
        within(
            "fe2o3 sender attach",
            Sender::attach(&mut self.session, name, address),
        )
        .await
        .expect("sender attach")
    }

    /// A sender with no target address: ANONYMOUS-RELAY, routed by `to`.
    pub async fn relay_sender(&mut self, name: &str) -> Sender {
        within(
            "fe2o3 relay sender attach",
            Sender::builder()
                .name(name)
                .target(Target::builder().build())
                .attach(&mut self.session),
        )
        .await
        .expect("relay sender attach")
    }

    pub async fn receiver(&mut self, name: &str, address: &str) -> Receiver {
        within(
            "fe2o3 receiver attach",
            Receiver::attach(&mut self.session, name, address),
        )
        .await
        .expect("receiver attach")
    }

    /// A sender to the queue `address`, asked for by the target's `queue`
    /// capability (as JMS does); the attach may be refused.
    pub async fn queue_sender(
        &mut self,
        name: &str,
        address: &str,
    ) -> Result<Sender, SenderAttachError> {
        self.sender_with_capability(name, address, "queue").await
    }

    /// A sender to the topic `address`, asked for by the target's `topic`
    /// capability (as JMS does).
    pub async fn topic_sender(&mut self, name: &str, address: &str) -> Sender {
        self.sender_with_capability(name, address, "topic")
            .await
            .expect("topic sender attach")
    }

    async fn sender_with_capability(
        &mut self,
        name: &str,
        address: &str,
        capability: &str,
    ) -> Result<Sender, SenderAttachError> {
        within(
            "fe2o3 sender attach (by capability)",
            Sender::builder()
                .name(name)
                .target(
                    Target::builder()
                        .address(address)
                        .capabilities(vec![Symbol::from(capability)])
                        .build(),
                )
                .attach(&mut self.session),
        )
        .await
    }

    /// A receiver from `address` (with the source's `capability`, if any)
    /// that grants credit only when told to; see [`recv_one`].
    pub async fn manual_receiver(
        &mut self,
        name: &str,
        address: &str,
        capability: Option<&str>,
    ) -> Receiver {
        let mut source = Source::builder().address(address);
        if let Some(c) = capability {
            source = source.capabilities(vec![Symbol::from(c)]);
        }
        within(
            "fe2o3 manual-credit receiver attach",
            Receiver::builder()
                .name(name)
                .source(source.build())
                .credit_mode(CreditMode::Manual)
                .attach(&mut self.session),
        )
        .await
        .expect("manual-credit receiver attach")
    }

    /// A subscriber to the topic `address` (by the source's `topic`
    /// capability): durable (named by the container id and `name`, kept
    /// while detached) or for this link only.
    pub async fn subscriber(&mut self, name: &str, address: &str, durable: bool) -> Receiver {
        let mut source = Source::builder()
            .address(address)
            .capabilities(vec![Symbol::from("topic")]);
        if durable {
            source = source
                .durable(TerminusDurability::UnsettledState)
                .expiry_policy(TerminusExpiryPolicy::Never);
        }
        within(
            "fe2o3 subscriber attach",
            Receiver::builder()
                .name(name)
                .source(source.build())
                .attach(&mut self.session),
        )
        .await
        .expect("subscriber attach")
    }

    /// A round trip with the router on this connection (attaching and
    /// closing a sender): frames sent before it, such as a receiver's
    /// credit, have been handled by the router when this returns.
    pub async fn round_trip(&mut self) {
        let s = self.sender("round-trip", "round-trip").await;
        within("round-trip close", s.close()).await.expect("close");
    }

    /// A receiver from a router-made (dynamic) node, and that node's address.
    pub async fn dynamic_receiver(&mut self, name: &str) -> (Receiver, String) {
        let r = within(
            "fe2o3 dynamic receiver attach",
            Receiver::builder()
                .name(name)
                .source(Source::builder().dynamic(true).build())
                .attach(&mut self.session),
        )
        .await
        .expect("dynamic receiver attach");
        let address = r
            .source()
            .as_ref()
            .and_then(|s| s.address.clone())
            .expect("the router names the dynamic node");
        (r, address)
    }
}

/// Receives one message, accepts it and returns its body.
pub async fn recv_accept(r: &mut Receiver) -> String {
    let d = within("a message", r.recv::<String>()).await.expect("recv");
    within("accept", r.accept(&d)).await.expect("accept");
    d.into_body()
}

/// Grants one credit (to a [`Fe::manual_receiver`]) and returns the one
/// delivery it brings (fe2o3 fails `recv` if more arrive than granted).
pub async fn recv_one(r: &mut Receiver) -> FeDelivery<String> {
    within("set credit", r.set_credit(1))
        .await
        .expect("set credit");
    within("a message", r.recv::<String>()).await.expect("recv")
}

/// The delivery-count of `d`'s header (0 without one).
pub fn delivery_count<T>(d: &FeDelivery<T>) -> u32 {
    d.message().header.as_ref().map_or(0, |h| h.delivery_count)
}

/// The durable subscriber `sub` gets the five messages `tx` publishes
/// first, then detaches (not closes: the subscription stays) and `tx`
/// publishes ten more; returns those, published while it was away.
pub async fn publish_while_durable_subscriber_is_away(
    tx: &mut Sender,
    mut sub: Receiver,
) -> Vec<String> {
    let before = numbered("before", 5);
    assert_all_accepted(&send_all(tx, &before).await);
    assert_eq!(recv_n(&mut sub, 5).await, before);
    within("detach", sub.detach())
        .await
        .map_err(|(_, e)| e)
        .expect("detach");
    let away = numbered("away", 10);
    assert_all_accepted(&send_all(tx, &away).await);
    away
}

/// The durable subscriber `sub`, attached again, gets exactly `away`, once
/// and in order, and then what `tx` publishes next: nothing else was kept.
pub async fn assert_durable_subscriber_gets_only(
    sub: &mut Receiver,
    away: &[String],
    tx: &mut Sender,
) {
    assert_eq!(
        recv_n(sub, away.len()).await,
        away,
        "what was published while away, once, in order"
    );
    assert_all_accepted(&send_all(tx, &["after".to_string()]).await);
    assert_eq!(recv_accept(sub).await, "after", "nothing else was kept");
}

/// An unsettled delivery's outcome, to come.
pub type Pending = DeliveryFut<Result<Outcome, SendError>>;

/// Sends each of `messages` unsettled without waiting for outcomes.
pub async fn send_unsettled<T, B>(s: &mut Sender, messages: &[T]) -> Vec<Pending>
where
    T: Clone + Into<Sendable<B>>,
    B: SerializableBody,
{
    let mut pending = Vec::new();
    for m in messages {
        pending.push(
            within("send", s.send_batchable(m.clone()))
                .await
                .expect("send"),
        );
    }
    pending
}

/// Waits for every outcome.
pub async fn outcomes(pending: Vec<Pending>) -> Vec<Outcome> {
    let mut out = Vec::new();
    for p in pending {
        out.push(within("an outcome", p).await.expect("outcome"));
    }
    out
}

/// Sends `bodies` without waiting, then waits for every outcome.
pub async fn send_all(s: &mut Sender, bodies: &[String]) -> Vec<Outcome> {
    let pending = send_unsettled(s, bodies).await;
    outcomes(pending).await
}

/// Receives `n` messages, accepting each; returns their bodies.
pub async fn recv_n(r: &mut Receiver, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(recv_accept(r).await);
    }
    got
}

/// Forwards every message `r` receives, accepted, as (`id`, body) until the
/// link or connection ends.
pub fn spawn_collector(
    id: usize,
    mut r: Receiver,
    tx: mpsc::UnboundedSender<(usize, String)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(d) = r.recv::<String>().await {
            if r.accept(&d).await.is_err() {
                break;
            }
            if tx.send((id, d.into_body())).is_err() {
                break;
            }
        }
    })
}

pub fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

pub fn assert_all_accepted(outcomes: &[Outcome]) {
    for (i, o) in outcomes.iter().enumerate() {
        assert!(matches!(o, Outcome::Accepted(_)), "message {i}: {o:?}");
    }
}

// ---------------------------------------------------------------------------
// Our own client, where credit and events must be seen exactly
// ---------------------------------------------------------------------------

/// Reads `c`'s events until `pick` returns something; other events are
/// dropped.
pub async fn next_event_where<T>(
    c: &mut Client,
    what: &str,
    mut pick: impl FnMut(&Client, Event) -> Option<T>,
) -> T {
    within(what, async {
        loop {
            let e = c
                .next_event()
                .await
                .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
            if let Some(t) = pick(c, e) {
                return t;
            }
        }
    })
    .await
}

/// The credit the router gave our sending link.
pub fn credit(c: &Client, link: LinkId) -> u32 {
    c.conn.link(link).map_or(0, |l| l.credit)
}

/// A round trip with the router on `c`'s connection (a dynamic receiver
/// attach): whatever the router sent `c` before answering it has been
/// processed when this returns.
pub async fn round_trip(c: &mut Client) {
    within("a round trip", c.open_receiver(None, 0))
        .await
        .expect("dynamic receiver");
}

pub fn text(body: &str) -> bytes::Bytes {
    message::encode_message(&MessageParts {
        body: body.as_bytes(),
        text: true,
        ..Default::default()
    })
}

/// Waits until the router gives our sending link credit.
pub async fn await_credit(c: &mut Client, link: LinkId) {
    if credit(c, link) == 0 {
        next_event_where(c, "credit", |c, _| (credit(c, link) > 0).then_some(())).await;
    }
}

/// Waits for credit, sends the encoded message `m` unsettled and returns
/// its outcome.
pub async fn send_message(
    c: &mut Client,
    link: LinkId,
    token: u64,
    m: bytes::Bytes,
) -> Option<DeliveryState> {
    await_credit(c, link).await;
    assert!(c.conn.send(link, &m, false, token), "send with credit");
    next_event_where(c, "an outcome", |_, e| match e {
        Event::Outcome {
            link: l,
            token: t,
            state,
            settled: true,
        } if l == link && t == token => Some(state),
        _ => None,
    })
    .await
}

/// Waits for a message on `link`, accepts it and returns its body.
pub async fn recv_text(c: &mut Client, link: LinkId) -> String {
    let d = next_event_where(c, "a message", |_, e| match e {
        Event::Delivery { link: l, delivery } if l == link => Some(delivery),
        _ => None,
    })
    .await;
    if !d.settled {
        c.conn.settle(d.id, DeliveryState::Accepted(Accepted {}));
        c.flush().await.expect("flush");
    }
    let body = message::body_bytes(&d.payload).expect("a text body");
    String::from_utf8(body).expect("utf-8 body")
}

/// Receives `n` messages on `link`, accepting each; returns their bodies.
pub async fn recv_texts(c: &mut Client, link: LinkId, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(recv_text(c, link).await);
    }
    got
}

/// Sends each of `bodies` unsettled on `link` as credit allows (token =
/// index) and returns every outcome, by index.
pub async fn send_texts(
    c: &mut Client,
    link: LinkId,
    bodies: &[String],
) -> Vec<Option<DeliveryState>> {
    let mut states: Vec<Option<Option<DeliveryState>>> = bodies.iter().map(|_| None).collect();
    let mut next = 0;
    let mut settled = 0;
    within("every message sent and settled", async {
        while settled < bodies.len() {
            while next < bodies.len() && credit(c, link) > 0 {
                assert!(c.conn.send(link, &text(&bodies[next]), false, next as u64));
                next += 1;
            }
            match c.next_event().await.expect("sender's connection") {
                Event::Outcome {
                    link: l,
                    token,
                    state,
                    settled: true,
                } if l == link => {
                    let slot = &mut states[token as usize];
                    assert!(slot.is_none(), "message {token} settled twice");
                    *slot = Some(state);
                    settled += 1;
                }
                Event::Detach { link: l, error, .. } if l == link => {
                    panic!("the sending link was detached: {error:?}")
                }
                _ => {}
            }
        }
    })
    .await;
    states.into_iter().map(|s| s.expect("settled")).collect()
}

pub fn is_accepted(s: &Option<DeliveryState>) -> bool {
    matches!(s, Some(DeliveryState::Accepted(_)))
}

pub fn assert_all_states_accepted(states: &[Option<DeliveryState>]) {
    for (i, s) in states.iter().enumerate() {
        assert!(is_accepted(s), "message {i}: {s:?}");
    }
}

/// The receiver (`rx`) rejects, releases and modifies three messages from
/// `tx`; each outcome, with its details, reaches the sender.
pub async fn assert_outcomes_relayed(tx: &mut Sender, rx: &mut Receiver) {
    let error = AmqpErrorBody::new(
        AmqpError::InvalidField,
        Some("no such product".to_string()),
        None,
    );
    let modified = Modified {
        delivery_failed: Some(true),
        undeliverable_here: Some(true),
        message_annotations: None,
    };
    let pending = send_unsettled(tx, &["reject me", "release me", "modify me"]).await;
    for _ in 0..3 {
        let d = within("a message", rx.recv::<String>())
            .await
            .expect("recv");
        let r = match d.body().as_str() {
            "reject me" => rx.reject(&d, error.clone()).await,
            "release me" => rx.release(&d).await,
            _ => rx.modify(&d, modified.clone()).await,
        };
        r.expect("disposition");
    }
    let outcomes = outcomes(pending).await;
    match &outcomes[0] {
        Outcome::Rejected(r) => assert_eq!(r.error.as_ref(), Some(&error), "the receiver's error"),
        o => panic!("expected rejected, got {o:?}"),
    }
    assert!(
        matches!(outcomes[1], Outcome::Released(_)),
        "{:?}",
        outcomes[1]
    );
    match &outcomes[2] {
        Outcome::Modified(m) => assert_eq!(m, &modified),
        o => panic!("expected modified, got {o:?}"),
    }
}

/// Sends `n` messages unsettled to `rx`, which accepts the first `accept`
/// and then detaches: the rest come back to the sender as released.
pub async fn assert_unaccepted_released_on_detach(
    tx: &mut Sender,
    mut rx: Receiver,
    n: usize,
    accept: usize,
) {
    let bodies = numbered("m", n);
    let pending = send_unsettled(tx, &bodies).await;
    for (i, b) in bodies.iter().enumerate() {
        let d = within("a message", rx.recv::<String>())
            .await
            .expect("recv");
        assert_eq!(d.body(), b);
        if i < accept {
            within("accept", rx.accept(&d)).await.expect("accept");
        }
    }
    within("the receiver to detach", rx.close())
        .await
        .expect("close");

    let outcomes = outcomes(pending).await;
    let accepted = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Accepted(_)))
        .count();
    let released = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Released(_)))
        .count();
    assert_eq!(
        (accepted, released),
        (accept, n - accept),
        "accepted + released == sent: {outcomes:?}"
    );
}

/// Two collectors (`spawn_collector` with ids 0 and 1) report on `seen`.
/// Sends markers until each collector has seen one (at most `max_markers`):
/// any duplicate of a work item would have arrived before. Then checks
/// that `got` plus what arrived meanwhile is `bodies`, each exactly once.
pub async fn assert_each_delivered_once(
    tx: &mut Sender,
    seen: &mut mpsc::UnboundedReceiver<(usize, String)>,
    got: &mut Vec<(usize, String)>,
    bodies: &[String],
    max_markers: usize,
) {
    send_markers_until_both_saw_one(tx, seen, max_markers, |id, body, _| got.push((id, body)))
        .await;
    assert_eq!(
        got.len(),
        bodies.len(),
        "each work item is delivered exactly once"
    );
    let mut bodies_got: Vec<String> = got.iter().map(|(_, b)| b.clone()).collect();
    bodies_got.sort();
    let mut expected = bodies.to_vec();
    expected.sort();
    assert_eq!(bodies_got, expected);
}

/// Two collectors (`spawn_collector` with ids 0 and 1) report on `seen`.
/// Sends `marker-0`, `marker-1`, … on `tx`, each accepted, until each
/// collector has seen one (at most `max_markers`). Everything else that
/// arrives meanwhile goes to `other(id, body, marked)`, `marked` saying
/// whether collector `id` had already seen a marker.
pub async fn send_markers_until_both_saw_one(
    tx: &mut Sender,
    seen: &mut mpsc::UnboundedReceiver<(usize, String)>,
    max_markers: usize,
    mut other: impl FnMut(usize, String, bool),
) {
    let mut marked = [false; 2];
    for i in 0.. {
        assert!(i < max_markers, "markers never reached both receivers");
        if marked.iter().all(|m| *m) {
            break;
        }
        let marker = format!("marker-{i}");
        let o = within("a marker", tx.send(marker.clone())).await;
        assert!(matches!(o, Ok(Outcome::Accepted(_))), "{o:?}");
        loop {
            let (id, body) = within("the marker", seen.recv())
                .await
                .expect("collectors run");
            if body.starts_with("marker-") {
                marked[id] = true;
                if body == marker {
                    break;
                }
            } else {
                other(id, body, marked[id]);
            }
        }
    }
}

/// Writes a CA and a server certificate for `localhost` signed by it;
/// returns (ca, cert, key) paths.
pub fn write_tls_files(dir: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flotilla test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    (
        dir.write("ca.pem", &ca.pem()),
        dir.write("server.pem", &cert.pem()),
        dir.write("server.key", &key.serialize_pem()),
    )
}

/// `--tls-cert CERT --tls-key KEY`, for a router or a broker.
pub fn tls_args(cert: &std::path::Path, key: &std::path::Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]
}

pub fn tls_opts(port: u16, ca: &std::path::Path) -> ClientOptions {
    ClientOptions {
        tls_ca: Some(ca.to_path_buf()),
        ..ClientOptions::from_url(&format!("amqps://localhost:{port}")).expect("valid url")
    }
}

// ---------------------------------------------------------------------------
// The console (control plane) process and a tiny HTTP client for its API
// ---------------------------------------------------------------------------

/// A running `flotilla console --listen 127.0.0.1:0 --data-dir DIR`,
/// killed on drop; its port is read from its `listening proto="http"` line
/// and its admin token from `DIR/admin-token`.
pub struct ConsoleProc {
    pub child: Child,
    pub port: u16,
    pub token: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Always `Some` but while [`ConsoleProc::restart`] moves it on.
    dir: Option<TempDir>,
}

impl ConsoleProc {
    pub async fn start() -> Self {
        Self::start_in(TempDir::new("console"), "127.0.0.1:0").await
    }

    /// Kills the console and starts it again on the same port and data
    /// directory (its store and token survive).
    pub async fn restart(mut self) -> Self {
        self.kill();
        let dir = self.dir.take().expect("the console has its directory");
        let listen = format!("127.0.0.1:{}", self.port);
        drop(self);
        Self::start_in(dir, &listen).await
    }

    async fn start_in(dir: TempDir, listen: &str) -> Self {
        let mut child = spawn_flotilla(
            ["console", "--listen", listen, "--data-dir"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain(std::iter::once(dir.path().as_os_str())),
        );
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let port = within("the console's listening line", async {
            loop {
                let Some(line) = rx.recv().await else {
                    panic!(
                        "console exited before listening:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                };
                if let Some(p) = listening_port(&line, "http") {
                    return p;
                }
            }
        })
        .await;
        let token = std::fs::read_to_string(dir.path().join("admin-token"))
            .expect("the console made its admin token")
            .trim()
            .to_string();
        ConsoleProc {
            child,
            port,
            token,
            log,
            dir: Some(dir),
        }
    }

    /// `http://127.0.0.1:PORT`, for `--console`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The admin token's file, for `--console-token-file`.
    pub fn token_file(&self) -> PathBuf {
        self.dir
            .as_ref()
            .expect("the console has its directory")
            .path()
            .join("admin-token")
    }

    /// `--console URL --console-token-file FILE`, for a router or broker.
    pub fn follow_args(&self) -> Vec<String> {
        vec![
            "--console".into(),
            self.url(),
            "--console-token-file".into(),
            self.token_file().display().to_string(),
        ]
    }

    /// One API call with the admin token: the status and the JSON body
    /// (`Null` if the body is empty or not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        within(
            "an API call",
            http_call(self.port, method, path, Some(&self.token), body),
        )
        .await
    }

    /// An API call that must answer `want`; returns the body.
    pub async fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        want: u16,
    ) -> serde_json::Value {
        let (status, v) = self.call(method, path, body.as_ref()).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Kills the console with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ConsoleProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- console log ----\n{}\n--------------------",
                self.log_text()
            );
        }
    }
}

/// A minimal HTTP/1.1 client (one request per connection, `Connection:
/// close`): the status and the JSON body (`Null` if empty or not JSON).
pub async fn http_call(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the console");
    tcp.write_all(req.as_bytes())
        .await
        .expect("send the request");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("read the answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut content = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &content[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        content = out;
    }
    (
        status,
        serde_json::from_slice(&content).unwrap_or(serde_json::Value::Null),
    )
}

/// Starts `flotilla ARGS…` with its log on a pipe (`FLOTILLA_TEST_LOG=debug`
/// shows more of it in failures).
fn spawn_flotilla<'a>(args: impl IntoIterator<Item = &'a std::ffi::OsStr>) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("FLOTILLA_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla")
}

// ---------------------------------------------------------------------------
// Hand-built frames, for bad input
// ---------------------------------------------------------------------------

use bytes::BytesMut as RawBytes;
use flotilla_amqp::frame::{Frame as RawFrame, Performative, HEADER_AMQP};
use flotilla_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use flotilla_amqp::types::messaging::TargetArchetype;
use flotilla_amqp::types::performatives::{Attach, Begin, ChannelMax, MaxFrameSize, Open};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A TCP connection speaking raw AMQP frames.
pub struct RawConn {
    pub tcp: tokio::net::TcpStream,
    pub buf: RawBytes,
    /// The router's Open, once exchanged.
    pub peer_open: Option<Box<Open>>,
}

pub fn encode(channel: u16, p: Performative) -> RawBytes {
    let mut out = RawBytes::new();
    flotilla_amqp::frame::encode_performative(&mut out, channel, &p);
    out
}

pub fn open_performative(hostname: Option<&str>) -> Performative {
    Performative::Open(Box::new(Open {
        container_id: "raw-client".into(),
        hostname: hostname.map(str::to_string),
        max_frame_size: MaxFrameSize(65536),
        channel_max: ChannelMax(255),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }))
}

pub fn begin_performative() -> Performative {
    Performative::Begin(Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 1000,
        outgoing_window: 1000,
        handle_max: Handle(u32::MAX),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
}

pub fn sender_attach(name: &str, handle: u32, address: &str) -> Performative {
    Performative::Attach(Box::new(Attach {
        name: name.into(),
        handle: Handle(handle),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::default()),
        target: Some(Box::new(TargetArchetype::Target(Target {
            address: Some(address.into()),
            ..Default::default()
        }))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }))
}

impl RawConn {
    pub async fn connect(port: u16) -> Self {
        let tcp = within(
            "raw connect",
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .expect("raw connect");
        RawConn {
            tcp,
            buf: RawBytes::new(),
            peer_open: None,
        }
    }

    /// Connects and exchanges protocol headers and Opens (no SASL).
    pub async fn open(port: u16, hostname: Option<&str>) -> Self {
        let mut c = Self::connect(port).await;
        c.write(&HEADER_AMQP).await;
        c.write(&encode(0, open_performative(hostname))).await;
        assert_eq!(c.read_header().await, Some(HEADER_AMQP));
        match c.next_frame().await {
            Some(RawFrame::Amqp {
                performative: Performative::Open(o),
                ..
            }) => c.peer_open = Some(o),
            other => panic!("expected the router's Open, got {other:?}"),
        }
        c
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        within("raw write", self.tcp.write_all(bytes))
            .await
            .expect("raw write");
    }

    /// Reads into the buffer; false at end of stream (or reset).
    pub async fn fill(&mut self) -> bool {
        matches!(
            within("bytes from the router", self.tcp.read_buf(&mut self.buf)).await,
            Ok(n) if n > 0
        )
    }

    /// The 8-byte protocol header the router sends, or `None` if it closes first.
    pub async fn read_header(&mut self) -> Option<[u8; 8]> {
        while self.buf.len() < 8 {
            if !self.fill().await {
                return None;
            }
        }
        let h = self.buf.split_to(8);
        Some(h[..].try_into().expect("8 bytes"))
    }

    /// The next frame, or `None` when the router closes the socket.
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some(f) =
                flotilla_amqp::frame::decode_frame(&mut self.buf, 1 << 20).expect("router's frame")
            {
                return Some(f);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next frame that is not a heartbeat; panics at end of stream.
    pub async fn next_performative(&mut self) -> Performative {
        loop {
            match self.next_frame().await {
                Some(RawFrame::Amqp { performative, .. }) => return performative,
                Some(_) => continue,
                None => panic!("router closed the socket"),
            }
        }
    }

    /// Reads until the router's Close, checks that nothing follows it but
    /// the end of the stream, and returns the Close's error.
    pub async fn expect_close(&mut self) -> Option<AmqpErrorBody> {
        let error = loop {
            match self.next_performative().await {
                Performative::Close(c) => break c.error,
                _ => continue,
            }
        };
        let after = self.next_frame().await;
        assert!(
            after.is_none(),
            "the router sent a frame after its Close: {after:?}"
        );
        error
    }
}
