//! flotilla-broker: store-and-forward queues and topics (DESIGN.md
//! "Broker"). A message a producer sends unsettled is accepted only once it
//! is on disk in the broker's own journal; consumers compete for a queue's
//! messages with credit, in order; released, modified and
//! unsettled-at-disconnect messages are redelivered (with the header's
//! delivery-count), and move to the dead-letter queue after too many
//! attempts; expired messages are dropped or moved to an expiry queue.
//! Topics fan out to subscriptions — durable, shared, wildcard, with
//! selectors — each a queue of its own. Everything not acknowledged
//! survives a crash.
//!
//! Clients connect directly (authenticated and placed in an address space
//! as on a router) or through routers: with `router` set, the broker keeps
//! a connection to that router as a route container, and the mesh routes
//! links for queue, topic and subscription addresses to it.
//!
//! # Layout
//!
//! - [`journal`]: segmented append-only files, CRC per record, group commit.
//! - [`store`]: the broker's records in the journal; rebuilding state.
//! - [`queues`]: the task that owns every queue and subscription.
//! - [`selector`]: message selectors (JMS / SQL-92 subset).
//! - `connection`: one task per connection.

#![forbid(unsafe_code)]

mod connection;
pub mod inspect;
pub mod journal;
pub mod queues;
pub mod selector;
pub mod shards;
pub mod store;
pub mod txn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_amqp::policy::Policy;
use flotilla_amqp::transport::{self, AcceptConfig};
use flotilla_core::config::Tenancy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Everything a broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub amqp: SocketAddr,
    pub data_dir: PathBuf,
    pub container_id: String,
    /// Dead-letter and expiry settings for every queue.
    pub dead_letter: queues::DeadLetter,
    /// Queue tasks (at least 1): queues spread over them by a hash of
    /// their key, each address space's subscriptions on one.
    pub queue_shards: usize,
    /// Address spaces, users and addresses (as for routers).
    pub tenancy: Tenancy,
    /// A router to connect to as a route container (`HOST:PORT`).
    pub router: Option<String>,
    /// Bytes of message bodies kept in memory; past this, bodies stay in
    /// the journal and are read back when delivered.
    pub max_memory: usize,
    /// Certificate and key (PEM): the listener then takes TLS too
    /// (`amqps` and the AMQP TLS header).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The mesh CA: the router's certificate must be signed by it, and
    /// with `tls` the broker presents its own certificate to the router,
    /// which proves it a component.
    pub tls_ca: Option<PathBuf>,
    /// The mesh secret: the broker proves it is a component to its router
    /// with it (SCRAM-SHA-256 as `ID@$mesh`); operators' tools may log in
    /// to the broker's own listener with it to see every space.
    pub mesh_secret: Option<flotilla_core::auth::MeshSecret>,
    /// Where address spaces' `jwksFile`s are (`--jwks-dir`).
    pub jwks_dir: Option<std::path::PathBuf>,
    /// Clients of the broker's own listener must use TLS.
    pub require_tls: bool,
    /// Limits on the broker's own listener.
    pub admission: flotilla_amqp::admission::AdmissionConfig,
    /// Follow the control plane for address spaces, addresses and users.
    pub console: Option<flotilla_core::watch::ConsoleLink>,
    /// The operations listener: `/metrics`, `/healthz`, `/readyz` (ready
    /// once the journal is recovered and the router, if any, connected).
    pub http: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("journal: {0}")]
    Journal(#[from] journal::JournalError),
    #[error("cannot start the journal: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_amqp::tls::TlsError),
    #[error("--require-tls needs --tls-cert and --tls-key")]
    TlsMissing,
    #[error("--router needs a component credential to be a route container: --mesh-secret-file FILE (the routers' mesh secret), or --tls-ca with --tls-cert/--tls-key (a certificate from the mesh CA)")]
    NoComponentCredential,
}

/// Keeps a connection to `router` (re-resolved and retried with backoff)
/// over which the router routes links to this broker.
/// `subscription` addresses exist before anyone consumes them.
/// A console command about a queue's messages: its id, the queue, and
/// what it asks (`browse` with `limit`, `retry` with optional `ids`,
/// `delete` with `message`).
fn inspect_command(c: &serde_json::Value) -> Option<(u64, String, queues::Inspect)> {
    let id = c["id"].as_u64()?;
    let queue = store::queue_key(c["space"].as_str()?, c["address"].as_str()?);
    let op = match c["op"].as_str()? {
        "browse" => queues::Inspect::Browse {
            limit: c["limit"].as_u64().unwrap_or(50).min(1000) as usize,
        },
        "retry" => queues::Inspect::Retry {
            ids: c["ids"]
                .as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect()),
        },
        "purge" => queues::Inspect::Purge,
        "delete" => queues::Inspect::Delete {
            id: c["message"].as_u64()?,
        },
        _ => return None,
    };
    Some((id, queue, op))
}

/// Makes sure each `subscription` address of `t` has its shared durable
/// subscription: those `before` (the tenancy applied last) did not have.
/// A space whose subscriptions did not change costs nothing, and one that
/// did costs what changed (an ordered map's diff skips what two versions
/// share).
fn ensure_subscription_addresses(
    t: &Tenancy,
    before: Option<&Tenancy>,
    queues: &queues::QueueHandle,
) {
    for space in t.spaces.values() {
        let old = before
            .and_then(|b| b.spaces.get(&space.name))
            .map(|s| &s.subscriptions);
        let added: Vec<(&String, &String)> = match old {
            Some(o) if o.ptr_eq(&space.subscriptions) => continue,
            Some(o) => o
                .diff(&space.subscriptions)
                .filter_map(|d| match d {
                    flotilla_core::imbl::ordmap::DiffItem::Add(k, v) => Some((k, v)),
                    flotilla_core::imbl::ordmap::DiffItem::Update { new, .. } => Some(new),
                    flotilla_core::imbl::ordmap::DiffItem::Remove(..) => None,
                })
                .collect(),
            None => space.subscriptions.iter().collect(),
        };
        for (address, topic) in added {
            queues.send_soon(queues::BrokerEvent::Ensure {
                spec: queues::SubSpec {
                    record: store::SubRecord {
                        key: store::sub_key(&space.name, &format!("address/{address}")),
                        space: space.name.clone(),
                        pattern: topic.clone(),
                        selector: None,
                        shared: true,
                        ..Default::default()
                    },
                    selector: None,
                    durable: true,
                    session: None,
                },
            });
        }
    }
}

/// How the broker reaches its router.
struct RouterLink {
    addr: String,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    sasl: transport::ClientSasl,
}

async fn keep_router(
    link: RouterLink,
    id: String,
    services: connection::Services,
    readiness: std::sync::Arc<flotilla_core::ops::Readiness>,
    shutdown: CancellationToken,
) {
    let mut redial = flotilla_core::redial::Redial::default();
    let mut conn = 0u64;
    while !shutdown.is_cancelled() {
        conn += 1;
        redial.attempt();
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&link.addr).await.ok()?;
            let _ = tcp.set_nodelay(true);
            let host = link
                .addr
                .rsplit_once(':')
                .map_or(link.addr.as_str(), |(h, _)| h);
            let tls = match &link.tls {
                Some(c) => Some((
                    c.clone(),
                    rustls_pki_types::ServerName::try_from(
                        host.trim_matches(['[', ']']).to_string(),
                    )
                    .ok()?,
                )),
                None => None,
            };
            let cc = transport::ConnectConfig {
                tls,
                sasl: link.sasl.clone(),
                hostname: None,
                tls_header: false,
            };
            let (io, buf) =
                match tokio::time::timeout(Duration::from_secs(10), transport::connect(tcp, &cc))
                    .await
                {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        // Most often a credential the router does not take.
                        warn!(router = %link.addr, error = %e, "the router refused this broker");
                        return None;
                    }
                    Err(_) => return None,
                };
            info!(router = %link.addr, "connected to router");
            readiness.ok("router");
            // Router connections count down from the top of the id space.
            let cid = u64::MAX - conn;
            connection::BrokerConnection::new(cid, &id, services.clone(), connection::Peer::Router)
                .run(io, buf, shutdown.clone())
                .await;
            readiness.set("router", Some(format!("connection to {} lost", link.addr)));
            Some(())
        };
        match attempt.await {
            Some(()) => info!(router = %link.addr, "connection to router closed"),
            None => debug!(router = %link.addr, "cannot reach router; retrying"),
        }
        if !redial.wait(&shutdown).await {
            return;
        }
    }
}

/// What the journal held, split among `n` queue tasks by what each owns.
fn split(recovered: store::Recovered, n: usize) -> Vec<store::Recovered> {
    let mut parts: Vec<store::Recovered> = (0..n).map(|_| store::Recovered::default()).collect();
    for (key, messages) in recovered.queues {
        parts[shards::of_key(n, &key)].queues.insert(key, messages);
    }
    for (seq, record) in recovered.subscriptions {
        parts[shards::of_key(n, &record.key)]
            .subscriptions
            .push((seq, record));
    }
    for r in recovered.retained {
        parts[shards::of_space(n, &r.1)].retained.push(r);
    }
    parts
}

/// The broker's live state: its queues, their depths and counts.
async fn report(q: queues::QueueHandle, id: String) -> serde_json::Value {
    let (tx, rx) = tokio::sync::oneshot::channel();
    q.send(queues::BrokerEvent::Report { reply: tx }).await;
    let mut v = rx.await.unwrap_or_default();
    v["component"] = "broker".into();
    v["id"] = id.into();
    v
}

/// Recovers the journal, binds, and serves until `shutdown`.
///
/// # Errors
/// The journal cannot be recovered (damage before its tail) or the port
/// cannot be bound.
pub async fn run(cfg: BrokerConfig, shutdown: CancellationToken) -> Result<(), BrokerError> {
    let proves_component = cfg.mesh_secret.is_some() || (cfg.tls_ca.is_some() && cfg.tls.is_some());
    if cfg.router.is_some() && !proves_component {
        return Err(BrokerError::NoComponentCredential);
    }
    if cfg.require_tls && cfg.tls.is_none() {
        return Err(BrokerError::TlsMissing);
    }
    // Probes answer while the journal is read: not ready, but alive.
    let mut checks = vec![("journal", "recovering the journal")];
    if cfg.router.is_some() {
        checks.push(("router", "not connected to the router yet"));
    }
    let readiness = flotilla_core::ops::Readiness::new(&checks);
    // Weak: the queue task ends when its last handle goes, and the
    // operations listener must not keep it.
    let reporter: std::sync::Arc<std::sync::OnceLock<shards::WeakShards>> = Default::default();
    if let Some(addr) = cfg.http {
        let l = flotilla_core::ops::bind(addr)
            .await
            .map_err(|source| BrokerError::Bind { addr, source })?;
        let (r, id) = (reporter.clone(), cfg.container_id.clone());
        let ops = flotilla_core::ops::Ops {
            component: "broker",
            id: cfg.container_id.clone(),
            readiness: readiness.clone(),
            report: Some(std::sync::Arc::new(move || {
                let (q, id) = (r.get().and_then(|w| w.upgrade()), id.clone());
                Box::pin(async move {
                    match q {
                        Some(q) => report(q, id).await,
                        None => serde_json::Value::Null,
                    }
                })
            })),
            token: cfg.console.as_ref().map(|l| l.token.clone()),
        };
        tokio::spawn(flotilla_core::ops::serve(l, ops, shutdown.clone()));
    }
    // The journal holds every tenant's messages: its owner only.
    flotilla_core::auth::private_dir(&cfg.data_dir)?;
    let jcfg = journal::JournalConfig::new(cfg.data_dir.join("journal"));
    // Bodies past the memory budget stay in the journal while it is read.
    let budget = cfg.max_memory;
    let (j, recovered) = tokio::task::spawn_blocking(move || {
        let j = journal::Journal::open_indexed(jcfg)?;
        let recovered = store::recover(&mut |each| j.replay(each), budget)?;
        Ok::<_, journal::JournalError>((j, recovered))
    })
    .await
    .map_err(|e| BrokerError::Io(std::io::Error::other(e)))??;
    let held: usize = recovered.queues.values().map(|q| q.len()).sum();
    info!(
        queues = recovered.queues.len(),
        subscriptions = recovered.subscriptions.len(),
        messages = held,
        "queues recovered"
    );
    let client_certs = cfg.tls_ca.as_deref().map_or(
        flotilla_amqp::tls::ClientCerts::None,
        flotilla_amqp::tls::ClientCerts::Optional,
    );
    let accept_cfg = AcceptConfig {
        tls: match &cfg.tls {
            Some((c, k)) => Some(flotilla_amqp::tls::server_config(c, k, client_certs)?),
            None => None,
        },
        require_tls: cfg.require_tls,
    };
    let router_tls = match (&cfg.tls_ca, &cfg.tls) {
        (Some(ca), Some((c, k))) => Some(flotilla_amqp::tls::client_config_with_cert(ca, c, k)?),
        (Some(ca), None) => Some(flotilla_amqp::tls::client_config(ca)?),
        _ => None,
    };
    let router_sasl = match &cfg.mesh_secret {
        Some(m) => transport::ClientSasl::Scram {
            user: flotilla_core::auth::MeshSecret::username(&cfg.container_id),
            password: m.secret().to_string(),
        },
        None => transport::ClientSasl::Anonymous,
    };

    let n = cfg.queue_shards.max(1);
    let readers: Vec<_> = (0..n).map(|_| j.reader()).collect();
    let journal = journal::JournalHandle::start_shared(j, n)?;
    let usage = queues::Usage::default();
    let gauges = queues::Gauges::default();
    let (queues, receivers) = shards::Shards::new(n);
    let mut tasks = Vec::with_capacity(n);
    for ((i, rx), (reader, part)) in receivers
        .into_iter()
        .enumerate()
        .zip(readers.into_iter().zip(split(recovered, n)))
    {
        // The memory budget is split evenly between the tasks.
        let memory = queues::Memory::new(cfg.max_memory / n, Some(reader));
        tasks.push(queues::QueueTask::new(
            (i, &queues, rx),
            journal.clone(),
            part,
            cfg.dead_letter.clone(),
            memory,
            usage.clone(),
            gauges.clone(),
        ));
    }
    info!(
        queue_tasks = n,
        "queues and subscriptions spread over the queue tasks"
    );
    queues
        .send(queues::BrokerEvent::Tenancy(Arc::new(cfg.tenancy.clone())))
        .await;
    let listener = TcpListener::bind(cfg.amqp)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: cfg.amqp,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
        addr: cfg.amqp,
        source,
    })?;
    info!(proto = "amqp", addr = %addr, "listening");
    readiness.ok("journal");
    let _ = reporter.set(queues.downgrade());
    let tracker = TaskTracker::new();
    for task in tasks {
        tracker.spawn(task.run());
    }
    let policy = Policy::new(cfg.tenancy.clone())
        .with_mesh_secret(cfg.mesh_secret.clone())
        .with_jwks_dir(cfg.jwks_dir.clone())
        .with_cert_components(cfg.tls_ca.is_some())
        .with_require_tls(cfg.require_tls);
    let services = connection::Services {
        queues: queues.clone(),
        journal: journal.clone(),
        policy: policy.clone(),
        usage: usage.clone(),
        gauges,
        tenancy_version: tokio::sync::watch::Sender::new(0),
    };
    ensure_subscription_addresses(&cfg.tenancy, None, &queues);
    if let Some(link) = cfg.console.clone() {
        let (p, q, v) = (
            policy.clone(),
            queues.clone(),
            services.tenancy_version.clone(),
        );
        let mut before: Option<Tenancy> = None;
        let apply = move |t: Tenancy| {
            ensure_subscription_addresses(&t, before.as_ref(), &q);
            before = Some(t.clone());
            q.send_soon(queues::BrokerEvent::Tenancy(Arc::new(t.clone())));
            p.replace(t);
            v.send_modify(|n| *n += 1);
        };
        tracker.spawn(flotilla_core::watch::follow(
            link.clone(),
            apply,
            shutdown.clone(),
        ));
        let (q1, q2, id) = (queues.clone(), queues.clone(), cfg.container_id.clone());
        let state = move || report(q1.clone(), id.clone());
        let (answer_link, me) = (link.clone(), cfg.container_id.clone());
        let command = move |c: serde_json::Value| {
            if let (Some(space), Some(address)) =
                (c["purge"]["space"].as_str(), c["purge"]["address"].as_str())
            {
                q2.send_soon(queues::BrokerEvent::PurgeNow {
                    queue: store::queue_key(space, address),
                });
            }
            if let Some((id, queue, op)) = inspect_command(&c["inspect"]) {
                let (reply, answer) = tokio::sync::oneshot::channel();
                q2.send_soon(queues::BrokerEvent::Inspect { queue, op, reply });
                let (link, me) = (answer_link.clone(), me.clone());
                tokio::spawn(async move {
                    if let Ok(result) = answer.await {
                        if let Err(e) = flotilla_core::watch::answer(&link, id, &me, result).await {
                            debug!(error = %e, "cannot answer the console");
                        }
                    }
                });
            }
        };
        tracker.spawn(flotilla_core::watch::report_every_second(
            link,
            state,
            command,
            shutdown.clone(),
        ));
    }
    if let Some(router) = cfg.router.clone() {
        let link = RouterLink {
            addr: router,
            tls: router_tls,
            sasl: router_sasl,
        };
        tracker.spawn(keep_router(
            link,
            cfg.container_id.clone(),
            services.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    let next = AtomicU64::new(1);
    let admission = std::sync::Arc::new(flotilla_amqp::admission::Admission::new(
        "amqp",
        cfg.admission,
        std::sync::Arc::default(),
    ));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    info!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let id = next.fetch_add(1, Ordering::Relaxed);
        let permit = match admission.begin(peer) {
            Ok(p) => p,
            Err(r) => {
                admission.warn("connection refused", r.reason(), peer);
                continue;
            }
        };
        let (services, stop, cid, policy, accept_cfg, admission) = (
            services.clone(),
            shutdown.clone(),
            cfg.container_id.clone(),
            policy.clone(),
            accept_cfg.clone(),
            admission.clone(),
        );
        let span = tracing::info_span!("conn", conn.id = id, client.addr = %peer);
        tracker.spawn(
            async move {
                let hs = transport::accept(tcp, peer, &accept_cfg, &policy);
                let Some((est, _slot)) = admission.handshake(peer, permit, hs, "broker").await
                else {
                    return;
                };
                let who = connection::Peer::Client {
                    identity: est.identity,
                    addr: peer,
                };
                connection::BrokerConnection::new(id, &cid, services, who)
                    .run(est.io, est.read_buf, stop)
                    .await;
            }
            .instrument(span),
        );
    }
    info!("stopped accepting; closing connections");
    // The queue task ends once every handle on it is gone.
    drop(queues);
    drop(services);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    // Acknowledgements still queued reach the disk before we exit.
    journal.flush().await;
    info!("stopped");
    Ok(())
}
