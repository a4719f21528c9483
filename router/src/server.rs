//! The accept loop: TCP → (TLS) → SASL → a [`ConnectionTask`] per client.
//! Accept errors back off and retry; they never end the loop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flotilla_amqp::transport::{self, AcceptConfig};
use tokio::net::TcpListener;
use tracing::{debug, error, info, Instrument};

use crate::connection::ConnectionTask;
use crate::core::ConnectionId;
use crate::Shared;

/// How long a client may take from TCP connect to the AMQP header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    accept_cfg: AcceptConfig,
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
        shared
            .tracker
            .spawn(async move { serve(tcp, peer, id, shared2, cfg).await }.instrument(span));
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    id: ConnectionId,
    shared: Arc<Shared>,
    cfg: AcceptConfig,
) {
    let open = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = scopeguard(shared.clone());
    if open > shared.cfg.max_connections {
        info!(
            limit = shared.cfg.max_connections,
            "connection refused: too many connections"
        );
        return;
    }
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        transport::accept(tcp, peer, &cfg, &shared.policy),
    )
    .await;
    let est = match hs {
        Ok(Ok(est)) => est,
        Ok(Err(e)) => {
            info!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            info!("handshake timed out");
            return;
        }
    };
    debug!(
        user = est.identity.user.as_deref().unwrap_or("<anonymous>"),
        mechanism = est.identity.mechanism,
        tls = est.tls,
        "authenticated"
    );
    let task = ConnectionTask::new(id, shared.clone(), est.identity, peer);
    let reason = task.run(est.io, est.read_buf).await;
    debug!(reason = ?reason, "connection closed");
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn scopeguard(s: Arc<Shared>) -> ConnGuard {
    ConnGuard(s)
}
