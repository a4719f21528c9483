//! Who gets in, and how many: the limits a listener puts on connections
//! before and after their handshake, so that no peer — however many
//! sockets it opens, however slowly it speaks — can take what others need.
//!
//! - A rate per source address (token bucket): a flood from one address
//!   is refused at accept, before any TLS or SASL work.
//! - Handshakes in progress (`--max-handshakes`), each bounded by a short
//!   timeout: sockets that connect and say nothing hold no connection slot.
//! - Established connections (`--max-connections`), counted after the
//!   handshake; one past the limit gets an Open and a Close with
//!   `amqp:resource-limit-exceeded`, not a bare TCP close.
//!
//! Refusals are logged at `warn` with their reason, at most once a second
//! per reason (with how many more there were), so a flood cannot fill the
//! log either.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Established connections (0 = no limit).
    pub max_connections: usize,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// How long a handshake (TLS, SASL, protocol headers) may take.
    pub handshake_timeout: Duration,
    /// New connections per second from one source address (0 = no limit),
    /// with bursts of twice as many.
    pub rate_per_source: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_connections: 10_000,
            max_handshakes: 500,
            handshake_timeout: Duration::from_secs(5),
            rate_per_source: 500,
        }
    }
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source connects faster than the rate allows.
    Rate,
    /// Too many handshakes are in progress.
    Handshakes,
    /// The connection limit is reached.
    Connections,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Rate => "its address connects faster than --max-connection-rate allows",
            Refusal::Handshakes => "too many handshakes in progress (--max-handshakes)",
            Refusal::Connections => "too many connections (--max-connections)",
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The count of established connections, shared by a router's listeners.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A listener's admission state.
pub struct Admission {
    /// The listener's name in logs (`amqp`, `inter-router`, …).
    listener: &'static str,
    cfg: AdmissionConfig,
    handshakes: Arc<Semaphore>,
    connections: Arc<ConnectionCount>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Per kind and reason: the second it counts in, logged and suppressed.
    log: Mutex<HashMap<(&'static str, String), (Instant, u32, u64)>>,
    refused: AtomicU64,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("cfg", &self.cfg).finish()
    }
}

/// Holds a connection slot until dropped.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionCount>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// A listener's admission, counting its connections in `connections`
    /// (shared with other listeners of the same server).
    pub fn new(
        listener: &'static str,
        cfg: AdmissionConfig,
        connections: Arc<ConnectionCount>,
    ) -> Self {
        Admission {
            listener,
            cfg,
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes.max(1))),
            connections,
            buckets: Mutex::new(HashMap::new()),
            log: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Connections refused so far (for metrics).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// At accept: the source's rate, then a handshake slot (held until the
    /// permit is dropped).
    ///
    /// # Errors
    /// Why the connection is refused.
    pub fn begin(&self, peer: SocketAddr) -> Result<OwnedSemaphorePermit, Refusal> {
        if !self.within_rate(peer.ip()) {
            return Err(Refusal::Rate);
        }
        self.handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Handshakes)
    }

    /// After the handshake: a connection slot.
    ///
    /// # Errors
    /// The connection limit is reached.
    pub fn establish(&self) -> Result<Slot, Refusal> {
        let n = self.connections.0.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot(self.connections.clone());
        if self.cfg.max_connections > 0 && n > self.cfg.max_connections {
            return Err(Refusal::Connections);
        }
        Ok(slot)
    }

    fn within_rate(&self, ip: IpAddr) -> bool {
        let rate = f64::from(self.cfg.rate_per_source);
        if rate <= 0.0 {
            return true;
        }
        let burst = rate * 2.0;
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > 100_000 {
            // Forget sources whose buckets have refilled.
            b.retain(|_, x| now.duration_since(x.at).as_secs_f64() * rate < burst);
        }
        let e = b.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * rate).min(burst);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Logs a refusal at `warn` with its reason: each one, up to
    /// [`LOG_BURST`] of one kind and reason in a second; past that they
    /// are counted, and the count is logged with the next one logged.
    pub fn warn(&self, what: &'static str, reason: &str, peer: SocketAddr) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() > 1000 {
            log.retain(|_, e| now.duration_since(e.0) < Duration::from_secs(1));
        }
        let e = log.entry((what, reason.to_string())).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 >= LOG_BURST {
            e.2 += 1;
            return;
        }
        e.1 += 1;
        let suppressed = std::mem::take(&mut e.2);
        drop(log);
        tracing::warn!(listener = self.listener, client.addr = %peer, reason, suppressed, "{what}");
    }
}

impl Admission {
    /// Runs a connection's handshake within the handshake timeout (its
    /// `permit` is given back when it ends), then takes a connection slot.
    /// Refusals are logged; one past the connection limit hears why (Open,
    /// then Close with `amqp:resource-limit-exceeded`). `server` names us
    /// in that Close.
    pub async fn handshake(
        &self,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        hs: impl std::future::Future<
            Output = Result<crate::transport::Established, crate::transport::HandshakeError>,
        >,
        server: &str,
    ) -> Option<(crate::transport::Established, Slot)> {
        let hs = tokio::time::timeout(self.cfg.handshake_timeout, hs).await;
        drop(permit);
        let mut est = match hs {
            Ok(Ok(est)) => est,
            Ok(Err(e)) => {
                self.warn("handshake failed", &e.to_string(), peer);
                return None;
            }
            Err(_) => {
                self.warn(
                    "handshake timed out",
                    "no handshake within the handshake timeout",
                    peer,
                );
                return None;
            }
        };
        match self.establish() {
            Ok(slot) => Some((est, slot)),
            Err(r) => {
                self.warn("connection refused", r.reason(), peer);
                let _ = crate::transport::refuse_open(
                    &mut est.io,
                    fe2o3_amqp_types::definitions::AmqpError::ResourceLimitExceeded,
                    &format!("the {server} has as many connections as it allows"),
                )
                .await;
                None
            }
        }
    }
}

/// Refusals of one kind and reason logged in a second before the rest are
/// only counted.
pub const LOG_BURST: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> SocketAddr {
        format!("{ip}:1").parse().unwrap()
    }

    #[test]
    fn a_source_past_its_rate_is_refused_others_are_not() {
        let a = Admission::new(
            "test",
            AdmissionConfig {
                rate_per_source: 10,
                ..Default::default()
            },
            Arc::default(),
        );
        let admitted = (0..100)
            .filter(|_| a.begin(peer("10.0.0.1")).is_ok())
            .count();
        assert!(
            (20..=21).contains(&admitted),
            "a burst of twice the rate: {admitted}"
        );
        assert!(
            a.begin(peer("10.0.0.2")).is_ok(),
            "another source is not held up"
        );
    }

    #[test]
    fn handshakes_and_connections_are_bounded_and_given_back() {
        let a = Admission::new(
            "test",
            AdmissionConfig {
                max_handshakes: 2,
                max_connections: 1,
                rate_per_source: 0,
                ..Default::default()
            },
            Arc::default(),
        );
        let h1 = a.begin(peer("10.0.0.1")).unwrap();
        let _h2 = a.begin(peer("10.0.0.1")).unwrap();
        assert_eq!(a.begin(peer("10.0.0.1")).unwrap_err(), Refusal::Handshakes);
        drop(h1);
        assert!(a.begin(peer("10.0.0.1")).is_ok());
        let s = a.establish().unwrap();
        assert_eq!(a.establish().unwrap_err(), Refusal::Connections);
        drop(s);
        assert!(a.establish().is_ok());
    }
}
