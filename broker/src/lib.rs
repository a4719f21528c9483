//! flotilla-broker: store-and-forward queues (DESIGN.md "Broker"). A
//! message a producer sends unsettled is accepted only once it is on disk
//! in the broker's own journal; consumers compete for a queue's messages
//! with credit, in order; released, modified and unsettled-at-disconnect
//! messages are redelivered; everything not acknowledged survives a crash.
//!
//! Not yet here (issue #4): topics and subscriptions, dead-letter and
//! expiry addresses, browsing, purge, selectors, paging, delivery-count in
//! the message header, authentication (every client is admitted), and
//! being reached through routers.
//!
//! # Layout
//!
//! - [`journal`]: segmented append-only files, CRC per record, group commit.
//! - [`store`]: the broker's records in the journal; rebuilding queues.
//! - [`queues`]: the task that owns every queue.
//! - `connection`: one task per client connection.

#![forbid(unsafe_code)]

mod connection;
pub mod journal;
pub mod queues;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_amqp::transport::{self, AcceptConfig, AllowAnonymous};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

/// Everything a broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub amqp: SocketAddr,
    pub data_dir: PathBuf,
    pub container_id: String,
    /// Dead-letter settings for every queue.
    pub dead_letter: queues::DeadLetter,
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
}

/// Recovers the journal, binds, and serves until `shutdown`.
///
/// # Errors
/// The journal cannot be recovered (damage before its tail) or the port
/// cannot be bound.
pub async fn run(cfg: BrokerConfig, shutdown: CancellationToken) -> Result<(), BrokerError> {
    let jcfg = journal::JournalConfig::new(cfg.data_dir.join("journal"));
    let (j, records) = tokio::task::spawn_blocking(move || journal::Journal::open(jcfg))
        .await
        .map_err(|e| BrokerError::Io(std::io::Error::other(e)))??;
    let recovered = store::recover(records);
    let held: usize = recovered.values().map(|q| q.len()).sum();
    info!(
        queues = recovered.len(),
        messages = held,
        "queues recovered"
    );
    let journal = journal::JournalHandle::start(j)?;
    let (task, queues) =
        queues::QueueTask::new(journal.clone(), recovered, cfg.dead_letter.clone());
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
    let tracker = TaskTracker::new();
    tracker.spawn(task.run());
    let next = AtomicU64::new(1);
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
        let (queues, journal, stop, cid) = (
            queues.clone(),
            journal.clone(),
            shutdown.clone(),
            cfg.container_id.clone(),
        );
        let span = tracing::info_span!("conn", conn.id = id, client.addr = %peer);
        tracker.spawn(
            async move {
                let hs = tokio::time::timeout(
                    Duration::from_secs(10),
                    transport::accept(tcp, peer, &AcceptConfig::default(), &AllowAnonymous),
                )
                .await;
                let Ok(Ok(est)) = hs else {
                    return info!("handshake failed");
                };
                connection::BrokerConnection::new(id, &cid, queues, journal)
                    .run(est.io, est.read_buf, stop)
                    .await;
            }
            .instrument(span),
        );
    }
    info!("stopped accepting; closing connections");
    drop(queues);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    // Acknowledgements still queued reach the disk before we exit.
    journal.flush().await;
    info!("stopped");
    Ok(())
}
