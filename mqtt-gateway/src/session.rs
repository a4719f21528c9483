//! One MQTT connection's protocol state, without I/O: packets from the
//! client and events from the upstream AMQP connection go in; packets to
//! the client (the write buffer), commands to the upstream connection and
//! a verdict on the connection come out. `server` runs it on a socket; the
//! fuzz target runs it against bytes.
//!
//! What lives where (DESIGN.md "MQTT gateway"): a session's subscriptions,
//! its queued messages and its QoS 2 state are in a broker — one MQTT
//! session subscription per client id (`$mqtt/session`, durable when the
//! session outlives the connection), whose topic filters and whose state
//! (subscription options, QoS 2 packet identifiers, the owning user) the
//! gateway changes with messages to `$mqtt/session-state`. Shared
//! subscriptions and subscriptions to declared anycast, multicast or queue
//! addresses are links of their own. Nothing here outlives the connection.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flotilla_amqp::connection::DeliveryRef;
use flotilla_amqp::policy::Principal;
use flotilla_amqp::types::definitions::{ReceiverSettleMode, Role, SenderSettleMode};
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, Source, Target, TargetArchetype, TerminusDurability,
    TerminusExpiryPolicy,
};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::primitives::{Symbol, Value};
use flotilla_core::config::Tenancy;
use flotilla_core::pattern;
use flotilla_core::resources::{AddressType, Operation, Undeclared};
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::subscribe::SubscribePacket;
use mqtt5_protocol::packet::unsubscribe::UnsubscribePacket;
use mqtt5_protocol::packet::Packet;
use mqtt5_protocol::protocol::v5::properties::{Properties, PropertyId, PropertyValue};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::codec::{self, V5};
use crate::convert;
use crate::registry::SessionStats;
use crate::upstream::{link_properties, ClientKey, Cmd, Dest, Ev, Outcome, RETAINED, SESSION};

/// Limits every connection of a gateway shares.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet we take (announced as Maximum Packet Size).
    pub max_packet: usize,
    /// QoS 1 and 2 publications a client may have unacknowledged
    /// (announced to 5.0 clients as Receive Maximum; a client of either
    /// version that sends more is disconnected, 0x93 in 5.0).
    pub receive_max: u16,
    /// Topic aliases a client may use towards us.
    pub topic_alias_max: u16,
    /// The longest keep-alive we let a 5.0 client have (Server Keep Alive).
    pub max_keep_alive: u16,
    /// Bytes waiting for a slow client past which its QoS 0 messages are
    /// dropped (and counted).
    pub qos0_buffer: usize,
    /// Messages each receiving link may have in flight towards us.
    pub link_window: u32,
    /// Subscriptions one session may hold (each is a filter the broker
    /// matches every publication of the space against).
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet: 1 << 20,
            receive_max: 1024,
            topic_alias_max: 64,
            max_keep_alive: u16::MAX,
            qos0_buffer: 256 * 1024,
            link_window: 2000,
            max_subscriptions: 1000,
        }
    }
}

/// A subscription's options (stored with the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubOpts {
    pub q: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nl: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rap: bool,
    #[serde(default)]
    pub rh: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

/// What a session keeps in its broker subscription's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub subs: BTreeMap<String, SubOpts>,
    /// QoS 2 publications received (PUBREC sent), awaiting PUBREL.
    #[serde(default)]
    pub q2in: Vec<u16>,
    /// QoS 2 messages sent and acknowledged (PUBREL sent), awaiting PUBCOMP.
    #[serde(default)]
    pub q2rel: Vec<u16>,
}

/// Why the gateway ends a connection (v5 reason code and text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub reason: u8,
    pub why: String,
    /// Send DISCONNECT (5.0) before closing.
    pub tell: bool,
    /// The client asked (DISCONNECT): no will.
    pub graceful: bool,
}

enum LinkKind {
    /// The session's subscription.
    Session,
    /// A shared subscription, or one to a declared anycast, multicast or
    /// queue address: `filter` is its key in `subs`, `address` what the
    /// link consumes.
    Sub { filter: String, address: String },
    /// A reader of retained messages for a new subscription.
    Retained { opts: SubOpts },
}

struct LinkState {
    kind: LinkKind,
    /// Credit to give back (messages done with since the last grant).
    owed: u32,
}

struct OutMsg {
    tag: u32,
    /// `None` when it came pre-settled (a retained copy).
    delivery: Option<DeliveryRef>,
    /// Waiting for PUBACK (1), PUBREC (2) or PUBCOMP (3).
    stage: u8,
}

struct PendingOut {
    tag: u32,
    delivery: Option<DeliveryRef>,
    topic: String,
    qos: u8,
    retain: bool,
    dup: bool,
    props: Option<Properties>,
    payload: Bytes,
}

struct InPub {
    pid: u16,
    qos: u8,
    parts: u8,
    worst: Outcome,
}

enum Deferred {
    Pubrec(u16, u8),
    Pubcomp(u16),
    Settle(DeliveryRef),
    Suback(u64),
    Unsuback(u16, Vec<u8>),
}

enum Op {
    Pub(u32),
    Save(Vec<Deferred>),
}

struct PendingSuback {
    pid: u16,
    codes: Vec<u8>,
    waits: u32,
    /// Filter index of each link waited for.
    links: HashMap<u32, usize>,
    filters: Vec<String>,
    retained: Vec<(String, SubOpts)>,
}

/// A session's state while something is in flight, or a topic alias is
/// set. Allocated on first write and given back by [`Session::tidy`] once
/// all of it is empty: an idle session holds one null pointer for it.
struct Flows {
    in_pubs: BTreeMap<u32, InPub>,
    ops: BTreeMap<u32, Op>,
    /// Packet ids of QoS 1/2 publications being forwarded.
    forwarding: BTreeSet<u16>,
    qos2_in: BTreeSet<u16>,
    aliases_in: BTreeMap<u16, String>,

    out: BTreeMap<u16, OutMsg>,
    pending: VecDeque<PendingOut>,
    qos2_rel: BTreeSet<u16>,
    aliases_out: BTreeMap<String, u16>,

    subacks: BTreeMap<u64, PendingSuback>,
    /// Acknowledgements waiting for a link's attach.
    attach_waiters: BTreeMap<u32, Vec<Deferred>>,
}

impl Flows {
    const EMPTY: Flows = Flows {
        in_pubs: BTreeMap::new(),
        ops: BTreeMap::new(),
        forwarding: BTreeSet::new(),
        qos2_in: BTreeSet::new(),
        aliases_in: BTreeMap::new(),
        out: BTreeMap::new(),
        pending: VecDeque::new(),
        qos2_rel: BTreeSet::new(),
        aliases_out: BTreeMap::new(),
        subacks: BTreeMap::new(),
        attach_waiters: BTreeMap::new(),
    };

    fn is_empty(&self) -> bool {
        self.in_pubs.is_empty()
            && self.ops.is_empty()
            && self.forwarding.is_empty()
            && self.qos2_in.is_empty()
            && self.aliases_in.is_empty()
            && self.out.is_empty()
            && self.pending.is_empty()
            && self.qos2_rel.is_empty()
            && self.aliases_out.is_empty()
            && self.subacks.is_empty()
            && self.attach_waiters.is_empty()
    }
}

/// Read through: the empty [`Flows`] while none is allocated; written
/// through: allocated on first use.
#[derive(Default)]
struct LazyFlows(Option<Box<Flows>>);

static NO_FLOWS: Flows = Flows::EMPTY;

impl std::ops::Deref for LazyFlows {
    type Target = Flows;
    fn deref(&self) -> &Flows {
        self.0.as_deref().unwrap_or(&NO_FLOWS)
    }
}

impl std::ops::DerefMut for LazyFlows {
    fn deref_mut(&mut self) -> &mut Flows {
        self.0.get_or_insert_with(|| Box::new(Flows::EMPTY))
    }
}

/// How the session was set up at CONNECT.
#[derive(Debug, Clone)]
pub struct Setup {
    pub key: ClientKey,
    pub version: u8,
    pub client_id: String,
    pub space: Arc<str>,
    pub principal: Principal,
    /// The session outlives the connection.
    pub persistent: bool,
    /// v5 session expiry (seconds; `u32::MAX`: never).
    pub expiry: u32,
    pub client_receive_max: u16,
    pub client_max_packet: u32,
    pub client_alias_max: u16,
    /// The session link is attached (persistent sessions, from CONNECT).
    pub session_tag: Option<u32>,
}

/// One MQTT connection's state.
pub struct Session {
    pub key: ClientKey,
    pub version: u8,
    pub client_id: String,
    /// The AMQP container of this session (`mqtt:ESCAPED-CLIENT-ID`).
    pub container: String,
    pub space: Arc<str>,
    pub principal: Principal,
    pub persistent: bool,
    pub expiry: u32,
    client_receive_max: u16,
    client_max_packet: u32,
    client_alias_max: u16,
    limits: Arc<Limits>,
    policy: Arc<flotilla_amqp::policy::Policy>,
    pub stats: Arc<SessionStats>,

    pub subs: BTreeMap<String, SubOpts>,
    links: BTreeMap<u32, LinkState>,
    session_tag: Option<u32>,
    next_tag: u32,

    /// What is in flight (allocated only then: see [`Flows`]).
    flows: LazyFlows,
    next_token: u32,
    next_pid: u16,
    next_suback: u64,

    /// Packets for the client.
    pub wbuf: BytesMut,
    /// Commands for the upstream connection.
    pub cmds: Vec<Cmd>,
    /// Set when the connection must end.
    pub close: Option<Box<Close>>,
    /// The upstream connection is gone.
    pub down: bool,
    /// Snapshots of the gateway's sessions asked for (`$SYS/flotilla/stat`).
    pub stat_requests: u32,
}

/// The properties of a 5.0 packet that has none.
static NO_PROPERTIES: std::sync::LazyLock<Properties> =
    std::sync::LazyLock::new(Properties::default);

/// Escapes what would make a client id ambiguous in a subscription name.
pub fn container_of(client_id: &str) -> String {
    let mut s = String::with_capacity(client_id.len() + 5);
    s.push_str("mqtt:");
    for c in client_id.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            '|' => s.push_str("%7C"),
            c => s.push(c),
        }
    }
    s
}

/// The v5 reason code for an AMQP refusal of a publication.
fn reason_for(condition: &str) -> u8 {
    if condition.contains("unauthorized") {
        0x87
    } else if condition.contains("resource-limit-exceeded") {
        0x97
    } else if condition.contains("not-found") || condition.contains("invalid-field") {
        0x90
    } else {
        0x80
    }
}

/// Where a subscription's messages come from.
enum Placement {
    /// The session's subscription (a topic, declared or not).
    Session,
    /// A link of its own to this address, with these capabilities.
    Link {
        address: String,
        caps: Vec<&'static str>,
        name: String,
    },
}

impl Session {
    pub fn new(
        s: Setup,
        limits: Arc<Limits>,
        policy: Arc<flotilla_amqp::policy::Policy>,
        stats: Arc<SessionStats>,
        meta: Option<Meta>,
    ) -> Self {
        let mut me = Session {
            key: s.key,
            version: s.version,
            container: container_of(&s.client_id),
            client_id: s.client_id,
            space: s.space,
            principal: s.principal,
            persistent: s.persistent,
            expiry: s.expiry,
            client_receive_max: s.client_receive_max.max(1),
            client_max_packet: s.client_max_packet,
            client_alias_max: s.client_alias_max,
            limits,
            policy,
            stats,
            subs: BTreeMap::new(),
            links: BTreeMap::new(),
            session_tag: None,
            next_tag: 1,
            flows: LazyFlows::default(),
            next_token: 1,
            next_pid: 1,
            next_suback: 1,
            wbuf: BytesMut::new(),
            cmds: Vec::new(),
            close: None,
            down: false,
            stat_requests: 0,
        };
        if let Some(tag) = s.session_tag {
            me.links.insert(
                tag,
                LinkState {
                    kind: LinkKind::Session,
                    owed: 0,
                },
            );
            me.session_tag = Some(tag);
            me.next_tag = me.next_tag.max(tag + 1);
        }
        if let Some(m) = meta {
            me.subs = m.subs;
            me.flows.qos2_in = m.q2in.into_iter().collect();
            me.flows.qos2_rel = m.q2rel.into_iter().collect();
            // Subscriptions with links of their own attach again; the
            // session's topic filters are still in its broker subscription.
            let own: Vec<(String, SubOpts)> = me
                .subs
                .iter()
                .map(|(f, o)| (f.clone(), *o))
                .filter(|(f, _)| !matches!(me.placement(f), Ok(Placement::Session)))
                .collect();
            for (f, _) in own {
                if let Ok(Placement::Link {
                    address,
                    caps,
                    name,
                }) = me.placement(&f)
                {
                    me.attach_sub(&f, &address, &caps, &name);
                }
            }
            // QoS 2 deliveries released by the broker but awaiting
            // PUBCOMP: PUBREL again (MQTT-4.4.0-1).
            let rel: Vec<u16> = me.flows.qos2_rel.iter().copied().collect();
            for pid in rel {
                codec::write_ack(&mut me.wbuf, me.version, 6, pid, 0, None);
                me.flows.out.insert(
                    pid,
                    OutMsg {
                        tag: 0,
                        delivery: None,
                        stage: 3,
                    },
                );
            }
        }
        me.note_subs();
        me
    }

    /// Tells the registry what the session subscribes to.
    fn note_subs(&self) {
        self.stats
            .subscriptions
            .store(self.subs.len() as u64, Ordering::Relaxed);
        *self.stats.filters.lock().unwrap_or_else(|p| p.into_inner()) =
            self.subs.iter().map(|(f, o)| (f.clone(), o.q)).collect();
    }

    /// The attach of the session's subscription.
    pub fn session_attach(
        space: &str,
        container: &str,
        durable: bool,
        expiry: u32,
        fresh: bool,
        filters: Option<Vec<String>>,
    ) -> Attach {
        let (policy, timeout) = if !durable {
            (TerminusExpiryPolicy::LinkDetach, 0)
        } else if expiry == u32::MAX {
            (TerminusExpiryPolicy::Never, 0)
        } else {
            (TerminusExpiryPolicy::LinkDetach, expiry)
        };
        let filter = filters.map(|f| {
            let mut m = flotilla_amqp::types::messaging::FilterSet::default();
            m.insert(
                Symbol::from("flotilla:topic-filters"),
                Value::List(f.into_iter().map(Value::String).collect()),
            );
            m
        });
        let source = Source {
            address: Some(SESSION.to_string()),
            durable: if durable {
                TerminusDurability::UnsettledState
            } else {
                TerminusDurability::None
            },
            expiry_policy: policy,
            timeout,
            filter,
            ..Default::default()
        };
        receiver_attach(
            "mqtt-session",
            source,
            link_properties(space, Some(container), fresh),
        )
    }

    fn token(&mut self) -> u32 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    fn tag(&mut self) -> u32 {
        let t = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        t
    }

    /// Ends the connection (the first reason wins).
    pub fn fail(&mut self, reason: u8, why: impl Into<String>) {
        if self.close.is_none() {
            let why = why.into();
            debug!(client = %self.client_id, reason, why = %why, "closing MQTT connection");
            self.close = Some(Box::new(Close {
                reason,
                why,
                tell: self.version == V5,
                graceful: false,
            }));
        }
    }

    // ---- packets from the client ----

    /// One packet from the client.
    pub fn on_packet(&mut self, p: Packet) {
        if self.close.is_some() {
            return;
        }
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => self.on_puback(a.packet_id),
            Packet::PubRec(r) => self.on_pubrec(r.packet_id, u8::from(r.reason_code)),
            Packet::PubRel(r) => self.on_pubrel(r.packet_id),
            Packet::PubComp(c) => self.on_pubcomp(c.packet_id),
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => codec::write_pingresp(&mut self.wbuf),
            Packet::Disconnect(d) => self.on_disconnect(u8::from(d.reason_code), &d.properties),
            Packet::Auth(_) => self.fail(0x82, "enhanced authentication is not supported"),
            Packet::Connect(_) => self.fail(0x82, "a second CONNECT"),
            other => self.fail(
                0x82,
                format!("{} is not sent by clients", other.packet_type_name()),
            ),
        }
    }

    fn on_disconnect(&mut self, reason: u8, props: &Properties) {
        if let Some(e) = props.get_session_expiry_interval() {
            if self.expiry == 0 && e != 0 {
                // MQTT-3.14.2-2.
                return self.fail(0x82, "session expiry set at DISCONNECT after 0 at CONNECT");
            }
            if self.persistent && e != self.expiry {
                self.expiry = e;
                if e == 0 {
                    self.persistent = false;
                } else {
                    let expiry = if e == u32::MAX { None } else { Some(e) };
                    self.save_with(Vec::new(), None, Some(expiry));
                }
            }
        }
        self.close = Some(Box::new(Close {
            reason,
            why: "client disconnected".into(),
            tell: false,
            // 0x04: disconnect with will message.
            graceful: reason != 0x04,
        }));
    }

    fn resolve_alias(&mut self, p: &mut PublishPacket) -> bool {
        let alias = match p.properties.get(PropertyId::TopicAlias) {
            Some(PropertyValue::TwoByteInteger(a)) => Some(*a),
            _ => None,
        };
        let Some(a) = alias else {
            return true;
        };
        if a == 0 || a > self.limits.topic_alias_max {
            self.fail(
                0x94,
                format!(
                    "topic alias {a} outside 1..={}",
                    self.limits.topic_alias_max
                ),
            );
            return false;
        }
        if p.topic_name.is_empty() {
            match self.flows.aliases_in.get(&a) {
                Some(t) => p.topic_name = t.clone(),
                None => {
                    self.fail(0x82, format!("topic alias {a} was never set"));
                    return false;
                }
            }
        } else {
            self.flows.aliases_in.insert(a, p.topic_name.clone());
        }
        true
    }

    /// Refuses a publication: a reason code in 5.0 (nothing for QoS 0), a
    /// closed connection in 3.1.1.
    fn refuse_publish(&mut self, pid: Option<u16>, qos: u8, reason: u8, why: String) {
        info!(client = %self.client_id, space = %self.space, reason = %why, "publication refused");
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        if self.version != V5 {
            return self.fail(reason, why);
        }
        if let Some(pid) = pid {
            let kind = if qos == 2 { 5 } else { 4 };
            codec::write_ack(&mut self.wbuf, self.version, kind, pid, reason, Some(&why));
        }
    }

    fn on_publish(&mut self, mut p: PublishPacket) {
        if self.version == V5
            && p.properties
                .get(PropertyId::SubscriptionIdentifier)
                .is_some()
        {
            // Only a server puts one on a PUBLISH (MQTT-3.3.4-6).
            return self.fail(
                0x82,
                "a PUBLISH from a client with a subscription identifier",
            );
        }
        if self.version == V5 && !self.resolve_alias(&mut p) {
            return;
        }
        if !codec::valid_topic_name(&p.topic_name) {
            return self.fail(0x90, format!("invalid topic name {:?}", p.topic_name));
        }
        let qos = p.qos as u8;
        let pid = p.packet_id;
        if let Some(id) = pid {
            if qos == 2 && self.flows.qos2_in.contains(&id) {
                // Received before (PUBREC sent): not again (MQTT-4.3.3).
                codec::write_ack(&mut self.wbuf, self.version, 5, id, 0, None);
                return;
            }
            if self.flows.forwarding.contains(&id) {
                // A resend of what is on its way: its answer follows.
                return;
            }
            let open = self.flows.forwarding.len() + self.flows.qos2_in.len();
            if open >= usize::from(self.limits.receive_max) {
                return self.fail(
                    0x93,
                    "more QoS 1 and 2 publications in flight than Receive Maximum",
                );
            }
        }
        let topic = p.topic_name.clone();
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if topic.starts_with('$') {
            return self.refuse_publish(pid, qos, 0x87, format!("topic {topic:?} is reserved"));
        }
        if !self.principal.may(Operation::Send, &topic) {
            return self.refuse_publish(
                pid,
                qos,
                0x87,
                format!("not allowed to publish to {topic:?}"),
            );
        }
        let dest = match self.destination(&topic) {
            Ok(d) => d,
            Err((reason, why)) => return self.refuse_publish(pid, qos, reason, why),
        };
        if let Some(max) = self
            .policy
            .tenancy()
            .spaces
            .get(&*self.space)
            .and_then(|s| s.quotas.message_size)
        {
            if p.payload.len() as u64 > max {
                let why = format!(
                    "message of {} bytes exceeds the address space's limit of {max}",
                    p.payload.len()
                );
                return self.refuse_publish(pid, qos, 0x97, why);
            }
        }
        if self.version == V5 {
            if let Some(PropertyValue::Byte(1)) =
                p.properties.get(PropertyId::PayloadFormatIndicator)
            {
                if std::str::from_utf8(&p.payload).is_err() {
                    return self.refuse_publish(
                        pid,
                        qos,
                        0x99,
                        "payload is not UTF-8 as its format indicator says".into(),
                    );
                }
            }
        }
        let message = convert::to_amqp(&convert::Inbound {
            topic: &topic,
            qos,
            retain: p.retain,
            client: &self.container,
            properties: (self.version == V5).then_some(&p.properties),
            payload: &p.payload,
        });
        let settled = qos == 0;
        let parts = 1 + u8::from(p.retain);
        let token = if settled {
            0
        } else {
            let t = self.token();
            let id = pid.unwrap_or(0);
            self.flows.forwarding.insert(id);
            self.flows.in_pubs.insert(
                t,
                InPub {
                    pid: id,
                    qos,
                    parts,
                    worst: Outcome::Accepted,
                },
            );
            self.flows.ops.insert(t, Op::Pub(t));
            t
        };
        if p.retain {
            self.cmds.push(Cmd::Publish {
                client: self.key,
                space: self.space.clone(),
                dest: Dest::Retained,
                message: message.clone(),
                settled,
                token,
            });
        }
        self.cmds.push(Cmd::Publish {
            client: self.key,
            space: self.space.clone(),
            dest,
            message,
            settled,
            token,
        });
    }

    /// Where a publication to `topic` goes in our space, or why it may not.
    pub fn destination(&self, topic: &str) -> Result<Dest, (u8, String)> {
        destination(&self.policy.tenancy(), &self.space, topic)
    }

    fn on_pubrel(&mut self, pid: u16) {
        if self.flows.qos2_in.remove(&pid) {
            if self.persistent {
                // The packet id may be used again after PUBCOMP: the
                // session forgets it first.
                self.save(vec![Deferred::Pubcomp(pid)]);
            } else {
                codec::write_ack(&mut self.wbuf, self.version, 7, pid, 0, None);
            }
        } else {
            codec::write_ack(&mut self.wbuf, self.version, 7, pid, 0x92, None);
        }
    }

    // ---- outcomes of what we sent upstream ----

    fn on_outcome(&mut self, token: u32, outcome: Outcome) {
        let Some(op) = self.flows.ops.remove(&token) else {
            return;
        };
        match op {
            Op::Pub(t) => {
                let Some(p) = self.flows.in_pubs.get_mut(&t) else {
                    return;
                };
                if !matches!(outcome, Outcome::Accepted) {
                    p.worst = match (&p.worst, outcome) {
                        (Outcome::Rejected(..), _) => p.worst.clone(),
                        (_, o) => o,
                    };
                }
                p.parts -= 1;
                if p.parts > 0 {
                    self.flows.ops.insert(token, Op::Pub(t));
                    return;
                }
                let p = self.flows.in_pubs.remove(&t).expect("present");
                self.publication_done(p);
            }
            Op::Save(then) => {
                if let Outcome::Rejected(c, d) = &outcome {
                    return self.fail(
                        0x80,
                        format!("the session's state could not be stored: {c} {d}"),
                    );
                }
                for d in then {
                    self.run(d);
                }
            }
        }
    }

    fn publication_done(&mut self, p: InPub) {
        self.flows.forwarding.remove(&p.pid);
        let (reason, why) = match &p.worst {
            Outcome::Accepted => (0, None),
            Outcome::Released => (0x10, None),
            Outcome::Rejected(c, d) => (reason_for(c), Some(format!("{c} {d}"))),
        };
        if reason >= 0x80 {
            return self.refuse_publish(Some(p.pid), p.qos, reason, why.unwrap_or_default());
        }
        let reason = if self.version == V5 { reason } else { 0 };
        if p.qos == 1 {
            codec::write_ack(&mut self.wbuf, self.version, 4, p.pid, reason, None);
        } else {
            self.flows.qos2_in.insert(p.pid);
            if self.persistent {
                self.save(vec![Deferred::Pubrec(p.pid, reason)]);
            } else {
                codec::write_ack(&mut self.wbuf, self.version, 5, p.pid, reason, None);
            }
        }
    }

    fn run(&mut self, d: Deferred) {
        match d {
            Deferred::Pubrec(pid, reason) => {
                codec::write_ack(&mut self.wbuf, self.version, 5, pid, reason, None)
            }
            Deferred::Pubcomp(pid) => {
                codec::write_ack(&mut self.wbuf, self.version, 7, pid, 0, None)
            }
            Deferred::Settle(d) => self.cmds.push(Cmd::Settle {
                client: self.key,
                delivery: d,
                state: DeliveryState::Accepted(Accepted {}),
            }),
            Deferred::Suback(id) => {
                if let Some(s) = self.flows.subacks.get_mut(&id) {
                    s.waits = s.waits.saturating_sub(1);
                    if s.waits == 0 {
                        let s = self.flows.subacks.remove(&id).expect("present");
                        self.send_suback(s);
                    }
                }
            }
            Deferred::Unsuback(pid, codes) => {
                codec::write_unsuback(&mut self.wbuf, self.version, pid, &codes)
            }
        }
    }

    // ---- the session's state in its broker subscription ----

    fn meta(&self) -> String {
        let m = Meta {
            user: self.principal.user.clone(),
            subs: self.subs.clone(),
            q2in: self.flows.qos2_in.iter().copied().collect(),
            q2rel: self.flows.qos2_rel.iter().copied().collect(),
        };
        serde_json::to_string(&m).unwrap_or_default()
    }

    /// The topic filters the session's subscription takes.
    fn session_filters(&self) -> Vec<String> {
        self.subs
            .keys()
            .filter(|f| matches!(self.placement(f), Ok(Placement::Session)))
            .cloned()
            .collect()
    }

    /// Stores the session's state (persistent sessions), then runs `then`.
    fn save(&mut self, then: Vec<Deferred>) {
        self.save_with(then, None, None);
    }

    fn save_with(
        &mut self,
        then: Vec<Deferred>,
        filters: Option<Vec<String>>,
        expiry: Option<Option<u32>>,
    ) {
        if !self.persistent && filters.is_none() {
            for d in then {
                self.run(d);
            }
            return;
        }
        let mut body = serde_json::json!({ "session": self.container });
        if self.persistent {
            body["meta"] = self.meta().into();
        }
        if let Some(f) = filters {
            body["filters"] = f.into();
        }
        if let Some(e) = expiry {
            body["expiry"] = e.into();
        }
        let message =
            flotilla_amqp::message::encode_message(&flotilla_amqp::message::MessageParts {
                body: body.to_string().as_bytes(),
                ..Default::default()
            });
        let token = self.token();
        self.flows.ops.insert(token, Op::Save(then));
        self.cmds.push(Cmd::Publish {
            client: self.key,
            space: self.space.clone(),
            dest: Dest::SessionState,
            message,
            settled: false,
            token,
        });
    }

    // ---- subscriptions ----

    /// Where the messages of a subscription to `filter` come from.
    fn placement(&self, filter: &str) -> Result<Placement, (u8, String)> {
        if let Ok(Some((group, f))) = codec::shared_subscription(filter) {
            return Ok(Placement::Link {
                address: f.to_string(),
                caps: vec!["topic", "shared", "global"],
                name: format!(
                    "$share/{group}/{}",
                    f.replace('%', "%25").replace('|', "%7C")
                ),
            });
        }
        let t = self.policy.tenancy();
        let Some(space) = t.spaces.get(&*self.space) else {
            return Err((0x80, "the address space is gone".into()));
        };
        match space.declared_as(filter) {
            Some((AddressType::Topic, _)) => Ok(Placement::Session),
            Some((AddressType::Subscription, _)) if !pattern::is_pattern(filter) => {
                Ok(Placement::Link {
                    address: filter.to_string(),
                    caps: vec![],
                    name: format!("sub:{filter}"),
                })
            }
            Some((AddressType::Anycast | AddressType::Multicast | AddressType::Queue, _))
                if !pattern::is_pattern(filter) =>
            {
                Ok(Placement::Link {
                    address: filter.to_string(),
                    caps: vec![],
                    name: format!("sub:{filter}"),
                })
            }
            Some(_) => Err((0x8f, format!("{filter:?} takes wildcards only on topics"))),
            None if space.undeclared == Undeclared::Anycast => Ok(Placement::Session),
            // A filter wider than the space's topics (`#` where `sensors/#`
            // is declared) takes what they carry.
            None if pattern::is_pattern(filter) && space.topics_overlapping(filter) => {
                Ok(Placement::Session)
            }
            None => Err((
                0x80,
                format!("no topic {filter:?} in address space {:?}", self.space),
            )),
        }
    }

    fn attach_sub(&mut self, filter: &str, address: &str, caps: &[&str], name: &str) -> u32 {
        let tag = self.tag();
        let source = Source {
            address: Some(address.to_string()),
            capabilities: (!caps.is_empty()).then(|| {
                caps.iter()
                    .map(|c| Symbol::from(*c))
                    .collect::<Vec<_>>()
                    .into()
            }),
            durable: if self.persistent {
                TerminusDurability::UnsettledState
            } else {
                TerminusDurability::None
            },
            expiry_policy: if self.persistent && self.expiry == u32::MAX {
                TerminusExpiryPolicy::Never
            } else {
                TerminusExpiryPolicy::LinkDetach
            },
            timeout: if self.persistent && self.expiry != u32::MAX {
                self.expiry
            } else {
                0
            },
            ..Default::default()
        };
        let attach = receiver_attach(
            name,
            source,
            link_properties(&self.space, Some(&self.container), false),
        );
        self.open_link(
            tag,
            LinkKind::Sub {
                filter: filter.to_string(),
                address: address.to_string(),
            },
            attach,
        );
        tag
    }

    /// Asks for receiving link `tag` (a window of credit with it).
    fn open_link(&mut self, tag: u32, kind: LinkKind, attach: Attach) {
        self.links.insert(tag, LinkState { kind, owed: 0 });
        self.cmds.push(Cmd::Attach {
            client: self.key,
            tag,
            attach: Box::new(attach),
            credit: self.limits.link_window,
        });
    }

    fn on_subscribe(&mut self, s: SubscribePacket) {
        let id = match s.properties.get(PropertyId::SubscriptionIdentifier) {
            Some(PropertyValue::VariableByteInteger(0)) => {
                return self.fail(0x82, "subscription identifier 0");
            }
            Some(PropertyValue::VariableByteInteger(n)) => Some(*n),
            _ => None,
        };
        if s.filters.is_empty() {
            return self.fail(0x82, "SUBSCRIBE with no topic filter");
        }
        let sid = self.next_suback;
        self.next_suback += 1;
        let mut pending = PendingSuback {
            pid: s.packet_id,
            codes: Vec::with_capacity(s.filters.len()),
            waits: 0,
            links: HashMap::new(),
            filters: Vec::new(),
            retained: Vec::new(),
        };
        let mut session_changed = false;
        for tf in s.filters {
            let filter = tf.filter;
            let o = tf.options;
            let opts = SubOpts {
                q: (o.qos as u8).min(2),
                nl: o.no_local,
                rap: o.retain_as_published,
                rh: o.retain_handling as u8,
                id,
            };
            let shared = codec::shared_subscription(&filter);
            let valid = match &shared {
                Ok(Some(_)) => true,
                Ok(None) => codec::valid_topic_filter(&filter),
                Err(()) => false,
            };
            pending.filters.push(filter.clone());
            if !valid {
                pending.codes.push(0x8f);
                continue;
            }
            if self.version == V5 && opts.nl && matches!(shared, Ok(Some(_))) {
                // MQTT-3.8.3-4.
                return self.fail(0x82, "no-local on a shared subscription");
            }
            let plain = match &shared {
                Ok(Some((_, f))) => (*f).to_string(),
                _ => filter.clone(),
            };
            if plain == crate::server::STAT_TOPIC && matches!(shared, Ok(None)) {
                // A snapshot of the gateway's sessions (of this space; of
                // all, for an operator's tool), sent once.
                if self.principal.may(Operation::View, "#") {
                    pending.codes.push(0);
                    self.stat_requests += 1;
                } else {
                    pending.codes.push(0x87);
                }
                continue;
            }
            if plain.starts_with("$mqtt/") {
                // The gateway's own addresses.
                pending.codes.push(0x87);
                continue;
            }
            if !self.principal.may(Operation::Recv, &plain) {
                info!(client = %self.client_id, space = %self.space, filter = %filter, "subscription refused: not authorized");
                pending.codes.push(0x87);
                continue;
            }
            let placement = match self.placement(&filter) {
                Ok(p) => p,
                Err((code, why)) => {
                    info!(client = %self.client_id, space = %self.space, filter = %filter, reason = %why, "subscription refused");
                    pending.codes.push(code);
                    continue;
                }
            };
            if !self.subs.contains_key(&filter) && self.subs.len() >= self.limits.max_subscriptions
            {
                debug!(client = %self.client_id, space = %self.space, filter = %filter, "subscription refused: the session has as many as allowed");
                pending.codes.push(0x97);
                continue;
            }
            let existed = self.subs.insert(filter.clone(), opts).is_some();
            pending.codes.push(opts.q);
            let retained =
                shared.ok().flatten().is_none() && (opts.rh == 0 || (opts.rh == 1 && !existed));
            if retained {
                pending.retained.push((plain.clone(), opts));
            }
            match placement {
                Placement::Session => session_changed = true,
                Placement::Link {
                    address,
                    caps,
                    name,
                } => {
                    if !existed {
                        let tag = self.attach_sub(&filter, &address, &caps, &name);
                        pending.links.insert(tag, pending.codes.len() - 1);
                        pending.waits += 1;
                        self.flows
                            .attach_waiters
                            .entry(tag)
                            .or_default()
                            .push(Deferred::Suback(sid));
                    }
                }
            }
        }
        self.note_subs();
        if session_changed || (self.persistent && pending.codes.iter().any(|c| *c < 0x80)) {
            pending.waits += 1;
            self.sync_session(vec![Deferred::Suback(sid)]);
        }
        if pending.waits == 0 {
            self.send_suback(pending);
        } else {
            self.flows.subacks.insert(sid, pending);
        }
    }

    /// Makes the broker's session subscription take the current filters
    /// (attaching it if the session has none yet), then runs `then`.
    fn sync_session(&mut self, then: Vec<Deferred>) {
        let filters = self.session_filters();
        match self.session_tag {
            Some(_) => self.save_with(then, Some(filters), None),
            None => {
                let tag = self.tag();
                let attach = Self::session_attach(
                    &self.space,
                    &self.container,
                    false,
                    0,
                    false,
                    Some(filters),
                );
                self.session_tag = Some(tag);
                self.flows
                    .attach_waiters
                    .entry(tag)
                    .or_default()
                    .extend(then);
                self.open_link(tag, LinkKind::Session, attach);
            }
        }
    }

    fn send_suback(&mut self, s: PendingSuback) {
        codec::write_suback(&mut self.wbuf, self.version, s.pid, &s.codes);
        // Retained messages of the topics the new subscriptions match.
        for (filter, opts) in s.retained {
            let tag = self.tag();
            let source = Source {
                address: Some(format!("{RETAINED}/{filter}")),
                ..Default::default()
            };
            let attach = receiver_attach(
                &format!("retained:{filter}"),
                source,
                link_properties(&self.space, None, false),
            );
            self.open_link(tag, LinkKind::Retained { opts }, attach);
        }
    }

    fn on_unsubscribe(&mut self, u: UnsubscribePacket) {
        if u.filters.is_empty() {
            return self.fail(0x82, "UNSUBSCRIBE with no topic filter");
        }
        let (codes, session_changed) = self.drop_subscriptions(&u.filters);
        let done = Deferred::Unsuback(u.packet_id, codes);
        if session_changed && self.session_tag.is_some() {
            self.sync_session(vec![done]);
        } else {
            self.run(done);
        }
    }

    /// Forgets subscriptions to `filters` (detaching links of their own):
    /// the UNSUBACK codes, and whether the broker's session must change.
    fn drop_subscriptions(&mut self, filters: &[String]) -> (Vec<u8>, bool) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut session_changed = false;
        for f in filters {
            let Some(_) = self.subs.remove(f) else {
                codes.push(0x11);
                continue;
            };
            codes.push(0);
            match self.placement(f) {
                Ok(Placement::Session) => session_changed = true,
                _ => {
                    let tag = self.links.iter().find_map(|(t, l)| match &l.kind {
                        LinkKind::Sub { filter, .. } if filter == f => Some(*t),
                        _ => None,
                    });
                    if let Some(tag) = tag {
                        self.links.remove(&tag);
                        self.cmds.push(Cmd::Detach {
                            client: self.key,
                            tag,
                            closed: true,
                        });
                    }
                    session_changed |= self.persistent;
                }
            }
        }
        self.note_subs();
        (codes, session_changed)
    }

    // ---- messages to the client ----

    fn on_message(&mut self, tag: u32, delivery: DeliveryRef, settled: bool, payload: Bytes) {
        let now = convert::now_ms();
        let d = (!settled).then_some(delivery);
        let Some(o) = convert::from_amqp(&payload, now) else {
            debug!(client = %self.client_id, "undecodable message dropped");
            return self.done_with(tag, d);
        };
        if o.expired(now) {
            return self.done_with(tag, d);
        }
        let Some(link) = self.links.get(&tag) else {
            return self.done_with(tag, d);
        };
        let (topic, sub_qos, retain, ids) = match &link.kind {
            LinkKind::Session => {
                let Some(topic) = o.topic.clone() else {
                    return self.done_with(tag, d);
                };
                let mine = o.client.as_deref() == Some(self.container.as_str());
                let mut qos = None;
                let mut rap = false;
                let mut ids = Vec::new();
                for (f, opts) in &self.subs {
                    if f.starts_with("$share/") || !pattern::matches_topic(f, &topic) {
                        continue;
                    }
                    if opts.nl && mine {
                        continue;
                    }
                    qos = Some(qos.unwrap_or(0).max(opts.q));
                    rap |= opts.rap;
                    ids.extend(opts.id);
                }
                let Some(q) = qos else {
                    // Unsubscribed since, or its own (no-local).
                    return self.done_with(tag, d);
                };
                (topic, q, rap && o.retain, ids)
            }
            LinkKind::Sub { filter, address } => {
                let topic = o.topic.clone().unwrap_or_else(|| address.clone());
                let Some(opts) = self.subs.get(filter) else {
                    return self.done_with(tag, d);
                };
                (
                    topic,
                    opts.q,
                    opts.rap && o.retain,
                    opts.id.into_iter().collect(),
                )
            }
            LinkKind::Retained { opts } => {
                let Some(topic) = o.topic.clone() else {
                    return self.done_with(tag, d);
                };
                (topic, opts.q, true, opts.id.into_iter().collect())
            }
        };
        let qos = o.qos.min(sub_qos);
        let props = if self.version == V5 {
            let mut p = o.v5_properties(now);
            if !ids.is_empty() {
                let p = p.get_or_insert_with(Properties::default);
                for id in ids {
                    p.set_subscription_identifier(id);
                }
            }
            p
        } else {
            None
        };
        let dup = o.redelivered && qos > 0;
        let m = PendingOut {
            tag,
            delivery: d,
            topic,
            qos,
            retain,
            dup,
            props,
            payload: o.payload,
        };
        if qos == 0 {
            if self.wbuf.len() > self.limits.qos0_buffer {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return self.done_with(tag, d);
            }
            self.write_out(&m, 0);
            return self.done_with(tag, d);
        }
        if self.flows.out.len() < usize::from(self.client_receive_max)
            && self.flows.pending.is_empty()
        {
            self.send_out(m);
        } else {
            self.flows.pending.push_back(m);
        }
    }

    /// A message done with: settled (accepted) if it was not, and its
    /// credit owed back.
    fn done_with(&mut self, tag: u32, d: Option<DeliveryRef>) {
        if let Some(d) = d {
            self.cmds.push(Cmd::Settle {
                client: self.key,
                delivery: d,
                state: DeliveryState::Accepted(Accepted {}),
            });
        }
        if let Some(l) = self.links.get_mut(&tag) {
            l.owed += 1;
        }
    }

    fn next_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_pid;
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            if !self.flows.out.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    fn send_out(&mut self, m: PendingOut) {
        let Some(pid) = self.next_packet_id() else {
            self.flows.pending.push_front(m);
            return;
        };
        if !self.write_out(&m, pid) {
            // Too large for the client: as if delivered (MQTT-3.1.2-25).
            return self.done_with(m.tag, m.delivery);
        }
        self.flows.out.insert(
            pid,
            OutMsg {
                tag: m.tag,
                delivery: m.delivery,
                stage: m.qos,
            },
        );
        self.stats
            .inflight_out
            .store(self.flows.out.len() as u64, Ordering::Relaxed);
    }

    /// Writes a PUBLISH; false if it is larger than the client takes.
    fn write_out(&mut self, m: &PendingOut, pid: u16) -> bool {
        let mut props = m.props.clone();
        let mut topic: &str = &m.topic;
        // A new alias is kept only once the packet that sets it is sent.
        let mut new_alias = None;
        if self.version == V5 && self.client_alias_max > 0 {
            match self.flows.aliases_out.get(&m.topic) {
                Some(&a) => {
                    props
                        .get_or_insert_with(Properties::default)
                        .set_topic_alias(a);
                    topic = "";
                }
                None if self.flows.aliases_out.len() < usize::from(self.client_alias_max) => {
                    let a = self.flows.aliases_out.len() as u16 + 1;
                    new_alias = Some(a);
                    props
                        .get_or_insert_with(Properties::default)
                        .set_topic_alias(a);
                }
                None => {}
            }
        }
        let p = codec::Publish {
            topic,
            qos: m.qos,
            packet_id: pid,
            retain: m.retain,
            dup: m.dup,
            // 5.0 always has a property length, 3.1.1 never.
            properties: (self.version == V5).then(|| props.as_ref().unwrap_or(&NO_PROPERTIES)),
            payload: &m.payload,
        };
        if p.size() > self.client_max_packet as usize {
            debug!(client = %self.client_id, size = p.size(), "message larger than the client's maximum packet size: not sent");
            return false;
        }
        codec::write_publish(&mut self.wbuf, &p);
        if let Some(a) = new_alias {
            self.flows.aliases_out.insert(m.topic.clone(), a);
        }
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn pump_pending(&mut self) {
        while self.flows.out.len() < usize::from(self.client_receive_max) {
            let Some(m) = self.flows.pending.pop_front() else {
                break;
            };
            self.send_out(m);
        }
    }

    fn on_puback(&mut self, pid: u16) {
        match self.flows.out.remove(&pid) {
            Some(m) if m.stage == 1 => {
                self.done_with(m.tag, m.delivery);
                self.pump_pending();
            }
            Some(m) => {
                self.flows.out.insert(pid, m);
                self.fail(0x82, format!("PUBACK for packet {pid}, which is not QoS 1"));
            }
            None => debug!(client = %self.client_id, pid, "PUBACK for an unknown packet"),
        }
        self.stats
            .inflight_out
            .store(self.flows.out.len() as u64, Ordering::Relaxed);
    }

    fn on_pubrec(&mut self, pid: u16, reason: u8) {
        let Some(m) = self.flows.out.get_mut(&pid) else {
            codec::write_ack(&mut self.wbuf, self.version, 6, pid, 0x92, None);
            return;
        };
        if m.stage == 3 {
            // PUBREC again: PUBREL again.
            codec::write_ack(&mut self.wbuf, self.version, 6, pid, 0, None);
            return;
        }
        if m.stage != 2 {
            return self.fail(0x82, format!("PUBREC for packet {pid}, which is not QoS 2"));
        }
        if reason >= 0x80 {
            // The client refused it: done.
            let m = self.flows.out.remove(&pid).expect("present");
            self.done_with(m.tag, m.delivery);
            self.pump_pending();
            return;
        }
        m.stage = 3;
        let (tag, delivery) = (m.tag, m.delivery.take());
        self.flows.qos2_rel.insert(pid);
        codec::write_ack(&mut self.wbuf, self.version, 6, pid, 0, None);
        // The broker forgets the message once the session remembers that
        // the client has it (so it is never sent twice).
        let then = delivery.map(Deferred::Settle).into_iter().collect();
        self.save(then);
        if let Some(l) = self.links.get_mut(&tag) {
            l.owed += 1;
        }
    }

    fn on_pubcomp(&mut self, pid: u16) {
        match self.flows.out.get(&pid) {
            Some(m) if m.stage == 3 => {
                self.flows.out.remove(&pid);
                if self.flows.qos2_rel.remove(&pid) && self.persistent {
                    self.save(Vec::new());
                }
                self.pump_pending();
            }
            Some(_) => self.fail(0x82, format!("PUBCOMP for packet {pid} before PUBREC")),
            None => debug!(client = %self.client_id, pid, "PUBCOMP for an unknown packet"),
        }
        self.stats
            .inflight_out
            .store(self.flows.out.len() as u64, Ordering::Relaxed);
    }

    // ---- events from the upstream connection ----

    /// One event from the upstream connection.
    pub fn on_event(&mut self, e: Ev) {
        match e {
            Ev::Message {
                tag,
                delivery,
                settled,
                payload,
            } => {
                if self.close.is_none() {
                    self.on_message(tag, delivery, settled, payload);
                }
            }
            Ev::Outcome { token, outcome } => self.on_outcome(token, outcome),
            Ev::Attached { tag, .. } => {
                for d in self.flows.attach_waiters.remove(&tag).unwrap_or_default() {
                    self.run(d);
                }
            }
            Ev::Detached { tag, error } => self.on_detached(tag, error),
            Ev::Down => {
                self.down = true;
                self.fail(0x88, "the gateway lost its router");
            }
        }
    }

    fn on_detached(&mut self, tag: u32, error: Option<flotilla_amqp::types::definitions::Error>) {
        let Some(link) = self.links.remove(&tag) else {
            return;
        };
        let waiters = self.flows.attach_waiters.remove(&tag).unwrap_or_default();
        let why = error
            .as_ref()
            .map(flotilla_amqp::client::describe)
            .unwrap_or_default();
        match link.kind {
            LinkKind::Retained { .. } => {}
            LinkKind::Session => {
                self.session_tag = None;
                if why.contains("stolen") {
                    return self.fail(0x8e, "session taken over");
                }
                self.fail(0x80, format!("the session's subscription was lost: {why}"));
            }
            LinkKind::Sub { filter, .. } => {
                if why.contains("stolen") {
                    return self.fail(0x8e, "session taken over");
                }
                info!(client = %self.client_id, filter = %filter, reason = %why, "subscription lost");
                self.subs.remove(&filter);
                for d in waiters {
                    if let Deferred::Suback(id) = d {
                        if let Some(s) = self.flows.subacks.get_mut(&id) {
                            if let Some(&i) = s.links.get(&tag) {
                                s.codes[i] = if why.contains("unauthorized") {
                                    0x87
                                } else {
                                    0x80
                                };
                            }
                        }
                        self.run(Deferred::Suback(id));
                    }
                }
            }
        }
    }

    /// Credit owed back to links, as commands (end of each wake-up).
    pub fn flush_credit(&mut self) {
        let half = (self.limits.link_window / 2).max(1);
        for (tag, l) in &mut self.links {
            if l.owed >= half || (l.owed > 0 && self.cmds.is_empty()) {
                self.cmds.push(Cmd::Credit {
                    client: self.key,
                    tag: *tag,
                    add: l.owed,
                });
                l.owed = 0;
            }
        }
    }

    /// The connection ends: the session's subscription detaches (closed
    /// unless the session outlives the connection), and so do the rest.
    pub fn end(&mut self) {
        if let Some(tag) = self.session_tag.take() {
            self.cmds.push(Cmd::Detach {
                client: self.key,
                tag,
                closed: !self.persistent,
            });
        }
        let tags: Vec<u32> = self.links.keys().copied().collect();
        for tag in tags {
            let closed = !self.persistent
                && matches!(
                    self.links.get(&tag).map(|l| &l.kind),
                    Some(LinkKind::Sub { .. })
                );
            if closed {
                self.cmds.push(Cmd::Detach {
                    client: self.key,
                    tag,
                    closed: true,
                });
            }
        }
        self.links.clear();
        self.cmds.push(Cmd::Gone { client: self.key });
    }

    /// The tenancy changed: the client must still be allowed in (its
    /// rules as they are now).
    /// Gives back what the session holds for in-flight state once none
    /// is left (called after each batch of work).
    pub fn tidy(&mut self) {
        if self.flows.0.as_ref().is_some_and(|f| f.is_empty()) {
            self.flows.0 = None;
        }
    }

    pub fn recheck(&mut self, peer: std::net::SocketAddr, tls: bool) {
        if self.space.as_ref() == crate::server::MESH_SPACE {
            return;
        }
        if self
            .principal
            .expires_at
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            if let Some(t) = &self.principal.token {
                flotilla_core::oidc::audit_closed(
                    &self.principal.space,
                    &t.subject,
                    &flotilla_core::oidc::Refused::Expired,
                );
            }
            info!(client = %self.client_id, space = %self.space, "closing connection: its token expired");
            return self.fail(0x87, "token expired: connect again with a new token");
        }
        match self.policy.recheck(&self.principal, peer, tls) {
            Ok(p) => self.principal = p,
            Err(why) => return self.fail(0x87, why),
        }
        // Subscriptions the user may no longer have end here (and in the
        // broker's session, so they do not come back on a reconnect).
        let lost: Vec<String> = self
            .subs
            .keys()
            .filter(|f| {
                let plain = match codec::shared_subscription(f) {
                    Ok(Some((_, p))) => p,
                    _ => f.as_str(),
                };
                plain != crate::server::STAT_TOPIC && !self.principal.may(Operation::Recv, plain)
            })
            .cloned()
            .collect();
        if !lost.is_empty() {
            info!(client = %self.client_id, space = %self.space, filters = ?lost, "subscriptions ended: no longer authorized");
            let (_, session_changed) = self.drop_subscriptions(&lost);
            if session_changed && self.session_tag.is_some() {
                self.sync_session(Vec::new());
            }
        }
    }

    /// A new connection of the same client takes the session over.
    pub fn taken_over(&mut self) {
        self.fail(0x8e, "session taken over");
    }
}

/// A receiver's attach.
pub fn receiver_attach(
    name: &str,
    source: Source,
    props: flotilla_amqp::types::definitions::Fields,
) -> Attach {
    Attach {
        name: name.to_string(),
        handle: flotilla_amqp::types::definitions::Handle(0),
        role: Role::Receiver,
        snd_settle_mode: SenderSettleMode::Mixed,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(source)),
        target: Some(Box::new(TargetArchetype::Target(Target::default()))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: None,
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: Some(props),
    }
}

/// Where a publication to `topic` goes in `space`, or why it may not (the
/// MQTT reason code and a description): the gateway's publications, and
/// the wills the last-will service publishes for it.
pub fn destination(t: &Tenancy, space_name: &str, topic: &str) -> Result<Dest, (u8, String)> {
    let Some(space) = t.spaces.get(space_name) else {
        return Err((0x80, "the address space is gone".into()));
    };
    match space.declared_as(topic) {
        Some((AddressType::Topic, decl)) => Ok(Dest::Address {
            address: decl.to_string(),
            topic: true,
        }),
        Some((AddressType::Queue, _)) => Ok(Dest::Address {
            address: topic.to_string(),
            topic: false,
        }),
        Some((AddressType::Anycast | AddressType::Multicast, _)) => Ok(Dest::Relay),
        Some((AddressType::Subscription, _)) => Err((
            0x90,
            format!("{topic:?} is a subscription: publish to its topic"),
        )),
        None if space.undeclared == Undeclared::Anycast => Ok(Dest::Address {
            address: "#".into(),
            topic: true,
        }),
        None => Err((
            0x90,
            format!("no address {topic:?} in address space {space_name:?}"),
        )),
    }
}
