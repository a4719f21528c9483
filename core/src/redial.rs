//! How a component keeps its connection to its router: tried again after
//! 100 ms, doubling up to 2 s while attempts keep failing fast, back to
//! 100 ms after a connection that lasted (the broker, the MQTT gateway's
//! upstream connections and the last-will service all keep one).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

const FIRST: Duration = Duration::from_millis(100);
const MOST: Duration = Duration::from_secs(2);
/// A connection that lasted this long starts the backoff over.
const LASTED: Duration = Duration::from_secs(5);

/// The pause between attempts.
#[derive(Debug)]
pub struct Redial {
    pause: Duration,
    started: Instant,
}

impl Default for Redial {
    fn default() -> Self {
        Redial {
            pause: FIRST,
            started: Instant::now(),
        }
    }
}

impl Redial {
    /// An attempt begins now.
    pub fn attempt(&mut self) {
        self.started = Instant::now();
    }

    /// The attempt (or the connection it made) ended: waits before the
    /// next. False when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        self.pause = if self.started.elapsed() > LASTED {
            FIRST
        } else {
            (self.pause * 2).min(MOST)
        };
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(self.pause) => true,
        }
    }
}
