//! flotilla-lwt-service: wills that fire whatever dies (DESIGN.md "MQTT
//! gateway and last-will service").
//!
//! Clients register wills by attaching a sender to `$lwt` in their space:
//! MQTT gateways for their clients, AMQP clients for themselves. Routers
//! route those links to this service, a route container with the
//! container id `$lwt`, wherever it is in the mesh. Wills are kept on
//! disk before they are acknowledged; a will goes out, at most once, when
//! its client's connection is lost, or its gateway's.
//!
//! # Layout
//!
//! - [`wills`]: the wills and their fate, without I/O.
//! - [`store`]: the wills on disk.
//! - [`service`]: the connection to the router and the publisher.

#![forbid(unsafe_code)]

pub mod service;
pub mod store;
pub mod wills;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_amqp::driver::{Driver, DriverConfig, Ended};
use flotilla_amqp::policy::Policy;
use flotilla_core::auth::MeshSecret;
use flotilla_core::config::Tenancy;
use flotilla_mqtt_gateway::upstream::{Pool, RouterLink};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct LwtConfig {
    /// The router (`HOST:PORT`) the service joins as a route container.
    pub router: String,
    /// Where the wills are kept.
    pub data_dir: PathBuf,
    /// Names the service to its router (its login `ID@$mesh`).
    pub id: String,
    /// Address spaces and users (whose rules wills are published under).
    pub tenancy: Tenancy,
    pub console: Option<flotilla_core::watch::ConsoleLink>,
    /// The mesh CA, and the service's own certificate and key.
    pub tls_ca: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub mesh_secret: Option<MeshSecret>,
    /// How long a will whose link broke (not its client's connection) may
    /// be claimed again before it is published (a gateway's) or dropped.
    pub grace: Duration,
    /// The operations listener: `/metrics`, `/healthz`, `/readyz` (ready
    /// once the wills are read and the router connected).
    pub http: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum LwtError {
    #[error("the last-will service proves itself to its router with a component credential: --mesh-secret-file FILE (the routers' mesh secret), or --tls-ca with --tls-cert/--tls-key (a certificate from the mesh CA)")]
    NoComponentCredential,
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_amqp::tls::TlsError),
}

/// Recovers the wills, joins the router, and serves until `shutdown`.
///
/// # Errors
/// No credential for the router, TLS files that do not load, or a store
/// that cannot be opened.
pub async fn run(cfg: LwtConfig, shutdown: CancellationToken) -> Result<(), LwtError> {
    if cfg.mesh_secret.is_none() && !(cfg.tls_ca.is_some() && cfg.tls.is_some()) {
        return Err(LwtError::NoComponentCredential);
    }
    let readiness = flotilla_core::ops::Readiness::new(&[
        ("store", "reading the wills"),
        ("router", "not connected to the router yet"),
    ]);
    let report = Arc::new(Mutex::new(serde_json::Value::Null));
    if let Some(addr) = cfg.http {
        let l = flotilla_core::ops::bind(addr).await?;
        let r = report.clone();
        let ops = flotilla_core::ops::Ops {
            component: "lwt",
            id: cfg.id.clone(),
            readiness: readiness.clone(),
            report: Some(Arc::new(move || {
                let v = r.lock().map(|v| v.clone()).unwrap_or_default();
                Box::pin(std::future::ready(v))
            })),
            token: cfg.console.as_ref().map(|l| l.token.clone()),
        };
        tokio::spawn(flotilla_core::ops::serve(l, ops, shutdown.clone()));
    }
    // Wills carry every tenant's messages: the owner's only.
    flotilla_core::auth::private_dir(&cfg.data_dir)?;
    let dir = cfg.data_dir.clone();
    let (store, recovered) = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(|e| LwtError::Io(std::io::Error::other(e)))??;
    let now = service::now_ms();
    let grace_ms = cfg.grace.as_millis() as u64;
    let wills = wills::Wills::recovered(recovered, grace_ms, now);
    info!(wills = wills.len(), "wills recovered");
    readiness.ok("store");
    // The route container's connection, and the publisher's (the same
    // login; a container id of its own).
    let router = RouterLink::for_component(
        &cfg.router,
        &cfg.id,
        cfg.tls_ca.as_deref(),
        cfg.tls.as_ref(),
        cfg.mesh_secret.as_ref(),
    )?;
    let policy = Policy::new(cfg.tenancy.clone()).with_mesh_secret(cfg.mesh_secret.clone());
    let tracker = TaskTracker::new();
    // Wills are published the way the gateway publishes: one connection
    // that names the space per link.
    let publisher = Pool::start(
        1,
        RouterLink {
            container_id: format!("{}-publisher", cfg.id),
            ..router.clone()
        },
        shutdown.clone(),
    );
    let mut svc = service::Service {
        wills,
        store,
        publisher,
        policy: policy.clone(),
        next_instance: 0,
        unpublished: Vec::new(),
        report: report.clone(),
        report_dirty: false,
        reported_at: std::time::Instant::now(),
        carried: None,
    };
    svc.update_report();
    if let Some(link) = cfg.console.clone() {
        let p = policy.clone();
        tracker.spawn(flotilla_core::watch::follow(
            link.clone(),
            move |t: Tenancy| p.replace(t),
            shutdown.clone(),
        ));
        let (r, id) = (report.clone(), cfg.id.clone());
        let state = move || {
            let (r, id) = (r.clone(), id.clone());
            async move {
                let mut v = r.lock().map(|v| v.clone()).unwrap_or_default();
                v["id"] = id.into();
                v
            }
        };
        tracker.spawn(flotilla_core::watch::report_every_second(
            link,
            state,
            |_| {},
            shutdown.clone(),
        ));
    }
    let mut redial = flotilla_core::redial::Redial::default();
    while !shutdown.is_cancelled() {
        redial.attempt();
        match flotilla_mqtt_gateway::upstream::connect(&router).await {
            Ok((io, buf)) => {
                readiness.ok("router");
                let mut conn = service::Conn::new(&mut svc, shutdown.clone());
                let ended = Driver::new(io, buf, DriverConfig::default())
                    .run(&mut conn)
                    .await;
                drop(conn);
                readiness.set("router", Some(format!("connection to {} lost", cfg.router)));
                match ended {
                    Ended::Io(e) => {
                        warn!(router = %cfg.router, error = %e, "connection to router failed")
                    }
                    _ => info!(router = %cfg.router, "connection to router closed"),
                }
            }
            Err(e) => debug!(router = %cfg.router, error = %e, "cannot reach router; retrying"),
        }
        if !redial.wait(&shutdown).await {
            break;
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    svc.store.close();
    info!("stopped");
    Ok(())
}
