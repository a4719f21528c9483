//! One task per connection — a client's, or the broker's own connection to
//! a router that routes links here. Publishes to a queue go to the journal
//! and, once durable, to their queue and back to the producer as
//! `accepted`; publishes to a topic go to the queue task, which stores
//! them for the subscriptions that take them. Consumers' credit and
//! settlements go to the queue task, and the deliveries it hands out go
//! onto the socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flotilla_amqp::connection::{
    amqp_error, AttachReply, Connection, ConnectionConfig, Event, LinkId,
};
use flotilla_amqp::driver::{Driver, DriverConfig, Ended, Handler};
use flotilla_amqp::message::{self, MessageParts};
use flotilla_amqp::policy::{Policy, Principal};
use flotilla_amqp::transport::{BoxIo, Identity};
use flotilla_amqp::types::definitions::{
    AmqpError, Error as AmqpErrorBody, Role, SenderSettleMode,
};
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, DistributionMode, Rejected, Source, TargetArchetype,
    TerminusDurability, TerminusExpiryPolicy,
};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::primitives::{Symbol, Value};
use flotilla_core::resources::{AddressType, Operation};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::journal::JournalHandle;
use crate::queues::{gauge_of, Gauge, Gauges};
use crate::queues::{BrokerEvent, PublishReply, QueueHandle, Settlement, SubSpec, ToConn};
use crate::selector::{Fields as _, MessageFields, Selector};
use crate::store::{self, Stored, SubRecord};
use crate::txn;
use flotilla_amqp::types::messaging::Outcome;
use flotilla_amqp::types::transaction::{Declared, TransactionalState};
use flotilla_core::resources::{AddressPolicy, Overflow};

/// The topic a message for a topic link goes to: the link's, or, on a
/// link to a topic pattern, the message's `to` (which the pattern must
/// match, without wildcards of its own).
fn topic_of(topic: &str, pattern: bool, payload: &[u8]) -> Result<String, String> {
    if !pattern {
        return Ok(topic.to_string());
    }
    match message::to_address(payload) {
        Ok(Some(t))
            if !flotilla_core::pattern::is_pattern(t)
                && flotilla_core::pattern::matches(topic, t) =>
        {
            Ok(t.to_string())
        }
        _ => Err(format!(
            "a message sent to topic pattern {topic:?} needs a `to` it matches, without wildcards"
        )),
    }
}

/// When a message published at `now` expires: its own TTL or expiry
/// time, else its address's default TTL (0: never).
fn expiry(payload: &[u8], now: u64, policy: &AddressPolicy) -> u64 {
    match (message::expiry(payload, now), policy.default_ttl_ms) {
        (0, Some(ttl)) => now.saturating_add(ttl),
        (at, _) => at,
    }
}

/// When a message published at `now` is due: 0 (at once) unless it
/// carries a delivery time or delay (scheduled delivery). Only a message
/// whose annotations mention one is decoded.
fn due(payload: &[u8], now: u64) -> u64 {
    const MARK: &[u8] = b"x-opt-delivery-";
    // The annotations come first: stop at the first section after them.
    let annotations = message::sections(payload)
        .map_while(Result::ok)
        .take_while(|s| s.code <= message::section::MESSAGE_ANNOTATIONS)
        .find(|s| s.code == message::section::MESSAGE_ANNOTATIONS);
    match annotations {
        Some(a) if a.value.windows(MARK.len()).any(|w| w == MARK) => {
            MessageFields::from_message(payload).due(now)
        }
        _ => 0,
    }
}

/// Credit a producer link gets: messages not yet on disk count against it.
const WINDOW: u32 = 1000;
/// The source of a snapshot of every queue (`flotilla stat`).
pub const STAT_ADDRESS: &str = "$stat";
/// The target of management requests (`operation: PURGE`).
pub const MANAGEMENT_ADDRESS: &str = "$management";
/// Offered by a broker on its connection to a router.
const ROUTE_CONTAINER_CAPABILITY: &str = "flotilla.route-container";
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The retained messages of a space (MQTT's), reached only through a
/// router, which routes it only for the MQTT gateway: a producer sets the
/// retained message of each message's `to` (an empty body clears it); a
/// consumer of `RETAINED/FILTER` gets those whose topic FILTER matches,
/// and then a closing detach.
pub const RETAINED_ADDRESS: &str = "$mqtt/retained";
/// An MQTT session's subscription (see `session_subscription`).
pub const SESSION_ADDRESS: &str = "$mqtt/session";
/// Changes to MQTT sessions: each message's body is JSON `{"session":
/// CLIENT, "filters": [..], "meta": "..", "expiry": SECONDS|null}` (all
/// but `session` optional).
pub const SESSION_STATE_ADDRESS: &str = "$mqtt/session-state";
/// The source filter that lists an MQTT session's topic filters.
const TOPIC_FILTERS: &str = "flotilla:topic-filters";

/// A list of strings from an AMQP value (list or array).
fn string_list(v: &Value) -> Result<Vec<String>, AmqpErrorBody> {
    let items: &[Value] = match v {
        Value::List(l) => l,
        Value::Array(a) => &a.0,
        Value::Described(d) => return string_list(&d.value),
        _ => &[],
    };
    items
        .iter()
        .map(|i| match i {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(amqp_error(
                AmqpError::InvalidField,
                "topic filters are a list of non-empty strings",
            )),
        })
        .collect()
}
const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

enum Destination {
    Queue(String),
    /// A topic; `pattern`: the link names a pattern (a topic tree) and
    /// each message's `to` says which topic under it.
    Topic {
        space: String,
        topic: String,
        pattern: bool,
    },
    Retained {
        space: String,
    },
    SessionState {
        space: String,
    },
    Management,
}

struct Producer {
    to: Destination,
    /// The address the client attached to.
    address: String,
    /// Published, not yet durable.
    storing: u32,
    /// The space's `storedBytes` quota, if it has one (looked up at attach
    /// and when the tenancy changes, not per message).
    quota: Option<(String, u64)>,
    /// The address's policy (default TTL, limits), looked up likewise.
    policy: Arc<AddressPolicy>,
    /// A queue's gauge: each message takes room in it before it is stored.
    gauge: Option<Arc<Gauge>>,
}

impl Destination {
    /// The address space a message for here is stored in.
    fn space(&self) -> Option<&str> {
        match self {
            Destination::Topic { space, .. }
            | Destination::Retained { space }
            | Destination::SessionState { space } => Some(space),
            Destination::Queue(q) => q.split_once('/').map(|(s, _)| s),
            Destination::Management => None,
        }
    }
}

/// Who is on the other end.
pub(crate) enum Peer {
    /// A client: authenticated by the handshake, placed by its Open.
    Client {
        identity: Identity,
        addr: SocketAddr,
    },
    /// A router that routes links here: attach properties say whose.
    Router,
}

/// Where an attach goes, once resolved.
struct Resolved {
    space: String,
    address: String,
    kind: AddressType,
    container: String,
    link_name: String,
    topic: Option<String>,
}

/// What every connection task works with.
#[derive(Clone)]
pub(crate) struct Services {
    pub(crate) queues: QueueHandle,
    pub(crate) journal: JournalHandle,
    pub(crate) policy: Policy,
    pub(crate) usage: crate::queues::Usage,
    pub(crate) gauges: Gauges,
    /// Bumped when the tenancy changes.
    pub(crate) tenancy_version: tokio::sync::watch::Sender<u64>,
}

pub(crate) struct BrokerConnection {
    id: u64,
    conn: Connection,
    queues: QueueHandle,
    journal: JournalHandle,
    policy: Policy,
    usage: crate::queues::Usage,
    gauges: Gauges,
    tenancy_version: tokio::sync::watch::Sender<u64>,
    peer: Peer,
    principal: Option<Principal>,
    remote_container: String,
    tx: mpsc::UnboundedSender<ToConn>,
    rx: mpsc::UnboundedReceiver<ToConn>,
    producers: HashMap<LinkId, Producer>,
    consumers: HashMap<LinkId, String>,
    /// Transaction coordinator links, with the space of their transactions.
    coordinators: HashMap<LinkId, String>,
    /// This connection's open transactions, by id.
    txns: HashMap<Bytes, txn::Txn>,
    /// The queue task each consumer is on.
    consumer_task: HashMap<LinkId, usize>,
    /// Routed receivers asking for a subscription by name: the user the
    /// router says they are (until the broker answers).
    /// A routed reattach's user, and a token user's claims.
    routed_user: HashMap<LinkId, (String, Option<String>)>,
    /// Events for the queue tasks waiting for room (in order): the
    /// driver reads nothing more from the peer until they are gone.
    outbox: std::collections::VecDeque<(usize, BrokerEvent)>,
    stat_links: Vec<LinkId>,
    /// Subscription consumers waiting for their subscription to be made:
    /// the attach answer to give them then.
    pending: HashMap<LinkId, AttachReply>,
    /// Receivers of management replies, by their (dynamic) address.
    reply_links: HashMap<String, LinkId>,
    /// Readers of retained messages: what is left to send them (`None`
    /// until the queue task answers).
    snapshots: HashMap<LinkId, Option<std::collections::VecDeque<Bytes>>>,
    next_reply: u64,
    closing: bool,
    /// Cancelled when the broker shuts down.
    shutdown: CancellationToken,
    tenancy: Option<tokio::sync::watch::Receiver<u64>>,
    /// Messages from the queue task, taken a batch per wake-up.
    batch: Vec<ToConn>,
}

use flotilla_core::time::now_ms;

fn has_capability(caps: Option<&flotilla_amqp::types::primitives::Array<Symbol>>, c: &str) -> bool {
    caps.is_some_and(|a| a.0.iter().any(|s| s.as_str() == c))
}

/// The selector in a source's filter set, if any.
fn selector_of(source: &Source) -> Option<String> {
    let filters = source.filter.as_ref()?;
    filters.iter().find_map(|(_, v)| match v {
        Value::Described(d) => {
            let ours = match &d.descriptor {
                serde_amqp::descriptor::Descriptor::Name(n) => n.as_str() == SELECTOR_FILTER,
                serde_amqp::descriptor::Descriptor::Code(c) => *c == SELECTOR_FILTER_CODE,
            };
            match (&d.value, ours) {
                (Value::String(s), true) => Some(s.clone()),
                _ => None,
            }
        }
        _ => None,
    })
}

impl BrokerConnection {
    pub(crate) fn new(id: u64, container_id: &str, services: Services, peer: Peer) -> Self {
        let Services {
            queues,
            journal,
            policy,
            usage,
            gauges,
            tenancy_version,
        } = services;
        let (tx, rx) = mpsc::unbounded_channel();
        let offered = match peer {
            Peer::Router => vec![ROUTE_CONTAINER_CAPABILITY],
            Peer::Client { .. } => Vec::new(),
        };
        let cfg = ConnectionConfig {
            container_id: container_id.to_string(),
            offered_capabilities: offered,
            ..Default::default()
        };
        BrokerConnection {
            id,
            conn: Connection::new(cfg),
            queues,
            journal,
            policy,
            usage,
            gauges,
            tenancy_version,
            peer,
            principal: None,
            remote_container: String::new(),
            tx,
            rx,
            producers: HashMap::new(),
            consumers: HashMap::new(),
            coordinators: HashMap::new(),
            txns: HashMap::new(),
            consumer_task: HashMap::new(),
            routed_user: HashMap::new(),
            outbox: std::collections::VecDeque::new(),
            stat_links: Vec::new(),
            pending: HashMap::new(),
            reply_links: HashMap::new(),
            snapshots: HashMap::new(),
            next_reply: 0,
            closing: false,
            shutdown: CancellationToken::new(),
            tenancy: None,
            batch: Vec::with_capacity(256),
        }
    }

    /// Runs the connection on the driver until it closes, then tells the
    /// queue task this connection's consumers are gone.
    pub(crate) async fn run(mut self, io: BoxIo, rbuf: BytesMut, shutdown: CancellationToken) {
        self.shutdown = shutdown;
        self.tenancy = Some(self.tenancy_version.subscribe());
        if matches!(self.peer, Peer::Router) {
            // We connected: our Open goes first.
            self.conn.open();
        }
        let ended = Driver::new(io, rbuf, DriverConfig::default())
            .run(&mut self)
            .await;
        if let Ended::Io(e) = ended {
            debug!(conn.id = self.id, error = %e, "connection failed");
        }
        // Its transactions end with it, undone (before its consumers go:
        // what they held for a transaction comes back first).
        for (_, t) in std::mem::take(&mut self.txns) {
            self.release(&t);
        }
        while let Some((i, ev)) = self.outbox.pop_front() {
            self.queues.send_to(i, ev).await;
        }
        self.queues.send(BrokerEvent::Gone { conn: self.id }).await;
    }

    fn handle_open(&mut self, open: &flotilla_amqp::types::performatives::Open) {
        self.remote_container = open.container_id.clone();
        let Peer::Client { identity, addr } = &self.peer else {
            info!(conn.id = self.id, router = %open.container_id, "connected to router: links to our queues and topics are routed here");
            return;
        };
        if identity.is_component() {
            // An operator's tool with the mesh credential: it may view
            // every space's queues, and nothing else.
            info!(conn.id = self.id, container = %open.container_id, "component connected");
            self.conn.open();
            return;
        }
        match self
            .policy
            .on_open(identity, open.hostname.as_deref(), *addr)
        {
            Ok(p) => {
                debug!(conn.id = self.id, vhost = %p.space, "connection opened");
                self.principal = Some(p);
                self.conn.open();
            }
            Err(why) => {
                warn!(conn.id = self.id, reason = %why, "connection refused");
                self.closing = true;
                self.conn
                    .close(Some(amqp_error(AmqpError::UnauthorizedAccess, why)));
            }
        }
    }

    fn handle_event(&mut self, e: Event) {
        match e {
            Event::Open(open) => self.handle_open(&open),
            Event::Attach {
                link,
                attach,
                reply: false,
            } => self.attach(link, &attach),
            Event::Flow { link } => self.on_flow(link),
            Event::Delivery { link, delivery } => self.publish(link, delivery),
            Event::Outcome {
                token,
                state,
                settled,
                ..
            } => {
                if let Some((txn, outcome)) = txn::state_of(state.as_ref()) {
                    // Settled under a transaction: held until the discharge.
                    let Some(how) = txn::settlement(outcome) else {
                        return;
                    };
                    match self.txns.get_mut(&txn) {
                        Some(t) if t.discharge.is_none() => {
                            t.holds.push((token, how));
                            t.pending += 1;
                            self.send_queue(BrokerEvent::Hold {
                                token,
                                txn,
                                conn: self.id,
                                tx: self.tx.clone(),
                            });
                        }
                        // Not a transaction of ours: it will never commit,
                        // so the message goes back.
                        _ => {
                            self.send_queue(BrokerEvent::Settle {
                                token,
                                how: Settlement::Requeue { failed: false },
                            });
                        }
                    }
                    return;
                }
                let how = match state {
                    Some(DeliveryState::Released(_)) => Settlement::Requeue { failed: false },
                    Some(DeliveryState::Modified(m)) => Settlement::Requeue {
                        failed: m.delivery_failed.unwrap_or(false),
                    },
                    Some(DeliveryState::Accepted(_) | DeliveryState::Rejected(_)) => {
                        Settlement::Consumed
                    }
                    _ if settled => Settlement::Consumed,
                    _ => return,
                };
                self.send_queue(BrokerEvent::Settle { token, how });
            }
            Event::Detach { link, closed, .. } => {
                self.producers.remove(&link);
                if self.coordinators.remove(&link).is_some() {
                    self.abandon(link);
                }
                self.routed_user.remove(&link);
                self.pending.remove(&link);
                self.stat_links.retain(|l| *l != link);
                self.reply_links.retain(|_, l| *l != link);
                self.snapshots.remove(&link);
                self.forget_consumer(link, closed);
            }
            Event::Close { .. } => self.closing = true,
            Event::Discarded { txn } => {
                if let Some(t) = self.txns.get_mut(&txn) {
                    t.doomed.get_or_insert_with(|| txn::DISCARDED.to_string());
                }
            }
            Event::Attach { .. } | Event::Begin { .. } | Event::End { .. } => {}
        }
    }

    fn on_flow(&mut self, link: LinkId) {
        if self.snapshots.contains_key(&link) {
            return self.send_snapshot(link);
        }
        if let Some(i) = self.stat_links.iter().position(|l| *l == link) {
            if self.conn.link(link).is_some_and(|l| l.credit > 0) {
                self.stat_links.swap_remove(i);
                // A tenant sees its own space; components see all.
                let space = self.principal.as_ref().map(|p| p.space.clone());
                self.send_queue(BrokerEvent::Stat {
                    tx: self.tx.clone(),
                    link,
                    space,
                });
            }
            return;
        }
        if self.consumers.contains_key(&link) {
            if let Some(l) = self.conn.link(link) {
                let limit = l.delivery_count.wrapping_add(l.credit);
                self.send_to_consumer_task(
                    link,
                    BrokerEvent::Credit {
                        conn: self.id,
                        link,
                        limit,
                        drain: l.drain,
                    },
                );
            }
        }
    }

    /// Who is attaching, in which space, to what kind of address.
    fn resolve(&self, attach: &Attach, address: &str) -> Result<Resolved, AmqpErrorBody> {
        let caps = match attach.role {
            Role::Receiver => attach.source.as_ref().and_then(|s| s.capabilities.as_ref()),
            Role::Sender => match attach.target.as_deref() {
                Some(TargetArchetype::Target(t)) => t.capabilities.as_ref(),
                #[allow(unreachable_patterns)]
                _ => None,
            },
        };
        let by_capability = if has_capability(caps, "topic") {
            AddressType::Topic
        } else {
            AddressType::Queue
        };
        if matches!(self.peer, Peer::Router) {
            let props = attach.properties.as_ref();
            let get = |k: &str| match props.and_then(|p| p.get(&Symbol::from(k))) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            let space = get("flotilla:space").ok_or_else(|| {
                amqp_error(
                    AmqpError::InvalidField,
                    "a routed link must say its address space",
                )
            })?;
            // Routers send a broker only the links placed on it.
            let me = self.conn.config().container_id.as_str();
            if let Some(b) = get("flotilla:broker").filter(|b| b != me) {
                return Err(amqp_error(
                    AmqpError::NotFound,
                    format!("routed to broker {b:?}, but this is {me:?}"),
                ));
            }
            let kind = match get("flotilla:type").as_deref() {
                Some("topic") => AddressType::Topic,
                Some("subscription") => AddressType::Subscription,
                _ => AddressType::Queue,
            };
            return Ok(Resolved {
                space,
                address: address.to_string(),
                kind,
                container: get("flotilla:container-id").unwrap_or_default(),
                link_name: get("flotilla:link-name").unwrap_or_else(|| attach.name.clone()),
                topic: get("flotilla:topic"),
            });
        }
        let Some(p) = &self.principal else {
            return Err(amqp_error(AmqpError::IllegalState, "connection not open"));
        };
        let op = match attach.role {
            Role::Receiver => Operation::Recv,
            Role::Sender => Operation::Send,
        };
        self.may_use(p, op, address)?;
        let t = self.policy.tenancy();
        let space = t.spaces.get(&p.space);
        let declared = space.and_then(|s| s.declaration(address));
        let kind = match declared {
            Some((k, _)) if !k.is_direct() => k,
            // Undeclared (or a router's type): a queue, or a topic if the
            // client says so (as JMS clients do).
            _ => by_capability,
        };
        Ok(Resolved {
            space: p.space.clone(),
            address: address.to_string(),
            kind,
            container: self.remote_container.clone(),
            link_name: attach.name.clone(),
            topic: space.and_then(|s| s.subscriptions.get(address).cloned()),
        })
    }

    /// A direct client may use `address` for `op`: its rules allow it, and
    /// the address exists in its space (declared, or the space takes
    /// undeclared addresses).
    fn may_use(&self, p: &Principal, op: Operation, address: &str) -> Result<(), AmqpErrorBody> {
        if !p.may(op, address) {
            return Err(amqp_error(
                AmqpError::UnauthorizedAccess,
                format!("not allowed to {op:?} on {address:?}").to_lowercase(),
            ));
        }
        let t = self.policy.tenancy();
        match t.spaces.get(&p.space).map(|s| s.declaration(address)) {
            Some(Some(_)) => Ok(()),
            _ => Err(amqp_error(
                AmqpError::NotFound,
                format!("no address {address:?} in address space {:?}", p.space),
            )),
        }
    }

    /// The tenancy changed: a direct client must still exist and be
    /// allowed in, and each of its links must still name an address it
    /// may use; what no longer holds is closed or detached with the reason.
    /// (Routed links are checked by the routers, which detach them here.)
    fn recheck(&mut self) {
        // Quotas and policies may have changed, for routed producers too.
        let quotas: Vec<_> = self
            .producers
            .iter()
            .map(|(l, prod)| {
                (
                    *l,
                    self.storage_quota(&prod.to),
                    self.address_policy(&prod.to),
                )
            })
            .collect();
        for (l, q, policy) in quotas {
            if let Some(prod) = self.producers.get_mut(&l) {
                prod.quota = q;
                prod.policy = policy;
            }
        }
        let (Peer::Client { addr, identity }, Some(p)) = (&self.peer, self.principal.clone())
        else {
            return;
        };
        let p = match self.policy.recheck(&p, *addr, identity.tls) {
            Ok(p) => p,
            Err(why) => {
                info!(conn.id = self.id, reason = %why, "closing connection: no longer authorized");
                self.closing = true;
                self.conn
                    .close(Some(amqp_error(AmqpError::UnauthorizedAccess, why)));
                return;
            }
        };
        let mut gone = Vec::new();
        for (link, prod) in &self.producers {
            if matches!(prod.to, Destination::Management) {
                continue;
            }
            if let Err(e) = self.may_use(&p, Operation::Send, &prod.address) {
                gone.push((*link, e));
            }
        }
        for (link, address) in &self.consumers {
            if let Err(e) = self.may_use(&p, Operation::Recv, address) {
                gone.push((*link, e));
            }
        }
        self.principal = Some(p);
        for (link, e) in gone {
            let e = if e.condition == AmqpError::NotFound.into() {
                amqp_error(AmqpError::NotFound, "the address was deleted")
            } else {
                e
            };
            info!(
                conn.id = self.id,
                link = link.0,
                reason = e.description.as_deref().unwrap_or(""),
                "detaching link"
            );
            self.conn.detach(link, Some(e));
            self.producers.remove(&link);
            self.pending.remove(&link);
            self.forget_consumer(link, false);
        }
    }

    /// The space of a link a router routed here (the retained store is
    /// reached only that way: the router lets only the MQTT gateway, a
    /// component, name the space).
    fn routed_space(&self, attach: &Attach) -> Result<String, AmqpErrorBody> {
        if !matches!(self.peer, Peer::Router) {
            return Err(amqp_error(
                AmqpError::NotFound,
                "the MQTT gateway's records are reached through a router, by the gateway",
            ));
        }
        match attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from("flotilla:space")))
        {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(amqp_error(
                AmqpError::InvalidField,
                "a routed link must say its address space",
            )),
        }
    }

    /// Sends a retained-message reader what its credit allows; once all is
    /// sent, detaches it (closed): the end of the snapshot.
    fn send_snapshot(&mut self, link: LinkId) {
        let Some(Some(q)) = self.snapshots.get_mut(&link) else {
            return;
        };
        while let Some(m) = q.front() {
            if !self.conn.send(link, m, true, 0) {
                return;
            }
            q.pop_front();
        }
        self.snapshots.remove(&link);
        self.conn.detach(link, None);
    }

    fn refuse(&mut self, link: LinkId, e: AmqpErrorBody) {
        warn!(
            conn.id = self.id,
            reason = e.description.as_deref().unwrap_or(""),
            "attach refused"
        );
        self.conn.refuse_attach(link, e);
    }

    /// A component (not a tenant) on our own listener.
    fn is_component(&self) -> bool {
        matches!(&self.peer, Peer::Client { identity, .. } if identity.is_component())
    }

    fn attach(&mut self, link: LinkId, attach: &Attach) {
        if flotilla_amqp::connection::is_coordinator(attach) {
            return self.attach_coordinator(link, attach);
        }
        if self.is_component() {
            let stat = attach.role == Role::Receiver
                && attach
                    .source
                    .as_ref()
                    .is_some_and(|s| s.address.as_deref() == Some(STAT_ADDRESS));
            if !stat {
                return self.refuse(
                    link,
                    amqp_error(
                        AmqpError::NotAllowed,
                        "a component's connection to a broker may only read $stat",
                    ),
                );
            }
        } else if self.principal.is_none() && matches!(self.peer, Peer::Client { .. }) {
            return self.refuse(
                link,
                amqp_error(AmqpError::IllegalState, "connection not open"),
            );
        }
        match attach.role {
            Role::Sender => self.attach_producer(link, attach),
            Role::Receiver => self.attach_consumer(link, attach),
        }
    }

    /// A transaction controller (AMQP 1.0 §4.3): its transactions are of
    /// this connection and of the space the link is in.
    fn attach_coordinator(&mut self, link: LinkId, attach: &Attach) {
        let space = match (&self.peer, &self.principal) {
            (Peer::Router, _) => self.routed_space(attach),
            (Peer::Client { .. }, Some(p)) if !self.is_component() => Ok(p.space.clone()),
            _ => Err(amqp_error(
                AmqpError::NotAllowed,
                "transactions are for clients of an address space",
            )),
        };
        let space = match space {
            Ok(s) => s,
            Err(e) => return self.refuse(link, e),
        };
        let mut answer = attach.clone();
        answer.role = Role::Receiver;
        self.conn.accept_attach_as(link, &answer);
        self.conn.flow(link, WINDOW, false);
        debug!(conn.id = self.id, space = %space, "transaction coordinator attached");
        self.coordinators.insert(link, space);
    }

    /// A message to the coordinator: declare or discharge.
    fn control(&mut self, link: LinkId, d: flotilla_amqp::connection::Delivery) {
        let Some(space) = self.coordinators.get(&link).cloned() else {
            return;
        };
        if self.conn.link(link).is_some_and(|l| l.credit < WINDOW / 2) {
            self.conn.flow(link, WINDOW, false);
        }
        match txn::decode(&d.payload) {
            Ok(txn::Control::Declare) => {
                let open = self
                    .txns
                    .values()
                    .filter(|t| self.same_client(t.controller, link))
                    .count();
                if open >= txn::MAX_OPEN {
                    let e = amqp_error(
                        AmqpError::ResourceLimitExceeded,
                        format!("a client may have {} transactions open", txn::MAX_OPEN),
                    );
                    return self
                        .conn
                        .settle(d.id, DeliveryState::Rejected(Rejected { error: Some(e) }));
                }
                let id = txn::new_id();
                debug!(conn.id = self.id, txn = %txn::hex(&id), space = %space, "transaction declared");
                self.txns.insert(id.clone(), txn::Txn::new(link, space));
                self.conn.settle(
                    d.id,
                    DeliveryState::Declared(Declared {
                        txn_id: id.to_vec().into(),
                    }),
                );
            }
            Ok(txn::Control::Discharge { txn, fail }) => {
                let Some(t) = self.txns.get_mut(&txn).filter(|t| t.space == space) else {
                    return self.conn.settle(
                        d.id,
                        DeliveryState::Rejected(Rejected {
                            error: Some(txn::unknown(&txn)),
                        }),
                    );
                };
                t.discharge = Some((d.id, d.settled, fail));
                if t.pending == 0 {
                    self.discharge(&txn);
                }
            }
            Err(e) => {
                warn!(
                    conn.id = self.id,
                    reason = e.description.as_deref().unwrap_or(""),
                    "coordinator request refused"
                );
                if !d.settled {
                    self.conn
                        .settle(d.id, DeliveryState::Rejected(Rejected { error: Some(e) }));
                }
            }
        }
    }

    /// Hands an event to the queue task it concerns; while that task's
    /// channel is full, events wait here in order (and the driver stops
    /// reading the peer's frames: `paused`).
    fn send_queue(&mut self, ev: BrokerEvent) {
        if self.outbox.is_empty() {
            if let Err(full) = self.queues.try_send(ev) {
                self.outbox.push_back(full);
            }
            return;
        }
        match self.queues.task_of(&ev) {
            Some(i) => self.outbox.push_back((i, ev)),
            None => self.queues.send_soon(ev),
        }
    }

    /// [`BrokerConnection::send_queue`] to task `i`.
    fn send_queue_to(&mut self, i: usize, ev: BrokerEvent) {
        if self.outbox.is_empty() {
            if let Err(ev) = self.queues.try_send_to(i, ev) {
                self.outbox.push_back((i, ev));
            }
            return;
        }
        self.outbox.push_back((i, ev));
    }

    /// There is room again: what waited goes, in order, while there is.
    fn flush_outbox(&mut self, permit: tokio::sync::mpsc::OwnedPermit<BrokerEvent>) {
        if let Some((_, ev)) = self.outbox.pop_front() {
            permit.send(ev);
        }
        while let Some((i, ev)) = self.outbox.pop_front() {
            if let Err(ev) = self.queues.try_send_to(i, ev) {
                self.outbox.push_front((i, ev));
                break;
            }
        }
    }

    /// A consumer's link is gone (`closed`: with a closing detach): its
    /// queue task lets it go.
    fn forget_consumer(&mut self, link: LinkId, closed: bool) {
        if self.consumers.remove(&link).is_some() {
            self.send_to_consumer_task(
                link,
                BrokerEvent::Detach {
                    conn: self.id,
                    link,
                    closed,
                },
            );
        }
    }

    /// Sends a consumer's credit or detach to the queue task that has it.
    fn send_to_consumer_task(&mut self, link: LinkId, ev: BrokerEvent) {
        let task = self.consumer_task.get(&link).copied().unwrap_or(0);
        if matches!(ev, BrokerEvent::Detach { .. }) {
            self.consumer_task.remove(&link);
        }
        self.send_queue_to(task, ev);
    }

    /// Discharges transaction `id` (its holds all answered): rolls it back
    /// (its holds released), or commits it on its space's queue task,
    /// which answers the discharge once the commit is on disk.
    fn discharge(&mut self, id: &Bytes) {
        let Some(t) = self.txns.remove(id) else {
            return;
        };
        let Some((dref, settled, fail)) = t.discharge else {
            return;
        };
        if fail || t.doomed.is_some() {
            debug!(conn.id = self.id, txn = %txn::hex(id), "transaction rolled back");
            self.release(&t);
            if !settled {
                let state = match t.doomed.as_deref().filter(|_| !fail) {
                    None => DeliveryState::Accepted(Accepted {}),
                    Some(why) => DeliveryState::Rejected(Rejected {
                        error: Some(txn::rolled_back(why)),
                    }),
                };
                self.conn.settle(dref, state);
            }
            return;
        }
        let reply = PublishReply {
            tx: self.tx.clone(),
            link: LinkId(u32::MAX),
            delivery: dref,
            settled,
        };
        self.send_queue(BrokerEvent::TxCommit {
            space: t.space,
            posts: t.posts,
            acks: t.acquired,
            reply,
        });
    }

    /// Whether transactions declared on coordinator links `a` and `b` are
    /// one client's (bounded together): on a router's connection, each
    /// client's coordinator link is its own; on a client's, they all are.
    fn same_client(&self, a: LinkId, b: LinkId) -> bool {
        a == b || !matches!(self.peer, Peer::Router)
    }

    /// Coordinator link `link` is gone: its transactions roll back (a
    /// coordinator cannot be resumed; through a router, its client left).
    fn abandon(&mut self, link: LinkId) {
        let ids: Vec<Bytes> = self
            .txns
            .iter()
            .filter(|(_, t)| t.controller == link)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(t) = self.txns.remove(&id) {
                debug!(conn.id = self.id, txn = %txn::hex(&id), "coordinator link gone: transaction rolled back");
                self.release(&t);
            }
        }
    }

    /// Puts back what a transaction held (it rolled back, or its
    /// connection is gone), on each delivery's queue task.
    fn release(&mut self, t: &txn::Txn) {
        let n = self.queues.len();
        let mut by_shard: HashMap<usize, Vec<u64>> = HashMap::new();
        for (token, _) in &t.holds {
            by_shard
                .entry(crate::shards::of_token(n, *token))
                .or_default()
                .push(*token);
        }
        for (shard, tokens) in by_shard {
            self.send_queue(BrokerEvent::TxRelease { shard, tokens });
        }
    }

    fn attach_producer(&mut self, link: LinkId, attach: &Attach) {
        let target = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => Some(t.clone()),
            _ => None,
        };
        let Some(address) = target
            .as_ref()
            .and_then(|t| t.address.clone())
            .filter(|a| !a.is_empty())
        else {
            return self.refuse(
                link,
                amqp_error(AmqpError::InvalidField, "a producer needs a target address"),
            );
        };
        let to = if address == MANAGEMENT_ADDRESS {
            Destination::Management
        } else if address == RETAINED_ADDRESS {
            match self.routed_space(attach) {
                Ok(space) => Destination::Retained { space },
                Err(e) => return self.refuse(link, e),
            }
        } else if address == SESSION_STATE_ADDRESS {
            match self.routed_space(attach) {
                Ok(space) => Destination::SessionState { space },
                Err(e) => return self.refuse(link, e),
            }
        } else {
            let r = match self.resolve(attach, &address) {
                Ok(r) => r,
                Err(e) => return self.refuse(link, e),
            };
            match r.kind {
                AddressType::Topic => Destination::Topic {
                    space: r.space,
                    pattern: flotilla_core::pattern::is_pattern(&r.address),
                    topic: r.address,
                },
                AddressType::Subscription => {
                    return self.refuse(
                        link,
                        amqp_error(
                            AmqpError::NotAllowed,
                            format!("{address:?} is a subscription: send to its topic"),
                        ),
                    )
                }
                _ => Destination::Queue(store::queue_key(&r.space, &r.address)),
            }
        };
        self.conn.accept_attach(
            link,
            AttachReply {
                source: attach.source.as_deref().cloned(),
                target,
                ..Default::default()
            },
        );
        self.conn.flow(link, WINDOW, false);
        debug!(conn.id = self.id, address = %address, "producer attached");
        let quota = self.storage_quota(&to);
        let policy = self.address_policy(&to);
        let gauge = match &to {
            Destination::Queue(key) => Some(gauge_of(&self.gauges, key)),
            _ => None,
        };
        self.producers.insert(
            link,
            Producer {
                to,
                address,
                storing: 0,
                quota,
                policy,
                gauge,
            },
        );
    }

    fn attach_consumer(&mut self, link: LinkId, attach: &Attach) {
        let named_only = attach
            .source
            .as_deref()
            .is_none_or(|s| s.address.is_none() && !s.dynamic);
        if named_only {
            return self.reattach(link, attach);
        }
        let mut source = attach.source.as_deref().cloned().unwrap_or_default();
        let target = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => Some(t.clone()),
            _ => None,
        };
        if source.dynamic {
            // A reply address for management answers.
            self.next_reply += 1;
            let a = format!("$reply/{}/{}", self.id, self.next_reply);
            source.address = Some(a.clone());
            self.reply_links.insert(a, link);
            return self.accept_presettled(link, source, target);
        }
        let Some(address) = source.address.clone().filter(|a| !a.is_empty()) else {
            return self.refuse(
                link,
                amqp_error(AmqpError::InvalidField, "a consumer needs a source address"),
            );
        };
        if let Some(filter) = address
            .strip_prefix(RETAINED_ADDRESS)
            .and_then(|f| f.strip_prefix('/'))
        {
            let space = match self.routed_space(attach) {
                Ok(space) => space,
                Err(e) => return self.refuse(link, e),
            };
            self.send_queue(BrokerEvent::ReadRetained {
                space,
                filter: filter.to_string(),
                tx: self.tx.clone(),
                link,
            });
            self.snapshots.insert(link, None);
            return self.accept_presettled(link, source, target);
        }
        if address == SESSION_ADDRESS {
            let spec = match self.session_subscription(attach, &source) {
                Ok(s) => s,
                Err(e) => return self.refuse(link, e),
            };
            self.pending.insert(
                link,
                AttachReply {
                    source: Some(source),
                    target,
                    ..Default::default()
                },
            );
            self.consumer_task
                .insert(link, self.queues.of_key(&spec.record.key));
            self.send_queue(BrokerEvent::Subscribe {
                spec,
                conn: self.id,
                link,
                tx: self.tx.clone(),
            });
            self.consumers.insert(link, address);
            return;
        }
        if address == STAT_ADDRESS {
            let allowed = match (&self.peer, &self.principal) {
                // Routers route no `$` address to a broker: a `$stat` link
                // from one carries some client's attach, of one space.
                (Peer::Router, _) => false,
                _ if self.is_component() => true,
                (_, Some(p)) => p.may(Operation::View, "#"),
                _ => false,
            };
            if !allowed {
                return self.refuse(
                    link,
                    amqp_error(
                        AmqpError::UnauthorizedAccess,
                        "viewing broker state needs the view operation on all addresses",
                    ),
                );
            }
            self.accept_presettled(link, source, target);
            self.stat_links.push(link);
            return;
        }
        let r = match self.resolve(attach, &address) {
            Ok(r) => r,
            Err(e) => return self.refuse(link, e),
        };
        let event = match r.kind {
            AddressType::Topic | AddressType::Subscription => {
                let spec = match self.subscription(&r, &source, link) {
                    Ok(s) => s,
                    Err(e) => return self.refuse(link, e),
                };
                BrokerEvent::Subscribe {
                    spec,
                    conn: self.id,
                    link,
                    tx: self.tx.clone(),
                }
            }
            _ => {
                // A queue consumer's selector: it takes what it matches.
                let selector = match selector_of(&source).map(|s| Selector::parse(&s)) {
                    None => None,
                    Some(Ok(s)) => Some(Arc::new(s)),
                    Some(Err(e)) => {
                        return self.refuse(
                            link,
                            amqp_error(AmqpError::InvalidField, format!("bad selector: {e}")),
                        )
                    }
                };
                BrokerEvent::Attach {
                    queue: store::queue_key(&r.space, &r.address),
                    conn: self.id,
                    link,
                    tx: self.tx.clone(),
                    browse: source.distribution_mode == Some(DistributionMode::Copy),
                    selector,
                }
            }
        };
        let browse = matches!(event, BrokerEvent::Attach { browse: true, .. });
        let reply = AttachReply {
            source: Some(source),
            target,
            snd_settle_mode: browse.then_some(SenderSettleMode::Settled),
            ..Default::default()
        };
        if matches!(event, BrokerEvent::Subscribe { .. }) {
            // Answered when the subscription exists (`ToConn::Subscribed`).
            self.pending.insert(link, reply);
        } else {
            self.conn.accept_attach(link, reply);
        }
        debug!(conn.id = self.id, address = %address, kind = ?r.kind, "consumer attached");
        let key = match &event {
            BrokerEvent::Subscribe { spec, .. } => spec.record.key.as_str(),
            BrokerEvent::Attach { queue, .. } => queue.as_str(),
            _ => "",
        };
        self.consumer_task.insert(link, self.queues.of_key(key));
        self.send_queue(event);
        self.consumers.insert(link, address);
    }

    /// A receiver that names no source: it asks for its durable
    /// subscription by link name alone (JMS's unsubscribe attaches so,
    /// then detaches closed, which deletes it). Answered with the
    /// subscription's source, or refused with `amqp:not-found`.
    fn reattach(&mut self, link: LinkId, attach: &Attach) {
        let who = match &self.peer {
            Peer::Router => self.routed_space(attach).map(|space| {
                let get = |k: &str| match attach
                    .properties
                    .as_ref()
                    .and_then(|p| p.get(&Symbol::from(k)))
                {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => None,
                };
                if let Some(u) = get("flotilla:user") {
                    self.routed_user.insert(link, (u, get("flotilla:claims")));
                }
                (
                    space,
                    get("flotilla:container-id").unwrap_or_default(),
                    get("flotilla:link-name").unwrap_or_else(|| attach.name.clone()),
                )
            }),
            Peer::Client { .. } => match &self.principal {
                Some(p) if !self.is_component() => Ok((
                    p.space.clone(),
                    self.remote_container.clone(),
                    attach.name.clone(),
                )),
                _ => Err(amqp_error(
                    AmqpError::NotAllowed,
                    "a consumer needs a source address",
                )),
            },
        };
        let (space, container, name) = match who {
            Ok(w) => w,
            Err(e) => return self.refuse(link, e),
        };
        let base = name.split('|').next().unwrap_or_default();
        let keys = vec![
            store::sub_key(&space, &format!("durable/{container}/{name}")),
            store::sub_key(&space, &format!("shared/{container}/{base}")),
            store::sub_key(&space, &format!("shared/global/{base}")),
        ];
        self.consumer_task
            .insert(link, self.queues.of_key(&keys[0]));
        self.send_queue(BrokerEvent::Reattach {
            keys,
            conn: self.id,
            link,
            tx: self.tx.clone(),
        });
        self.consumers.insert(link, String::new());
    }

    /// The answer to [`BrokerConnection::reattach`]: the subscription
    /// found (its source as the client made it), or none.
    fn reattached(&mut self, link: LinkId, record: Option<SubRecord>) {
        // A direct client by its own rules; a routed one by the rules of
        // the user the router names (none: an anonymous client, whose
        // space lets anonymous clients do anything).
        let routed_user = self.routed_user.remove(&link);
        let allowed = |r: &SubRecord| match (&self.peer, &self.principal) {
            (Peer::Client { .. }, Some(p)) => p.may(Operation::Recv, &r.pattern),
            (Peer::Router, _) => match &routed_user {
                None => true,
                Some((u, claims)) => {
                    let t = self.policy.tenancy();
                    let Some(s) = t.spaces.get(&r.space) else {
                        return false;
                    };
                    if flotilla_amqp::policy::is_token_user(u) {
                        flotilla_amqp::policy::token_claims_may(
                            s,
                            claims.as_deref(),
                            Operation::Recv,
                            &r.pattern,
                        )
                    } else {
                        s.users.get(u).is_some_and(|u| {
                            flotilla_core::auth::authorized(&u.rules, Operation::Recv, &r.pattern)
                        })
                    }
                }
            },
            _ => false,
        };
        let Some(r) = record.filter(allowed) else {
            self.forget_consumer(link, false);
            return self.refuse(
                link,
                amqp_error(
                    AmqpError::NotFound,
                    "no durable subscription by this link name (a receiver with no source address finds one)",
                ),
            );
        };
        let mut caps = vec![Symbol::from("topic")];
        if r.shared {
            caps.push(Symbol::from("shared"));
            if r.key.contains("/$sub/shared/global/") {
                caps.push(Symbol::from("global"));
            }
        }
        let mut source = Source {
            address: Some(r.pattern.clone()),
            durable: TerminusDurability::UnsettledState,
            expiry_policy: TerminusExpiryPolicy::Never,
            capabilities: Some(caps.into()),
            ..Default::default()
        };
        if let Some(sel) = &r.selector {
            let mut f = flotilla_amqp::types::messaging::FilterSet::default();
            f.insert(
                Symbol::from("jms-selector"),
                Value::Described(Box::new(serde_amqp::described::Described {
                    descriptor: serde_amqp::descriptor::Descriptor::Name(Symbol::from(
                        SELECTOR_FILTER,
                    )),
                    value: Value::String(sel.clone()),
                })),
            );
            source.filter = Some(f);
        }
        self.consumers.insert(link, r.pattern.clone());
        self.conn.accept_attach(
            link,
            AttachReply {
                source: Some(source),
                ..Default::default()
            },
        );
        debug!(conn.id = self.id, subscription = %r.key, "durable subscription found by name");
        self.on_flow(link);
    }

    /// Takes a consumer we send to pre-settled (`$stat`, management replies).
    fn accept_presettled(
        &mut self,
        link: LinkId,
        source: Source,
        target: Option<flotilla_amqp::types::messaging::Target>,
    ) {
        self.conn.accept_attach(
            link,
            AttachReply {
                source: Some(source),
                target,
                snd_settle_mode: Some(SenderSettleMode::Settled),
                ..Default::default()
            },
        );
    }

    /// The subscription a topic consumer (or a `subscription` address's
    /// consumer) takes its messages from.
    fn subscription(
        &self,
        r: &Resolved,
        source: &Source,
        link: LinkId,
    ) -> Result<SubSpec, AmqpErrorBody> {
        let selector_text = selector_of(source);
        let selector = match &selector_text {
            Some(s) => Some(Arc::new(Selector::parse(s).map_err(|e| {
                amqp_error(AmqpError::InvalidField, format!("bad selector: {e}"))
            })?)),
            None => None,
        };
        if r.kind == AddressType::Subscription {
            let topic = r.topic.clone().ok_or_else(|| {
                amqp_error(
                    AmqpError::NotFound,
                    format!("subscription {:?} names no topic", r.address),
                )
            })?;
            return Ok(SubSpec {
                record: SubRecord {
                    key: store::sub_key(&r.space, &format!("address/{}", r.address)),
                    space: r.space.clone(),
                    pattern: topic,
                    selector: None,
                    shared: true,
                    ..Default::default()
                },
                selector: None,
                durable: true,
                session: None,
            });
        }
        let caps = source.capabilities.as_ref();
        let shared = has_capability(caps, "shared");
        let durable = source.durable != TerminusDurability::None
            || source.expiry_policy == TerminusExpiryPolicy::Never;
        // A durable terminus that expires after a timeout (an MQTT
        // session's expiry interval) ends that long after its last consumer.
        let expiry =
            (durable && source.expiry_policy != TerminusExpiryPolicy::Never && source.timeout > 0)
                .then_some(source.timeout);
        // JMS names the consumers of a shared subscription `name|N`.
        let base = r.link_name.split('|').next().unwrap_or_default();
        let name = if shared {
            let owner = if has_capability(caps, "global") {
                "global"
            } else {
                r.container.as_str()
            };
            format!("shared/{owner}/{base}")
        } else if durable {
            format!("durable/{}/{}", r.container, r.link_name)
        } else {
            // Its own, whoever else uses the same link name (through a
            // router, every client's links share one connection).
            format!("temp/{}/{}", self.id, link.0)
        };
        Ok(SubSpec {
            record: SubRecord {
                key: store::sub_key(&r.space, &name),
                space: r.space.clone(),
                pattern: r.address.clone(),
                selector: selector_text,
                shared,
                expiry,
                ..Default::default()
            },
            selector,
            durable,
            session: None,
        })
    }

    /// The subscription of an MQTT session (source `$mqtt/session`, routed
    /// from the gateway): one per client id (the routed container), taking
    /// what any of its topic filters matches; the filters come in the
    /// source's `flotilla:topic-filters` filter (absent: those it had), and
    /// link property `mqtt:fresh` starts it afresh.
    fn session_subscription(
        &self,
        attach: &Attach,
        source: &Source,
    ) -> Result<SubSpec, AmqpErrorBody> {
        let space = self.routed_space(attach)?;
        let container = match attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from("flotilla:container-id")))
        {
            Some(Value::String(c)) if !c.is_empty() => c.clone(),
            _ => {
                return Err(amqp_error(
                    AmqpError::InvalidField,
                    "an MQTT session names its client (flotilla:container-id)",
                ))
            }
        };
        let fresh = matches!(
            attach
                .properties
                .as_ref()
                .and_then(|p| p.get(&Symbol::from("mqtt:fresh"))),
            Some(Value::Bool(true))
        );
        let filters = source
            .filter
            .as_ref()
            .and_then(|f| f.iter().find(|(k, _)| k.as_str() == TOPIC_FILTERS))
            .map(|(_, v)| string_list(v))
            .transpose()?;
        let durable = source.durable != TerminusDurability::None
            || source.expiry_policy == TerminusExpiryPolicy::Never;
        let expiry =
            (durable && source.expiry_policy != TerminusExpiryPolicy::Never && source.timeout > 0)
                .then_some(source.timeout);
        Ok(SubSpec {
            record: SubRecord {
                key: store::sub_key(&space, &format!("session/{container}")),
                space,
                pattern: SESSION_ADDRESS.to_string(),
                expiry,
                session: true,
                ..Default::default()
            },
            selector: None,
            durable,
            session: Some(crate::queues::SessionAttach { filters, fresh }),
        })
    }

    /// A message from a producer: to the journal (a queue) or the queue
    /// task (a topic); `accepted` once stored.
    fn publish(&mut self, link: LinkId, d: flotilla_amqp::connection::Delivery) {
        if self.coordinators.contains_key(&link) {
            return self.control(link, d);
        }
        let Some(p) = self.producers.get_mut(&link) else {
            return;
        };
        let (dref, settled) = (d.id, d.settled);
        let under = txn::state_of(d.state.as_ref()).map(|(t, _)| t);
        let payload = d.payload;
        if let Some(e) = p
            .quota
            .as_ref()
            .and_then(|q| over_storage_quota(&self.usage, q))
        {
            if !settled {
                self.conn
                    .settle(dref, DeliveryState::Rejected(Rejected { error: Some(e) }));
            }
            return;
        }
        if let Some(txn) = under {
            return self.post_under(link, txn, d.id, settled, payload);
        }
        let queue = match &p.to {
            Destination::Management => return self.management(dref, settled, &payload),
            Destination::SessionState { space } => {
                let space = space.clone();
                return self.session_state(link, dref, settled, &space, &payload);
            }
            Destination::Retained { space } => {
                let space = space.clone();
                let topic = match message::to_address(&payload) {
                    Ok(Some(t)) if !t.is_empty() && !flotilla_core::pattern::is_pattern(t) => {
                        t.to_string()
                    }
                    _ => {
                        return self.reject_publish(
                            dref,
                            settled,
                            "a retained message needs a topic (`to`) without wildcards",
                        )
                    }
                };
                p.storing += 1;
                let message = if message::body_is_empty(&payload) {
                    Bytes::new()
                } else {
                    payload
                };
                self.send_queue(BrokerEvent::Retain {
                    space,
                    topic,
                    message,
                    reply: self.reply(link, dref, settled),
                });
                return;
            }
            Destination::Topic {
                space,
                topic,
                pattern,
            } => {
                let topic = match topic_of(topic, *pattern, &payload) {
                    Ok(t) => t,
                    Err(why) => return self.reject_publish(dref, settled, &why),
                };
                p.storing += 1;
                let now = now_ms();
                let ev = BrokerEvent::Publish {
                    space: space.clone(),
                    topic,
                    expires: expiry(&payload, now, &p.policy),
                    due: due(&payload, now),
                    payload,
                    reply: Some(self.reply(link, dref, settled)),
                };
                self.send_queue(ev);
                return;
            }
            Destination::Queue(q) => q.clone(),
        };
        // Room in the queue first: a full queue refuses the message (or,
        // overflow `dropOldest`, the queue drops its oldest to take it).
        let size = payload.len().min(u32::MAX as usize) as u32;
        let gauge = p.gauge.clone();
        if let Some(g) = &gauge {
            let limits = &p.policy;
            let fits = if limits.overflow == Some(Overflow::DropOldest) {
                g.count(size);
                true
            } else {
                g.reserve(size, limits.max_depth, limits.max_bytes)
            };
            if !fits {
                if !settled {
                    let e = amqp_error(
                        AmqpError::ResourceLimitExceeded,
                        format!(
                            "queue {:?} is full (its address policy: maxDepth {}, maxBytes {})",
                            p.address,
                            limits.max_depth.map_or("-".into(), |n| n.to_string()),
                            limits.max_bytes.map_or("-".into(), |n| n.to_string()),
                        ),
                    );
                    self.conn
                        .settle(dref, DeliveryState::Rejected(Rejected { error: Some(e) }));
                }
                return;
            }
        }
        p.storing += 1;
        let queues = self.queues.clone();
        let me = self.tx.clone();
        let now = now_ms();
        let expires = expiry(&payload, now, &p.policy);
        let due = due(&payload, now);
        let record = store::publish_at(&[queue.as_str()], expires, due, &payload);
        let reserved = gauge.clone();
        // Made here (reading its group), not on the journal's thread.
        let mut msg = Stored::new(0, payload, expires);
        msg.due = due;
        let done = Box::new(
            move |r: Result<u64, crate::journal::JournalError>| match r {
                Ok(seq) => {
                    msg.seq = seq;
                    // On the journal's thread: waits for room in the task.
                    queues.send_blocking(BrokerEvent::Stored {
                        queue,
                        msg,
                        reserved: reserved.is_some(),
                    });
                    let _ = me.send(ToConn::Stored {
                        link,
                        delivery: dref,
                        settled,
                    });
                }
                Err(e) => {
                    if let Some(g) = reserved {
                        g.sub(size);
                    }
                    let _ = me.send(ToConn::Failed {
                        link,
                        delivery: dref,
                        settled,
                        why: e.to_string(),
                    });
                }
            },
        );
        if self.journal.append_then(record, done).is_err() {
            if let Some(g) = &gauge {
                g.sub(size);
            }
            self.conn.settle(
                dref,
                DeliveryState::Rejected(Rejected {
                    error: Some(amqp_error(
                        AmqpError::InternalError,
                        "the journal has stopped",
                    )),
                }),
            );
        }
    }

    /// A message posted under transaction `txn`: held by it until the
    /// discharge (at most [`txn::MAX_MESSAGES`] and [`txn::MAX_BYTES`]),
    /// and accepted under it at once.
    fn post_under(
        &mut self,
        link: LinkId,
        txn: Bytes,
        dref: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        payload: Bytes,
    ) {
        let Some(p) = self.producers.get(&link) else {
            return;
        };
        let to = match &p.to {
            Destination::Queue(q) => txn::TxDest::Queue(q.clone()),
            Destination::Topic { topic, pattern, .. } => {
                match topic_of(topic, *pattern, &payload) {
                    Ok(t) => txn::TxDest::Topic(t),
                    Err(why) => return self.reject_publish(dref, settled, &why),
                }
            }
            _ => {
                let e = amqp_error(
                    AmqpError::NotImplemented,
                    format!("{:?} takes no messages under a transaction", p.address),
                );
                return self.refused(link, dref, settled, e);
            }
        };
        let space = p.to.space().unwrap_or_default();
        let now = now_ms();
        let expires = expiry(&payload, now, &p.policy);
        // What all of this client's transactions hold (at most
        // `txn::MAX_OPEN` of them): the bound is the client's.
        let held = match self.txns.get(&txn) {
            Some(mine) => self
                .txns
                .values()
                .filter(|t| self.same_client(t.controller, mine.controller))
                .fold((0, 0), |(n, b), t| (n + t.posts.len(), b + t.bytes)),
            None => (0, 0),
        };
        let error = match self.txns.get_mut(&txn) {
            Some(t) if t.space == space && t.discharge.is_none() => {
                if let Some(why) = &t.doomed {
                    Some(txn::rolled_back(why))
                } else if held.0 >= txn::MAX_MESSAGES || held.1 + payload.len() > txn::MAX_BYTES {
                    let why = format!(
                        "a client's transactions hold at most {} messages and {} bytes",
                        txn::MAX_MESSAGES,
                        txn::MAX_BYTES
                    );
                    t.doomed = Some(why.clone());
                    Some(amqp_error(AmqpError::ResourceLimitExceeded, why))
                } else {
                    t.bytes += payload.len();
                    t.posts.push(txn::TxPost {
                        to,
                        expires,
                        due: due(&payload, now),
                        payload,
                    });
                    None
                }
            }
            _ => Some(txn::unknown(&txn)),
        };
        match error {
            Some(e) => self.refused(link, dref, settled, e),
            None => {
                if !settled {
                    self.conn.settle(
                        dref,
                        DeliveryState::TransactionalState(TransactionalState {
                            txn_id: txn.to_vec().into(),
                            outcome: Some(Outcome::Accepted(Accepted {})),
                        }),
                    );
                }
                if let Some(p) = self.producers.get_mut(&link) {
                    p.storing += 1;
                }
                self.stored_one(link);
            }
        }
    }

    /// A change to an MQTT session (see [`SESSION_STATE_ADDRESS`]).
    fn session_state(
        &mut self,
        link: LinkId,
        dref: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        space: &str,
        payload: &Bytes,
    ) {
        #[derive(serde::Deserialize)]
        struct Change {
            session: String,
            #[serde(default)]
            filters: Option<Vec<String>>,
            #[serde(default)]
            meta: Option<String>,
            #[serde(default, deserialize_with = "present")]
            expiry: Option<Option<u32>>,
            /// The session ends (a clean start): dropped, with whatever
            /// it held, and whoever consumed it detached.
            #[serde(default)]
            delete: bool,
            /// Who asks to delete it (none: anonymous).
            #[serde(default)]
            user: Option<String>,
        }
        fn present<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Option<u32>>, D::Error> {
            use serde::Deserialize;
            Ok(Some(Option::<u32>::deserialize(d)?))
        }
        let body = message::body_bytes(payload).unwrap_or_default();
        let change: Change = match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => {
                return self.reject_publish(dref, settled, &format!("bad session change: {e}"))
            }
        };
        if let Some(p) = self.producers.get_mut(&link) {
            p.storing += 1;
        }
        let key = store::sub_key(space, &format!("session/{}", change.session));
        if change.delete {
            self.send_queue(BrokerEvent::SessionDelete {
                key,
                user: change.user,
                reply: self.reply(link, dref, settled),
            });
            return;
        }
        self.send_queue(BrokerEvent::SessionUpdate {
            key,
            filters: change.filters,
            meta: change.meta,
            expiry: change.expiry,
            reply: self.reply(link, dref, settled),
        });
    }

    /// Rejects a message that cannot go where its link leads.
    fn reject_publish(
        &mut self,
        dref: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        why: &str,
    ) {
        debug!(conn.id = self.id, reason = why, "message rejected");
        if !settled {
            let e = amqp_error(AmqpError::InvalidField, why);
            self.conn
                .settle(dref, DeliveryState::Rejected(Rejected { error: Some(e) }));
        }
    }

    /// The `storedBytes` quota of the space `to` stores in, if any.
    /// The policy of the address messages for `to` go to.
    fn address_policy(&self, to: &Destination) -> Arc<AddressPolicy> {
        let (space, address) = match to {
            Destination::Queue(key) => key.split_once('/').unwrap_or(("", key)),
            Destination::Topic { space, topic, .. } => (space.as_str(), topic.as_str()),
            _ => return Arc::default(),
        };
        self.policy
            .tenancy()
            .spaces
            .get(space)
            .map(|s| s.policy(address))
            .unwrap_or_default()
    }

    fn storage_quota(&self, to: &Destination) -> Option<(String, u64)> {
        let space = to.space()?;
        let max = self
            .policy
            .tenancy()
            .spaces
            .get(space)?
            .quotas
            .stored_bytes?;
        Some((space.to_string(), max))
    }

    /// A management request: `operation: PURGE` with `name` (the queue's
    /// address) in its application properties; the answer goes to its
    /// `reply-to` (a receiver of this connection).
    fn management(
        &mut self,
        dref: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        payload: &Bytes,
    ) {
        let f = MessageFields::from_message(payload);
        let text = |v| match v {
            crate::selector::Value::Str(s) => Some(s.into_owned()),
            _ => None,
        };
        let operation = text(f.field("operation"));
        let name = text(f.field("name"));
        let reply_to = message::reply_to(payload)
            .ok()
            .flatten()
            .map(str::to_string);
        let correlation = message::message_id(payload)
            .ok()
            .flatten()
            .map(str::to_string);
        let reply_link = reply_to
            .as_ref()
            .and_then(|r| self.reply_links.get(r))
            .copied();
        let outcome = match (operation.as_deref(), name, reply_link) {
            (Some(op), Some(name), Some(link)) if op.eq_ignore_ascii_case("purge") => {
                let space = match (&self.peer, &self.principal) {
                    (Peer::Client { .. }, Some(p)) if p.may(Operation::Manage, &name) => {
                        Some(p.space.clone())
                    }
                    _ => None,
                };
                match space {
                    Some(space) => {
                        self.send_queue(BrokerEvent::Purge {
                            queue: store::queue_key(&space, &name),
                            tx: self.tx.clone(),
                            link,
                            correlation,
                        });
                        DeliveryState::Accepted(Accepted {})
                    }
                    None => DeliveryState::Rejected(Rejected {
                        error: Some(amqp_error(
                            AmqpError::UnauthorizedAccess,
                            format!("purging {name:?} needs the manage operation on it"),
                        )),
                    }),
                }
            }
            _ => DeliveryState::Rejected(Rejected {
                error: Some(amqp_error(
                    AmqpError::NotImplemented,
                    "management requests: operation PURGE with a name, and reply-to a receiver of this connection",
                )),
            }),
        };
        if !settled {
            self.conn.settle(dref, outcome);
        }
    }

    fn handle_queue_event(&mut self, m: ToConn) {
        match m {
            ToConn::Deliver {
                link,
                token,
                msg,
                settled,
            } => {
                let payload = if msg.delivery_count > 0 {
                    message::redelivered(&msg.payload, msg.delivery_count)
                } else {
                    msg.payload
                };
                if !self.conn.send(link, &payload, settled, token) && !settled {
                    self.send_queue(BrokerEvent::Settle {
                        token,
                        how: Settlement::Requeue { failed: false },
                    });
                }
            }
            ToConn::Stored {
                link,
                delivery,
                settled,
            } => {
                if !settled {
                    self.conn
                        .settle(delivery, DeliveryState::Accepted(Accepted {}));
                }
                self.stored_one(link);
            }
            ToConn::Failed {
                link,
                delivery,
                settled,
                why,
            } => {
                let e = amqp_error(AmqpError::InternalError, format!("not stored: {why}"));
                self.refused(link, delivery, settled, e);
            }
            ToConn::Refused {
                link,
                delivery,
                settled,
                why,
            } => {
                let e = amqp_error(AmqpError::UnauthorizedAccess, why);
                self.refused(link, delivery, settled, e);
            }
            ToConn::Rejected {
                link,
                delivery,
                settled,
                error,
            } => {
                if self.coordinators.contains_key(&link) {
                    if !settled {
                        self.conn.settle(
                            delivery,
                            DeliveryState::Rejected(Rejected { error: Some(error) }),
                        );
                    }
                } else {
                    self.refused(link, delivery, settled, error);
                }
            }
            ToConn::Held {
                txn,
                token,
                acquired,
            } => {
                let Some(t) = self.txns.get_mut(&txn) else {
                    return;
                };
                t.pending = t.pending.saturating_sub(1);
                if let Some(a) = acquired {
                    let how = t
                        .holds
                        .iter()
                        .find(|(k, _)| *k == token)
                        .map_or(Settlement::Consumed, |(_, h)| *h);
                    t.acquired.push((a, how));
                }
                if t.pending == 0 && t.discharge.is_some() {
                    self.discharge(&txn);
                }
            }
            ToConn::Discharged {
                delivery,
                settled,
                error,
            } => {
                if !settled {
                    let state = match error {
                        None => DeliveryState::Accepted(Accepted {}),
                        Some(e) => DeliveryState::Rejected(Rejected { error: Some(e) }),
                    };
                    self.conn.settle(delivery, state);
                }
            }
            ToConn::Reattached { link, record } => self.reattached(link, record),
            ToConn::Drained { link } => self.conn.drained(link),
            ToConn::Stolen { link } => {
                if self.consumers.remove(&link).is_some() {
                    let e = amqp_error(
                        flotilla_amqp::types::definitions::LinkError::Stolen,
                        "the durable subscription was attached elsewhere",
                    );
                    if self.pending.remove(&link).is_some() {
                        self.conn.refuse_attach(link, e);
                    } else {
                        self.conn.detach_with(link, false, Some(e));
                    }
                }
            }
            ToConn::Snapshot { link, messages } => {
                if let Some(slot) = self.snapshots.get_mut(&link) {
                    *slot = Some(messages.into());
                    self.send_snapshot(link);
                }
            }
            ToConn::Subscribed {
                link,
                resumed,
                meta,
            } => {
                if let Some(mut reply) = self.pending.remove(&link) {
                    // Whether the subscription was there before: an MQTT
                    // session resumed (with the state it kept), or a new one.
                    let mut props = flotilla_amqp::types::definitions::Fields::default();
                    props.insert(Symbol::from("flotilla:resumed"), Value::Bool(resumed));
                    if let Some(m) = meta {
                        props.insert(Symbol::from("flotilla:session-meta"), Value::String(m));
                    }
                    reply.properties = Some(props);
                    self.conn.accept_attach(link, reply);
                    // Credit the client gave before the answer.
                    self.on_flow(link);
                }
            }
            ToConn::Stat { link, body } => {
                let mut body = body;
                // A client sees only its own address space.
                if let (Peer::Client { .. }, Some(p)) = (&self.peer, &self.principal) {
                    if let Some(qs) = body["queues"].as_array_mut() {
                        qs.retain(|q| q["space"] == p.space.as_str());
                    }
                    if let Some(r) = body["retained"].as_object_mut() {
                        r.retain(|space, _| *space == p.space);
                    }
                }
                body["id"] = self.conn.config().container_id.clone().into();
                let text = body.to_string();
                let msg = message::encode_message(&MessageParts {
                    body: text.as_bytes(),
                    text: true,
                    ..Default::default()
                });
                self.conn.send(link, &msg, true, 0);
            }
            ToConn::Purged {
                link,
                correlation,
                queue,
                count,
            } => {
                let body = match count {
                    Some(n) => serde_json::json!({"status": 200, "queue": queue, "purged": n}),
                    None => {
                        serde_json::json!({"status": 404, "queue": queue, "error": "no such queue"})
                    }
                }
                .to_string();
                let msg = message::encode_message(&MessageParts {
                    correlation_id: correlation.as_deref(),
                    body: body.as_bytes(),
                    text: true,
                    ..Default::default()
                });
                self.conn.send(link, &msg, true, 0);
            }
        }
    }

    /// Where the queue task answers a publication on `link`.
    fn reply(
        &self,
        link: LinkId,
        delivery: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
    ) -> PublishReply {
        PublishReply {
            tx: self.tx.clone(),
            link,
            delivery,
            settled,
        }
    }

    /// A publication that was not taken: rejected with `error`.
    fn refused(
        &mut self,
        link: LinkId,
        delivery: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        error: AmqpErrorBody,
    ) {
        if !settled {
            self.conn.settle(
                delivery,
                DeliveryState::Rejected(Rejected { error: Some(error) }),
            );
        }
        self.stored_one(link);
    }

    /// One of `link`'s messages left the journal's queue: give its credit back.
    fn stored_one(&mut self, link: LinkId) {
        let Some(p) = self.producers.get_mut(&link) else {
            return;
        };
        p.storing = p.storing.saturating_sub(1);
        let storing = p.storing;
        let credit = self.conn.link(link).map_or(0, |l| l.credit);
        if credit + storing <= WINDOW / 2 {
            self.conn.flow(link, WINDOW - storing, false);
        }
    }
}

/// The space holds as many bytes as its quota allows: the error to refuse
/// a message with.
fn over_storage_quota(
    usage: &crate::queues::Usage,
    (space, max): &(String, u64),
) -> Option<AmqpErrorBody> {
    let used = usage
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(space)
        .copied()
        .unwrap_or(0);
    (used >= *max).then(|| {
        amqp_error(
            AmqpError::ResourceLimitExceeded,
            format!(
                "address space {space:?} stores {used} bytes, as many as its plan allows ({max})"
            ),
        )
    })
}

/// What wakes a broker connection up besides its socket.
pub(crate) enum Signal {
    /// Messages from the queue task (in `batch`).
    Queue,
    /// The tenancy changed.
    Tenancy,
    /// The broker is shutting down.
    Shutdown,
    /// Room in the queue task the first waiting event is for.
    Room(tokio::sync::mpsc::OwnedPermit<BrokerEvent>),
}

impl Handler for BrokerConnection {
    type Signal = Signal;

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<Signal>> + Send {
        async move {
            let closing = self.closing;
            let room = self
                .outbox
                .front()
                .and_then(|(i, _)| self.queues.sender(*i).cloned());
            tokio::select! {
                Some(permit) = async { match room {
                    Some(s) => s.reserve_owned().await.ok(),
                    None => std::future::pending().await,
                } } => Some(Signal::Room(permit)),
                Some(Ok(())) = async { match self.tenancy.as_mut() {
                    Some(t) => Some(t.changed().await),
                    None => None,
                } } => Some(Signal::Tenancy),
                _ = self.shutdown.cancelled(), if !closing => Some(Signal::Shutdown),
                n = self.rx.recv_many(&mut self.batch, 256) => (n > 0).then_some(Signal::Queue),
            }
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Queue => {
                let batch = std::mem::take(&mut self.batch);
                for m in batch {
                    self.handle_queue_event(m);
                }
            }
            Signal::Tenancy => self.recheck(),
            Signal::Room(permit) => self.flush_outbox(permit),
            Signal::Shutdown => {
                self.closing = true;
                self.conn.close(Some(amqp_error(
                    flotilla_amqp::types::definitions::ConnectionError::ConnectionForced,
                    "broker shutting down",
                )));
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        self.handle_event(event);
    }

    fn on_protocol_error(&mut self, error: AmqpErrorBody) {
        info!(conn.id = self.id, error = ?error.condition, description = error.description.as_deref().unwrap_or(""), "closing connection: protocol error");
        self.closing = true;
        self.conn.close(Some(error));
    }

    fn paused(&self) -> bool {
        !self.outbox.is_empty()
    }

    fn deadline(&self) -> Option<std::time::Instant> {
        if self.closing {
            return None;
        }
        self.principal.as_ref().and_then(|p| p.expires_at)
    }

    fn on_deadline(&mut self) {
        if let Some(p) = &self.principal {
            if let Some(t) = &p.token {
                flotilla_core::oidc::audit_closed(
                    &p.space,
                    &t.subject,
                    &flotilla_core::oidc::Refused::Expired,
                );
            }
        }
        info!(conn.id = self.id, "closing connection: its token expired");
        self.closing = true;
        self.conn.close(Some(amqp_error(
            AmqpError::UnauthorizedAccess,
            "token expired: authenticate again with a new token",
        )));
    }

    fn closing(&self) -> bool {
        self.closing
    }
}
