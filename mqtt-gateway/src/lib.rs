//! flotilla-mqtt-gateway: MQTT 3.1.1 and 5.0 clients on the AMQP router
//! mesh (DESIGN.md "MQTT gateway and last-will service").
//!
//! MQTT clients connect here (plain, TLS, WebSocket); the gateway logs
//! them in against their space's users, and speaks AMQP for them to its
//! router over a few connections it shares between them, proving the
//! mesh credential so the router trusts the space each link names.
//! Topics are the space's addresses; what a session keeps (subscriptions,
//! queued messages, QoS 2 state) and retained messages are in brokers, so
//! a gateway can die and its clients resume on another.
//!
//! # Layout
//!
//! - [`codec`]: MQTT packets on the wire.
//! - [`convert`]: MQTT messages as AMQP messages and back.
//! - [`session`]: one connection's protocol state, without I/O.
//! - [`upstream`]: the AMQP connections to the router.
//! - [`server`]: listeners and one task per connection.
//! - [`registry`]: who is connected; counters; `stat`.

#![forbid(unsafe_code)]

pub mod codec;
pub mod convert;
pub mod lwt;
pub mod registry;
pub mod server;
pub mod session;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use flotilla_amqp::admission::{Admission, AdmissionConfig};
use flotilla_amqp::policy::Policy;
use flotilla_core::auth::MeshSecret;
use flotilla_core::config::Tenancy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use server::STAT_TOPIC;
pub use session::Limits;

/// Everything a gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// MQTT over TCP (`--mqtt`).
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS (`--mqtts`; needs `tls`).
    pub mqtts: Option<SocketAddr>,
    /// MQTT over WebSocket, subprotocol `mqtt` (`--mqtt-ws`).
    pub mqtt_ws: Option<SocketAddr>,
    /// The router (`HOST:PORT`) the gateway speaks AMQP to.
    pub router: String,
    pub container_id: String,
    /// Address spaces, users and addresses (as for routers).
    pub tenancy: Tenancy,
    /// Follow the control plane.
    pub console: Option<flotilla_core::watch::ConsoleLink>,
    /// Certificate and key (PEM) for `--mqtts`; with `tls_ca`, also what
    /// proves the gateway to its router.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The mesh CA (the router's certificate is checked against it).
    pub tls_ca: Option<PathBuf>,
    /// The mesh secret: the gateway's credential towards its router, and
    /// what operators' tools log in with for `stat`.
    pub mesh_secret: Option<MeshSecret>,
    /// Where address spaces' `jwksFile`s are (`--jwks-dir`).
    pub jwks_dir: Option<std::path::PathBuf>,
    /// Clients must come over TLS.
    pub require_tls: bool,
    pub admission: AdmissionConfig,
    pub limits: Limits,
    /// AMQP connections to the router the clients are spread over.
    pub upstreams: usize,
    /// The operations listener: `/metrics`, `/healthz`, `/readyz` (ready
    /// while every connection to the router is up).
    pub http: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_amqp::tls::TlsError),
    #[error("--mqtts and --require-tls need --tls-cert and --tls-key")]
    TlsMissing,
    #[error("the gateway proves itself to its router with a component credential: --mesh-secret-file FILE (the routers' mesh secret), or --tls-ca with --tls-cert/--tls-key (a certificate from the mesh CA)")]
    NoComponentCredential,
}

async fn bind(addr: SocketAddr, proto: &str) -> Result<TcpListener, GatewayError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })?;
    let bound = l
        .local_addr()
        .map_err(|source| GatewayError::Bind { addr, source })?;
    info!(proto, addr = %bound, "listening");
    Ok(l)
}

/// Binds the listeners, connects to the router, and serves until `shutdown`.
///
/// # Errors
/// A port cannot be bound, TLS files do not load, or there is no
/// credential to prove the gateway to its router.
pub async fn run(cfg: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let proves_component = cfg.mesh_secret.is_some() || (cfg.tls_ca.is_some() && cfg.tls.is_some());
    if !proves_component {
        return Err(GatewayError::NoComponentCredential);
    }
    if (cfg.mqtts.is_some() || cfg.require_tls) && cfg.tls.is_none() {
        return Err(GatewayError::TlsMissing);
    }
    let router = upstream::RouterLink::for_component(
        &cfg.router,
        &cfg.container_id,
        cfg.tls_ca.as_deref(),
        cfg.tls.as_ref(),
        cfg.mesh_secret.as_ref(),
    )?;
    let policy = Policy::new(cfg.tenancy.clone())
        .with_mesh_secret(cfg.mesh_secret.clone())
        .with_jwks_dir(cfg.jwks_dir.clone())
        .with_require_tls(cfg.require_tls);
    let tracker = TaskTracker::new();
    let pool = upstream::Pool::start(cfg.upstreams, router, shutdown.clone());
    let ops_listener = match cfg.http {
        Some(addr) => Some(
            flotilla_core::ops::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { addr, source })?,
        ),
        None => None,
    };
    let shared = Arc::new(server::Shared {
        policy: Arc::new(policy.clone()),
        mesh: cfg.mesh_secret.clone(),
        pool,
        registry: registry::Registry::default(),
        limits: Arc::new(cfg.limits.clone()),
        handshake_timeout: cfg.admission.handshake_timeout,
        next_key: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        delayed_wills: Default::default(),
        will_prefix: format!("{}/{}", cfg.container_id, crate::convert::now_ms()),
        will_fallback_said: Default::default(),
    });
    if let Some(link) = cfg.console.clone() {
        let (p, sh) = (policy.clone(), shared.clone());
        // Every connection checks its user and subscriptions again.
        let apply = move |t: Tenancy| {
            p.replace(t);
            sh.registry.raise_all(upstream::SIGNAL_RECHECK);
        };
        tracker.spawn(flotilla_core::watch::follow(
            link.clone(),
            apply,
            shutdown.clone(),
        ));
        let (sh, id) = (shared.clone(), cfg.container_id.clone());
        let state = move || {
            let (sh, id) = (sh.clone(), id.clone());
            async move {
                let mut v = sh.registry.snapshot(None);
                v["component"] = "gateway".into();
                v["id"] = id.into();
                v
            }
        };
        let sh = shared.clone();
        let command = move |c: serde_json::Value| {
            if let Some(key) = c["closeConnection"].as_u64() {
                if !sh.registry.close(key) {
                    tracing::debug!(key, "the console closes a connection that is gone");
                }
            }
        };
        tracker.spawn(flotilla_core::watch::report_every_second(
            link,
            state,
            command,
            shutdown.clone(),
        ));
    }
    if let Some(l) = ops_listener {
        let readiness = flotilla_core::ops::Readiness::new(&[]);
        let pool = shared.pool.clone();
        let router = cfg.router.clone();
        readiness.live("router", move || {
            (!pool.ready()).then(|| format!("not connected to the router {router}"))
        });
        let sh = shared.clone();
        let ops = flotilla_core::ops::Ops {
            component: "gateway",
            id: cfg.container_id.clone(),
            readiness,
            report: Some(Arc::new(move || {
                let v = sh.registry.snapshot(None);
                Box::pin(std::future::ready(v))
            })),
            token: cfg.console.as_ref().map(|l| l.token.clone()),
        };
        tracker.spawn(flotilla_core::ops::serve(l, ops, shutdown.clone()));
    }
    let acceptor = match &cfg.tls {
        Some((c, k)) => Some(tokio_rustls::TlsAcceptor::from(
            flotilla_amqp::tls::server_config(c, k, flotilla_amqp::tls::ClientCerts::None)?,
        )),
        None => None,
    };
    let counted = Arc::default();
    let mut listeners = Vec::new();
    if let Some(a) = cfg.mqtt {
        listeners.push((bind(a, "mqtt").await?, server::Kind::Plain, "mqtt"));
    }
    if let (Some(a), Some(acc)) = (cfg.mqtts, &acceptor) {
        listeners.push((
            bind(a, "mqtts").await?,
            server::Kind::Tls(acc.clone()),
            "mqtts",
        ));
    }
    if let Some(a) = cfg.mqtt_ws {
        listeners.push((
            bind(a, "mqtt-ws").await?,
            server::Kind::WebSocket,
            "mqtt-ws",
        ));
    }
    for (l, kind, name) in listeners {
        let admission = Arc::new(Admission::new(name, cfg.admission, Arc::clone(&counted)));
        tracker.spawn(server::serve(
            l,
            kind,
            shared.clone(),
            admission,
            tracker.clone(),
        ));
    }
    // One sweep for every connection's keep-alive (no timer each).
    tracker.spawn({
        let (sh, stop) = (shared.clone(), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => sh.registry.check_keep_alive(),
                }
            }
        }
    });
    shutdown.cancelled().await;
    info!("stopped accepting; closing connections");
    shared.registry.raise_all(upstream::SIGNAL_SHUTDOWN);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    info!("stopped");
    Ok(())
}
