//! The gateway's connections: who is connected (one connection per client
//! id and space — a new one takes the session over), their counters, and
//! the views of them `flotilla stat --mqtt`, the console and `/metrics`
//! show.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::upstream::{Mailbox, SIGNAL_KEEP_ALIVE, SIGNAL_KICK, SIGNAL_RECHECK};

/// Counters of one connection, shared with the registry.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// PUBLISH packets from the client.
    pub received: AtomicU64,
    /// PUBLISH packets to the client.
    pub sent: AtomicU64,
    /// QoS 0 messages dropped for a client that did not keep up.
    pub dropped: AtomicU64,
    /// Publications refused (authorization, quota, unknown topic).
    pub refused: AtomicU64,
    /// QoS 1 and 2 messages sent and not yet acknowledged.
    pub inflight_out: AtomicU64,
    pub subscriptions: AtomicU64,
    /// The session's subscriptions (for `stat`).
    pub filters: Mutex<Vec<(String, u8)>>,
    /// An administrator closes the connection (the console's close).
    pub closed_by_admin: std::sync::atomic::AtomicBool,
}

/// One connected client.
pub struct Entry {
    pub key: u64,
    pub user: Option<String>,
    pub addr: SocketAddr,
    pub listener: &'static str,
    pub version: u8,
    pub persistent: bool,
    pub since_ms: u64,
    pub stats: Arc<SessionStats>,
    /// Where a new connection taking the session over, an administrator's
    /// close or a change of tenancy reaches the connection.
    pub mailbox: Arc<Mailbox>,
    /// When the token the client logged in with stops being valid.
    pub expires_at: Option<std::time::Instant>,
}

/// Counters of connections that ended, so totals keep counting.
#[derive(Debug, Default)]
pub struct Totals {
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub protocol_errors: AtomicU64,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<(Arc<str>, String), Entry>>,
    pub totals: Totals,
}

impl Registry {
    /// Registers a connection for `space`/`client_id`; returns the one it
    /// takes the session from, if any.
    /// A connection of another user holding the client id is not taken
    /// over: `Err` then.
    pub fn claim(&self, space: Arc<str>, client_id: String, e: Entry) -> Result<Option<Entry>, ()> {
        self.totals.connections.fetch_add(1, Ordering::Relaxed);
        let k = (space, client_id);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if s.get(&k).is_some_and(|old| old.user != e.user) {
            return Err(());
        }
        Ok(s.insert(k, e))
    }

    /// The connection `key` ended: forgotten (unless another took over),
    /// its counters added to the totals.
    pub fn release(&self, space: &Arc<str>, client_id: &str, key: u64, stats: &SessionStats) {
        let t = &self.totals;
        t.received
            .fetch_add(stats.received.load(Ordering::Relaxed), Ordering::Relaxed);
        t.sent
            .fetch_add(stats.sent.load(Ordering::Relaxed), Ordering::Relaxed);
        t.dropped
            .fetch_add(stats.dropped.load(Ordering::Relaxed), Ordering::Relaxed);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let k = (space.clone(), client_id.to_string());
        if s.get(&k).is_some_and(|e| e.key == key) {
            s.remove(&k);
        }
    }

    /// Closes connection `key` (an administrator's action); false when
    /// there is no such connection.
    pub fn close(&self, key: u64) -> bool {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = s.values().find(|e| e.key == key) else {
            return false;
        };
        e.stats.closed_by_admin.store(true, Ordering::Release);
        e.mailbox.raise(SIGNAL_KICK);
        true
    }

    /// Tells each connection silent for longer than its keep-alive, and
    /// each whose token has expired (it checks itself again and ends).
    pub fn check_keep_alive(&self) {
        let now = std::time::Instant::now();
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for e in s.values() {
            if e.mailbox.silent_too_long() {
                e.mailbox.raise(SIGNAL_KEEP_ALIVE);
            }
            if e.expires_at.is_some_and(|t| t <= now) {
                e.mailbox.raise(SIGNAL_RECHECK);
            }
        }
    }

    /// Raises `signal` on every connection.
    pub fn raise_all(&self, signal: u8) {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for e in s.values() {
            e.mailbox.raise(signal);
        }
    }

    /// True while a connection holds `space`/`client_id`.
    pub fn connected(&self, space: &Arc<str>, client_id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(space.clone(), client_id.to_string()))
    }

    /// Connected clients.
    pub fn count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The sessions (of `space`, or all), with subscriptions and counters.
    pub fn snapshot(&self, space: Option<&str>) -> serde_json::Value {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<serde_json::Value> = s
            .iter()
            .filter(|((sp, _), _)| space.is_none_or(|want| **sp == *want))
            .map(|((sp, client_id), e)| {
                let st = &e.stats;
                let filters: Vec<serde_json::Value> = st
                    .filters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(f, q)| json!({"filter": f, "qos": q}))
                    .collect();
                json!({
                    "id": e.key,
                    "clientId": client_id,
                    "space": &**sp,
                    "user": e.user,
                    "addr": e.addr.to_string(),
                    "listener": e.listener,
                    "protocol": if e.version == 5 { "mqtt5" } else { "mqtt3.1.1" },
                    "persistent": e.persistent,
                    "since": e.since_ms,
                    "subscriptions": filters,
                    "received": st.received.load(Ordering::Relaxed),
                    "sent": st.sent.load(Ordering::Relaxed),
                    "inflight": st.inflight_out.load(Ordering::Relaxed),
                    "dropped": st.dropped.load(Ordering::Relaxed),
                    "refused": st.refused.load(Ordering::Relaxed),
                })
            })
            .collect();
        list.sort_by(|a, b| {
            (a["space"].as_str(), a["clientId"].as_str())
                .cmp(&(b["space"].as_str(), b["clientId"].as_str()))
        });
        let live = |f: fn(&SessionStats) -> &AtomicU64| -> u64 {
            s.values()
                .map(|e| f(&e.stats).load(Ordering::Relaxed))
                .sum()
        };
        let t = &self.totals;
        json!({
            "kind": "mqtt-gateway",
            "sessions": list,
            "totals": {
                "connections": t.connections.load(Ordering::Relaxed),
                "refusedConnections": t.refused_connections.load(Ordering::Relaxed),
                "protocolErrors": t.protocol_errors.load(Ordering::Relaxed),
                "received": t.received.load(Ordering::Relaxed) + live(|s| &s.received),
                "sent": t.sent.load(Ordering::Relaxed) + live(|s| &s.sent),
                "dropped": t.dropped.load(Ordering::Relaxed) + live(|s| &s.dropped),
            },
        })
    }
}
