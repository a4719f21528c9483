//! The router mesh (DESIGN.md "Mesh"): inter-router connections
//! ([`crate::connection`] in peer mode), HELLO-based neighbour liveness,
//! link-state and mobile-address records flooded through the mesh, and
//! shortest-path routes ([`routes`]) recomputed on every change.
//!
//! One [`MeshTask`] per router owns the databases. It turns them into
//! routing state the connection tasks use directly: for anycast, a remote
//! consumer per neighbour on each address with receivers elsewhere (see
//! `AddressState::set_remote`); for multicast, the routers with receivers
//! and each ingress router's shortest-path tree, in a [`Snapshot`].

pub mod peer;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_amqp::connection::LinkId;
use flotilla_core::resources::AddressType;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::connection::TaskHandle;
use crate::core::AddressTable;
use crate::linkroute::BROKERS_SPACE;
use routes::{LinkState, Routes};

/// HELLO period; a neighbour is dead after [`DEAD_AFTER`] without one.
pub const HELLO_INTERVAL: Duration = Duration::from_secs(1);
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Messages one address may have in flight towards one neighbour, unless
/// the router is told otherwise (twice its `--link-capacity`).
pub const REMOTE_WINDOW: u32 = 500;

/// An address with receivers on some router.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddressKey {
    pub space: String,
    pub address: String,
    pub multicast: bool,
}

/// A router's mobile-address record: the addresses it has receivers for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub id: String,
    pub version: u64,
    pub addresses: BTreeSet<AddressKey>,
}

/// Messages on the control link between two routers (JSON bodies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// I am alive; the routers I hear HELLOs from.
    Hello {
        id: String,
        seen: Vec<String>,
        /// Sent by edge routers: they do not join link state.
        #[serde(default)]
        edge: bool,
    },
    /// A router's link-state record, flooded.
    LinkState(LinkState),
    /// A router's mobile-address record, flooded.
    Addresses(AddressRecord),
}

/// What the mesh asks a peer connection to do.
#[derive(Debug, Clone)]
pub enum PeerCommand {
    Send(Control),
    /// The neighbour went silent: drop the connection.
    Close,
}

/// What peer connections and the router tell the mesh.
#[derive(Debug)]
pub enum MeshEvent {
    /// A connection to router `id` is ready: its control channel and the
    /// data link messages for that router go on.
    PeerUp {
        id: String,
        conn: TaskHandle,
        control: mpsc::UnboundedSender<PeerCommand>,
        data: LinkId,
    },
    /// A control message from router `from` on connection `conn`.
    Control {
        from: String,
        conn: u64,
        msg: Control,
    },
    /// The connection `conn` to router `id` closed.
    PeerDown { id: String, conn: u64 },
    /// Local receivers came or went on some address.
    LocalAddresses,
    /// The router is stopping (lame duck): it announces no addresses any
    /// more, so other routers send it nothing new; its brokers stay
    /// announced until their connections move.
    Withdraw,
}

/// Routing state the connection tasks read (replaced whole on change).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub id: String,
    /// Two-way neighbours and their data links.
    pub neighbors: BTreeMap<String, (TaskHandle, LinkId)>,
    /// Router → (next hop, cost).
    pub routes: BTreeMap<String, (String, u64)>,
    /// Multicast addresses → routers (other than this one) with receivers.
    pub multicast: HashMap<(String, String), BTreeSet<String>>,
    /// Ingress router → each router's parent on its shortest-path tree.
    pub trees: HashMap<String, HashMap<String, String>>,
    /// Multicast addresses → edge routers attached here with receivers.
    pub edge_multicast: HashMap<(String, String), BTreeSet<String>>,
    /// Brokers connected to other routers → the nearest such router.
    pub brokers: BTreeMap<String, String>,
}

/// The brokers connected to a router, by id.
pub type Brokers = Arc<std::sync::Mutex<BTreeMap<String, TaskHandle>>>;

impl Snapshot {
    /// Where this router sends a multicast message for (`space`,
    /// `address`) that entered the mesh at `ingress`.
    pub fn multicast_hops(
        &self,
        space: &str,
        address: &str,
        ingress: &str,
    ) -> Vec<(String, TaskHandle, LinkId)> {
        let key = (space.to_string(), address.to_string());
        let mut hops: BTreeSet<String> = BTreeSet::new();
        if let Some(targets) = self.multicast.get(&key) {
            // A message from an edge router (not in link state) spreads as
            // if it had entered here.
            let root = if self.trees.contains_key(ingress) {
                ingress
            } else {
                self.id.as_str()
            };
            match self.trees.get(root) {
                Some(parents) => {
                    hops.extend(routes::multicast_children(&self.id, parents, targets))
                }
                // An edge router: its uplink is the way to everything.
                None => hops.extend(
                    targets
                        .iter()
                        .filter(|t| self.neighbors.contains_key(*t))
                        .cloned(),
                ),
            }
        }
        if let Some(edges) = self.edge_multicast.get(&key) {
            hops.extend(edges.iter().cloned());
        }
        hops.into_iter()
            .filter_map(|n| self.neighbors.get(&n).map(|(c, l)| (n, c.clone(), *l)))
            .collect()
    }
}

/// A cloneable handle to the mesh task.
#[derive(Debug, Clone)]
pub struct MeshHandle {
    pub id: String,
    pub tx: mpsc::UnboundedSender<MeshEvent>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
}

impl MeshHandle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn send(&self, ev: MeshEvent) {
        let _ = self.tx.send(ev);
    }
}

struct Neighbor {
    conn: TaskHandle,
    control: mpsc::UnboundedSender<PeerCommand>,
    data: LinkId,
    last_hello: Instant,
    /// It hears our HELLOs: the link works both ways.
    two_way: bool,
    /// An edge router hanging off this one.
    edge: bool,
    /// What we last told it (edge routers only).
    told: Option<BTreeSet<AddressKey>>,
}

/// Owns the link-state and mobile-address databases and the routes.
pub struct MeshTask {
    id: String,
    /// This router is an edge router: one uplink, no link state.
    edge: bool,
    /// Messages one address may have in flight towards one neighbour.
    window: u32,
    /// Edge routers attached here → the addresses they have receivers for.
    edge_mars: HashMap<String, BTreeSet<AddressKey>>,
    version: u64,
    rx: mpsc::UnboundedReceiver<MeshEvent>,
    table: Arc<AddressTable>,
    /// Brokers connected to this router (route containers).
    brokers: Brokers,
    neighbors: BTreeMap<String, Neighbor>,
    lsdb: HashMap<String, LinkState>,
    mardb: HashMap<String, AddressRecord>,
    routes: Routes,
    /// Remote consumers installed per anycast address: the neighbours.
    applied: HashMap<AddressKey, BTreeMap<String, u32>>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    /// Lame duck: addresses withdrawn ([`MeshEvent::Withdraw`]).
    withdrawn: bool,
}

fn clock_version() -> u64 {
    // Versions start from the clock, so a restarted router's records
    // replace the ones the mesh still remembers from before.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

impl MeshTask {
    /// Messages one address may have in flight towards one neighbour.
    #[must_use]
    pub fn with_window(mut self, window: u32) -> Self {
        self.window = window.max(1);
        self
    }

    /// A mesh task for router `id` over the router's address table.
    pub fn new(
        id: &str,
        table: Arc<AddressTable>,
        brokers: Brokers,
        edge: bool,
    ) -> (MeshTask, MeshHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let snapshot = Arc::new(RwLock::new(Arc::new(Snapshot {
            id: id.to_string(),
            ..Default::default()
        })));
        let version = clock_version();
        let mut lsdb = HashMap::new();
        lsdb.insert(
            id.to_string(),
            LinkState {
                id: id.to_string(),
                version,
                neighbors: BTreeMap::new(),
            },
        );
        let mut mardb = HashMap::new();
        mardb.insert(
            id.to_string(),
            AddressRecord {
                id: id.to_string(),
                version,
                addresses: BTreeSet::new(),
            },
        );
        let task = MeshTask {
            id: id.to_string(),
            edge,
            window: REMOTE_WINDOW,
            edge_mars: HashMap::new(),
            version,
            rx,
            table,
            brokers,
            neighbors: BTreeMap::new(),
            lsdb,
            mardb,
            routes: Routes::default(),
            applied: HashMap::new(),
            snapshot: snapshot.clone(),
            withdrawn: false,
        };
        (
            task,
            MeshHandle {
                id: id.to_string(),
                tx,
                snapshot,
            },
        )
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut hello = tokio::time::interval(HELLO_INTERVAL);
        hello.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = self.rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    let mut changed = false;
                    for ev in batch.drain(..) {
                        changed |= self.handle_event(ev);
                    }
                    if changed {
                        self.recompute();
                    }
                }
                _ = hello.tick() => {
                    if self.handle_tick() {
                        self.recompute();
                    }
                }
            }
        }
    }

    /// Sends to every interior neighbour but `except` (edge routers get
    /// records made for them in `sync_addresses`).
    fn flood(&self, msg: &Control, except: Option<&str>) {
        for (id, n) in &self.neighbors {
            if Some(id.as_str()) != except && !n.edge {
                let _ = n.control.send(PeerCommand::Send(msg.clone()));
            }
        }
    }

    /// Sends HELLOs; drops neighbours silent for too long. True if routes
    /// must be recomputed.
    fn handle_tick(&mut self) -> bool {
        let now = Instant::now();
        let dead: Vec<String> = self
            .neighbors
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_hello) > DEAD_AFTER)
            .map(|(id, _)| id.clone())
            .collect();
        let changed = !dead.is_empty();
        for id in dead {
            info!(router = %id, "neighbour silent for 3 HELLO periods: dead");
            if let Some(n) = self.neighbors.remove(&id) {
                let _ = n.control.send(PeerCommand::Close);
            }
        }
        if changed {
            self.own_links_changed();
        }
        let hello = Control::Hello {
            id: self.id.clone(),
            seen: self.neighbors.keys().cloned().collect(),
            edge: self.edge,
        };
        for n in self.neighbors.values() {
            let _ = n.control.send(PeerCommand::Send(hello.clone()));
        }
        changed
    }

    /// Handles one event; true if routes must be recomputed.
    fn handle_event(&mut self, ev: MeshEvent) -> bool {
        match ev {
            MeshEvent::PeerUp {
                id,
                conn,
                control,
                data,
            } => {
                if id == self.id {
                    let _ = control.send(PeerCommand::Close);
                    return false;
                }
                debug!(router = %id, "peer connection up");
                let seen = self.neighbors.keys().cloned().collect();
                let _ = control.send(PeerCommand::Send(Control::Hello {
                    id: self.id.clone(),
                    seen,
                    edge: self.edge,
                }));
                if self.edge {
                    // An edge router tells its uplink only its own addresses.
                    if let Some(mar) = self.mardb.get(&self.id) {
                        let _ = control.send(PeerCommand::Send(Control::Addresses(mar.clone())));
                    }
                } else {
                    // Bring the new neighbour up to date with all we know
                    // (an edge router ignores what is not for it).
                    for ls in self.lsdb.values() {
                        let _ = control.send(PeerCommand::Send(Control::LinkState(ls.clone())));
                    }
                    for mar in self.mardb.values() {
                        let _ = control.send(PeerCommand::Send(Control::Addresses(mar.clone())));
                    }
                }
                let old = self.neighbors.insert(
                    id,
                    Neighbor {
                        conn,
                        control,
                        data,
                        last_hello: Instant::now(),
                        two_way: false,
                        edge: false,
                        told: None,
                    },
                );
                if let Some(old) = old {
                    // A second connection to the same router replaces the first.
                    let _ = old.control.send(PeerCommand::Close);
                    self.own_links_changed();
                    return true;
                }
                false
            }
            MeshEvent::PeerDown { id, conn } => {
                if !self
                    .neighbors
                    .get(&id)
                    .is_some_and(|n| n.conn.id().0 == conn)
                {
                    return false;
                }
                info!(router = %id, "neighbour connection lost");
                self.neighbors.remove(&id);
                if self.edge_mars.remove(&id).is_some() {
                    self.local_addresses();
                }
                self.own_links_changed();
                true
            }
            MeshEvent::LocalAddresses => self.local_addresses(),
            MeshEvent::Withdraw => {
                info!("addresses withdrawn from the mesh");
                self.withdrawn = true;
                self.local_addresses()
            }
            MeshEvent::Control { from, conn, msg } => {
                if !self
                    .neighbors
                    .get(&from)
                    .is_some_and(|n| n.conn.id().0 == conn)
                {
                    return false;
                }
                self.handle_control(from, msg)
            }
        }
    }

    fn handle_control(&mut self, from: String, msg: Control) -> bool {
        match msg {
            Control::Hello { id, seen, edge } => {
                let me = self.id.clone();
                let Some(n) = self.neighbors.get_mut(&from) else {
                    return false;
                };
                if id != from {
                    return false;
                }
                n.last_hello = Instant::now();
                let two_way = seen.contains(&me);
                if two_way == n.two_way && edge == n.edge {
                    return false;
                }
                n.two_way = two_way;
                n.edge = edge;
                info!(router = %from, two_way, edge, "neighbour");
                self.own_links_changed();
                true
            }
            Control::LinkState(_) if self.edge => false,
            Control::LinkState(ls) => {
                if ls.id == self.id {
                    // Our own record from before a restart: outdo it.
                    if ls.version >= self.version {
                        self.version = ls.version;
                        self.own_links_changed();
                        self.local_addresses();
                        return true;
                    }
                    return false;
                }
                if self
                    .lsdb
                    .get(&ls.id)
                    .is_some_and(|old| ls.version <= old.version)
                {
                    return false;
                }
                self.flood(&Control::LinkState(ls.clone()), Some(&from));
                self.lsdb.insert(ls.id.clone(), ls);
                true
            }
            Control::Addresses(mar) => {
                if mar.id == self.id {
                    return false;
                }
                if self.neighbors.get(&from).is_some_and(|n| n.edge) && mar.id == from {
                    // An edge router's receivers: this router answers for
                    // them to the rest of the mesh.
                    self.edge_mars.insert(from, mar.addresses);
                    self.local_addresses();
                    return true;
                }
                if self.edge && mar.id != from {
                    // Edge routers learn only what their uplink tells them.
                    return false;
                }
                if self
                    .mardb
                    .get(&mar.id)
                    .is_some_and(|old| mar.version <= old.version)
                {
                    return false;
                }
                self.flood(&Control::Addresses(mar.clone()), Some(&from));
                self.mardb.insert(mar.id.clone(), mar);
                true
            }
        }
    }

    /// Our neighbours changed: a new link-state version, flooded.
    fn own_links_changed(&mut self) {
        self.version = self.version.max(clock_version()) + 1;
        if self.edge {
            // Edge routers do not join link state.
            return;
        }
        let neighbors = self
            .neighbors
            .iter()
            .filter(|(_, n)| n.two_way && !n.edge)
            .map(|(id, _)| (id.clone(), 1))
            .collect();
        let ls = LinkState {
            id: self.id.clone(),
            version: self.version,
            neighbors,
        };
        self.flood(&Control::LinkState(ls.clone()), None);
        self.lsdb.insert(self.id.clone(), ls);
    }

    /// Tells each attached edge router which addresses have receivers
    /// somewhere else: all of them are reached through this router.
    fn tell_edges(&mut self) {
        let own = self.own_addresses();
        let elsewhere: Vec<(String, BTreeSet<AddressKey>)> = self
            .mardb
            .iter()
            .filter(|(id, _)| **id != self.id && self.routes.next_hop.contains_key(*id))
            .map(|(id, r)| (id.clone(), r.addresses.clone()))
            .collect();
        let edges: Vec<String> = self
            .neighbors
            .iter()
            .filter(|(_, n)| n.edge)
            .map(|(id, _)| id.clone())
            .collect();
        for edge in edges {
            let mut keys = own.clone();
            for (_, a) in &elsewhere {
                keys.extend(a.iter().cloned());
            }
            for (other, a) in &self.edge_mars {
                if *other != edge {
                    keys.extend(a.iter().cloned());
                }
            }
            let version = self.version.max(clock_version()) + 1;
            let Some(n) = self.neighbors.get_mut(&edge) else {
                continue;
            };
            if n.told.as_ref() == Some(&keys) {
                continue;
            }
            let rec = AddressRecord {
                id: self.id.clone(),
                version,
                addresses: keys.clone(),
            };
            let _ = n.control.send(PeerCommand::Send(Control::Addresses(rec)));
            n.told = Some(keys);
            self.version = version;
        }
    }

    /// Rescans the addresses with local receivers; floods a new record if
    /// the set changed. True if it did.
    fn local_addresses(&mut self) -> bool {
        let mut addresses = self.own_addresses();
        // What edge routers attached here have, this router answers for
        // (until it stops).
        for e in self.edge_mars.values().filter(|_| !self.withdrawn) {
            addresses.extend(e.iter().cloned());
        }
        if self
            .mardb
            .get(&self.id)
            .is_some_and(|r| r.addresses == addresses)
        {
            return false;
        }
        self.version = self.version.max(clock_version()) + 1;
        let mar = AddressRecord {
            id: self.id.clone(),
            version: self.version,
            addresses,
        };
        self.flood(&Control::Addresses(mar.clone()), None);
        self.mardb.insert(self.id.clone(), mar);
        true
    }

    /// Routes from the link-state database, then the routing state the
    /// connection tasks use.
    /// Addresses with receivers attached to this router itself.
    fn own_addresses(&self) -> BTreeSet<AddressKey> {
        let mut own: BTreeSet<AddressKey> = self
            .table
            .all()
            .into_iter()
            .filter(|a| !self.withdrawn && a.has_local_consumers())
            .map(|a| AddressKey {
                space: a.space.clone(),
                address: a.address.clone(),
                multicast: a.kind == AddressType::Multicast,
            })
            .collect();
        // Brokers here are flooded like addresses in a space of their own.
        let brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        own.extend(brokers.keys().map(|b| AddressKey {
            space: BROKERS_SPACE.to_string(),
            address: b.clone(),
            multicast: false,
        }));
        own
    }

    fn recompute(&mut self) {
        let routes = if self.edge {
            // Everything is behind the uplink.
            let mut r = Routes::default();
            for id in self
                .neighbors
                .iter()
                .filter(|(_, n)| n.two_way)
                .map(|(id, _)| id)
            {
                r.next_hop.insert(id.clone(), id.clone());
                r.cost.insert(id.clone(), 1);
            }
            r
        } else {
            routes::compute(&self.id, &self.lsdb)
        };
        // Records of routers not reachable now stay: a record can arrive
        // before the link that makes its router reachable (flooding has
        // no order), and routes use only reachable routers.
        if routes != self.routes {
            let summary: Vec<String> = routes
                .next_hop
                .iter()
                .map(|(d, h)| format!("{d} via {h} cost {}", routes.cost[d]))
                .collect();
            info!(routes = ?summary, "mesh routes");
            self.routes = routes;
        }
        self.sync_addresses();
    }

    /// Installs remote consumers (anycast) and remote presence (multicast)
    /// on every address with receivers on other routers.
    fn sync_addresses(&mut self) {
        let neighbors: BTreeMap<String, (TaskHandle, LinkId)> = self
            .neighbors
            .iter()
            .filter(|(_, n)| n.two_way)
            .map(|(id, n)| (id.clone(), (n.conn.clone(), n.data)))
            .collect();
        // Anycast: address → neighbour → the cost of its nearest receivers.
        let mut wanted: HashMap<AddressKey, BTreeMap<String, u32>> = HashMap::new();
        let mut multicast: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
        let mut brokers: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for (router, rec) in &self.mardb {
            if *router == self.id {
                continue;
            }
            let Some(hop) = self.routes.next_hop.get(router) else {
                continue;
            };
            for key in &rec.addresses {
                if key.space == BROKERS_SPACE {
                    let cost = self.routes.cost.get(router).copied().unwrap_or(u64::MAX);
                    let e = brokers
                        .entry(key.address.clone())
                        .or_insert((cost, router.clone()));
                    if (cost, router) < (e.0, &e.1) {
                        *e = (cost, router.clone());
                    }
                } else if key.multicast {
                    multicast
                        .entry((key.space.clone(), key.address.clone()))
                        .or_default()
                        .insert(router.clone());
                    wanted.entry(key.clone()).or_default();
                } else if neighbors.contains_key(hop) {
                    let cost = self
                        .routes
                        .cost
                        .get(router)
                        .map_or(1, |c| (*c).min(u64::from(u32::MAX)) as u32);
                    let e = wanted
                        .entry(key.clone())
                        .or_default()
                        .entry(hop.clone())
                        .or_insert(cost);
                    *e = (*e).min(cost);
                }
            }
        }
        // Edge routers attached here are reached directly.
        let mut edge_multicast: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
        for (edge, keys) in &self.edge_mars {
            if !neighbors.contains_key(edge) {
                continue;
            }
            for key in keys {
                if key.space == BROKERS_SPACE {
                    continue;
                }
                if key.multicast {
                    edge_multicast
                        .entry((key.space.clone(), key.address.clone()))
                        .or_default()
                        .insert(edge.clone());
                }
                let w = wanted.entry(key.clone()).or_default();
                if !key.multicast {
                    w.insert(edge.clone(), 1);
                }
            }
        }
        self.tell_edges();
        let keys: BTreeSet<AddressKey> =
            wanted.keys().chain(self.applied.keys()).cloned().collect();
        for key in keys {
            let new = wanted.get(&key).cloned().unwrap_or_default();
            let old = self.applied.get(&key).cloned().unwrap_or_default();
            let kind = if key.multicast {
                AddressType::Multicast
            } else {
                AddressType::Anycast
            };
            // Under the table's lock: the state cannot be forgotten
            // between being found and getting its remote receivers.
            let (st, ()) = self.table.with(&key.space, &key.address, kind, |st| {
                if key.multicast {
                    st.set_remote_multicast(wanted.contains_key(&key));
                } else {
                    for n in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
                        let via = new.get(n).and_then(|cost| {
                            neighbors.get(n).map(|(h, l)| ((h.core.clone(), *l), *cost))
                        });
                        st.set_remote(n, via, self.window);
                    }
                }
            });
            if wanted.contains_key(&key) {
                self.applied.insert(key, new);
            } else {
                self.applied.remove(&key);
                self.table.gc(&st);
            }
        }
        let mut trees = HashMap::new();
        for id in self.lsdb.keys() {
            trees.insert(id.clone(), routes::tree_parents(id, &self.lsdb));
        }
        let snap = Snapshot {
            id: self.id.clone(),
            neighbors,
            routes: self
                .routes
                .next_hop
                .iter()
                .map(|(d, h)| (d.clone(), (h.clone(), self.routes.cost[d])))
                .collect(),
            multicast,
            trees,
            edge_multicast,
            brokers: brokers.into_iter().map(|(b, (_, r))| (b, r)).collect(),
        };
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
    }
}
