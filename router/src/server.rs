//! Listeners and connectors: TCP → (TLS) → SASL → a [`ConnectionTask`] per
//! connection. Accept errors back off and retry; they never end the loop.
//! Inter-router connections come in on their own listener and go out to
//! `--peer` addresses, re-resolved periodically and reconnected with
//! backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flotilla_amqp::transport::{self, AcceptConfig, ClientSasl, ConnectConfig, Identity};
use flotilla_core::auth::MeshSecret;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, Instrument};

use crate::connection::ConnectionTask;
use crate::core::ConnectionId;
use crate::Shared;

/// How long an outbound inter-router handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often peer DNS names are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    accept_cfg: AcceptConfig,
    inter_router: bool,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                error!(error = %e, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let id = ConnectionId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
        let shared2 = shared.clone();
        let cfg = accept_cfg.clone();
        let span = tracing::info_span!("conn", conn.id = id.0, client.addr = %peer);
        shared.tracker.spawn(
            async move { serve(tcp, peer, id, shared2, cfg, inter_router).await }.instrument(span),
        );
    }
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    id: ConnectionId,
    shared: Arc<Shared>,
    cfg: AcceptConfig,
    inter_router: bool,
) {
    let admission = if inter_router {
        &shared.peer_admission
    } else {
        &shared.admission
    };
    // The source's rate and a handshake slot, before any TLS or SASL work.
    let permit = match admission.begin(peer) {
        Ok(p) => p,
        Err(r) => return admission.warn("connection refused", r.reason(), peer),
    };
    // Every established connection counts, routers' too: no port lets a
    // peer past the limit, and one past it hears why.
    let done = if inter_router {
        let hs = transport::accept(tcp, peer, &cfg, &shared.mesh_auth);
        admission.handshake(peer, permit, hs, "router").await
    } else {
        let hs = transport::accept(tcp, peer, &cfg, &shared.policy);
        admission.handshake(peer, permit, hs, "router").await
    };
    let Some((est, _slot)) = done else {
        return;
    };
    debug!(
        user = est.identity.user.as_deref().unwrap_or("<anonymous>"),
        mechanism = est.identity.mechanism,
        tls = est.tls,
        "authenticated"
    );
    let mut task = ConnectionTask::new(id, shared.clone(), est.identity, peer);
    if inter_router {
        let Some(mesh) = shared.mesh.clone() else {
            return;
        };
        task.make_peer(mesh, false);
    }
    let reason = task.run(est.io, est.read_buf).await;
    debug!(reason = ?reason, "connection closed");
}

/// Keeps connections to every address `peer` (HOST:PORT) resolves to,
/// resolving again every few seconds so routers that come and go behind
/// a DNS name (a Kubernetes headless service) join and leave the mesh.
pub(crate) async fn connect_peer(peer: String, shared: Arc<Shared>) {
    let mut conns: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        match tokio::net::lookup_host(peer.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = {
                    let own = shared.self_addrs.lock().unwrap_or_else(|p| p.into_inner());
                    addrs.filter(|a| !own.contains(a)).collect()
                };
                shared
                    .peer_others
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(peer.clone(), addrs.len());
                conns.retain(|a, stop| {
                    let keep = addrs.contains(a);
                    if !keep {
                        info!(peer = %peer, addr = %a, "peer address gone from DNS, or it is this router");
                        stop.cancel();
                    }
                    keep
                });
                for a in addrs {
                    conns.entry(a).or_insert_with(|| {
                        let stop = shared.closing.child_token();
                        shared
                            .tracker
                            .spawn(keep_connected(a, shared.clone(), stop.clone()));
                        stop
                    });
                }
            }
            Err(e) => debug!(peer = %peer, error = %e, "cannot resolve peer"),
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
    }
}

/// An edge router's uplink: one connection at a time, to the first of
/// `uplinks` that answers; when it fails, the next, round and round.
pub(crate) async fn keep_uplink(uplinks: Vec<String>, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    for spec in uplinks.iter().cycle() {
        if shared.shutdown.is_cancelled() {
            return;
        }
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(spec.as_str()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                debug!(uplink = %spec, error = %e, "cannot resolve uplink");
                Vec::new()
            }
        };
        for addr in addrs {
            let stop = shared.closing.child_token();
            if let Some(lived) = connect_once(addr, &shared, &stop).await {
                info!(uplink = %addr, "uplink lost; trying the next");
                if lived > Duration::from_secs(5) {
                    backoff = Duration::from_millis(100);
                }
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Connects to one peer address, and again with backoff whenever the
/// connection fails or closes, until `stop`.
async fn keep_connected(addr: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let connected = connect_once(addr, &shared, &stop).await;
        // A stopping router keeps the connections it has (what is in
        // flight settles over them) and makes no new ones.
        if shared.shutdown.is_cancelled()
            || shared
                .self_addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&addr)
        {
            return;
        }
        // A connection that lived a while earns a quick reconnect.
        backoff = match connected {
            Some(lived) if lived > Duration::from_secs(5) => Duration::from_millis(100),
            _ => (backoff * 2).min(Duration::from_secs(2)),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

/// One inter-router connection to `addr`, run until it closes or `stop`.
/// Returns how long it lived, or `None` if it never opened.
async fn connect_once(
    addr: SocketAddr,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Option<Duration> {
    let id = ConnectionId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("peer", conn.id = id.0, peer.addr = %addr);
    let connected = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let tls = shared
            .peer_tls
            .clone()
            .map(|c| (c, rustls_server_name(addr)));
        let sasl = match &shared.cfg.mesh_secret {
            Some(m) => ClientSasl::Scram {
                user: MeshSecret::username(&shared.cfg.container_id),
                password: m.secret().to_string(),
            },
            None => ClientSasl::Anonymous,
        };
        let cc = ConnectConfig {
            tls,
            sasl,
            hostname: None,
            tls_header: false,
        };
        let (io, buf) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, transport::connect(tcp, &cc)).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    info!(error = %e, "inter-router handshake failed");
                    return None;
                }
                Err(_) => return None,
            };
        let mesh = shared.mesh.clone()?;
        let identity = Identity::component(None, "outbound");
        let mut task = ConnectionTask::new(id, shared.clone(), identity, addr);
        task.make_peer(mesh, true);
        let started = std::time::Instant::now();
        let reason = tokio::select! {
            r = task.run(io, buf) => Some(r),
            _ = stop.cancelled() => None,
        };
        debug!(reason = ?reason, "inter-router connection closed");
        Some(started.elapsed())
    }
    .instrument(span)
    .await;
    connected
}

fn rustls_server_name(addr: SocketAddr) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(addr.ip().into())
}
