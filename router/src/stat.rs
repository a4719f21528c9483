//! The router's view of itself for `flotilla stat` (like qdstat): a
//! receiver attached to the source `$stat` gets one message, a JSON
//! document with the router's id, its connections, the mesh (neighbours,
//! routes) and the addresses of the client's address space with their
//! local and remote receivers, senders and message counts. It needs the
//! `view` operation on `#`, and shows a tenant only its own space (and its
//! own connections); a component (an operator's tool with the mesh
//! credential) sees every space.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::Shared;

/// The source address that yields a snapshot.
pub const STAT_ADDRESS: &str = "$stat";

#[derive(Debug, Serialize)]
pub struct RouterStat {
    pub id: String,
    pub connections: usize,
    pub mesh: Option<MeshStat>,
    pub addresses: Vec<AddressStat>,
    /// Client links attached to addresses of the space (anonymous-relay
    /// senders, which have no one address, are not listed).
    pub links: Vec<LinkStat>,
    /// Brokers links are routed to: (broker, the router it is connected to).
    pub brokers: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct LinkStat {
    pub connection: u64,
    /// `in` (a client sends) or `out` (a client receives).
    pub dir: &'static str,
    pub address: String,
    /// Receivers: deliveries sent but not settled.
    pub unsettled: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct MeshStat {
    pub neighbors: Vec<String>,
    /// (router, next hop, cost)
    pub routes: Vec<(String, String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct AddressStat {
    pub space: String,
    pub address: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub local_receivers: usize,
    /// Neighbours through which receivers on other routers are reached.
    pub remote_via: Vec<String>,
    pub senders: usize,
    pub waiting: usize,
    pub delivered: u64,
    pub dropped: u64,
}

/// The JSON snapshot for a client of address space `space` (what no
/// other tenant's clients see), or of every space for a component.
pub(crate) fn snapshot(shared: &Shared, space: Option<&str>) -> Vec<u8> {
    let mut links = Vec::new();
    let mut addresses: Vec<AddressStat> = shared
        .table
        .all()
        .into_iter()
        .filter(|a| space.map_or(!a.space.starts_with('$'), |s| a.space == s))
        .map(|a| {
            let g = a.lock();
            for c in g.consumers.iter().filter(|c| c.remote.is_none()) {
                let unsettled = Some(c.outstanding.load(Ordering::Relaxed));
                links.push(LinkStat {
                    connection: c.conn.id.0,
                    dir: "out",
                    address: a.address.clone(),
                    unsettled,
                });
            }
            for (conn, _) in &g.senders {
                links.push(LinkStat {
                    connection: conn.id.0,
                    dir: "in",
                    address: a.address.clone(),
                    unsettled: None,
                });
            }
            AddressStat {
                space: a.space.clone(),
                address: a.address.clone(),
                kind: format!("{:?}", a.kind).to_lowercase(),
                local_receivers: g.consumers.iter().filter(|c| c.remote.is_none()).count(),
                remote_via: g
                    .consumers
                    .iter()
                    .filter_map(|c| c.remote.clone())
                    .collect(),
                senders: g.senders.len(),
                waiting: g.undelivered.len(),
                delivered: a.delivered.load(Ordering::Relaxed),
                dropped: a.dropped.load(Ordering::Relaxed),
            }
        })
        .collect();
    links.sort_by(|a, b| (a.connection, &a.address).cmp(&(b.connection, &b.address)));
    addresses.sort_by(|a, b| a.address.cmp(&b.address));
    let mesh = shared.mesh.as_ref().map(|m| {
        let snap = m.snapshot();
        MeshStat {
            neighbors: snap.neighbors.keys().cloned().collect(),
            routes: snap
                .routes
                .iter()
                .map(|(d, (h, c))| (d.clone(), h.clone(), *c))
                .collect(),
        }
    });
    let mut brokers: Vec<(String, String)> = shared
        .brokers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .map(|b| (b.clone(), shared.cfg.container_id.clone()))
        .collect();
    if let Some(m) = &shared.mesh {
        for (b, r) in &m.snapshot().brokers {
            if !brokers.iter().any(|(x, _)| x == b) {
                brokers.push((b.clone(), r.clone()));
            }
        }
    }
    brokers.sort();
    let connections = match space {
        Some(s) => shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| c.space == s)
            .count(),
        None => shared.connections.get(),
    };
    let stat = RouterStat {
        id: shared.cfg.container_id.clone(),
        connections,
        mesh,
        addresses,
        links,
        brokers,
    };
    // Plain strings and numbers: serialization cannot fail.
    serde_json::to_vec_pretty(&stat).unwrap_or_default()
}

/// A client connection, as the console lists it.
#[derive(Debug, Clone)]
pub(crate) struct ClientInfo {
    pub space: String,
    pub user: Option<String>,
    pub addr: std::net::SocketAddr,
    pub container: String,
    pub handle: crate::connection::TaskHandle,
    /// Links the client has open (refreshed by its connection task).
    pub links: Arc<AtomicUsize>,
    pub traffic: Arc<Traffic>,
    /// Its links routed to brokers: link → (address, it sends).
    pub routed: Routed,
}

/// A connection's routed links (link id → address and whether the client
/// sends on it), for the console: each entry lives as long as the link's
/// route ([`Listed`]).
pub(crate) type Routed = Arc<std::sync::Mutex<std::collections::HashMap<u32, (String, bool)>>>;

/// A routed link's entry in its connection's [`Routed`]: gone with it.
pub(crate) struct Listed {
    routed: Routed,
    link: u32,
}

impl Listed {
    pub(crate) fn new(routed: &Routed, link: u32, address: String, sends: bool) -> Listed {
        routed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(link, (address, sends));
        Listed {
            routed: routed.clone(),
            link,
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.routed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.link);
    }
}

/// A connection's messages in (from the peer) and out (to it), counted by
/// its task.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub r#in: std::sync::atomic::AtomicU64,
    pub out: std::sync::atomic::AtomicU64,
}

/// The router's live state for the console: its client connections and,
/// per address, senders, receivers, deliveries and their rate since the
/// last report (`last` keeps the previous counts).
pub(crate) fn report(
    shared: &Shared,
    last: &mut std::collections::HashMap<(String, String), u64>,
) -> serde_json::Value {
    let mut space_links: std::collections::BTreeMap<String, usize> = Default::default();
    let mut seen = std::collections::HashMap::new();
    let mut links = Vec::new();
    let connections: Vec<serde_json::Value> = shared
        .clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, c)| {
            // Its links to brokers' queues and topics (the router's own
            // addresses' links are listed below, from the addresses).
            for (address, sends) in c.routed.lock().unwrap_or_else(|p| p.into_inner()).values() {
                links.push(serde_json::json!({
                    "space": c.space, "address": address, "connection": id,
                    "dir": if *sends { "in" } else { "out" }, "routed": true,
                }));
            }
            let links = c.links.load(Ordering::Relaxed);
            *space_links.entry(c.space.clone()).or_insert(0) += links;
            let (i, o) = (
                c.traffic.r#in.load(Ordering::Relaxed),
                c.traffic.out.load(Ordering::Relaxed),
            );
            let mut rate = |dir: &str, now: u64| {
                let key = (format!("$conn-{dir}"), id.to_string());
                let r = now.saturating_sub(last.get(&key).copied().unwrap_or(now));
                seen.insert(key, now);
                r
            };
            serde_json::json!({
                "id": id,
                "space": c.space,
                "user": c.user,
                "addr": c.addr.to_string(),
                "container": c.container,
                "links": links,
                "in": i,
                "out": o,
                "inRate": rate("in", i),
                "outRate": rate("out", o),
            })
        })
        .collect();
    let addresses: Vec<serde_json::Value> = shared
        .table
        .all()
        .into_iter()
        .filter(|a| !a.space.starts_with('$'))
        .map(|a| {
            let g = a.lock();
            for c in g.consumers.iter().filter(|c| c.remote.is_none()) {
                links.push(serde_json::json!({
                    "space": a.space, "address": a.address, "connection": c.conn.id.0,
                    "dir": "out", "unsettled": c.outstanding.load(Ordering::Relaxed),
                }));
            }
            for (conn, _) in &g.senders {
                links.push(serde_json::json!({
                    "space": a.space, "address": a.address, "connection": conn.id.0, "dir": "in",
                }));
            }
            let delivered = a.delivered.load(Ordering::Relaxed);
            let key = (a.space.clone(), a.address.clone());
            let rate = delivered.saturating_sub(last.get(&key).copied().unwrap_or(delivered));
            seen.insert(key, delivered);
            serde_json::json!({
                "space": a.space,
                "address": a.address,
                "type": format!("{:?}", a.kind).to_lowercase(),
                "senders": g.senders.len(),
                "receivers": g.consumers.iter().filter(|c| c.remote.is_none()).count(),
                "delivered": delivered,
                "rate": rate,
            })
        })
        .collect();
    *last = seen;
    let snapshot = shared.mesh.as_ref().map(|m| m.snapshot());
    let peers: Vec<&String> = snapshot
        .as_ref()
        .map_or(Vec::new(), |s| s.neighbors.keys().collect());
    let containers = shared.local_brokers();
    let gateways: Vec<String> = shared
        .gateways
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    serde_json::json!({
        "component": "router",
        "id": shared.cfg.container_id,
        "routerId": snapshot.as_ref().map(|s| s.id.clone()),
        "edge": shared.cfg.edge,
        "connections": connections,
        "neighbours": peers.len(),
        "peers": peers,
        "containers": containers,
        "gateways": gateways,
        "spaceLinks": space_links,
        "addresses": addresses,
        "links": links,
    })
}

/// Carries out a console command: `{"closeConnection": ID}`.
pub(crate) fn command(shared: &Shared, c: &serde_json::Value) {
    if let Some(id) = c["closeConnection"].as_u64() {
        let h = shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|c| c.handle.clone());
        if let Some(h) = h {
            h.command(crate::connection::Command::Close {
                reason: "closed by an administrator".into(),
            });
        }
    }
}
