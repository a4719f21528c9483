//! flotilla-router: the AMQP 1.0 router. Clients attach senders and
//! receivers to addresses; the router moves each message directly from a
//! sender to a receiver (anycast) or to every receiver (multicast), with
//! credit-based flow control end to end and outcomes relayed back.
//!
//! # Layout
//!
//! - [`server`]: listeners, accept loop, TLS/SASL handshake.
//! - [`connection`]: one task per connection: engine events → routing.
//! - [`core`]: the address table and the forwarders.
//! - [`linkroute`]: links to brokers' queues and topics, routed hop by hop.
//! - [`transactions`]: the clients' coordinator; each transaction goes to
//!   the broker of its first address.
//! - [`policy`] (from flotilla-amqp): authentication, address-space selection, authorization.

#![forbid(unsafe_code)]

pub mod connection;
pub mod core;
pub mod linkroute;
pub mod mesh;
pub use flotilla_amqp::policy;
mod server;
pub mod stat;
pub mod transactions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use flotilla_amqp::transport::AcceptConfig;
use flotilla_core::config::Tenancy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::core::AddressTable;
use crate::policy::Policy;

/// Everything a router needs to start.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// AMQP listener (SASL and non-SASL clients; TLS too when a certificate is set).
    pub amqp: SocketAddr,
    /// AMQPS listener: TLS required.
    pub amqps: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub container_id: String,
    pub max_connections: usize,
    /// Handshakes in progress at once on the client ports (the
    /// inter-router port has its own, smaller, allowance).
    pub max_handshakes: usize,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// New connections per second from one source address (0 = no limit).
    pub max_connection_rate: u32,
    pub max_links_per_connection: usize,
    /// Largest message accepted (bytes; 0 = unlimited).
    pub max_message_size: u64,
    pub max_frame_size: u32,
    pub channel_max: u16,
    pub idle_timeout: Option<Duration>,
    /// Credit window a sender gets while a receiver exists.
    pub link_capacity: u32,
    pub tenancy: Tenancy,
    /// Listener for other routers' connections (joins the mesh).
    pub inter_router: Option<SocketAddr>,
    /// Routers to connect to: `HOST:PORT`, where HOST may be a DNS name
    /// whose addresses are re-resolved every few seconds.
    pub peers: Vec<String>,
    /// CA for mutual TLS on inter-router connections (with the TLS
    /// certificate and key): peers must present a certificate it signed.
    pub tls_ca: Option<PathBuf>,
    /// Edge router: one uplink at a time (the first of `peers` that
    /// answers, the next on failure), no link state, no inter-router
    /// listener.
    pub edge: bool,
    /// Follow the control plane: address spaces, addresses and users from
    /// its watch stream replace `tenancy` as they change.
    pub console: Option<flotilla_core::watch::ConsoleLink>,
    /// The mesh credential (`--mesh-secret-file`): routers authenticate
    /// to each other with it, and components (brokers) to this router.
    pub mesh_secret: Option<flotilla_core::auth::MeshSecret>,
    /// Where address spaces' `jwksFile`s are (`--jwks-dir`).
    pub jwks_dir: Option<std::path::PathBuf>,
    /// Every client must come over TLS (`--require-tls`).
    pub require_tls: bool,
    /// A broker away this long is retired: the addresses it held are
    /// placed on the others (`None`: only when the console retires it).
    pub retire_brokers_after: Option<Duration>,
    /// The operations listener: `/metrics`, `/healthz`, `/readyz`.
    pub http: Option<SocketAddr>,
    /// How long a router asked to stop (lame duck) waits for its
    /// unsettled deliveries to settle before it closes its connections.
    pub drain_timeout: Duration,
    /// Where a stopping router sends its clients: `HOST:PORT` of another
    /// router, or of a service in front of the others, named in the
    /// `amqp:connection:redirect` that closes them. `None`:
    /// `amqp:connection:forced`.
    pub redirect: Option<String>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            amqp: "127.0.0.1:5672".parse().expect("literal address"),
            amqps: None,
            tls_cert: None,
            tls_key: None,
            container_id: "flotilla-router".into(),
            max_connections: 10_000,
            max_handshakes: 500,
            handshake_timeout: Duration::from_secs(5),
            max_connection_rate: 500,
            max_links_per_connection: 1000,
            max_message_size: 16 * 1024 * 1024,
            max_frame_size: 65536,
            channel_max: 255,
            idle_timeout: Some(Duration::from_secs(16)),
            link_capacity: 250,
            tenancy: Tenancy::zero_config(),
            inter_router: None,
            peers: Vec::new(),
            tls_ca: None,
            edge: false,
            console: None,
            mesh_secret: None,
            jwks_dir: None,
            require_tls: false,
            retire_brokers_after: None,
            http: None,
            drain_timeout: Duration::from_secs(20),
            redirect: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_amqp::tls::TlsError),
    #[error("--amqps needs --tls-cert and --tls-key")]
    TlsMissing,
    #[error(
        "an edge router has no --inter-router listener and needs at least one --peer (its uplink)"
    )]
    EdgeConfig,
    #[error(
        "--inter-router {0} is reachable from other machines but has no mesh credential: give --mesh-secret-file FILE (a secret of at least 16 characters every router and broker shares, e.g. `openssl rand -hex 32 > FILE`) or --tls-ca CA with --tls-cert/--tls-key (mutual TLS between routers)"
    )]
    OpenMesh(SocketAddr),
    #[error("--tls-ca needs --tls-cert and --tls-key (this router's own certificate)")]
    CaWithoutCert,
}

/// State every connection task shares.
pub(crate) struct Shared {
    pub(crate) cfg: RouterConfig,
    /// Unsettled deliveries in flight to one local receiver at most.
    pub(crate) receiver_cap: u32,
    /// Messages one address may have in flight towards one neighbour.
    pub(crate) remote_window: u32,
    pub(crate) table: Arc<AddressTable>,
    pub(crate) mesh: Option<crate::mesh::MeshHandle>,
    /// TLS for connecting to peers (mutual TLS), when configured.
    pub(crate) peer_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) policy: Policy,
    /// Who may connect on the inter-router listener.
    pub(crate) mesh_auth: flotilla_amqp::policy::MeshAuth,
    /// Cancelled first: stop accepting and withdraw senders' credit.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when what was in flight settled: senders lose the credit
    /// they still have.
    pub(crate) revoke: CancellationToken,
    /// Cancelled once waiting deliveries were released: close connections.
    pub(crate) closing: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Established connections, clients' and routers' together.
    pub(crate) connections: Arc<flotilla_amqp::admission::ConnectionCount>,
    /// Who gets in on the client ports, and on the inter-router port.
    pub(crate) admission: flotilla_amqp::admission::Admission,
    pub(crate) peer_admission: flotilla_amqp::admission::Admission,
    pub(crate) next_conn: AtomicU64,
    pub(crate) dynamic_seq: AtomicU64,
    /// Brokers connected to this router (route containers) by id.
    pub(crate) brokers: crate::mesh::Brokers,
    /// The brokers placement spreads addresses over.
    pub(crate) known_brokers: std::sync::Mutex<linkroute::KnownBrokers>,
    /// Bumped when the tenancy changes: connections check their clients
    /// and links again.
    pub(crate) tenancy_version: tokio::sync::watch::Sender<u64>,
    /// Open client connections, for the console's live view.
    /// The MQTT gateways connected here: connection id → container id
    /// (for the console's map).
    pub(crate) gateways: std::sync::Mutex<std::collections::BTreeMap<u64, String>>,
    pub(crate) clients: std::sync::Mutex<std::collections::BTreeMap<u64, stat::ClientInfo>>,
    /// What `/readyz` answers: listeners bound, the mesh joined, not
    /// stopping.
    pub(crate) readiness: Arc<flotilla_core::ops::Readiness>,
    /// Deliveries sent and not yet settled, every connection together
    /// (each connection task adds its change after each turn): a lame
    /// duck closes its connections when this reaches zero.
    pub(crate) in_flight: std::sync::atomic::AtomicI64,
    /// Peer addresses that turned out to be this router itself (a
    /// headless service lists every router, this one too).
    pub(crate) self_addrs: std::sync::Mutex<std::collections::HashSet<SocketAddr>>,
    /// Per `--peer`: how many addresses it resolved to besides this
    /// router's own (none anywhere: this router is alone, and ready).
    pub(crate) peer_others: PeerOthers,
}

/// A router whose listeners are bound.
pub struct Router {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, AcceptConfig)>,
    /// Bound addresses: (protocol, address).
    pub local_addrs: Vec<(&'static str, SocketAddr)>,
    inter_router: Option<(TcpListener, AcceptConfig)>,
    mesh_task: Option<crate::mesh::MeshTask>,
    http: Option<TcpListener>,
}

/// A few random-ish hex digits for generated router ids.
fn shutdown_nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:05x}", t & 0xfffff)
}

impl Router {
    /// Validates the config and binds the listeners.
    ///
    /// # Errors
    /// A port cannot be bound or the TLS files are invalid.
    pub async fn bind(
        cfg: RouterConfig,
        shutdown: CancellationToken,
    ) -> Result<Router, RouterError> {
        use flotilla_amqp::tls::ClientCerts;
        if cfg.tls_ca.is_some() && (cfg.tls_cert.is_none() || cfg.tls_key.is_none()) {
            return Err(RouterError::CaWithoutCert);
        }
        // With a mesh CA, a client port also takes components that present
        // a certificate it signed.
        let client_certs = cfg
            .tls_ca
            .as_deref()
            .map_or(ClientCerts::None, ClientCerts::Optional);
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => Some(flotilla_amqp::tls::server_config(c, k, client_certs)?),
            (None, None) => None,
            _ => return Err(RouterError::TlsMissing),
        };
        if cfg.amqps.is_some() && tls.is_none() {
            return Err(RouterError::TlsMissing);
        }
        if cfg.require_tls && tls.is_none() {
            return Err(RouterError::TlsMissing);
        }
        let mesh_credential = cfg.mesh_secret.is_some() || cfg.tls_ca.is_some();
        if let Some(addr) = cfg.inter_router {
            if !addr.ip().is_loopback() && !mesh_credential {
                return Err(RouterError::OpenMesh(addr));
            }
        }
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        let plain = listen(cfg.amqp, "amqp", &mut local_addrs).await?;
        listeners.push((
            plain,
            AcceptConfig {
                tls: tls.clone(),
                require_tls: cfg.require_tls,
            },
        ));
        if let Some(addr) = cfg.amqps {
            let l = listen(addr, "amqps", &mut local_addrs).await?;
            listeners.push((
                l,
                AcceptConfig {
                    tls: tls.clone(),
                    require_tls: true,
                },
            ));
        }
        let mut cfg = cfg;
        if cfg.edge && (cfg.inter_router.is_some() || cfg.peers.is_empty()) {
            return Err(RouterError::EdgeConfig);
        }
        let meshed = cfg.inter_router.is_some() || !cfg.peers.is_empty();
        let mut inter_router = None;
        let mut peer_tls = None;
        let mut peer_accept = AcceptConfig::default();
        if meshed {
            if cfg.container_id == RouterConfig::default().container_id {
                // Router ids must be unique in a mesh.
                cfg.container_id = format!("router-{}-{}", std::process::id(), shutdown_nonce());
            }
            if let (Some(c), Some(k), Some(ca)) = (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca) {
                peer_accept = AcceptConfig {
                    tls: Some(flotilla_amqp::tls::server_config(
                        c,
                        k,
                        ClientCerts::Required(ca),
                    )?),
                    require_tls: true,
                };
                peer_tls = Some(flotilla_amqp::tls::client_config_with_cert(ca, c, k)?);
            }
            if let Some(addr) = cfg.inter_router {
                let l = listen(addr, "inter-router", &mut local_addrs).await?;
                if !mesh_credential {
                    tracing::warn!(addr = %addr, "the inter-router listener has no mesh credential: any process on this machine can join the mesh (give --mesh-secret-file or --tls-ca)");
                }
                inter_router = Some(l);
            }
        }
        let http = match cfg.http {
            Some(addr) => Some(listen(addr, "http", &mut local_addrs).await?),
            None => None,
        };
        let readiness = flotilla_core::ops::Readiness::new(&[]);
        let peer_others: PeerOthers = Arc::default();
        let table = Arc::new(AddressTable::default());
        let brokers: crate::mesh::Brokers = Arc::default();
        // Measured (bench/RESULTS.md): twice the senders' credit in flight
        // to a receiver, and per address towards a neighbour, keeps a
        // chain's throughput with its latency at saturation low.
        let receiver_cap = cfg.link_capacity.saturating_mul(2);
        let remote_window = cfg.link_capacity.saturating_mul(2);
        let mesh_task = meshed.then(|| {
            let (task, handle) = crate::mesh::MeshTask::new(
                &cfg.container_id,
                table.clone(),
                brokers.clone(),
                cfg.edge,
            );
            (task.with_window(remote_window), handle)
        });
        if let (Some((_, mesh)), false) = (&mesh_task, cfg.peers.is_empty()) {
            readiness.live("mesh", mesh_ready(mesh.clone(), peer_others.clone(), &cfg));
        }
        let policy = Policy::new(cfg.tenancy.clone())
            .with_mesh_secret(cfg.mesh_secret.clone())
            .with_jwks_dir(cfg.jwks_dir.clone())
            .with_cert_components(cfg.tls_ca.is_some())
            .with_require_tls(cfg.require_tls);
        let mesh_auth = flotilla_amqp::policy::MeshAuth {
            secret: cfg.mesh_secret.clone(),
            ca: cfg.tls_ca.is_some(),
        };
        let connections: Arc<flotilla_amqp::admission::ConnectionCount> = Arc::default();
        let limits = flotilla_amqp::admission::AdmissionConfig {
            max_connections: cfg.max_connections,
            max_handshakes: cfg.max_handshakes,
            handshake_timeout: cfg.handshake_timeout,
            rate_per_source: cfg.max_connection_rate,
        };
        let admission =
            flotilla_amqp::admission::Admission::new("amqp", limits, connections.clone());
        // Routers reconnect rarely: a small allowance of their own, so a
        // flood on the client ports never keeps a neighbour out.
        let peer_admission = flotilla_amqp::admission::Admission::new(
            "inter-router",
            flotilla_amqp::admission::AdmissionConfig {
                max_handshakes: 64,
                rate_per_source: 0,
                ..limits
            },
            connections.clone(),
        );
        let shared = Arc::new(Shared {
            receiver_cap,
            remote_window,
            cfg,
            table,
            mesh: mesh_task.as_ref().map(|(_, h)| h.clone()),
            peer_tls,
            policy,
            mesh_auth,
            shutdown,
            revoke: CancellationToken::new(),
            closing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            connections,
            admission,
            peer_admission,
            next_conn: AtomicU64::new(1),
            dynamic_seq: AtomicU64::new(0),
            brokers,
            known_brokers: Default::default(),
            tenancy_version: tokio::sync::watch::Sender::new(0),
            clients: Default::default(),
            gateways: Default::default(),
            readiness,
            in_flight: Default::default(),
            self_addrs: Default::default(),
            peer_others,
        });
        Ok(Router {
            shared,
            listeners,
            local_addrs,
            inter_router: inter_router.map(|l| (l, peer_accept)),
            mesh_task: mesh_task.map(|(t, _)| t),
            http,
        })
    }

    /// Serves until the shutdown token is cancelled, then goes lame duck
    /// (see [`Router::drain`]).
    pub async fn serve(self) {
        for (proto, addr) in &self.local_addrs {
            info!(proto = *proto, addr = %addr, "listening");
        }
        let shared = self.shared.clone();
        if shared.mesh.is_some() {
            info!(router = %shared.cfg.container_id, "mesh enabled");
        }
        for (l, cfg) in self.listeners {
            shared
                .tracker
                .spawn(server::accept_loop(l, shared.clone(), cfg, false));
        }
        if let Some((l, cfg)) = self.inter_router {
            shared
                .tracker
                .spawn(server::accept_loop(l, shared.clone(), cfg, true));
        }
        if let Some(task) = self.mesh_task {
            shared.tracker.spawn(task.run(shared.closing.clone()));
        }
        if let Some(l) = self.http {
            let (s1, s2) = (shared.clone(), shared.clone());
            let last = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
            let report: flotilla_core::ops::ReportFn = Arc::new(move || {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                let r = stat::report(&s1, &mut last);
                Box::pin(std::future::ready(r))
            });
            let ops = flotilla_core::ops::Ops {
                component: "router",
                id: s2.cfg.container_id.clone(),
                readiness: s2.readiness.clone(),
                report: Some(report),
                token: s2.cfg.console.as_ref().map(|l| l.token.clone()),
            };
            shared
                .tracker
                .spawn(flotilla_core::ops::serve(l, ops, shared.closing.clone()));
        }
        shared
            .tracker
            .spawn(linkroute::watch_brokers(shared.clone()));
        if let Some(link) = shared.cfg.console.clone() {
            let s = shared.clone();
            let apply = move |t: flotilla_core::config::Tenancy| {
                s.policy.replace(t);
                s.tenancy_version.send_modify(|v| *v += 1);
            };
            shared.tracker.spawn(flotilla_core::watch::follow(
                link.clone(),
                apply,
                shared.closing.clone(),
            ));
            let (s1, s2) = (shared.clone(), shared.clone());
            let mut last = std::collections::HashMap::new();
            shared
                .tracker
                .spawn(flotilla_core::watch::report_every_second(
                    link,
                    move || std::future::ready(stat::report(&s1, &mut last)),
                    move |c| stat::command(&s2, &c),
                    shared.closing.clone(),
                ));
        }
        if shared.cfg.edge {
            shared.tracker.spawn(server::keep_uplink(
                shared.cfg.peers.clone(),
                shared.clone(),
            ));
        } else {
            for peer in shared.cfg.peers.clone() {
                shared
                    .tracker
                    .spawn(server::connect_peer(peer, shared.clone()));
            }
        }
        shared.shutdown.cancelled().await;
        Router::drain(&shared).await;
        info!("stopped");
    }

    /// Lame duck, when asked to stop: not ready any more; stops accepting
    /// (the accept loops end on `shutdown`) and gives senders no more
    /// credit (connection tasks, on `shutdown`); withdraws its addresses
    /// from the mesh, so other routers send it nothing new; hands messages
    /// waiting for a receiver back to their senders; waits, up to
    /// `drain_timeout`, until every delivery in flight is settled; then
    /// closes its connections (clients with a redirect to `redirect`, or
    /// `amqp:connection:forced`) and waits for them (bounded).
    async fn drain(shared: &Arc<Shared>) {
        shared
            .readiness
            .set("stopping", Some("the router is shutting down".into()));
        if let Some(m) = &shared.mesh {
            m.send(crate::mesh::MeshEvent::Withdraw);
        }
        let deadline = tokio::time::Instant::now() + shared.cfg.drain_timeout;
        info!(
            in_flight = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            timeout_s = shared.cfg.drain_timeout.as_secs(),
            "lame duck: accepting nothing new, addresses withdrawn from the mesh, waiting for deliveries in flight to settle"
        );
        // Senders use up the credit they had (nothing in flight for a
        // while); then it is taken back, and what they sent meanwhile settles.
        let mut settled = Router::settle(shared, deadline, Duration::from_millis(200)).await;
        if settled {
            shared.revoke.cancel();
            settled = Router::settle(shared, deadline, Duration::from_millis(50)).await;
        }
        if settled {
            info!("lame duck: every delivery settled; closing connections");
        } else {
            info!(
                unsettled = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                "lame duck: drain timeout; closing connections (unsettled deliveries are released)"
            );
        }
        shared.closing.cancel();
        shared.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait())
            .await
            .is_err()
        {
            info!("some connections did not close within 5 s");
        }
    }
}

impl Router {
    /// Waits until no delivery has been in flight for `quiet` (true), or
    /// until `deadline` (false); messages waiting for a receiver meanwhile
    /// go back to their senders.
    async fn settle(shared: &Arc<Shared>, deadline: tokio::time::Instant, quiet: Duration) -> bool {
        let mut quiet_since = None;
        loop {
            for a in shared.table.all() {
                a.release_all();
            }
            let now = tokio::time::Instant::now();
            if shared.in_flight.load(std::sync::atomic::Ordering::Relaxed) <= 0 {
                let since = *quiet_since.get_or_insert(now);
                if now.duration_since(since) >= quiet {
                    return true;
                }
            } else {
                quiet_since = None;
            }
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Per `--peer`: how many addresses it resolved to besides this router.
pub(crate) type PeerOthers = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// The readiness check `mesh`, asked at each probe: ready while the router
/// has a neighbour, or when no `--peer` resolves to anything but itself
/// (the first router of a set).
fn mesh_ready(
    mesh: crate::mesh::MeshHandle,
    others: PeerOthers,
    cfg: &RouterConfig,
) -> impl Fn() -> Option<String> + Send + Sync + 'static {
    let (peers, edge) = (cfg.peers.len(), cfg.edge);
    move || {
        let alone = !edge && {
            let o = others.lock().unwrap_or_else(|p| p.into_inner());
            o.len() == peers && o.values().all(|n| *n == 0)
        };
        (mesh.snapshot().neighbors.is_empty() && !alone).then(|| "no neighbour router yet".into())
    }
}

/// Binds `addr` for `proto` and records the bound address.
async fn listen(
    addr: SocketAddr,
    proto: &'static str,
    local_addrs: &mut Vec<(&'static str, SocketAddr)>,
) -> Result<TcpListener, RouterError> {
    let bind_err = |source| RouterError::Bind { addr, source };
    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
    local_addrs.push((proto, l.local_addr().map_err(bind_err)?));
    Ok(l)
}

/// Binds and serves: the entry point the `flotilla` binary calls.
///
/// # Errors
/// See [`Router::bind`].
pub async fn run(cfg: RouterConfig, shutdown: CancellationToken) -> Result<(), RouterError> {
    Router::bind(cfg, shutdown).await?.serve().await;
    Ok(())
}
