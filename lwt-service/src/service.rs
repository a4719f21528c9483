//! The service's connection to its router, as the route container every
//! `$lwt` link of the mesh is routed to, and what it does with them.
//!
//! One [`Service`] outlives the connections: the wills, the store, the
//! publisher. Each connection is a [`Conn`] on the shared socket driver.
//! A delivery changes the wills at once and is acknowledged once the
//! change is on disk; a link's detach says how its client's connection
//! ended ([`Ending`]); a timer makes due wills go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use flotilla_amqp::connection::{
    amqp_error, AttachReply, Connection, ConnectionConfig, Delivery, DeliveryRef, Event, LinkId,
};
use flotilla_amqp::driver::Handler;
use flotilla_amqp::policy::Policy;
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody, ErrorCondition, Role};
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, MessageAnnotations, Rejected, TargetArchetype,
};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::primitives::{Symbol, Value};
use flotilla_core::resources::Operation;
use flotilla_mqtt_gateway::lwt::{self, Op};
use flotilla_mqtt_gateway::upstream::Pool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::Store;
use crate::wills::{Change, Ending, Key, Kind, Owner, State, Will, Wills};

/// Offered on Open: links are routed to us.
pub const ROUTE_CONTAINER_CAPABILITY: &str = "flotilla.route-container";
/// Our container id: routers route `$lwt` links to it.
pub const CONTAINER: &str = "$lwt";
/// The condition of a detach whose client's connection was lost.
pub const CONNECTION_LOST: &str = "flotilla:connection-lost";
/// The message annotation an AMQP client's will may carry: seconds to
/// wait after the loss before publishing it.
pub const DELAY_ANNOTATION: &str = "x-opt-will-delay";
/// The space of an operator's tool's links (routers set it; no tenant's
/// space has this name).
pub const OPERATORS_SPACE: &str = "$mesh";
/// Deliveries each link may have unacknowledged.
const WINDOW: u32 = 1000;

/// Milliseconds since the Unix epoch (deadlines survive a restart).
pub use flotilla_core::time::now_ms;

/// What a connection that ended leaves to the next: changes not yet
/// written, and due wills waiting for a commit.
pub type Carried = (Vec<Change>, Vec<(Key, Will)>);

/// What outlives a connection to the router.
pub struct Service {
    pub wills: Wills,
    pub store: Store,
    pub publisher: Pool,
    pub policy: Policy,
    /// Counts attaches (a will remembers the attach that registered it).
    pub next_instance: u64,
    /// Due wills not yet published (the publisher was not connected).
    pub unpublished: Vec<(Key, Will)>,
    /// What `stat` and the console see.
    pub report: Arc<Mutex<serde_json::Value>>,
    /// The counts changed since the report was made ([`Service::report_soon`]).
    pub report_dirty: bool,
    pub reported_at: std::time::Instant,
    /// Left by a connection that ended: changes not yet given to the
    /// store, and due wills to publish once what went before is on disk.
    pub carried: Option<Carried>,
}

/// One `$lwt` link.
struct LinkInfo {
    owner: Owner,
    instance: u64,
    kind: Kind,
    user: Option<String>,
    /// A token user's claims (JSON), from `flotilla:claims`.
    claims: Option<String>,
    /// Deliveries not acknowledged yet.
    unacked: u32,
}

/// A commit on its way to disk, and what waits for it.
struct Commit {
    done: oneshot::Receiver<Result<(), String>>,
    settles: Vec<(LinkId, DeliveryRef)>,
    publish: Vec<(Key, Will)>,
}

/// The route-container connection.
pub struct Conn<'a> {
    svc: &'a mut Service,
    conn: Connection,
    links: HashMap<LinkId, LinkInfo>,
    /// Operators' tools waiting for credit to be sent the counts.
    stat_links: Vec<LinkId>,
    changes: Vec<Change>,
    settles: Vec<(LinkId, DeliveryRef)>,
    publish: Vec<(Key, Will)>,
    inflight: Option<Commit>,
    /// Write even with no changes (carried wills wait for an earlier commit).
    must_write: bool,
    shutdown: CancellationToken,
    closing: bool,
}

pub enum Signal {
    Committed(Result<(), String>),
    Tick,
    Shutdown,
}

impl<'a> Conn<'a> {
    pub fn new(svc: &'a mut Service, shutdown: CancellationToken) -> Self {
        let mut conn = Connection::new(ConnectionConfig {
            container_id: CONTAINER.into(),
            offered_capabilities: vec![ROUTE_CONTAINER_CAPABILITY],
            // Every `$lwt` link of the mesh ends here: the engine's default
            // (1000) would let one tenant's links shut out every other's.
            // A tenant is bounded by its space's link quota instead.
            max_links: 1 << 20,
            ..Default::default()
        });
        conn.open();
        let (changes, publish) = svc.carried.take().unwrap_or_default();
        Conn {
            svc,
            conn,
            links: HashMap::new(),
            stat_links: Vec::new(),
            must_write: !publish.is_empty(),
            changes,
            settles: Vec::new(),
            publish,
            inflight: None,
            shutdown,
            closing: false,
        }
    }

    fn attach(&mut self, link: LinkId, attach: &Attach) {
        let prop = |k: &str| match attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from(k)))
        {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let address = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            _ => None,
        };
        let refuse = |c: &mut Connection, why: &str| {
            warn!(link.name = %attach.name, reason = why, "attach refused");
            c.refuse_attach(link, amqp_error(AmqpError::NotAllowed, why));
        };
        let source = attach.source.as_ref().and_then(|s| s.address.clone());
        if attach.role == Role::Receiver
            && source.as_deref() == Some(lwt::ADDRESS)
            && prop("flotilla:space").as_deref() == Some(OPERATORS_SPACE)
        {
            // `flotilla stat --lwt`: one message with the counts.
            self.conn
                .accept_attach(link, AttachReply::mirroring(attach));
            self.stat_links.push(link);
            return self.send_stats();
        }
        if attach.role != Role::Sender || address.as_deref() != Some(lwt::ADDRESS) {
            return refuse(&mut self.conn, "only senders to $lwt are served here");
        }
        let Some(space) = prop("flotilla:space") else {
            return refuse(&mut self.conn, "a routed link must name its address space");
        };
        let (kind, container) = match prop("flotilla:gateway") {
            Some(g) => (Kind::Gateway, g),
            None => (
                Kind::Amqp,
                prop("flotilla:container-id").unwrap_or_default(),
            ),
        };
        let link_name = prop("flotilla:link-name").unwrap_or_else(|| attach.name.clone());
        self.svc.next_instance += 1;
        let instance = self.svc.next_instance;
        debug!(vhost = %space, container = %container, link.name = %link_name, gateway = kind == Kind::Gateway, "will link attached");
        self.links.insert(
            link,
            LinkInfo {
                owner: Owner {
                    space,
                    container,
                    link_name,
                },
                instance,
                kind,
                user: prop("flotilla:user"),
                claims: prop("flotilla:claims"),
                unacked: 0,
            },
        );
        self.conn
            .accept_attach(link, AttachReply::mirroring(attach));
        self.conn.flow(link, WINDOW, false);
    }

    fn delivery(&mut self, link: LinkId, d: Delivery) {
        let Some(info) = self.links.get_mut(&link) else {
            if !d.settled {
                self.conn
                    .settle(d.id, rejected(AmqpError::IllegalState, "unknown link"));
            }
            return;
        };
        let now = now_ms();
        let result = match info.kind {
            Kind::Gateway => match lwt::decode(&d.payload) {
                Ok(Op::Register(r)) => {
                    let will = Will {
                        kind: Kind::Gateway,
                        reg: r.reg,
                        owner: info.owner.clone(),
                        instance: info.instance,
                        user: r.user,
                        claims: r.claims,
                        to: r.topic,
                        qos: r.qos,
                        retain: r.retain,
                        delay: r.delay,
                        message: r.message,
                        state: State::Live,
                    };
                    let key = (info.owner.space.clone(), r.client);
                    Ok(Some(self.svc.wills.register(key, will)))
                }
                Ok(Op::Cancel { client, reg }) => Ok(self
                    .svc
                    .wills
                    .cancel(&(info.owner.space.clone(), client), &reg)),
                Ok(Op::Fire { client, reg, asked }) => {
                    Ok(self
                        .svc
                        .wills
                        .fire(&(info.owner.space.clone(), client), &reg, now, asked))
                }
                Ok(Op::Connected { client }) => Ok(self
                    .svc
                    .wills
                    .reconnected(&(info.owner.space.clone(), client))),
                Ok(Op::Synced) => {
                    let (owner, instance) = (info.owner.clone(), info.instance);
                    let changes = self.svc.wills.synced(&owner, instance, now);
                    if !changes.is_empty() {
                        info!(vhost = %owner.space, gateway = %owner.container, wills = changes.len(), "wills of clients lost while the gateway was away are due");
                    }
                    self.changes.extend(changes);
                    Ok(None)
                }
                Err(e) => Err((AmqpError::DecodeError, e)),
            },
            Kind::Amqp => match amqp_will(&self.svc.policy, info, &d) {
                Ok(will) => {
                    let key = (
                        info.owner.space.clone(),
                        format!("amqp:{}/{}", info.owner.container, info.owner.link_name),
                    );
                    Ok(Some(self.svc.wills.register(key, will)))
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(change) => {
                self.changes.extend(change);
                if !d.settled {
                    info.unacked += 1;
                    self.settles.push((link, d.id));
                }
            }
            Err((cond, why)) => {
                warn!(vhost = %info.owner.space, reason = %why, "will refused");
                if !d.settled {
                    self.conn.settle(d.id, rejected(cond, &why));
                }
            }
        }
    }

    fn detached(&mut self, link: LinkId, error: Option<AmqpErrorBody>) {
        let Some(info) = self.links.remove(&link) else {
            return;
        };
        let how = match &error {
            None => Ending::Graceful,
            Some(e) if is_connection_lost(&e.condition) => Ending::Lost,
            Some(_) => Ending::Broken,
        };
        debug!(vhost = %info.owner.space, container = %info.owner.container, how = ?how, "will link detached");
        let changes = self
            .svc
            .wills
            .link_ended(&info.owner, info.instance, how, now_ms());
        if how == Ending::Lost && info.kind == Kind::Gateway && !changes.is_empty() {
            info!(vhost = %info.owner.space, gateway = %info.owner.container, wills = changes.len(), "a gateway's connection was lost: its clients' wills are due");
        }
        self.changes.extend(changes);
    }

    /// Sends each waiting operator's tool the counts, once it has credit,
    /// and closes its link.
    fn send_stats(&mut self) {
        if self.stat_links.is_empty() {
            return;
        }
        self.svc.update_report();
        let doc = self
            .svc
            .report
            .lock()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let msg = flotilla_amqp::message::encode_message(&flotilla_amqp::message::MessageParts {
            body: doc.as_bytes(),
            ..Default::default()
        });
        let mut waiting = Vec::new();
        for link in std::mem::take(&mut self.stat_links) {
            if self.conn.send(link, &msg, true, 0) {
                self.conn.detach(link, None);
            } else if self.conn.link(link).is_some() {
                waiting.push(link);
            }
        }
        self.stat_links = waiting;
    }

    /// Due wills come out of the table, to be published once that is on disk.
    fn tick(&mut self) {
        let (changes, due) = self.svc.wills.tick(now_ms());
        self.changes.extend(changes);
        self.publish.extend(due);
    }

    /// Sends what waits to disk, one commit at a time.
    fn commit(&mut self) {
        if self.inflight.is_some() {
            return;
        }
        if self.changes.is_empty() && !self.must_write {
            // Nothing to wait for: answer and publish now.
            let (settles, publish) = (
                std::mem::take(&mut self.settles),
                std::mem::take(&mut self.publish),
            );
            self.acknowledge(settles);
            self.svc.publish(publish);
            return;
        }
        self.must_write = false;
        self.inflight = Some(Commit {
            done: self.svc.store.write(std::mem::take(&mut self.changes)),
            settles: std::mem::take(&mut self.settles),
            publish: std::mem::take(&mut self.publish),
        });
    }

    fn committed(&mut self, r: Result<(), String>) {
        let Some(c) = self.inflight.take() else {
            return;
        };
        match r {
            Ok(()) => self.acknowledge(c.settles),
            Err(e) => {
                for (link, d) in c.settles {
                    if let Some(i) = self.links.get_mut(&link) {
                        i.unacked = i.unacked.saturating_sub(1);
                    }
                    self.conn.settle(d, rejected(AmqpError::InternalError, &e));
                }
            }
        }
        // Published even if the deletion failed: a will lost is worse
        // than one that might go again after a restart.
        self.svc.publish(c.publish);
        self.svc.report_soon();
    }

    fn acknowledge(&mut self, settles: Vec<(LinkId, DeliveryRef)>) {
        let mut touched = Vec::new();
        for (link, d) in settles {
            self.conn.settle(d, DeliveryState::Accepted(Accepted {}));
            if let Some(i) = self.links.get_mut(&link) {
                i.unacked = i.unacked.saturating_sub(1);
                touched.push(link);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for link in touched {
            if let Some(i) = self.links.get(&link) {
                self.conn.flow(link, WINDOW - i.unacked.min(WINDOW), false);
            }
        }
    }
}

/// Reads an AMQP client's will: the message itself, with `to` (where it
/// goes, which its user must be allowed to send to) and, optionally, the
/// delay annotation.
fn amqp_will(policy: &Policy, info: &LinkInfo, d: &Delivery) -> Result<Will, (AmqpError, String)> {
    let to = flotilla_amqp::message::to_address(&d.payload)
        .map_err(|e| {
            (
                AmqpError::DecodeError,
                format!("malformed message: {}", e.0),
            )
        })?
        .filter(|t| !t.is_empty())
        .ok_or((
            AmqpError::InvalidField,
            "a will needs a `to`: the address it is published to".to_string(),
        ))?
        .to_string();
    if !may_send(
        policy,
        &info.owner.space,
        info.user.as_deref(),
        info.claims.as_deref(),
        &to,
    ) {
        return Err((
            AmqpError::UnauthorizedAccess,
            format!("not allowed to send to {to:?}"),
        ));
    }
    let t = policy.tenancy();
    flotilla_mqtt_gateway::session::destination(&t, &info.owner.space, &to)
        .map_err(|(_, why)| (AmqpError::NotFound, why))?;
    let mut delay = 0u32;
    for span in flotilla_amqp::message::section_spans(&d.payload) {
        let Ok((0x72, span)) = span else {
            continue;
        };
        let a: MessageAnnotations = flotilla_amqp::frame::decode_checked(span).map_err(|e| {
            (
                AmqpError::DecodeError,
                format!("malformed annotations: {e}"),
            )
        })?;
        delay = match a.get(&OwnedKey::Symbol(Symbol::from(DELAY_ANNOTATION))) {
            None => 0,
            Some(Value::Uint(n)) => *n,
            Some(Value::Ulong(n)) => u32::try_from(*n).unwrap_or(u32::MAX),
            Some(Value::Int(n)) if *n >= 0 => *n as u32,
            Some(Value::Long(n)) if *n >= 0 => u32::try_from(*n).unwrap_or(u32::MAX),
            Some(Value::Ubyte(n)) => u32::from(*n),
            Some(Value::Ushort(n)) => u32::from(*n),
            Some(_) => {
                return Err((
                    AmqpError::InvalidField,
                    format!("{DELAY_ANNOTATION} must be a number of seconds"),
                ))
            }
        };
    }
    Ok(Will {
        kind: Kind::Amqp,
        reg: format!("{}/{}", info.instance, d.id.delivery_id),
        owner: info.owner.clone(),
        instance: info.instance,
        user: info.user.clone(),
        claims: info.claims.clone(),
        to,
        qos: if d.settled { 0 } else { 1 },
        retain: false,
        delay,
        message: d.payload.clone(),
        state: State::Live,
    })
}

/// True when `user` (or an anonymous client) may send to `to` in `space`
/// under the rules as they are now.
pub fn may_send(
    policy: &Policy,
    space: &str,
    user: Option<&str>,
    claims: Option<&str>,
    to: &str,
) -> bool {
    let t = policy.tenancy();
    let Some(s) = t.spaces.get(space) else {
        return false;
    };
    // A token user: its claims mapped through the space's rules as they
    // are now (the space must still take tokens, its id not revoked).
    if user.is_some_and(flotilla_amqp::policy::is_token_user) {
        return flotilla_amqp::policy::token_claims_may(s, claims, Operation::Send, to);
    }
    match user {
        Some(u) => s
            .users
            .get(u)
            .is_some_and(|u| flotilla_core::auth::authorized(&u.rules, Operation::Send, to)),
        None => s.anonymous != flotilla_core::config::Anonymous::Deny,
    }
}

fn is_connection_lost(c: &ErrorCondition) -> bool {
    matches!(c, ErrorCondition::Custom(s) if s.as_str() == CONNECTION_LOST)
}

fn rejected(cond: AmqpError, why: &str) -> DeliveryState {
    DeliveryState::Rejected(Rejected {
        error: Some(amqp_error(cond, why)),
    })
}

impl Service {
    /// Publishes due wills into their spaces, as their users, where their
    /// topics go; keeps them for later while the publisher is not
    /// connected.
    pub fn publish(&mut self, wills: Vec<(Key, Will)>) {
        self.unpublished.extend(wills);
        if self.unpublished.is_empty() || !self.publisher.ready() {
            return;
        }
        let t = self.policy.tenancy();
        for ((space, client), w) in std::mem::take(&mut self.unpublished) {
            if !may_send(
                &self.policy,
                &space,
                w.user.as_deref(),
                w.claims.as_deref(),
                &w.to,
            ) {
                warn!(vhost = %space, client.id = %client, topic = %w.to, "will not published: its user may no longer send there");
                continue;
            }
            let dest = match flotilla_mqtt_gateway::session::destination(&t, &space, &w.to) {
                Ok(d) => d,
                Err((_, why)) => {
                    warn!(vhost = %space, client.id = %client, topic = %w.to, reason = %why, "will not published");
                    continue;
                }
            };
            info!(vhost = %space, client.id = %client, topic = %w.to, "publishing a will");
            let up = &self.publisher.pick(&client).tx;
            flotilla_mqtt_gateway::upstream::publish_will(
                up,
                Arc::from(space.as_str()),
                dest,
                w.message,
                w.qos,
                w.retain,
            );
        }
    }

    /// The counts changed: the report is made again within a second
    /// (making it looks at every will, so not once per commit).
    pub fn report_soon(&mut self) {
        self.report_dirty = true;
    }

    /// When the report is to be made again, if it is.
    fn report_due(&self) -> Option<std::time::Instant> {
        self.report_dirty
            .then(|| self.reported_at + Duration::from_secs(1))
    }

    /// Refreshes what `stat` and the console see.
    pub fn update_report(&mut self) {
        self.report_dirty = false;
        self.reported_at = std::time::Instant::now();
        let mut spaces = serde_json::Map::new();
        let mut gateways: HashMap<&str, u64> = HashMap::new();
        let mut held: HashMap<&str, u64> = HashMap::new();
        for ((space, _), w) in self.wills.iter() {
            *held.entry(space.as_str()).or_default() += 1;
            if w.kind == Kind::Gateway && w.state == State::Live {
                *gateways.entry(w.owner.container.as_str()).or_default() += 1;
            }
        }
        let mut names: Vec<&str> = held.keys().copied().collect();
        names.extend(self.wills.counts.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        for s in names {
            let c = self.wills.counts.get(s).copied().unwrap_or_default();
            spaces.insert(
                s.to_string(),
                serde_json::json!({
                    "held": held.get(s).copied().unwrap_or(0),
                    "registered": c.registered,
                    "cancelled": c.cancelled,
                    "fired": {
                        "connectionLost": c.fired_lost,
                        "gatewayLost": c.fired_gateway,
                        "asked": c.fired_asked,
                    },
                    "droppedOrphans": c.dropped_orphans,
                }),
            );
        }
        let v = serde_json::json!({
            "component": "lwt",
            "wills": self.wills.len(),
            "spaces": spaces,
            "gateways": gateways,
        });
        if let Ok(mut r) = self.report.lock() {
            *r = v;
        }
    }
}

impl Handler for Conn<'_> {
    type Signal = Signal;

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<Signal>> + Send {
        let deadline = self.svc.wills.next_deadline().map(|at| {
            let wait = at.saturating_sub(now_ms());
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        // Wills waiting for the publisher: look again every second.
        let retry = (!self.svc.unpublished.is_empty())
            .then(|| tokio::time::Instant::now() + Duration::from_secs(1));
        let report = self.svc.report_due().map(tokio::time::Instant::from_std);
        let wake = [deadline, retry, report].into_iter().flatten().min();
        let closing = self.closing;
        let inflight = self.inflight.as_mut().map(|c| &mut c.done);
        let shutdown = &self.shutdown;
        async move {
            tokio::select! {
                _ = shutdown.cancelled(), if !closing => Some(Signal::Shutdown),
                r = async { inflight.expect("guarded").await }, if inflight.is_some() => {
                    Some(Signal::Committed(r.unwrap_or_else(|_| Err("the will store stopped".into()))))
                }
                _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                    Some(Signal::Tick)
                }
            }
        }
    }

    fn on_signal(&mut self, s: Signal) {
        match s {
            Signal::Committed(r) => self.committed(r),
            Signal::Tick => {
                self.tick();
                self.svc.publish(Vec::new());
                if self
                    .svc
                    .report_due()
                    .is_some_and(|t| t <= std::time::Instant::now())
                {
                    self.svc.update_report();
                }
            }
            Signal::Shutdown => {
                self.closing = true;
                self.conn.close(None);
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Attach {
                link,
                attach,
                reply: false,
            } => self.attach(link, &attach),
            Event::Delivery { link, delivery } => self.delivery(link, delivery),
            Event::Flow { .. } => self.send_stats(),
            Event::Detach { link, error, .. } => {
                self.stat_links.retain(|l| *l != link);
                self.detached(link, error)
            }
            Event::Close { error } => {
                if let Some(e) = error {
                    warn!(error = %flotilla_amqp::client::describe(&e), "the router closed the connection");
                }
                self.closing = true;
            }
            Event::Open(o) => {
                info!(router = %o.container_id, "connected to router: wills are routed here");
            }
            _ => {}
        }
    }

    fn on_turn(&mut self) {
        self.commit();
    }

    fn closing(&self) -> bool {
        self.closing
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        // The connection is gone, and every link with it. What it had not
        // given to the store, and the wills waiting for a commit, go to
        // the next connection: they are published once a commit after
        // the one on its way has landed (the store writes in order).
        self.svc.wills.all_links_ended(now_ms());
        let mut publish = std::mem::take(&mut self.publish);
        if let Some(c) = self.inflight.take() {
            publish.extend(c.publish);
        }
        let changes = std::mem::take(&mut self.changes);
        if !changes.is_empty() || !publish.is_empty() {
            self.svc.carried = Some((changes, publish));
        }
        self.svc.update_report();
    }
}
