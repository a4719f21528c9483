//! The routing core: the address table and the forwarders.
//!
//! Each address (per address space) has one [`AddressState`] behind a mutex:
//! its consumers (outgoing links to receivers, each with the credit its
//! receiver granted), the senders attached to it (so they learn when
//! receivers come and go), and, for anycast, the deliveries waiting for a
//! receiver's credit. Connection tasks route by locking one address for one
//! delivery; nothing else is shared. Deliveries travel to the receiving
//! connection's task as [`ConnEvent::Deliver`]; outcomes travel back to the
//! sending connection as [`ConnEvent::Outcome`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use flotilla_amqp::connection::{DeliveryRef, LinkId};
use flotilla_amqp::types::messaging::DeliveryState;
use flotilla_core::resources::AddressType;
use tokio::sync::mpsc;

/// The `released` outcome (AMQP 1.0 §3.4.4).
pub fn released() -> DeliveryState {
    DeliveryState::Released(flotilla_amqp::types::messaging::Released {})
}

/// A connection, unique for the life of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// What the routing core tells a connection task.
#[derive(Debug)]
pub enum ConnEvent {
    /// Send this message on our outgoing link `link`, for `address`;
    /// `outstanding` counts the link's unsettled deliveries (balancing).
    Deliver {
        link: LinkId,
        msg: Routed,
        address: Arc<AddressState>,
        outstanding: Arc<AtomicU32>,
    },
    /// The receiver's outcome for a delivery that came in on our link.
    Outcome {
        delivery: DeliveryRef,
        state: DeliveryState,
    },
    /// Re-evaluate credit on our incoming link: receivers came or went, or
    /// `returned` of its deliveries left the router's queues.
    Credit { link: LinkId, returned: u32 },
    /// `n` of our incoming link's deliveries wait in the router again (one
    /// routed to a receiver that went away was queued): they hold its
    /// credit until they leave.
    Held { link: LinkId, n: u32 },
}

/// A cloneable sender to a connection task's core inbox.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub id: ConnectionId,
    pub tx: mpsc::UnboundedSender<ConnEvent>,
    /// Set while the connection's socket has more unwritten than its
    /// high-water mark: no new deliveries are routed to it.
    pub congested: Arc<AtomicBool>,
}

impl ConnHandle {
    /// A handle and the inbox it sends to.
    pub fn new(id: ConnectionId) -> (ConnHandle, mpsc::UnboundedReceiver<ConnEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ConnHandle {
                id,
                tx,
                congested: Arc::default(),
            },
            rx,
        )
    }

    /// Sends an event; a connection that is gone is ignored (its links'
    /// deliveries are released by whoever holds them).
    pub fn send(&self, ev: ConnEvent) -> bool {
        self.tx.send(ev).is_ok()
    }

    /// True while the connection's output is over its high-water mark.
    pub fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }
}

/// Where an unsettled delivery came from, to send its outcome back.
#[derive(Debug, Clone)]
pub struct Origin {
    pub conn: ConnHandle,
    pub delivery: DeliveryRef,
}

/// A message on its way through the router.
#[derive(Debug, Clone)]
pub struct Routed {
    pub payload: Bytes,
    pub settled: bool,
    /// Present for unsettled deliveries.
    pub origin: Option<Origin>,
    /// The sending link, for returning its credit when the message waited.
    pub sender: Option<(ConnHandle, LinkId)>,
    /// Set when the message came through the mesh: where it entered and
    /// the routers it passed (loop prevention).
    pub hops: Option<Arc<Hops>>,
}

/// A meshed message's path so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hops {
    pub ingress: String,
    pub trace: Vec<String>,
}

impl Routed {
    /// True when the message already passed router `id`.
    pub fn visited(&self, id: &str) -> bool {
        self.hops
            .as_ref()
            .is_some_and(|h| h.ingress == id || h.trace.iter().any(|t| t == id))
    }
}

impl Routed {
    /// Gives the message back to its sender unsent: `released` (AMQP 1.0
    /// §3.4.4) for unsettled deliveries; settled ones are dropped.
    pub fn release(self) {
        if let Some(o) = self.origin {
            o.conn.send(ConnEvent::Outcome {
                delivery: o.delivery,
                state: crate::core::released(),
            });
        }
    }
}

/// A receiver's link, as the address sees it.
#[derive(Debug)]
pub struct Consumer {
    pub conn: ConnHandle,
    pub link: LinkId,
    /// Deliveries routed to this link so far (serial number).
    pub routed: u32,
    /// The delivery count up to which the receiver allows deliveries.
    pub limit: u32,
    /// Unsettled deliveries on this link, for balancing.
    pub outstanding: Arc<AtomicU32>,
    /// Multicast only: messages held while the receiver has no credit.
    pub backlog: VecDeque<Routed>,
    /// Receivers on other routers, reached through this neighbour's
    /// inter-router data link (anycast only).
    pub remote: Option<String>,
    /// Path cost to the nearest receivers behind this consumer (0: local).
    pub cost: u32,
    /// Local receivers: at most this many unsettled deliveries at once
    /// (the router's link capacity), whatever credit the receiver gives,
    /// so that what waits for a slow receiver waits here, holding its
    /// senders' credit, not in its connection. 0: no cap.
    pub cap: u32,
}

impl Consumer {
    /// True when this consumer may ever take `m`: it is local, or its
    /// neighbour is not a router `m` already passed.
    fn may_take(&self, m: &Routed) -> bool {
        self.remote.as_ref().is_none_or(|n| !m.visited(n))
    }

    /// True when a message may be routed to this consumer now.
    fn can_take(&self) -> bool {
        self.credit() > 0 && !self.conn.is_congested()
    }

    /// How many more deliveries may be routed to this consumer now.
    pub fn credit(&self) -> u32 {
        let c = self.limit.wrapping_sub(self.routed);
        let c = if c > (1 << 31) { 0 } else { c };
        if self.cap == 0 {
            return c;
        }
        c.min(
            self.cap
                .saturating_sub(self.outstanding.load(Ordering::Relaxed)),
        )
    }
}

/// The mutable part of an address.
#[derive(Debug, Default)]
pub struct AddressInner {
    pub consumers: Vec<Consumer>,
    pub senders: Vec<(ConnHandle, LinkId)>,
    /// Anycast deliveries waiting for credit (bounded by senders' credit).
    pub undelivered: VecDeque<Routed>,
    rr: usize,
    /// Multicast receivers exist on other routers.
    pub remote_multicast: bool,
}

impl AddressInner {
    /// The consumer that takes `m` now: one with credit that may take it,
    /// whose connection is not congested, with the fewest unsettled
    /// deliveries plus path cost (an idle local receiver first, remote ones
    /// as local ones get busy); round robin among equals.
    fn pick(&self, m: &Routed) -> Option<usize> {
        let n = self.consumers.len();
        if n == 0 {
            return None;
        }
        let start = self.rr % n;
        let mut best: Option<(usize, u32)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let c = &self.consumers[i];
            // A connection over its high-water mark takes nothing more:
            // the message goes elsewhere or waits, holding its sender's
            // credit.
            if !c.can_take() || !c.may_take(m) {
                continue;
            }
            let score = c.outstanding.load(Ordering::Relaxed).saturating_add(c.cost);
            if best.is_none_or(|(_, bs)| score < bs) {
                best = Some((i, score));
                if score == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

/// What [`AddressState::pump`] did under the lock, finished after it is
/// dropped: waiting messages that left hand their senders' credit back;
/// those no consumer may take are released.
#[derive(Debug, Default)]
#[must_use]
struct Pumped {
    freed: Vec<(ConnHandle, LinkId)>,
    lost: Vec<Routed>,
}

impl Pumped {
    fn finish(self) {
        return_credit_to(
            self.freed
                .iter()
                .chain(self.lost.iter().filter_map(|m| m.sender.as_ref())),
        );
        for m in self.lost {
            m.release();
        }
    }
}

/// Messages held per multicast receiver without credit before the oldest
/// are dropped (multicast is at-most-once).
pub const MULTICAST_BACKLOG: usize = 1000;

/// One address in one address space.
#[derive(Debug)]
pub struct AddressState {
    pub space: String,
    pub address: String,
    pub kind: AddressType,
    inner: Mutex<AddressInner>,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
}

/// What happened to a delivery handed to [`AddressState::forward`].
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// Sent to a receiver (anycast) or to `n` receivers (multicast).
    Sent(usize),
    /// Held until a receiver grants credit (anycast only).
    Queued,
    /// No receiver anywhere: the caller releases or drops it.
    NoReceiver,
}

/// What a receiver's new credit released: messages to send on its link
/// now, and the counter of its unsettled deliveries.
#[derive(Debug, Default)]
pub struct Credited {
    pub msgs: Vec<Routed>,
    pub outstanding: Option<Arc<AtomicU32>>,
}

impl AddressState {
    /// A state kept by no table (a message passing through).
    pub fn unlisted(space: &str, address: &str, kind: AddressType) -> Self {
        Self::new(space, address, kind)
    }

    fn new(space: &str, address: &str, kind: AddressType) -> Self {
        AddressState {
            space: space.to_string(),
            address: address.to_string(),
            kind,
            inner: Mutex::new(AddressInner::default()),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Locks the address. Lock order: never hold two addresses' locks.
    pub fn lock(&self) -> MutexGuard<'_, AddressInner> {
        // A panic while holding the lock would be a bug in this module; the
        // state is still consistent enough to keep serving, so recover.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a receiver exists anywhere in the mesh.
    pub fn has_consumers(&self) -> bool {
        let g = self.lock();
        !g.consumers.is_empty() || g.remote_multicast
    }

    /// True when a receiver is attached to this router.
    pub fn has_local_consumers(&self) -> bool {
        self.lock().consumers.iter().any(|c| c.remote.is_none())
    }

    /// Anycast: receivers behind `neighbor` now exist (`Some(link)`: that
    /// neighbour's data link, with a window of `window` messages) or no
    /// longer do (`None`).
    pub fn set_remote(
        self: &Arc<Self>,
        neighbor: &str,
        via: Option<((ConnHandle, LinkId), u32)>,
        window: u32,
    ) {
        let mut g = self.lock();
        let had_any = !g.consumers.is_empty() || g.remote_multicast;
        let existing = g
            .consumers
            .iter()
            .position(|c| c.remote.as_deref() == Some(neighbor));
        match (existing, via) {
            (Some(i), Some(((conn, link), cost)))
                if g.consumers[i].link == link && g.consumers[i].conn.id == conn.id =>
            {
                g.consumers[i].cost = cost;
            }
            (existing, via) => {
                if let Some(i) = existing {
                    g.consumers.remove(i);
                }
                if let Some(((conn, link), cost)) = via {
                    g.consumers.push(Consumer {
                        conn,
                        link,
                        routed: 0,
                        limit: window,
                        outstanding: Default::default(),
                        backlog: VecDeque::new(),
                        remote: Some(neighbor.to_string()),
                        cost,
                        // Unsettled deliveries count until their outcomes
                        // come back: what waits behind the neighbour for a
                        // slow receiver is bounded by the window too.
                        cap: window,
                    });
                }
            }
        }
        let p = self.after_consumers_changed(&mut g, had_any);
        drop(g);
        p.finish();
    }

    /// Multicast: whether receivers exist on other routers (fan-out there
    /// follows the mesh's trees; senders get credit while any exist).
    pub fn set_remote_multicast(&self, present: bool) {
        let mut g = self.lock();
        let had_any = !g.consumers.is_empty() || g.remote_multicast;
        g.remote_multicast = present;
        let has_any = !g.consumers.is_empty() || g.remote_multicast;
        if had_any != has_any {
            notify_senders(&g);
        }
    }

    /// After any change to the consumers, under the lock: senders hear of a
    /// change between some receivers and none, and what waits goes where it
    /// can now. A consumer that came with credit takes what it may; a
    /// waiting message that no consumer left may take (none at all, or only
    /// ones back towards a router it passed) goes back to its sender once
    /// the lock is dropped ([`Pumped::finish`]). Nothing waits that nobody
    /// can take: that would be a black hole, and everything its sender
    /// sent later would queue behind it.
    fn after_consumers_changed(self: &Arc<Self>, g: &mut AddressInner, had_any: bool) -> Pumped {
        let has_any = !g.consumers.is_empty() || g.remote_multicast;
        if had_any != has_any {
            notify_senders(g);
        }
        let mut p = Pumped::default();
        if self.kind != AddressType::Multicast {
            self.pump(g, true, &mut p);
        }
        p
    }

    /// Hands waiting anycast messages, oldest first, to consumers with
    /// credit that may take them. With `purge`, also takes out those no
    /// consumer may take (into `p.lost`). A message that can go nowhere now
    /// stays, and so do the ones behind it from the same sender: they share
    /// its path, so no consumer with credit may take them either, and order
    /// holds.
    fn pump(self: &Arc<Self>, g: &mut AddressInner, mut purge: bool, p: &mut Pumped) {
        let mut i = 0;
        while i < g.undelivered.len() {
            let has_credit = g.consumers.iter().any(Consumer::can_take);
            if !has_credit && !purge {
                return;
            }
            let m = &g.undelivered[i];
            if purge && !g.consumers.iter().any(|c| c.may_take(m)) {
                p.lost.extend(g.undelivered.remove(i));
                continue;
            }
            let Some(ci) = g.pick(m) else {
                i += 1;
                continue;
            };
            let m = g.undelivered.remove(i).expect("index in range");
            let sender = m.sender.clone();
            match self.send_to(g, ci, m) {
                Ok(()) => p.freed.extend(sender),
                Err(m) => {
                    // Its connection is gone: the consumer was dropped, so
                    // look at everything again.
                    g.undelivered.insert(i, m);
                    if g.consumers.is_empty() && !g.remote_multicast {
                        notify_senders(g);
                    }
                    purge = true;
                    i = 0;
                }
            }
        }
    }

    /// Routes one message by the address's type.
    pub fn forward(self: &Arc<Self>, msg: Routed) -> Forwarded {
        match self.kind {
            AddressType::Multicast => self.forward_multicast(msg),
            _ => self.forward_anycast(msg),
        }
    }

    /// Anycast: to the receiver with credit that has the fewest unsettled
    /// deliveries, round-robin among equals; else wait for credit.
    pub fn forward_anycast(self: &Arc<Self>, mut msg: Routed) -> Forwarded {
        let mut g = self.lock();
        let mut p = Pumped::default();
        if !g.undelivered.is_empty() {
            // Keep order: what waited goes first. A local receiver takes
            // what waits itself whenever its credit comes back (a Flow, an
            // outcome under its cap): behind it, this message waits too.
            // A neighbour's window may be open while what waits cannot go
            // there (it came from that neighbour): then what can goes now,
            // and so does this message, or nothing would ever move it.
            if !g
                .consumers
                .iter()
                .any(|c| c.remote.is_some() && c.can_take())
            {
                if !g.consumers.iter().any(|c| c.may_take(&msg)) {
                    return Forwarded::NoReceiver;
                }
                g.undelivered.push_back(msg);
                return Forwarded::Queued;
            }
            self.pump(&mut g, false, &mut p);
        }
        let forwarded = loop {
            // Never back towards a router the message already passed.
            if !g.consumers.iter().any(|c| c.may_take(&msg)) {
                break Forwarded::NoReceiver;
            }
            // What still waits could go nowhere; this message goes ahead
            // only where none of its sender's earlier ones could.
            let Some(i) = g.pick(&msg) else {
                g.undelivered.push_back(msg);
                break Forwarded::Queued;
            };
            let had_any = !g.consumers.is_empty() || g.remote_multicast;
            match self.send_to(&mut g, i, msg) {
                Ok(()) => break Forwarded::Sent(1),
                Err(m) => {
                    // That connection is gone (its task closed its
                    // channel): its consumer was dropped like a leaving
                    // one; try the others.
                    msg = m;
                    let more = self.after_consumers_changed(&mut g, had_any);
                    p.freed.extend(more.freed);
                    p.lost.extend(more.lost);
                }
            }
        };
        drop(g);
        p.finish();
        forwarded
    }

    /// Sends `msg` to consumer `i` (counted as routed to it). If its
    /// connection is gone, the consumer is dropped and `msg` comes back.
    fn send_to(
        self: &Arc<Self>,
        g: &mut AddressInner,
        i: usize,
        msg: Routed,
    ) -> Result<(), Routed> {
        g.rr = i + 1;
        let c = &mut g.consumers[i];
        let unsettled = !msg.settled;
        if unsettled {
            c.outstanding.fetch_add(1, Ordering::Relaxed);
        }
        let ev = ConnEvent::Deliver {
            link: c.link,
            msg,
            address: self.clone(),
            outstanding: c.outstanding.clone(),
        };
        match c.conn.tx.send(ev) {
            Ok(()) => {
                c.routed = c.routed.wrapping_add(1);
                self.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::SendError(ev)) => {
                if unsettled {
                    c.outstanding.fetch_sub(1, Ordering::Relaxed);
                }
                g.consumers.remove(i);
                let ConnEvent::Deliver { msg, .. } = ev else {
                    unreachable!("the event sent was a delivery")
                };
                Err(msg)
            }
        }
    }

    /// Multicast: a copy to every receiver (at-most-once); a receiver with
    /// no credit keeps up to [`MULTICAST_BACKLOG`] messages, then loses the
    /// oldest.
    pub fn forward_multicast(self: &Arc<Self>, msg: Routed) -> Forwarded {
        let mut g = self.lock();
        if g.consumers.is_empty() {
            return Forwarded::NoReceiver;
        }
        let copy = Routed {
            payload: msg.payload,
            settled: true,
            origin: None,
            sender: None,
            hops: msg.hops,
        };
        let mut sent = 0;
        for c in g.consumers.iter_mut() {
            if c.credit() > 0 && c.backlog.is_empty() && !c.conn.is_congested() {
                c.routed = c.routed.wrapping_add(1);
                c.conn.send(ConnEvent::Deliver {
                    link: c.link,
                    msg: copy.clone(),
                    address: self.clone(),
                    outstanding: c.outstanding.clone(),
                });
                sent += 1;
            } else {
                if c.backlog.len() >= MULTICAST_BACKLOG {
                    c.backlog.pop_front();
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                c.backlog.push_back(copy.clone());
            }
        }
        self.delivered.fetch_add(sent as u64, Ordering::Relaxed);
        Forwarded::Sent(g.consumers.len())
    }

    /// A receiver's credit changed: record its new limit and hand it what
    /// waited for credit. Returns the messages to send on that link now.
    pub fn consumer_credit(
        self: &Arc<Self>,
        conn: ConnectionId,
        link: LinkId,
        limit: u32,
    ) -> Credited {
        self.credit_consumer(|c| c.conn.id == conn && c.link == link, |_| limit)
    }

    /// Sets the limit of the consumer `which` picks to what `limit` says,
    /// and hands it what waited, all under the address lock.
    fn credit_consumer(
        self: &Arc<Self>,
        which: impl Fn(&Consumer) -> bool,
        limit: impl FnOnce(&Consumer) -> u32,
    ) -> Credited {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(c) = g.consumers.iter_mut().find(|c| which(c)) else {
            return Credited::default();
        };
        c.limit = limit(c);
        if c.conn.is_congested() {
            // Taken when the connection has written its backlog.
            return Credited {
                msgs: Vec::new(),
                outstanding: Some(c.outstanding.clone()),
            };
        }
        let mut msgs = Vec::new();
        while c.credit() > 0 {
            let next = match (&self.kind, &c.remote) {
                (AddressType::Multicast, _) => c.backlog.pop_front(),
                (_, None) => g.undelivered.pop_front(),
                // Through a neighbour: only what has not been there yet.
                (_, Some(n)) => g
                    .undelivered
                    .iter()
                    .position(|m| !m.visited(n))
                    .and_then(|i| g.undelivered.remove(i)),
            };
            let Some(m) = next else { break };
            c.routed = c.routed.wrapping_add(1);
            if !m.settled {
                c.outstanding.fetch_add(1, Ordering::Relaxed);
            }
            msgs.push(m);
        }
        self.delivered
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        if c.remote.is_some() && !msgs.is_empty() {
            // Towards a neighbour, what waited goes through the neighbour
            // connection's channel, sent while this lock is held: behind
            // any message routed to it earlier (still in that channel) and
            // ahead of any routed later, so order holds.
            return_credit(&msgs);
            for m in msgs {
                let ev = ConnEvent::Deliver {
                    link: c.link,
                    msg: m,
                    address: self.clone(),
                    outstanding: c.outstanding.clone(),
                };
                if let Err(mpsc::error::SendError(ConnEvent::Deliver { msg, .. })) =
                    c.conn.tx.send(ev)
                {
                    // The connection is gone; its cleanup re-routes the rest.
                    msg.release();
                }
            }
            return Credited {
                msgs: Vec::new(),
                outstanding: Some(c.outstanding.clone()),
            };
        }
        Credited {
            msgs,
            outstanding: Some(c.outstanding.clone()),
        }
    }

    /// The consumer (`conn`, `link`) can take messages again (its
    /// connection's output drained): hand it what waited, within its credit.
    pub fn offer(self: &Arc<Self>, conn: ConnectionId, link: LinkId) -> Credited {
        self.credit_consumer(|c| c.conn.id == conn && c.link == link, |c| c.limit)
    }

    /// Messages of a neighbour's remote consumer went out on the wire:
    /// its window widens by `n`. The consumer is named by its own counter
    /// (`outstanding`), so a consumer made again after a route change
    /// starts with a fresh window, never one widened by the old one's
    /// messages. Returns what waited for the window.
    pub fn widen(self: &Arc<Self>, outstanding: &Arc<AtomicU32>, n: u32) {
        // What waited goes through the neighbour's channel under the lock
        // (see `credit_consumer`): nothing comes back here.
        let _ = self.credit_consumer(
            |c| Arc::ptr_eq(&c.outstanding, outstanding),
            |c| c.limit.wrapping_add(n),
        );
    }

    /// A message routed to `link` could not be sent (the link went away or
    /// lost its credit): take it back and try elsewhere (anycast) or drop it.
    pub fn unsend(self: &Arc<Self>, conn: ConnectionId, link: LinkId, msg: Routed) {
        self.unroute(conn, link, msg.settled);
        if self.kind == AddressType::Multicast {
            return;
        }
        // Re-route without the link (it is gone or has no credit).
        let sender = msg.sender.clone();
        match self.forward_anycast(msg.clone()) {
            Forwarded::NoReceiver => msg.release(),
            Forwarded::Queued => {
                if let Some((conn, link)) = sender {
                    conn.send(ConnEvent::Held { link, n: 1 });
                }
            }
            Forwarded::Sent(_) => {}
        }
    }

    /// Undoes the accounting of a message routed to `link` but not sent.
    pub fn unroute(&self, conn: ConnectionId, link: LinkId, settled: bool) {
        {
            let mut g = self.lock();
            if let Some(c) = g
                .consumers
                .iter_mut()
                .find(|c| c.conn.id == conn && c.link == link)
            {
                c.routed = c.routed.wrapping_sub(1);
                if !settled {
                    c.outstanding.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        self.delivered.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds a receiver, with at most `cap` unsettled deliveries at once
    /// (0: no cap).
    pub fn add_consumer(
        self: &Arc<Self>,
        conn: ConnHandle,
        link: LinkId,
        outstanding: Arc<AtomicU32>,
        cap: u32,
    ) {
        let mut g = self.lock();
        let had_any = !g.consumers.is_empty() || g.remote_multicast;
        g.consumers.push(Consumer {
            conn,
            link,
            routed: 0,
            limit: 0,
            outstanding,
            backlog: VecDeque::new(),
            remote: None,
            cost: 0,
            cap,
        });
        let p = self.after_consumers_changed(&mut g, had_any);
        drop(g);
        p.finish();
    }

    /// Removes a receiver; when it was the last anywhere, waiting anycast
    /// messages are released to their senders and senders lose their credit.
    pub fn remove_consumer(self: &Arc<Self>, conn: ConnectionId, link: LinkId) {
        let mut g = self.lock();
        let had_any = !g.consumers.is_empty() || g.remote_multicast;
        g.consumers
            .retain(|c| !(c.conn.id == conn && c.link == link));
        let p = self.after_consumers_changed(&mut g, had_any);
        drop(g);
        p.finish();
    }

    pub fn add_sender(&self, conn: ConnHandle, link: LinkId) {
        self.lock().senders.push((conn, link));
    }

    pub fn remove_sender(&self, conn: ConnectionId, link: LinkId) {
        self.lock()
            .senders
            .retain(|(c, l)| !(c.id == conn && *l == link));
    }

    /// Releases every waiting message (router shutdown).
    pub fn release_all(&self) {
        let waiting: Vec<Routed> = self.lock().undelivered.drain(..).collect();
        for m in waiting {
            m.release();
        }
    }

    fn is_unused(&self) -> bool {
        let g = self.lock();
        g.consumers.is_empty()
            && g.senders.is_empty()
            && g.undelivered.is_empty()
            && !g.remote_multicast
    }

    /// Numbers for `flotilla stat`.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.consumers.len(), g.senders.len(), g.undelivered.len())
    }
}

fn notify_senders(g: &AddressInner) {
    for (conn, link) in &g.senders {
        conn.send(ConnEvent::Credit {
            link: *link,
            returned: 0,
        });
    }
}

/// Tells senders whose messages waited in the router that the credit those
/// messages held is free again.
pub fn return_credit(msgs: &[Routed]) {
    return_credit_to(msgs.iter().filter_map(|m| m.sender.as_ref()));
}

/// [`return_credit`] for one message per entry of `senders`.
fn return_credit_to<'a>(senders: impl Iterator<Item = &'a (ConnHandle, LinkId)>) {
    let mut per: HashMap<(ConnectionId, LinkId), (ConnHandle, u32)> = HashMap::new();
    for (c, l) in senders {
        per.entry((c.id, *l)).or_insert_with(|| (c.clone(), 0)).1 += 1;
    }
    for ((_, link), (conn, n)) in per {
        conn.send(ConnEvent::Credit { link, returned: n });
    }
}

/// Every address the router knows, by (space, address).
///
/// Lock order: the table's lock, then one address's lock; never the
/// reverse, and never two addresses' locks at once. Adding a sender or a
/// receiver to an address ([`AddressTable::with`]) and forgetting an unused
/// address ([`AddressTable::gc`]) both run under the table's lock, so an
/// address is never forgotten between being found and being used (which
/// would leave a receiver on a state no sender can reach: a black hole).
#[derive(Debug, Default)]
pub struct AddressTable {
    /// space → address → state (looked up by `&str`, no allocation).
    map: Mutex<HashMap<String, HashMap<String, Arc<AddressState>>>>,
}

impl AddressTable {
    fn map(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, Arc<AddressState>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the address's state (made with `kind` if there is none)
    /// while the table's lock is held: what `f` adds (a sender, a
    /// receiver, a neighbour's receivers) is there before any `gc` can
    /// look. `f` may lock the address, and must not touch the table.
    pub fn with<R>(
        &self,
        space: &str,
        address: &str,
        kind: AddressType,
        f: impl FnOnce(&Arc<AddressState>) -> R,
    ) -> (Arc<AddressState>, R) {
        let mut m = self.map();
        let a = match m.get(space).and_then(|s| s.get(address)) {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(AddressState::new(space, address, kind));
                m.entry(space.to_string())
                    .or_default()
                    .insert(address.to_string(), a.clone());
                a
            }
        };
        let r = f(&a);
        (a, r)
    }

    /// The address's state, if it has one (routing a message never makes
    /// one: with no state there is no receiver).
    pub fn get(&self, space: &str, address: &str) -> Option<Arc<AddressState>> {
        self.map().get(space).and_then(|s| s.get(address)).cloned()
    }

    /// Forgets an address nobody uses any more. Called when a sender or
    /// receiver leaves, never per message.
    pub fn gc(&self, a: &AddressState) {
        let mut m = self.map();
        let Some(space) = m.get_mut(&a.space) else {
            return;
        };
        if space
            .get(&a.address)
            .is_some_and(|s| std::ptr::eq(s.as_ref(), a) && s.is_unused())
        {
            space.remove(&a.address);
            if space.is_empty() {
                m.remove(&a.space);
            }
        }
    }

    pub fn all(&self) -> Vec<Arc<AddressState>> {
        self.map()
            .values()
            .flat_map(|s| s.values().cloned())
            .collect()
    }

    /// How many addresses the table holds (tests and `flotilla stat`).
    pub fn len(&self) -> usize {
        self.map().values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(id: u64) -> (ConnHandle, mpsc::UnboundedReceiver<ConnEvent>) {
        ConnHandle::new(ConnectionId(id))
    }

    fn msg(settled: bool, origin: Option<Origin>) -> Routed {
        Routed {
            payload: Bytes::from_static(b"m"),
            settled,
            origin,
            sender: None,
            hops: None,
        }
    }

    #[test]
    fn anycast_balances_by_credit_and_queues_without_it() {
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        assert_eq!(a.forward(msg(true, None)), Forwarded::NoReceiver);
        let (c1, mut r1) = handle(1);
        let (c2, mut r2) = handle(2);
        a.add_consumer(c1, LinkId(1), Default::default(), 0);
        a.add_consumer(c2, LinkId(2), Default::default(), 0);
        assert_eq!(a.forward(msg(true, None)), Forwarded::Queued);
        let sent = a.consumer_credit(ConnectionId(1), LinkId(1), 2).msgs;
        assert_eq!(
            sent.len(),
            1,
            "the queued message goes to the first receiver with credit"
        );
        a.consumer_credit(ConnectionId(2), LinkId(2), 2);
        for _ in 0..3 {
            assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        }
        assert_eq!(
            a.forward(msg(true, None)),
            Forwarded::Queued,
            "all credit used"
        );
        let n1 = std::iter::from_fn(|| r1.try_recv().ok()).count();
        let n2 = std::iter::from_fn(|| r2.try_recv().ok()).count();
        assert_eq!((n1, n2), (1, 2), "credit bounds what each receiver gets");
    }

    #[test]
    fn last_receiver_leaving_releases_waiting_messages() {
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (c1, _r1) = handle(1);
        let (origin, mut ro) = handle(9);
        a.add_consumer(c1, LinkId(1), Default::default(), 0);
        let o = Origin {
            conn: origin,
            delivery: DeliveryRef {
                channel: 0,
                delivery_id: 7,
            },
        };
        assert_eq!(a.forward(msg(false, Some(o))), Forwarded::Queued);
        a.remove_consumer(ConnectionId(1), LinkId(1));
        match ro.try_recv() {
            Ok(ConnEvent::Outcome {
                delivery,
                state: DeliveryState::Released(_),
            }) => assert_eq!(delivery.delivery_id, 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multicast_copies_to_every_receiver() {
        let a = Arc::new(AddressState::new("default", "t", AddressType::Multicast));
        let mut rxs = Vec::new();
        for i in 0..3 {
            let (c, r) = handle(i);
            a.add_consumer(c, LinkId(0), Default::default(), 0);
            a.consumer_credit(ConnectionId(i), LinkId(0), 10);
            rxs.push(r);
        }
        assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(3));
        for r in &mut rxs {
            assert!(matches!(r.try_recv(), Ok(ConnEvent::Deliver { .. })));
        }
    }

    #[test]
    fn anycast_never_goes_back_to_a_router_the_message_passed() {
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (n1, mut r1) = handle(1);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 10);
        let mut m = msg(true, None);
        m.hops = Some(Arc::new(Hops {
            ingress: "r0".into(),
            trace: vec!["r0".into(), "r1".into()],
        }));
        assert_eq!(
            a.forward(m),
            Forwarded::NoReceiver,
            "the only way on is back"
        );
        assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        assert!(matches!(
            r1.try_recv(),
            Ok(ConnEvent::Deliver {
                link: LinkId(5),
                ..
            })
        ));
    }

    fn via(m: Routed, routers: &[&str]) -> Routed {
        Routed {
            hops: Some(Arc::new(Hops {
                ingress: routers[0].into(),
                trace: routers.iter().map(|r| r.to_string()).collect(),
            })),
            ..m
        }
    }

    fn origin(conn: &ConnHandle, id: u32) -> Option<Origin> {
        Some(Origin {
            conn: conn.clone(),
            delivery: DeliveryRef {
                channel: 0,
                delivery_id: id,
            },
        })
    }

    #[test]
    fn a_message_no_receiver_left_may_take_goes_back_and_blocks_nothing() {
        // A message from neighbour r1 waits for a local receiver without
        // credit; the receiver leaves. The only consumer left is back
        // through r1: the message is released, and what a local sender
        // sends next goes to r1 instead of queueing behind it for ever.
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (local, _rl) = handle(1);
        let (n1, mut r1) = handle(2);
        let (peer_in, mut rp) = handle(3);
        a.add_consumer(local, LinkId(1), Default::default(), 0);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 10);
        let stale = via(msg(false, origin(&peer_in, 7)), &["r1"]);
        assert_eq!(a.forward(stale), Forwarded::Queued);
        a.remove_consumer(ConnectionId(1), LinkId(1));
        assert!(
            matches!(
                rp.try_recv(),
                Ok(ConnEvent::Outcome {
                    state: DeliveryState::Released(_),
                    ..
                })
            ),
            "released to the neighbour it came from"
        );
        assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        assert!(matches!(r1.try_recv(), Ok(ConnEvent::Deliver { .. })));
        assert_eq!(a.snapshot().2, 0, "nothing waits");
    }

    #[test]
    fn a_message_waiting_for_one_receiver_does_not_hold_up_others() {
        // A message from r1 waits for the local receiver's credit; the
        // consumer through r1 has credit but may not take it. Later
        // messages from here go through r1 at once.
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (local, mut rl) = handle(1);
        let (n1, mut r1) = handle(2);
        a.add_consumer(local, LinkId(1), Default::default(), 0);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 10);
        assert_eq!(a.forward(via(msg(true, None), &["r1"])), Forwarded::Queued);
        for _ in 0..3 {
            assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        }
        assert_eq!(std::iter::from_fn(|| r1.try_recv().ok()).count(), 3);
        let sent = a.consumer_credit(ConnectionId(1), LinkId(1), 5).msgs;
        assert_eq!(
            sent.len(),
            1,
            "the waiting one, when the receiver has credit"
        );
        assert!(rl.try_recv().is_err());
    }

    #[test]
    fn a_receiver_that_comes_with_credit_takes_what_waited() {
        // A local receiver without credit holds messages back; a neighbour
        // then announces receivers (a window of credit at once): what
        // waited goes there, and the senders get their credit back.
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (local, _rl) = handle(1);
        let (n1, mut r1) = handle(2);
        let (sender, mut rs) = handle(3);
        a.add_consumer(local, LinkId(1), Default::default(), 0);
        let m = Routed {
            sender: Some((sender, LinkId(9))),
            ..msg(true, None)
        };
        assert_eq!(a.forward(m), Forwarded::Queued);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 10);
        assert!(matches!(r1.try_recv(), Ok(ConnEvent::Deliver { .. })));
        assert!(matches!(
            rs.try_recv(),
            Ok(ConnEvent::Credit { returned: 1, .. })
        ));
        assert_eq!(a.snapshot().2, 0, "nothing waits");
    }

    #[test]
    fn what_waited_for_a_neighbour_follows_what_was_already_on_its_way() {
        // m1 goes straight to the neighbour's channel; m2 waits for the
        // window; when the window opens, m2 must queue behind m1 (which the
        // neighbour's connection has not taken from its channel yet).
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (n1, mut r1) = handle(1);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 1);
        let body = |b: &'static [u8]| Routed {
            payload: Bytes::from_static(b),
            ..msg(true, None)
        };
        assert_eq!(a.forward(body(b"m1")), Forwarded::Sent(1));
        assert_eq!(a.forward(body(b"m2")), Forwarded::Queued);
        let credited = a.consumer_credit(ConnectionId(1), LinkId(5), 2);
        assert!(credited.msgs.is_empty(), "sent through the channel instead");
        let mut order = Vec::new();
        while let Ok(ConnEvent::Deliver { msg, .. }) = r1.try_recv() {
            order.push(msg.payload);
        }
        assert_eq!(
            order,
            vec![Bytes::from_static(b"m1"), Bytes::from_static(b"m2")]
        );
    }

    #[test]
    fn a_receiver_whose_connection_is_gone_is_skipped() {
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (c1, r1) = handle(1);
        let (c2, mut r2) = handle(2);
        a.add_consumer(c1, LinkId(1), Default::default(), 0);
        a.add_consumer(c2, LinkId(2), Default::default(), 0);
        a.consumer_credit(ConnectionId(1), LinkId(1), 10);
        a.consumer_credit(ConnectionId(2), LinkId(2), 10);
        drop(r1);
        for _ in 0..4 {
            assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        }
        assert_eq!(std::iter::from_fn(|| r2.try_recv().ok()).count(), 4);
    }

    #[test]
    fn anycast_weighs_unsettled_deliveries_against_path_cost() {
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (local, mut rl) = handle(1);
        let (remote, mut rr) = handle(2);
        a.add_consumer(local, LinkId(1), Default::default(), 0);
        a.consumer_credit(ConnectionId(1), LinkId(1), 100);
        a.set_remote("r1", Some(((remote, LinkId(9)), 2)), 100);
        // Unsettled: each one counts against its receiver until settled.
        let sends: Vec<Forwarded> = (0..4).map(|_| a.forward(msg(false, None))).collect();
        assert!(sends.iter().all(|f| *f == Forwarded::Sent(1)));
        let local_n = std::iter::from_fn(|| rl.try_recv().ok()).count();
        let remote_n = std::iter::from_fn(|| rr.try_recv().ok()).count();
        // Costs 0 and 2: local takes the first three (scores 0, 1, 2 ties
        // go round robin), the remote one gets work once local is busier.
        assert!(
            local_n >= 2 && remote_n >= 1,
            "local {local_n}, remote {remote_n}"
        );
        assert_eq!(local_n + remote_n, 4);
    }

    #[test]
    fn a_neighbours_window_made_again_starts_fresh() {
        // Messages of the old remote consumer that reach the wire after a
        // route change must not widen the new consumer's window.
        let a = Arc::new(AddressState::new("default", "q", AddressType::Anycast));
        let (n1, mut r1) = handle(1);
        a.set_remote("r1", Some(((n1.clone(), LinkId(5)), 1)), 3);
        for _ in 0..3 {
            assert_eq!(a.forward(msg(true, None)), Forwarded::Sent(1));
        }
        let old: Vec<Arc<AtomicU32>> = std::iter::from_fn(|| match r1.try_recv() {
            Ok(ConnEvent::Deliver { outstanding, .. }) => Some(outstanding),
            _ => None,
        })
        .collect();
        assert_eq!(old.len(), 3);
        // The route goes and comes back: a new consumer, a window of 3.
        a.set_remote("r1", None, 3);
        a.set_remote("r1", Some(((n1, LinkId(5)), 1)), 3);
        for o in &old {
            a.widen(o, 1);
        }
        let sent = (0..10)
            .filter(|_| a.forward(msg(true, None)) == Forwarded::Sent(1))
            .count();
        assert_eq!(sent, 3, "exactly the new window");
    }

    /// One simulated receiver's connection.
    struct SimConsumer {
        conn: ConnHandle,
        rx: mpsc::UnboundedReceiver<ConnEvent>,
        outstanding: Arc<AtomicU32>,
        /// Deliveries received and not yet settled.
        held: Vec<Routed>,
        received: u32,
    }

    #[derive(Debug, Clone)]
    enum SimOp {
        AddLocal(usize),
        RemoveLocal(usize),
        Credit(usize, u32),
        Settle(usize),
        Kill(usize),
        Congest(usize, bool),
        NeighbourUp(usize),
        NeighbourDown(usize),
        Wire(usize, usize),
        Forward(usize, bool),
    }

    fn sim_op() -> impl proptest::strategy::Strategy<Value = SimOp> {
        use proptest::prelude::*;
        prop_oneof![
            (0..3usize).prop_map(SimOp::AddLocal),
            (0..3usize).prop_map(SimOp::RemoveLocal),
            (0..3usize, 0..6u32).prop_map(|(i, n)| SimOp::Credit(i, n)),
            (0..3usize).prop_map(SimOp::Settle),
            (0..3usize).prop_map(SimOp::Kill),
            (0..3usize, any::<bool>()).prop_map(|(i, c)| SimOp::Congest(i, c)),
            (0..2usize).prop_map(SimOp::NeighbourUp),
            (0..2usize).prop_map(SimOp::NeighbourDown),
            (0..2usize, 0..6usize).prop_map(|(k, n)| SimOp::Wire(k, n)),
            (0..3usize, any::<bool>()).prop_map(|(s, settled)| SimOp::Forward(s, settled)),
            (0..3usize, any::<bool>()).prop_map(|(s, settled)| SimOp::Forward(s, settled)),
        ]
    }

    /// An address, its local receivers, two neighbours behind which
    /// receivers live, and three senders, all as a connection task would
    /// drive them; counts every outcome and every credit returned.
    struct Sim {
        a: Arc<AddressState>,
        locals: Vec<Option<SimConsumer>>,
        remotes: Vec<Option<SimConsumer>>,
        senders: Vec<(ConnHandle, mpsc::UnboundedReceiver<ConnEvent>)>,
        next_conn: u64,
        next_delivery: u32,
        queued: u64,
        returned: u64,
        /// Unsettled deliveries sent, and the outcomes their senders got.
        unsettled_sent: std::collections::BTreeSet<u32>,
        outcomes: std::collections::BTreeMap<u32, u32>,
    }

    impl Sim {
        fn new() -> Self {
            let senders = (0..3).map(|i| handle(100 + i)).collect();
            Sim {
                a: Arc::new(AddressState::new("default", "q", AddressType::Anycast)),
                locals: (0..3).map(|_| None).collect(),
                remotes: (0..2).map(|_| None).collect(),
                senders,
                next_conn: 1,
                next_delivery: 0,
                queued: 0,
                returned: 0,
                unsettled_sent: Default::default(),
                outcomes: Default::default(),
            }
        }

        /// Takes what the core sent a local receiver's connection.
        fn pump_local(&mut self, i: usize) {
            let a = self.a.clone();
            let Some(c) = self.locals[i].as_mut() else {
                return;
            };
            while let Ok(ev) = c.rx.try_recv() {
                if let ConnEvent::Deliver { msg, .. } = ev {
                    c.received += 1;
                    if !msg.settled {
                        c.held.push(msg);
                    }
                }
            }
            let _ = a;
        }

        fn remove_local(&mut self, i: usize) {
            self.pump_local(i);
            let Some(mut c) = self.locals[i].take() else {
                return;
            };
            self.a.remove_consumer(c.conn.id, LinkId(0));
            for m in c.held.drain(..) {
                c.outstanding.fetch_sub(1, Ordering::Relaxed);
                m.release();
            }
            // What was on its way to the connection goes back (cleanup).
            c.rx.close();
            while let Ok(ConnEvent::Deliver { msg, .. }) = c.rx.try_recv() {
                self.a.unsend(c.conn.id, LinkId(0), msg);
            }
            assert_eq!(c.outstanding.load(Ordering::Relaxed), 0);
        }

        fn neighbour_down(&mut self, k: usize) {
            let Some(mut c) = self.remotes[k].take() else {
                return;
            };
            self.a.set_remote(&format!("r{k}"), None, 4);
            c.rx.close();
            while let Ok(ConnEvent::Deliver { msg, .. }) = c.rx.try_recv() {
                self.a.unsend(c.conn.id, LinkId(9), msg);
            }
        }

        fn apply(&mut self, op: &SimOp) {
            match *op {
                SimOp::AddLocal(i) if self.locals[i].is_none() => {
                    let (conn, rx) = handle(self.next_conn);
                    self.next_conn += 1;
                    let outstanding = Arc::new(AtomicU32::new(0));
                    self.a
                        .add_consumer(conn.clone(), LinkId(0), outstanding.clone(), 2);
                    self.locals[i] = Some(SimConsumer {
                        conn,
                        rx,
                        outstanding,
                        held: Vec::new(),
                        received: 0,
                    });
                }
                SimOp::AddLocal(_) => {}
                SimOp::RemoveLocal(i) => self.remove_local(i),
                SimOp::Credit(i, n) => {
                    self.pump_local(i);
                    let a = self.a.clone();
                    let Some(c) = self.locals[i].as_mut() else {
                        return;
                    };
                    let limit = c.received.wrapping_add(n);
                    let got = a.consumer_credit(c.conn.id, LinkId(0), limit).msgs;
                    return_credit(&got);
                    for m in got {
                        c.received += 1;
                        if !m.settled {
                            c.held.push(m);
                        }
                    }
                }
                SimOp::Settle(i) => {
                    self.pump_local(i);
                    let Some(c) = self.locals[i].as_mut() else {
                        return;
                    };
                    if let Some(m) = c.held.pop() {
                        c.outstanding.fetch_sub(1, Ordering::Relaxed);
                        if let Some(o) = m.origin {
                            o.conn.send(ConnEvent::Outcome {
                                delivery: o.delivery,
                                state: DeliveryState::Accepted(
                                    flotilla_amqp::types::messaging::Accepted {},
                                ),
                            });
                        }
                    }
                }
                SimOp::Kill(i) => {
                    // The connection task is gone: its channel closes; the
                    // core notices when it next routes to it, and the
                    // task's cleanup gives back what it held.
                    self.remove_local(i);
                }
                SimOp::Congest(i, on) => {
                    let Some(c) = self.locals[i].as_ref() else {
                        return;
                    };
                    c.conn.congested.store(on, Ordering::Relaxed);
                    if !on {
                        let (id, a) = (c.conn.id, self.a.clone());
                        let got = a.offer(id, LinkId(0)).msgs;
                        return_credit(&got);
                        let c = self.locals[i].as_mut().expect("checked");
                        for m in got {
                            c.received += 1;
                            if !m.settled {
                                c.held.push(m);
                            }
                        }
                    }
                }
                SimOp::NeighbourUp(k) if self.remotes[k].is_none() => {
                    let (conn, rx) = handle(self.next_conn);
                    self.next_conn += 1;
                    self.a
                        .set_remote(&format!("r{k}"), Some(((conn.clone(), LinkId(9)), 1)), 4);
                    self.remotes[k] = Some(SimConsumer {
                        conn,
                        rx,
                        outstanding: Arc::default(),
                        held: Vec::new(),
                        received: 0,
                    });
                }
                SimOp::NeighbourUp(_) => {}
                SimOp::NeighbourDown(k) => self.neighbour_down(k),
                SimOp::Wire(k, n) => {
                    // The neighbour's connection writes up to `n` to the
                    // wire; the far side accepts each at once.
                    let a = self.a.clone();
                    let Some(c) = self.remotes[k].as_mut() else {
                        return;
                    };
                    for _ in 0..n {
                        let Ok(ConnEvent::Deliver {
                            msg, outstanding, ..
                        }) = c.rx.try_recv()
                        else {
                            break;
                        };
                        a.widen(&outstanding, 1);
                        if !msg.settled {
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                        }
                        if let Some(o) = msg.origin {
                            o.conn.send(ConnEvent::Outcome {
                                delivery: o.delivery,
                                state: DeliveryState::Accepted(
                                    flotilla_amqp::types::messaging::Accepted {},
                                ),
                            });
                        }
                    }
                }
                SimOp::Forward(s, settled) => {
                    let id = self.next_delivery;
                    self.next_delivery += 1;
                    let (conn, _) = &self.senders[s];
                    let origin = (!settled).then(|| Origin {
                        conn: conn.clone(),
                        delivery: DeliveryRef {
                            channel: 0,
                            delivery_id: id,
                        },
                    });
                    if !settled {
                        self.unsettled_sent.insert(id);
                    }
                    let m = Routed {
                        payload: Bytes::from_static(b"m"),
                        settled,
                        origin,
                        sender: Some((conn.clone(), LinkId(s as u32))),
                        hops: None,
                    };
                    match self.a.forward(m.clone()) {
                        Forwarded::Queued => self.queued += 1,
                        Forwarded::NoReceiver => m.release(),
                        Forwarded::Sent(_) => {}
                    }
                }
            }
        }

        fn count_sender_events(&mut self) {
            for (_, rx) in &mut self.senders {
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        ConnEvent::Credit { returned, .. } => self.returned += u64::from(returned),
                        ConnEvent::Held { n, .. } => self.queued += u64::from(n),
                        ConnEvent::Outcome { delivery, .. } => {
                            *self.outcomes.entry(delivery.delivery_id).or_default() += 1
                        }
                        ConnEvent::Deliver { .. } => {}
                    }
                }
            }
        }

        /// Everyone leaves; every counter must come back to zero.
        fn finish(mut self) {
            for _ in 0..4 {
                for i in 0..3 {
                    self.remove_local(i);
                }
                for k in 0..2 {
                    self.neighbour_down(k);
                }
            }
            self.count_sender_events();
            let g = self.a.lock();
            assert!(g.consumers.is_empty());
            assert!(g.undelivered.is_empty(), "nothing waits with no receiver");
            drop(g);
            assert_eq!(
                self.returned, self.queued,
                "every message that waited gave its sender's credit back"
            );
            for id in &self.unsettled_sent {
                assert_eq!(
                    self.outcomes.get(id).copied(),
                    Some(1),
                    "delivery {id} settled exactly once"
                );
            }
            for (id, n) in &self.outcomes {
                assert!(
                    self.unsettled_sent.contains(id) && *n == 1,
                    "outcome for {id}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn attach_detach_and_kill_leave_every_counter_at_zero(
            ops in proptest::collection::vec(sim_op(), 1..80)
        ) {
            let mut sim = Sim::new();
            for op in &ops {
                sim.apply(op);
                sim.count_sender_events();
            }
            sim.finish();
        }
    }
}
