//! Link routing (DESIGN.md "Data flow"): a client's attach to a
//! broker-held address (queue, topic, subscription) travels hop by hop to
//! the broker that holds it, and each hop pairs the link it was asked for
//! with the link it attached onward. From then on every transfer, flow,
//! disposition and detach is relayed one to one, so the client sees the
//! broker's own semantics: its termini, filters, durability and outcomes.
//!
//! Brokers join as route containers: a broker connects to a router
//! offering [`ROUTE_CONTAINER_CAPABILITY`]; the router attaches links to it
//! and floods through the mesh that the broker is behind it. Which broker
//! holds an address is decided by [`place`] from the brokers the mesh
//! knows, the same way on every router.
//!
//! Credit travels as a *limit*: the number of deliveries, counted from the
//! start of the link, the receiving end allows. Every hop counts the same
//! deliveries, so each grants its neighbour `limit - what passed here`.

use std::sync::Arc;

use flotilla_amqp::connection::{amqp_error, Event, LinkId};
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody, Fields, Role};
use flotilla_amqp::types::messaging::{DeliveryState, TargetArchetype};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::primitives::{Symbol, Value};
use flotilla_core::resources::AddressType;
use tracing::{debug, info, warn};

use crate::connection::{ConnectionTask, Lost, TaskHandle, Unsettled};
use crate::core::{Origin, Routed};

/// Offered on Open by a broker that wants routers to route links to it.
pub const ROUTE_CONTAINER_CAPABILITY: &str = "flotilla.route-container";
/// The pseudo address space in which routers flood where brokers are.
pub const BROKERS_SPACE: &str = "$brokers";

/// Attach properties a routed link carries (set by routers; a broker
/// trusts them only on its own connection to a router).
pub const PROP_SPACE: &str = "flotilla:space";
pub const PROP_TYPE: &str = "flotilla:type";
pub const PROP_CONTAINER: &str = "flotilla:container-id";
pub const PROP_LINK_NAME: &str = "flotilla:link-name";
pub const PROP_BROKER: &str = "flotilla:broker";
pub const PROP_HOPS: &str = "flotilla:hops";
pub const PROP_TOPIC: &str = "flotilla:topic";
/// The user a client's link acts for (set by the router that
/// authenticated the client; the lwt-service authorizes wills by it).
pub const PROP_USER: &str = "flotilla:user";
/// Set when the link is an MQTT gateway's: the gateway's container id.
pub const PROP_GATEWAY: &str = "flotilla:gateway";
/// Wills are registered by attaching a sender to this address, in any
/// space; the link goes to the last-will service (DESIGN.md "MQTT gateway
/// and last-will service").
pub const LWT_ADDRESS: &str = "$lwt";
/// A token user's claims on a will link (JSON).
pub const PROP_CLAIMS: &str = "flotilla:claims";
/// The container id of the last-will service, as a route container.
pub const LWT_CONTAINER: &str = "$lwt";
/// The space an operator's tool's routed links name (no tenant's space
/// can be called this: space names are DNS labels).
pub const OPERATORS_SPACE: &str = "$mesh";
/// The condition of a routed link's detach when the client's connection
/// ended without its Close (lost, timed out, closed for an error, or its
/// router shut down): the last-will service publishes the link's will.
pub const CONNECTION_LOST: &str = "flotilla:connection-lost";
const MAX_HOPS: u32 = 16;

/// Where a routed link goes and on whose behalf.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    pub space: String,
    pub kind: AddressType,
    /// The address the client attached to.
    pub address: String,
    /// What placement hashes: the declared address (a topic pattern) or
    /// the address itself.
    pub placed_by: String,
    /// The client's container-id and link name (durable subscriptions
    /// are named by them).
    pub container: String,
    pub link_name: String,
    /// The broker, once placed.
    pub broker: Option<String>,
    pub hops: u32,
    /// `subscription` addresses: the topic subscribed to.
    pub topic: Option<String>,
    /// The client's user (links to the last-will service).
    pub user: Option<String>,
    /// The gateway's container id when the link is an MQTT gateway's.
    pub gateway: Option<String>,
    /// A token user's claims (those its space reads, JSON), for the
    /// last-will service: it authorizes such a user's wills by them.
    pub claims: Option<String>,
}

impl RouteInfo {
    /// The attach properties for the next hop: the client's own, minus
    /// anything claiming to be ours, plus the route.
    fn to_properties(&self, client: Option<&Fields>) -> Fields {
        let mut f = Fields::default();
        if let Some(c) = client {
            for (k, v) in c.iter() {
                if !k.as_str().starts_with("flotilla:") {
                    f.insert(k.clone(), v.clone());
                }
            }
        }
        let s = |v: &str| Value::String(v.to_string());
        f.insert(Symbol::from(PROP_SPACE), s(&self.space));
        f.insert(Symbol::from(PROP_TYPE), s(kind_name(self.kind)));
        f.insert(Symbol::from(PROP_CONTAINER), s(&self.container));
        f.insert(Symbol::from(PROP_LINK_NAME), s(&self.link_name));
        if let Some(b) = &self.broker {
            f.insert(Symbol::from(PROP_BROKER), s(b));
        }
        f.insert(Symbol::from(PROP_HOPS), Value::Uint(self.hops));
        if let Some(t) = &self.topic {
            f.insert(Symbol::from(PROP_TOPIC), s(t));
        }
        if let Some(u) = &self.user {
            f.insert(Symbol::from(PROP_USER), s(u));
        }
        if let Some(g) = &self.gateway {
            f.insert(Symbol::from(PROP_GATEWAY), s(g));
        }
        if let Some(c) = &self.claims {
            f.insert(Symbol::from(PROP_CLAIMS), s(c));
        }
        f
    }

    /// The route of an attach that came from a neighbour router.
    pub fn from_attach(a: &Attach) -> Option<RouteInfo> {
        let p = a.properties.as_ref()?;
        let get = |k: &str| match p.get(&Symbol::from(k)) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let kind = match get(PROP_TYPE)?.as_str() {
            "queue" => AddressType::Queue,
            "topic" => AddressType::Topic,
            "subscription" => AddressType::Subscription,
            _ => return None,
        };
        let address = terminus_address(a)?;
        Some(RouteInfo {
            space: get(PROP_SPACE)?,
            kind,
            placed_by: address.clone(),
            address,
            container: get(PROP_CONTAINER).unwrap_or_default(),
            link_name: get(PROP_LINK_NAME).unwrap_or_else(|| a.name.clone()),
            broker: get(PROP_BROKER),
            topic: get(PROP_TOPIC),
            user: get(PROP_USER),
            gateway: get(PROP_GATEWAY),
            claims: get(PROP_CLAIMS),
            hops: match p.get(&Symbol::from(PROP_HOPS)) {
                Some(Value::Uint(n)) => *n,
                _ => 0,
            },
        })
    }
}

pub fn kind_name(k: AddressType) -> &'static str {
    match k {
        AddressType::Anycast => "anycast",
        AddressType::Multicast => "multicast",
        AddressType::Queue => "queue",
        AddressType::Topic => "topic",
        AddressType::Subscription => "subscription",
    }
}

/// The address an attach names: the source's for a receiver, the
/// target's for a sender.
pub fn terminus_address(a: &Attach) -> Option<String> {
    match a.role {
        Role::Receiver => match a.source.as_deref() {
            Some(s) if s.address.is_some() || s.dynamic => s.address.clone(),
            _ => Some(REATTACH_ADDRESS.to_string()),
        },
        Role::Sender => match a.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            Some(TargetArchetype::Coordinator(_)) => Some(COORDINATOR_ADDRESS.to_string()),
            #[allow(unreachable_patterns)]
            _ => None,
        },
    }
}

/// What a routed transaction coordinator link is called in routing (it
/// has no address: its target is a `coordinator`).
pub const COORDINATOR_ADDRESS: &str = "$coordinator";
/// What a receiver with no source address is called in routing: it asks
/// a broker for its durable subscription by link name alone.
pub const REATTACH_ADDRESS: &str = "$reattach";

pub use flotilla_core::placement::place;

/// The brokers placement spreads addresses over (DESIGN.md "Broker"):
/// every broker seen since this router started and, following a console,
/// every broker it has registered. A broker that is away keeps its
/// addresses (attaches to them are refused, not moved, so its messages are
/// not stranded) until it is retired: the console forgets it (through its
/// API, or after `--retire-brokers-after`), or it has been away longer than
/// this router's `--retire-brokers-after`.
#[derive(Debug, Default)]
pub(crate) struct KnownBrokers {
    /// Broker → when it was last seen connected, here or in the mesh.
    seen: std::collections::BTreeMap<String, std::time::Instant>,
}

impl KnownBrokers {
    /// Brings the set up to date with the brokers `present` now.
    pub(crate) fn refresh(
        &mut self,
        present: &std::collections::BTreeSet<String>,
        registry: Option<&std::collections::BTreeSet<String>>,
        retire_after: Option<std::time::Duration>,
    ) {
        let now = std::time::Instant::now();
        for b in present {
            self.seen.insert(b.clone(), now);
        }
        if let Some(r) = registry {
            for b in r {
                self.seen.entry(b.clone()).or_insert(now);
            }
            self.seen.retain(|b, _| {
                let keep = r.contains(b) || present.contains(b);
                if !keep {
                    info!(broker = %b, "broker retired by the console: its addresses move to the other brokers");
                }
                keep
            });
        }
        if let Some(d) = retire_after {
            self.seen.retain(|b, at| {
                let keep = now.duration_since(*at) <= d;
                if !keep {
                    info!(broker = %b, away_s = d.as_secs(), "broker away too long: retired, its addresses move to the other brokers");
                }
                keep
            });
        }
    }

    /// The brokers addresses are placed over (never the last-will
    /// service, a route container for `$lwt` only).
    pub(crate) fn ids(&self) -> impl Iterator<Item = &String> {
        self.seen.keys().filter(|b| b.as_str() != LWT_CONTAINER)
    }
}

impl crate::Shared {
    /// The brokers (and route containers) connected to this router.
    pub(crate) fn local_brokers(&self) -> std::collections::BTreeSet<String> {
        self.brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Brokers connected here or anywhere in the mesh now.
    pub(crate) fn present_brokers(&self) -> std::collections::BTreeSet<String> {
        let mut present = self.local_brokers();
        if let Some(m) = &self.mesh {
            present.extend(m.snapshot().brokers.keys().cloned());
        }
        present
    }

    /// Refreshes the placement set (every second, and before placing).
    pub(crate) fn refresh_brokers(&self) {
        let present = self.present_brokers();
        let t = self.policy.tenancy();
        self.known_brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh(&present, t.brokers.as_ref(), self.cfg.retire_brokers_after);
    }
}

/// Keeps the placement set up to date, so a broker's time away is
/// counted from when it left.
pub(crate) async fn watch_brokers(shared: Arc<crate::Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shared.closing.cancelled() => return,
            _ = tick.tick() => shared.refresh_brokers(),
        }
    }
}

/// Asks a connection task to attach onward and pair the new link with
/// `from_link` on `from`.
#[derive(Debug)]
pub struct RouteReq {
    /// The attach as the client sent it (its role is the one the onward
    /// link takes: we face the next hop as the client faces us).
    pub attach: Attach,
    pub info: RouteInfo,
    pub from: TaskHandle,
    pub from_link: LinkId,
}

impl RouteEvent {
    /// The link of ours it is about (none for an attach to make).
    fn link(&self) -> Option<LinkId> {
        match self {
            RouteEvent::Attach(_) => None,
            RouteEvent::Answer { link, .. }
            | RouteEvent::Refused { link, .. }
            | RouteEvent::Flow { link, .. }
            | RouteEvent::Drained { link }
            | RouteEvent::Transfer { link, .. }
            | RouteEvent::Detach { link, .. } => Some(*link),
        }
    }
}

/// What connection tasks on a route tell each other.
#[derive(Debug)]
pub enum RouteEvent {
    /// Attach onward and pair.
    Attach(Box<RouteReq>),
    /// The far end answered the onward attach of our `link`.
    Answer {
        link: LinkId,
        peer_link: LinkId,
        answer: Box<Attach>,
    },
    /// No route: refuse the attach of our `link`.
    Refused { link: LinkId, error: AmqpErrorBody },
    /// The receiving end allows `limit` deliveries on the route in all.
    Flow {
        link: LinkId,
        limit: u32,
        drain: bool,
    },
    /// The sending end finished a drain.
    Drained { link: LinkId },
    /// A message to send on our routed `link`.
    /// A message, with its transfer's state when it has one (posted under
    /// a transaction: the broker must see the `transactional-state`).
    Transfer {
        link: LinkId,
        msg: Routed,
        state: Option<Box<DeliveryState>>,
    },
    /// The paired link detached.
    Detach {
        link: LinkId,
        closed: bool,
        error: Option<AmqpErrorBody>,
    },
}

/// One of our links paired with a link on another connection task.
pub(crate) struct RouteLink {
    peer: TaskHandle,
    /// The paired link; unknown on the client's side until the far end
    /// answers.
    peer_link: Option<LinkId>,
    /// We answered (or started) the attach on our side.
    answered: bool,
    /// Our side detached before the far end answered: detach theirs when
    /// the answer comes.
    gone: bool,
    /// The link's delivery count when it began (credit limits count from it).
    base: u32,
    /// A drain we passed on, not yet finished.
    draining: bool,
    /// A credit limit that came before the pairing was complete.
    early_flow: Option<(u32, bool)>,
    /// The link faces the client (we were asked to route it), not the
    /// broker (we attached it onward).
    faces_client: bool,
    /// A client's link: the address and what the client does with it, to
    /// check again when the tenancy changes.
    guard: Option<(String, flotilla_core::resources::Operation)>,
    /// A transaction coordinator's link, towards the broker: a declare or
    /// discharge lost on it is in doubt, and must not look settled.
    coordinator: bool,
    /// A client's link, listed for the console while it is routed.
    _listed: Option<crate::stat::Listed>,
    /// The broker at the end of the route, once placed (here, or by the
    /// router that answered: `flotilla:broker` on its answer). A client's
    /// transaction is bound to the broker of its first link.
    pub(crate) broker: Option<String>,
}

impl RouteLink {
    fn new(peer: TaskHandle, peer_link: Option<LinkId>, answered: bool, base: u32) -> Self {
        RouteLink {
            peer,
            peer_link,
            answered,
            coordinator: false,
            _listed: None,
            broker: None,
            gone: false,
            base,
            draining: false,
            early_flow: None,
            faces_client: !answered,
            guard: None,
        }
    }
}

/// Per-connection link-routing state.
#[derive(Default)]
pub(crate) struct Routes {
    pub(crate) links: std::collections::HashMap<LinkId, RouteLink>,
    /// The session we attach routed links on, once it is begun (and
    /// answered, on a broker's connection).
    pub(crate) session: Option<u16>,
    pub(crate) begun: Option<u16>,
    /// Requests waiting for that session.
    pending: Vec<RouteReq>,
    /// Counts outstanding deliveries for the shared `Unsettled` record.
    outstanding: Arc<std::sync::atomic::AtomicU32>,
    next_name: u64,
}

impl ConnectionTask {
    /// True when `link` is one of ours in a route.
    pub(crate) fn is_routed(&self, link: LinkId) -> bool {
        self.routes.links.contains_key(&link)
    }

    /// The connection of the next hop towards the broker for `info`
    /// (placing the address first if no hop before us did).
    pub(crate) fn route_next_hop(&self, info: &mut RouteInfo) -> Option<TaskHandle> {
        let brokers = self
            .shared
            .brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let snap = self.shared.mesh.as_ref().map(|m| m.snapshot());
        if info.broker.is_none() {
            self.shared.refresh_brokers();
            let known = self
                .shared
                .known_brokers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            info.broker = place(&info.space, &info.placed_by, known.ids());
        }
        let via_mesh = |b: &String| {
            let s = snap.as_ref()?;
            let (hop, _) = s.routes.get(s.brokers.get(b)?)?;
            s.neighbors.get(hop).map(|(c, _)| c.clone())
        };
        // An edge router knows no brokers: its uplink places the address
        // (and routes to the broker named).
        let uplink = || {
            let s = snap.as_ref().filter(|_| self.shared.cfg.edge)?;
            s.neighbors.values().next().map(|(c, _)| c.clone())
        };
        match &info.broker {
            Some(b) => brokers
                .get(b)
                .cloned()
                .or_else(|| via_mesh(b))
                .or_else(uplink),
            None => uplink(),
        }
    }

    /// Handles an engine event on one of our routed links (an answer,
    /// credit, a message, a detach); gives back any other event.
    pub(crate) fn route_event_on_link(&mut self, e: Event) -> Option<Event> {
        match e {
            Event::Attach {
                link,
                attach,
                reply: true,
            } if self.is_routed(link) => self.route_on_answer(link, &attach),
            Event::Flow { link } if self.is_routed(link) => self.route_on_flow(link),
            Event::Delivery { link, delivery } if self.is_routed(link) => {
                self.route_on_delivery(link, delivery)
            }
            Event::Detach {
                link,
                closed,
                error,
                unsettled,
            } if self.is_routed(link) => self.route_on_detach(link, closed, error, unsettled),
            other => return Some(other),
        }
        None
    }

    /// A client (or a neighbour router) attached `link` to a broker-held
    /// address: ask the next hop to attach onward.
    pub(crate) fn route_attach(&mut self, link: LinkId, attach: Attach, mut info: RouteInfo) {
        let hop = if info.hops >= MAX_HOPS {
            None
        } else {
            self.route_next_hop(&mut info)
        };
        let Some(hop) = hop else {
            let e = amqp_error(
                AmqpError::NotFound,
                format!(
                    "no broker reachable for {} {:?} in address space {:?}{}",
                    kind_name(info.kind),
                    info.address,
                    info.space,
                    info.broker
                        .as_deref()
                        .map(|b| format!(" (it is held by broker {b:?})"))
                        .unwrap_or_default()
                ),
            );
            warn!(conn.id = self.id.0, address = %info.address, "attach refused: no broker");
            return self.conn.refuse_attach(link, e);
        };
        let base = self.conn.link(link).map_or(0, |l| l.delivery_count);
        debug!(conn.id = self.id.0, address = %info.address, broker = info.broker.as_deref().unwrap_or("?"), "routing link");
        let mut r = RouteLink::new(hop.clone(), None, false, base);
        r.broker = info.broker.clone();
        if !self.is_peer()
            && info.address != COORDINATOR_ADDRESS
            && info.address != REATTACH_ADDRESS
        {
            let op = match attach.role {
                Role::Receiver => flotilla_core::resources::Operation::Recv,
                Role::Sender => flotilla_core::resources::Operation::Send,
            };
            r.guard = Some((info.address.clone(), op));
            if matches!(self.role, crate::connection::ConnRole::Client(_)) {
                let sends = op == flotilla_core::resources::Operation::Send;
                r._listed = Some(crate::stat::Listed::new(
                    &self.routed,
                    link.0,
                    info.address.clone(),
                    sends,
                ));
            }
        }
        self.routes.links.insert(link, r);
        let req = RouteReq {
            attach,
            info,
            from: self.handle.clone(),
            from_link: link,
        };
        if !hop.route(RouteEvent::Attach(Box::new(req))) {
            self.routes.links.remove(&link);
            self.conn.refuse_attach(
                link,
                amqp_error(AmqpError::NotFound, "the route to the broker just closed"),
            );
        }
    }

    /// Another task asks us (a broker's connection, or one to a neighbour
    /// router) to attach onward.
    pub(crate) fn route_on_request(&mut self, mut req: RouteReq) {
        let usable = self.container().is_some() || self.is_peer();
        let Some(ch) = self.routes.session.filter(|_| usable) else {
            if usable && self.closing.is_none() {
                self.routes.pending.push(req);
            } else {
                req.from.route(RouteEvent::Refused {
                    link: req.from_link,
                    error: amqp_error(AmqpError::NotFound, "the route to the broker closed"),
                });
            }
            return;
        };
        if self.is_peer() {
            req.info.hops += 1;
        }
        self.routes.next_name += 1;
        let mut a = req.attach;
        let coordinator = flotilla_amqp::connection::is_coordinator(&a);
        a.properties = Some(req.info.to_properties(a.properties.as_ref()));
        a.name = format!("{}.{}", self.shared.cfg.container_id, self.routes.next_name);
        let link = self.conn.attach_as(ch, a);
        self.routes.links.insert(
            link,
            RouteLink {
                coordinator,
                broker: req.info.broker,
                ..RouteLink::new(req.from, Some(req.from_link), true, 0)
            },
        );
    }

    /// The far end answered our onward attach: answer the one we were asked for.
    pub(crate) fn route_on_answer(&mut self, link: LinkId, answer: &Attach) {
        let base = self.conn.link(link).map_or(0, |l| l.delivery_count);
        let Some(r) = self.routes.links.get_mut(&link) else {
            return;
        };
        r.base = base;
        let Some(peer_link) = r.peer_link else {
            return;
        };
        let mut answer = answer.clone();
        if let Some(b) = &r.broker {
            // Which broker it is, for the hops back to the client (an edge
            // router does not place addresses itself).
            answer
                .properties
                .get_or_insert_with(Fields::default)
                .insert(Symbol::from(PROP_BROKER), Value::String(b.clone()));
        }
        let ev = RouteEvent::Answer {
            link: peer_link,
            peer_link: link,
            answer: Box::new(answer),
        };
        if !r.peer.route(ev) {
            self.routes.links.remove(&link);
            self.conn.detach(link, None);
        }
    }

    /// The far end's answer reached the client's side.
    fn route_answered(&mut self, link: LinkId, peer_link: LinkId, mut answer: Attach) {
        let Some(r) = self.routes.links.get_mut(&link) else {
            return;
        };
        r.peer_link = Some(peer_link);
        if let Some(Value::String(b)) = answer
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from(PROP_BROKER)))
        {
            r.broker = Some(b.clone());
        }
        if r.gone {
            let peer = r.peer.clone();
            self.routes.links.remove(&link);
            peer.route(RouteEvent::Detach {
                link: peer_link,
                closed: true,
                error: None,
            });
            return;
        }
        r.answered = true;
        let early = r.early_flow.take();
        let peer = r.peer.clone();
        // The broker's link properties stay behind, but for the MQTT
        // gateway: whether its session was resumed, with its state.
        // The broker's link properties stay behind, but for the MQTT
        // gateway (whether its session was resumed, with its state) and a
        // neighbour router (which broker it is).
        let keep: &[&str] = match &self.role {
            crate::connection::ConnRole::Gateway => &["flotilla:resumed", "flotilla:session-meta"],
            crate::connection::ConnRole::Peer(_) => &[PROP_BROKER],
            _ => &[],
        };
        answer.properties = answer
            .properties
            .take()
            .filter(|_| !keep.is_empty())
            .map(|p| {
                let mut kept = Fields::default();
                for (k, v) in p.iter() {
                    if keep.contains(&k.as_str()) {
                        kept.insert(k.clone(), v.clone());
                    }
                }
                kept
            });
        self.conn.accept_attach_as(link, &answer);
        if let Some((limit, drain)) = early {
            match self.conn.link(link).map(|l| l.role.clone()) {
                // The client's credit, given before the answer: on to the broker.
                Some(Role::Sender) => {
                    peer.route(RouteEvent::Flow {
                        link: peer_link,
                        limit,
                        drain,
                    });
                }
                // The broker's credit, for our client's sender.
                _ => self.route_send_limit(link, limit, drain),
            }
        }
    }

    /// Credit or drain changed on a routed link.
    pub(crate) fn route_on_flow(&mut self, link: LinkId) {
        let Some(l) = self.conn.link(link) else {
            return;
        };
        let (role, dc, credit, drain) = (l.role.clone(), l.delivery_count, l.credit, l.drain);
        let Some(r) = self.routes.links.get_mut(&link) else {
            return;
        };
        match role {
            // The far receiver's credit: pass the limit towards the sender.
            Role::Sender => {
                let limit = dc.wrapping_sub(r.base).wrapping_add(credit);
                match r.peer_link {
                    Some(pl) if r.answered => {
                        r.peer.route(RouteEvent::Flow {
                            link: pl,
                            limit,
                            drain,
                        });
                    }
                    _ => r.early_flow = Some((limit, drain)),
                }
            }
            // The sender's delivery count: a drain ends when no credit is left.
            Role::Receiver => {
                if r.draining && credit == 0 {
                    r.draining = false;
                    if let Some(pl) = r.peer_link {
                        r.peer.route(RouteEvent::Drained { link: pl });
                    }
                }
            }
        }
    }

    /// Grants our sender the credit left under `limit`.
    fn route_send_limit(&mut self, link: LinkId, limit: u32, drain: bool) {
        let Some(l) = self.conn.link(link) else {
            return;
        };
        let Some(r) = self.routes.links.get_mut(&link) else {
            return;
        };
        if !r.answered {
            r.early_flow = Some((limit, drain));
            return;
        }
        let passed = l.delivery_count.wrapping_sub(r.base);
        let c = limit.wrapping_sub(passed);
        // A stopping router's clients send nothing new.
        let stopping = self.revoked && matches!(self.role, crate::connection::ConnRole::Client(_));
        let credit = if c > 1 << 31 || stopping { 0 } else { c };
        r.draining = drain;
        self.conn.flow(link, credit, drain);
    }

    /// A whole message on a routed link: to the paired link.
    pub(crate) fn route_on_delivery(
        &mut self,
        link: LinkId,
        d: flotilla_amqp::connection::Delivery,
    ) {
        self.traffic
            .r#in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = self.over_message_quota(d.payload.len()) {
            self.txn_dropped(
                d.state.as_ref(),
                "a message under it was over the space's message size quota",
            );
            return self.reject(&d.id, d.settled, e);
        }
        let Some(d) = self.txn_transfer(link, d) else {
            return;
        };
        let origin = (!d.settled).then(|| Origin {
            conn: self.handle.core.clone(),
            delivery: d.id,
        });
        let msg = Routed {
            payload: d.payload,
            settled: d.settled,
            origin,
            sender: None,
            hops: None,
        };
        let sent = match self.routes.links.get(&link) {
            Some(RouteLink {
                peer,
                peer_link: Some(pl),
                ..
            }) => {
                let peer = peer.clone();
                let pl = *pl;
                let back = msg.clone();
                let state = d.state.map(Box::new);
                if peer.route(RouteEvent::Transfer {
                    link: pl,
                    msg,
                    state,
                }) {
                    None
                } else {
                    Some(back)
                }
            }
            _ => {
                self.txn_dropped(
                    d.state.as_ref(),
                    "a message under it came on a link whose route was gone",
                );
                Some(msg)
            }
        };
        if let Some(m) = sent {
            m.release();
        }
    }

    fn route_send(&mut self, link: LinkId, msg: Routed, state: Option<Box<DeliveryState>>) {
        if !self.is_routed(link) {
            return msg.release();
        }
        // Towards the client, a delivery lost with its link goes back to
        // the broker by that link's detach; towards the broker, it may
        // have been stored.
        let lost = match self.routes.links.get(&link) {
            Some(r) if r.faces_client => Lost::Silent,
            Some(r) if r.coordinator => Lost::Transaction,
            _ => Lost::InDoubt,
        };
        let token = self.next_token;
        let sent =
            self.conn
                .send_with_state(link, &[&msg.payload], msg.settled, token, state.as_deref());
        if sent {
            self.next_token += 1;
            self.traffic
                .out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !msg.settled {
                self.routes
                    .outstanding
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.unsettled.insert(
                    token,
                    Unsettled {
                        origin: msg.origin,
                        outstanding: self.routes.outstanding.clone(),
                        lost,
                        receiver: None,
                    },
                );
            }
        } else {
            msg.release();
        }
    }

    /// The routed link `link` was detached by our peer: pass it on.
    pub(crate) fn route_on_detach(
        &mut self,
        link: LinkId,
        closed: bool,
        error: Option<AmqpErrorBody>,
        unsettled: Vec<u64>,
    ) {
        self.release_tokens(unsettled);
        let Some(mut r) = self.routes.links.remove(&link) else {
            return;
        };
        match r.peer_link {
            Some(pl) => {
                r.peer.route(RouteEvent::Detach {
                    link: pl,
                    closed,
                    error,
                });
            }
            // Not answered yet: finish when the answer comes.
            None => {
                r.gone = true;
                self.routes.links.insert(link, r);
            }
        }
    }

    /// Deliveries of ours that will never settle: their senders hear
    /// what [`Lost`] says.
    pub(crate) fn release_tokens(&mut self, tokens: Vec<u64>) {
        for token in tokens {
            if let Some(u) = self.unsettled.remove(&token) {
                u.outstanding
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                u.give_back();
            }
        }
    }

    /// The other side of a route detached: detach ours the same way.
    fn route_detached(&mut self, link: LinkId, closed: bool, error: Option<AmqpErrorBody>) {
        let Some(r) = self.routes.links.remove(&link) else {
            return;
        };
        if r.answered {
            let tokens = self.conn.detach_with(link, closed, error);
            self.release_tokens(tokens);
        } else {
            let e =
                error.unwrap_or_else(|| amqp_error(AmqpError::NotFound, "refused by the broker"));
            self.conn.refuse_attach(link, e);
        }
    }

    /// Events for link routing from other connection tasks.
    pub(crate) fn route_event(&mut self, ev: RouteEvent) {
        if ev.link().is_some_and(|l| self.is_onward(l)) {
            return self.txn_route_event(ev);
        }
        match ev {
            RouteEvent::Attach(req) => self.route_on_request(*req),
            RouteEvent::Answer {
                link,
                peer_link,
                answer,
            } => self.route_answered(link, peer_link, *answer),
            RouteEvent::Refused { link, error } if self.routes.links.remove(&link).is_some() => {
                self.conn.refuse_attach(link, error);
            }
            RouteEvent::Flow { link, limit, drain } => {
                self.route_send_limit(link, limit, drain);
            }
            RouteEvent::Drained { link } if self.is_routed(link) => self.conn.drained(link),
            RouteEvent::Transfer { link, msg, state } => self.route_send(link, msg, state),
            RouteEvent::Detach {
                link,
                closed,
                error,
            } => self.route_detached(link, closed, error),
            _ => {}
        }
    }

    /// The tenancy changed: a client's routed link whose address is gone
    /// (or no longer a broker's, or no longer allowed) is detached, and so
    /// is its pair towards the broker.
    pub(crate) fn route_recheck(&mut self, p: &crate::policy::Principal) {
        let t = self.shared.policy.tenancy();
        let space = t.spaces.get(&p.space);
        let gone: Vec<(LinkId, String)> = self
            .routes
            .links
            .iter()
            .filter_map(|(link, r)| {
                let (address, op) = r.guard.as_ref()?;
                let why = if !p.may(*op, address) {
                    format!("no longer allowed to use {address:?}")
                } else {
                    match space.and_then(|s| s.declaration(address)) {
                        Some((k, _)) if !k.is_direct() => return None,
                        // Undeclared, allowed by capability: still there.
                        Some(_) if space.is_some_and(|s| s.declared_as(address).is_none()) => {
                            return None
                        }
                        _ => format!("address {address:?} was deleted"),
                    }
                };
                Some((*link, why))
            })
            .collect();
        for (link, why) in gone {
            info!(conn.id = self.id.0, link = link.0, reason = %why, "detaching routed link");
            let Some(mut r) = self.routes.links.remove(&link) else {
                continue;
            };
            match r.peer_link {
                Some(pl) => {
                    r.peer.route(RouteEvent::Detach {
                        link: pl,
                        closed: false,
                        error: None,
                    });
                }
                // Its answer is still coming: detach the far side then.
                None => {
                    r.gone = true;
                    r.guard = None;
                    self.routes.links.insert(link, r);
                    let e = amqp_error(AmqpError::NotFound, why);
                    self.conn.refuse_attach(link, e);
                    continue;
                }
            }
            let e = amqp_error(AmqpError::NotFound, why);
            if r.answered {
                let tokens = self.conn.detach(link, Some(e));
                self.release_tokens(tokens);
            } else {
                self.conn.refuse_attach(link, e);
            }
        }
    }

    /// A session to attach routed links on is ready: send what waited.
    pub(crate) fn route_session_ready(&mut self, ch: u16) {
        self.routes.session = Some(ch);
        for req in std::mem::take(&mut self.routes.pending) {
            self.route_on_request(req);
        }
    }

    /// This connection is a broker's: begin the session routed links use
    /// and tell the mesh the broker is here.
    pub(crate) fn route_container_open(&mut self, container: &str) {
        info!(
            conn.id = self.id.0,
            broker = container,
            "broker connected (route container)"
        );
        self.role = crate::connection::ConnRole::RouteContainer(container.to_string());
        self.shared
            .brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container.to_string(), self.handle.clone());
        if let Some(m) = &self.shared.mesh {
            m.send(crate::mesh::MeshEvent::LocalAddresses);
        }
        self.routes.begun = self.conn.begin();
    }

    /// The connection ends: every paired link hears of it.
    pub(crate) fn route_cleanup(&mut self) {
        let client = self.container().is_none() && !self.is_peer();
        let what = if self.container().is_some() {
            "the broker's connection to the router closed"
        } else if self.is_peer() {
            "the connection between routers on the route closed"
        } else {
            "the client's connection closed"
        };
        // Towards the broker (or the last-will service), a client's links
        // say how its connection ended: with its Close, a plain detach;
        // otherwise `flotilla:connection-lost` (its will goes out).
        let error = if !client {
            Some(amqp_error(AmqpError::IllegalState, what))
        } else if self.closing == Some(crate::connection::CloseReason::PeerClosed) {
            None
        } else {
            Some(AmqpErrorBody::new(
                flotilla_amqp::types::definitions::ErrorCondition::Custom(Symbol::from(
                    CONNECTION_LOST,
                )),
                Some("the client's connection ended without its Close".to_string()),
                None,
            ))
        };
        for (_, r) in self.routes.links.drain() {
            if let Some(pl) = r.peer_link {
                r.peer.route(RouteEvent::Detach {
                    link: pl,
                    closed: false,
                    error: error.clone(),
                });
            }
        }
        for req in std::mem::take(&mut self.routes.pending) {
            req.from.route(RouteEvent::Refused {
                link: req.from_link,
                error: amqp_error(AmqpError::NotFound, what),
            });
        }
        if let Some(c) = self.container().map(str::to_string) {
            let mut b = self
                .shared
                .brokers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if b.get(&c).is_some_and(|h| h.id() == self.id) {
                b.remove(&c);
            }
            drop(b);
            info!(conn.id = self.id.0, broker = %c, "broker disconnected");
            if let Some(m) = &self.shared.mesh {
                m.send(crate::mesh::MeshEvent::LocalAddresses);
            }
        }
    }
}
