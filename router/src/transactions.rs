//! Transactions through a router (AMQP 1.0 §4): the router is its
//! clients' coordinator, and each transaction goes to the broker that
//! holds its first address.
//!
//! A client's coordinator link ends here. `declare` is answered at once
//! with an id of ours; nothing is asked of any broker yet. The first
//! transfer or disposition under the transaction names a routed link, and
//! so the broker behind it: the transaction is bound to that broker. The
//! router declares it there, on this connection's coordinator link to that
//! broker (one per broker, attached when first needed and routed like any
//! link with [`RouteReq`]), and holds what came under the transaction (and
//! what follows it on the same links, to keep their order) until the
//! broker's `declared`. From then on, what the client sends under our id
//! goes on under the broker's, and the broker's answers come back under
//! ours. The discharge follows the transaction to its broker; one that
//! never touched a broker is answered here.
//!
//! A transaction spans the queues of one broker: work under it for
//! another broker's address is refused (`amqp:not-implemented`, saying
//! which brokers), and the transaction can then only roll back. When the
//! client's coordinator link goes, its transactions roll back (a
//! coordinator cannot be resumed); when its connection goes, the
//! coordinator links to the brokers are detached, and the brokers roll
//! back what they held for it.
//!
//! What waits here is bounded by the client's windows: transfers by the
//! credit the broker gave its links, dispositions by its unsettled
//! deliveries, and at most [`MAX_OPEN`] transactions with a declare and a
//! discharge each.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use flotilla_amqp::connection::{amqp_error, Delivery, DeliveryRef, LinkId};
use flotilla_amqp::txn::{self, Control};
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody};
use flotilla_amqp::types::messaging::{
    Accepted, DeliveryState, Rejected, Released, Source, TargetArchetype,
};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::transaction::{Coordinator, Declared, TxnCapability};
use flotilla_core::resources::AddressType;
use tracing::{debug, warn};

use crate::connection::{ConnRole, ConnectionTask, TaskHandle};
use crate::core::{Origin, Routed};
use crate::linkroute::{RouteEvent, RouteInfo, RouteReq, COORDINATOR_ADDRESS};

/// Why work on a direct address cannot be under a transaction.
pub(crate) const DIRECT: &str = "transactions cover queues and topics (held by brokers); anycast and multicast addresses are direct and take no message under a transaction";
/// Open transactions per client connection (a broker allows as many per
/// client).
pub const MAX_OPEN: usize = 64;
/// The channel of the deliveries this router sends brokers itself (its
/// declares and discharges): no session of a client's has it, as channel
/// numbers stay below the negotiated channel-max, which is less.
pub(crate) const OWN_CHANNEL: u16 = u16::MAX;
/// Our coordinator links to brokers have ids from here up (the engine's
/// link ids are small indexes).
const OWN_LINKS: u32 = 0xFFFF_0000;

/// A connection's transactions.
#[derive(Default)]
pub(crate) struct Txns {
    /// The client's coordinator links (answered here).
    controllers: HashSet<LinkId>,
    /// Open transactions, by our id.
    open: HashMap<Bytes, Local>,
    /// Our id for a broker's (its answers come back under ours).
    ours: HashMap<Bytes, Bytes>,
    /// Our coordinator links to brokers, by broker.
    onward: HashMap<String, Onward>,
    /// A client's link whose transfers wait behind a transaction being
    /// declared at its broker, and that transaction.
    blocked: HashMap<LinkId, Bytes>,
    /// Our declares and discharges waiting for the broker's answer.
    asked: HashMap<u32, Asked>,
    next_delivery: u32,
    next_link: u32,
}

struct Local {
    controller: LinkId,
    at: At,
    /// Why it can only roll back.
    doomed: Option<String>,
}

/// Where a transaction is.
enum At {
    /// Nothing under it yet.
    Nowhere,
    /// Being declared at `broker`; what came under it waits.
    Declaring {
        broker: String,
        waiting: Vec<Waiting>,
    },
    /// Declared at `broker` as `id`.
    Broker {
        broker: String,
        id: Bytes,
        discharging: bool,
    },
    /// Its broker went away: it rolled back there.
    Lost(String),
}

/// Work under a transaction that waits for its declare at the broker.
enum Waiting {
    Transfer(LinkId, Delivery),
    Disposition {
        link: LinkId,
        token: u64,
        state: DeliveryState,
        settled: bool,
    },
    /// Our id, the client's discharge, whether it was settled, `fail`.
    Discharge(Bytes, DeliveryRef, bool, bool),
}

/// Where work under a transaction goes.
enum Bind {
    /// On to the broker, under its id.
    Go(Bytes),
    /// It waits for the declare at the broker.
    Wait,
    /// It waits, and the transaction is to be declared at this broker.
    Declare(String),
}

/// Our coordinator link to one broker.
struct Onward {
    link: LinkId,
    peer: TaskHandle,
    peer_link: Option<LinkId>,
    /// Deliveries the broker allows on the link in all, and those sent.
    limit: u32,
    sent: u32,
    queue: VecDeque<(u32, Bytes)>,
}

/// What one of our deliveries to a broker asked.
enum Asked {
    /// A declare: our id, and the broker.
    Declare(Bytes, String),
    /// A discharge: our id, the client's discharge (unless settled), and
    /// why it was turned into a rollback.
    Discharge(Bytes, Option<DeliveryRef>, Option<String>),
    /// A rollback for a transaction its client let go.
    Abandon,
}

fn rejected(e: AmqpErrorBody) -> DeliveryState {
    DeliveryState::Rejected(Rejected { error: Some(e) })
}

fn released() -> DeliveryState {
    DeliveryState::Released(Released {})
}

impl ConnectionTask {
    fn is_client(&self) -> bool {
        matches!(self.role, ConnRole::Client(_))
    }

    /// A client attached a sender to a coordinator: it is answered here.
    pub(crate) fn txn_attach(&mut self, link: LinkId, attach: &Attach) {
        if !self.is_client() {
            let why = "transactions are for clients of an address space";
            warn!(conn.id = self.id.0, link.name = %attach.name, reason = why, "attach refused");
            return self
                .conn
                .refuse_attach(link, amqp_error(AmqpError::NotAllowed, why));
        }
        let mut answer = attach.clone();
        answer.role = flotilla_amqp::types::definitions::Role::Receiver;
        answer.properties = None;
        self.conn.accept_attach_as(link, &answer);
        self.conn.flow(link, MAX_OPEN as u32, false);
        self.txns.controllers.insert(link);
        debug!(conn.id = self.id.0, "transaction coordinator attached");
    }

    pub(crate) fn is_controller(&self, link: LinkId) -> bool {
        self.txns.controllers.contains(&link)
    }

    /// A `declare` or `discharge` from the client.
    pub(crate) fn txn_control(&mut self, link: LinkId, d: Delivery) {
        if self
            .conn
            .link(link)
            .is_some_and(|l| l.credit < MAX_OPEN as u32 / 2)
        {
            self.conn.flow(link, MAX_OPEN as u32, false);
        }
        let control = match txn::decode(&d.payload) {
            Ok(c) => c,
            Err(e) => return self.reject(&d.id, d.settled, e),
        };
        match control {
            Control::Declare if d.settled => {}
            Control::Declare if self.txns.open.len() >= MAX_OPEN => {
                let why = format!("a connection may have {MAX_OPEN} transactions open");
                self.reject(
                    &d.id,
                    false,
                    amqp_error(AmqpError::ResourceLimitExceeded, why),
                );
            }
            Control::Declare => {
                let id = txn::new_id();
                debug!(conn.id = self.id.0, txn = %txn::hex(&id), "transaction declared");
                self.txns.open.insert(
                    id.clone(),
                    Local {
                        controller: link,
                        at: At::Nowhere,
                        doomed: None,
                    },
                );
                let state = DeliveryState::Declared(Declared {
                    txn_id: id.to_vec().into(),
                });
                self.conn.settle(d.id, state);
            }
            Control::Discharge { txn: id, fail } => self.discharge(id, d.id, d.settled, fail),
        }
    }

    fn discharge(&mut self, ours: Bytes, client: DeliveryRef, settled: bool, fail: bool) {
        let Some(t) = self.txns.open.get_mut(&ours) else {
            return self.reject(&client, settled, txn::unknown(&ours));
        };
        let answer = |doomed: &Option<String>| match doomed {
            Some(why) if !fail => rejected(txn::rolled_back(why)),
            _ => DeliveryState::Accepted(Accepted {}),
        };
        match &mut t.at {
            At::Broker { discharging, .. } if *discharging => {
                self.reject(&client, settled, txn::unknown(&ours))
            }
            At::Declaring { waiting, .. } => {
                waiting.push(Waiting::Discharge(ours, client, settled, fail))
            }
            At::Broker {
                broker,
                id,
                discharging,
            } => {
                *discharging = true;
                let (broker, id) = (broker.clone(), id.clone());
                let doomed = t.doomed.clone();
                let control = Control::Discharge {
                    txn: id,
                    fail: fail || doomed.is_some(),
                };
                let asked = Asked::Discharge(ours, (!settled).then_some(client), doomed);
                self.ask(&broker, &control, asked);
            }
            At::Nowhere => {
                let state = answer(&t.doomed);
                self.txns.open.remove(&ours);
                if !settled {
                    self.conn.settle(client, state);
                }
            }
            At::Lost(why) => {
                let state = answer(&Some(why.clone()));
                self.txns.open.remove(&ours);
                if !settled {
                    self.conn.settle(client, state);
                }
            }
        }
    }

    /// The broker behind a client's routed link, once known.
    fn broker_of(&self, link: LinkId) -> Option<String> {
        self.routes.links.get(&link)?.broker.clone()
    }

    /// A transfer on a client's routed link, before it goes on: held when
    /// its transaction (or one before it on the link) is being declared,
    /// refused when the transaction cannot take it, its id made the
    /// broker's when it is under one. `None`: it was held or answered.
    pub(crate) fn txn_transfer(&mut self, link: LinkId, mut d: Delivery) -> Option<Delivery> {
        if !self.is_client() {
            return Some(d);
        }
        if let Some(ours) = self.txns.blocked.get(&link) {
            if let Some(At::Declaring { waiting, .. }) =
                self.txns.open.get_mut(ours).map(|t| &mut t.at)
            {
                waiting.push(Waiting::Transfer(link, d));
                return None;
            }
        }
        let Some((ours, _)) = txn::state_of(d.state.as_ref()) else {
            return Some(d);
        };
        match self.bind(&ours, link) {
            Ok(Bind::Go(id)) => {
                d.state = d.state.map(|s| txn::with_id(s, &id));
                Some(d)
            }
            Ok(b) => {
                self.txns.blocked.insert(link, ours.clone());
                self.wait(&ours, Waiting::Transfer(link, d), b);
                None
            }
            Err(e) => {
                self.reject(&d.id, d.settled, e);
                None
            }
        }
    }

    /// A client's disposition under a transaction, before it goes on to
    /// the broker (as [`Self::txn_transfer`]); one that cannot be under
    /// the transaction releases the delivery. `None`: it waits.
    pub(crate) fn txn_disposition(
        &mut self,
        link: LinkId,
        token: u64,
        state: DeliveryState,
        settled: bool,
    ) -> Option<DeliveryState> {
        let Some((ours, _)) = txn::state_of(Some(&state)).filter(|_| self.is_client()) else {
            return Some(state);
        };
        match self.bind(&ours, link) {
            Ok(Bind::Go(id)) => Some(txn::with_id(state, &id)),
            Ok(b) => {
                let w = Waiting::Disposition {
                    link,
                    token,
                    state,
                    settled,
                };
                self.wait(&ours, w, b);
                None
            }
            Err(e) => {
                debug!(
                    conn.id = self.id.0,
                    reason = e.description.as_deref().unwrap_or(""),
                    "delivery released: it cannot be under the transaction"
                );
                Some(released())
            }
        }
    }

    /// `w` waits for transaction `ours` to be declared at its broker
    /// (asked now, with [`Bind::Declare`]).
    fn wait(&mut self, ours: &Bytes, w: Waiting, b: Bind) {
        if let Some(At::Declaring { waiting, .. }) = self.txns.open.get_mut(ours).map(|t| &mut t.at)
        {
            waiting.push(w);
        }
        if let Bind::Declare(broker) = b {
            let asked = Asked::Declare(ours.clone(), broker.clone());
            self.ask(&broker, &Control::Declare, asked);
        }
    }

    /// Binds transaction `ours` to the broker of `link` (see [`Bind`]).
    /// `Err`: the work cannot be under it (and a transaction asked to span
    /// brokers, or to cover a direct address, can only roll back).
    fn bind(&mut self, ours: &Bytes, link: LinkId) -> Result<Bind, AmqpErrorBody> {
        let here = self.broker_of(link);
        let Some(t) = self.txns.open.get_mut(ours) else {
            return Err(txn::unknown(ours));
        };
        let Some(here) = here else {
            t.doomed.get_or_insert_with(|| DIRECT.to_string());
            return Err(amqp_error(AmqpError::NotImplemented, DIRECT));
        };
        let (there, go) = match &t.at {
            At::Nowhere => {
                debug!(conn.id = self.id.0, txn = %txn::hex(ours), broker = %here, "transaction bound to its first address's broker");
                t.at = At::Declaring {
                    broker: here.clone(),
                    waiting: Vec::new(),
                };
                return Ok(Bind::Declare(here));
            }
            At::Declaring { broker, .. } => (broker, Bind::Wait),
            At::Broker {
                discharging: true, ..
            } => return Err(txn::unknown(ours)),
            At::Broker { broker, id, .. } => (broker, Bind::Go(id.clone())),
            At::Lost(why) => return Err(txn::rolled_back(why)),
        };
        if *there != here {
            let why = format!(
                "transaction {} holds work on broker {there:?}, and this address is held by broker {here:?}: a transaction spans the queues of one broker (it can now only roll back)",
                txn::hex(ours)
            );
            t.doomed.get_or_insert_with(|| why.clone());
            return Err(amqp_error(AmqpError::NotImplemented, why));
        }
        if let Some(why) = &t.doomed {
            return Err(txn::rolled_back(why));
        }
        Ok(go)
    }

    /// Sends `control` to `broker` on our coordinator link to it
    /// (attached first if need be).
    fn ask(&mut self, broker: &str, control: &Control, asked: Asked) {
        if !self.txns.onward.contains_key(broker) {
            if let Err(e) = self.attach_onward(broker) {
                self.txns.asked.insert(self.txns.next_delivery, asked);
                let n = self.txns.next_delivery;
                self.txns.next_delivery = n.wrapping_add(1);
                return self.txn_outcome(n, rejected(e));
            }
        }
        let n = self.txns.next_delivery;
        self.txns.next_delivery = n.wrapping_add(1);
        self.txns.asked.insert(n, asked);
        if let Some(o) = self.txns.onward.get_mut(broker) {
            o.queue.push_back((n, txn::encode(control)));
        }
        self.pump(broker);
    }

    fn attach_onward(&mut self, broker: &str) -> Result<(), AmqpErrorBody> {
        let Some(p) = self.principal().cloned() else {
            return Err(amqp_error(AmqpError::IllegalState, "connection not open"));
        };
        let link = LinkId(OWN_LINKS.wrapping_add(self.txns.next_link));
        self.txns.next_link += 1;
        let name = format!("txn:{}", txn::hex(&txn::new_id()));
        let attach = Attach {
            name: name.clone(),
            handle: 0.into(),
            role: flotilla_amqp::types::definitions::Role::Sender,
            snd_settle_mode: Default::default(),
            rcv_settle_mode: Default::default(),
            source: Some(Box::new(Source::default())),
            target: Some(Box::new(TargetArchetype::Coordinator(Coordinator {
                capabilities: Some(vec![TxnCapability::LocalTransactions].into()),
            }))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let mut info = RouteInfo {
            space: p.space.clone(),
            kind: AddressType::Queue,
            placed_by: COORDINATOR_ADDRESS.to_string(),
            address: COORDINATOR_ADDRESS.to_string(),
            container: self.remote_container.clone(),
            link_name: name,
            broker: Some(broker.to_string()),
            hops: 0,
            topic: None,
            user: p.user.clone(),
            gateway: None,
            claims: None,
        };
        let Some(peer) = self.route_next_hop(&mut info) else {
            return Err(amqp_error(
                AmqpError::NotFound,
                format!("broker {broker:?} is not reachable"),
            ));
        };
        let req = RouteReq {
            attach,
            info,
            from: self.handle.clone(),
            from_link: link,
        };
        if !peer.route(RouteEvent::Attach(Box::new(req))) {
            return Err(amqp_error(
                AmqpError::NotFound,
                "the route to the broker just closed",
            ));
        }
        self.txns.onward.insert(
            broker.to_string(),
            Onward {
                link,
                peer,
                peer_link: None,
                limit: 0,
                sent: 0,
                queue: VecDeque::new(),
            },
        );
        Ok(())
    }

    /// Sends what waits on our coordinator link to `broker` as its credit
    /// allows.
    fn pump(&mut self, broker: &str) {
        let me = self.handle.core.clone();
        let Some(o) = self.txns.onward.get_mut(broker) else {
            return;
        };
        let Some(pl) = o.peer_link else { return };
        while o.limit.wrapping_sub(o.sent) as i32 > 0 {
            let Some((n, payload)) = o.queue.pop_front() else {
                break;
            };
            let msg = Routed {
                payload,
                settled: false,
                origin: Some(Origin {
                    conn: me.clone(),
                    delivery: DeliveryRef {
                        channel: OWN_CHANNEL,
                        delivery_id: n,
                    },
                }),
                sender: None,
                hops: None,
            };
            o.sent = o.sent.wrapping_add(1);
            if !o.peer.route(RouteEvent::Transfer {
                link: pl,
                msg,
                state: None,
            }) {
                let why = "the route to the broker closed".to_string();
                return self.onward_gone(broker.to_string(), why);
            }
        }
    }

    /// Whether `link` is one of our coordinator links to brokers.
    pub(crate) fn is_onward(&self, link: LinkId) -> bool {
        link.0 >= OWN_LINKS
    }

    /// A link-routing event on one of our coordinator links to brokers.
    pub(crate) fn txn_route_event(&mut self, ev: RouteEvent) {
        let (link, gone) = match ev {
            RouteEvent::Answer {
                link, peer_link, ..
            } => {
                if let Some(o) = self.txns.onward.values_mut().find(|o| o.link == link) {
                    o.peer_link = Some(peer_link);
                }
                (link, None)
            }
            RouteEvent::Flow { link, limit, .. } => {
                if let Some(o) = self.txns.onward.values_mut().find(|o| o.link == link) {
                    o.limit = limit;
                }
                (link, None)
            }
            RouteEvent::Refused { link, error }
            | RouteEvent::Detach {
                link,
                error: Some(error),
                ..
            } => (
                link,
                Some(
                    error
                        .description
                        .unwrap_or_else(|| "the broker refused".into()),
                ),
            ),
            RouteEvent::Detach { link, .. } => (link, Some("the broker detached".to_string())),
            RouteEvent::Transfer { msg, .. } => return msg.release(),
            _ => return,
        };
        let Some(broker) = self
            .txns
            .onward
            .iter()
            .find(|(_, o)| o.link == link)
            .map(|(b, _)| b.clone())
        else {
            return;
        };
        match gone {
            Some(why) => self.onward_gone(broker, why),
            None => self.pump(&broker),
        }
    }

    /// Our coordinator link to `broker` is gone: the transactions there
    /// rolled back.
    fn onward_gone(&mut self, broker: String, why: String) {
        let Some(o) = self.txns.onward.remove(&broker) else {
            return;
        };
        warn!(conn.id = self.id.0, broker = %broker, reason = %why, "coordinator link to the broker gone: its transactions rolled back");
        let lost = format!("its broker {broker:?} went away ({why})");
        // Asked and never sent: answered now (what was sent is answered
        // by the route, as in doubt).
        for (n, _) in o.queue {
            let e = amqp_error(AmqpError::NotFound, lost.clone());
            self.txn_outcome(n, rejected(e));
        }
        let ids: Vec<Bytes> = self
            .txns
            .open
            .iter()
            .filter(|(_, t)| match &t.at {
                At::Declaring { broker: b, .. } | At::Broker { broker: b, .. } => *b == broker,
                _ => false,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.lose(&id, lost.clone());
        }
    }

    /// Transaction `ours` can no longer be at its broker: what waited for
    /// it is refused (or released), and a discharge is rolled back.
    fn lose(&mut self, ours: &Bytes, why: String) {
        let Some(t) = self.txns.open.get_mut(ours) else {
            return;
        };
        let before = std::mem::replace(&mut t.at, At::Lost(why.clone()));
        if let At::Broker {
            id,
            discharging: false,
            ..
        } = &before
        {
            self.txns.ours.remove(id);
        }
        if let At::Declaring { waiting, .. } = before {
            self.txns.blocked.retain(|_, t| t != ours);
            self.replay(waiting);
        }
    }

    /// Work that waited for a declare goes on (or is refused) in order.
    fn replay(&mut self, waiting: Vec<Waiting>) {
        for w in waiting {
            match w {
                Waiting::Transfer(link, d) => self.route_on_delivery(link, d),
                Waiting::Disposition {
                    link,
                    token,
                    state,
                    settled,
                } => self.handle_outcome(link, token, Some(state), settled),
                Waiting::Discharge(ours, client, settled, fail) => {
                    self.discharge(ours, client, settled, fail)
                }
            }
        }
    }

    /// A transfer under transaction `ours` was dropped (`why`): the
    /// transaction can only roll back (it would commit without it).
    pub(crate) fn txn_doom(&mut self, ours: &Bytes, why: &str) {
        if let Some(t) = self.txns.open.get_mut(ours) {
            t.doomed.get_or_insert_with(|| why.to_string());
        }
    }

    /// A transfer with `state` (under our id or, once on its way, the
    /// broker's) was refused or dropped: its transaction, if any, is
    /// doomed (all or nothing).
    pub(crate) fn txn_dropped(&mut self, state: Option<&DeliveryState>, why: &str) {
        if let Some((id, _)) = txn::state_of(state) {
            let ours = self.txns.ours.get(&id).cloned().unwrap_or(id);
            self.txn_doom(&ours, why);
        }
    }

    /// A broker answered one of our declares or discharges.
    pub(crate) fn txn_outcome(&mut self, n: u32, state: DeliveryState) {
        let Some(asked) = self.txns.asked.remove(&n) else {
            return;
        };
        match asked {
            Asked::Declare(ours, broker) => {
                let id = match state {
                    DeliveryState::Declared(d) => Bytes::from(d.txn_id.into_vec()),
                    other => {
                        let why = match other {
                            DeliveryState::Rejected(Rejected { error: Some(e) }) => e
                                .description
                                .unwrap_or_else(|| "the broker refused the declare".into()),
                            _ => "the broker refused the declare".into(),
                        };
                        return self.lose(&ours, why);
                    }
                };
                let Some(t) = self.txns.open.get_mut(&ours) else {
                    // Its client let it go while it was being declared.
                    let control = Control::Discharge {
                        txn: id,
                        fail: true,
                    };
                    return self.ask(&broker, &control, Asked::Abandon);
                };
                if !matches!(t.at, At::Declaring { .. }) {
                    return;
                }
                let At::Declaring { waiting, .. } = std::mem::replace(
                    &mut t.at,
                    At::Broker {
                        broker,
                        id: id.clone(),
                        discharging: false,
                    },
                ) else {
                    return;
                };
                self.txns.ours.insert(id, ours.clone());
                self.txns.blocked.retain(|_, t| *t != ours);
                self.replay(waiting);
            }
            Asked::Discharge(ours, client, doomed) => {
                if let Some(t) = self.txns.open.remove(&ours) {
                    if let At::Broker { id, .. } = t.at {
                        self.txns.ours.remove(&id);
                    }
                }
                let state = match (state, doomed) {
                    (DeliveryState::Accepted(_), Some(why)) => rejected(txn::rolled_back(&why)),
                    (s, _) => s,
                };
                if let Some(c) = client {
                    self.conn.settle(c, state);
                }
            }
            Asked::Abandon => {}
        }
    }

    /// A broker's outcome for a client's transfer: under our id again.
    pub(crate) fn txn_state_back(&self, state: DeliveryState) -> DeliveryState {
        match txn::state_of(Some(&state)).and_then(|(id, _)| self.txns.ours.get(&id)) {
            Some(ours) => txn::with_id(state, ours),
            None => state,
        }
    }

    /// A client's coordinator link is gone: its transactions roll back.
    pub(crate) fn txn_controller_gone(&mut self, link: LinkId) {
        self.txns.controllers.remove(&link);
        let ids: Vec<Bytes> = self
            .txns
            .open
            .iter()
            .filter(|(_, t)| t.controller == link)
            .map(|(id, _)| id.clone())
            .collect();
        for ours in ids {
            let Some(t) = self.txns.open.remove(&ours) else {
                continue;
            };
            debug!(conn.id = self.id.0, txn = %txn::hex(&ours), "coordinator link gone: transaction rolled back");
            match t.at {
                At::Broker {
                    broker,
                    id,
                    discharging: false,
                } => {
                    self.txns.ours.remove(&id);
                    let control = Control::Discharge {
                        txn: id,
                        fail: true,
                    };
                    self.ask(&broker, &control, Asked::Abandon);
                }
                At::Declaring { waiting, .. } => {
                    self.txns.blocked.retain(|_, t| *t != ours);
                    self.replay(waiting);
                }
                _ => {}
            }
        }
    }

    /// The connection ends: our coordinator links to brokers are detached
    /// (the brokers roll back what they held for it).
    pub(crate) fn txn_cleanup(&mut self) {
        for (_, o) in self.txns.onward.drain() {
            if let Some(pl) = o.peer_link {
                o.peer.route(RouteEvent::Detach {
                    link: pl,
                    closed: true,
                    error: None,
                });
            }
        }
        self.txns.open.clear();
        self.txns.asked.clear();
    }
}
