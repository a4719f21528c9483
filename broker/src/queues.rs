//! The queues and subscriptions: one task owns them all. Connection tasks
//! tell it what was stored, who consumes, with how much credit, and how
//! deliveries were settled; it hands each message to one consumer with
//! credit (competing consumers, round robin), keeps order per queue, and
//! puts back what comes back (released, modified, or with its consumer
//! gone).
//!
//! A topic is not a queue: a message published to a topic goes to every
//! subscription whose pattern matches the topic address and whose
//! selector matches the message, each a queue of its own. Durable
//! subscriptions (and shared ones) outlive their consumers, for as long as
//! their terminus timeout says when they have one; the others go with
//! their last consumer. Attaching to a durable subscription that has a
//! consumer steals it (`amqp:link:stolen`): an MQTT session taken over.
//!
//! Retained messages (one per topic and space, MQTT's) are kept here too:
//! set by the gateway, journaled before they are accepted, and read back
//! as a snapshot of the topics a filter matches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_amqp::connection::{DeliveryRef, LinkId};
use flotilla_core::pattern;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, error, info};

use flotilla_amqp::connection::amqp_error;
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody};

use crate::journal::{JournalError, JournalHandle, JournalReader};
use crate::selector::{MessageFields, Selector};
use crate::shards::{Shards, WeakShards};
use crate::store::{self, Stored, SubRecord};
use crate::txn::{TxDest, TxPost};
use flotilla_core::config::Tenancy;
use flotilla_core::resources::{AddressPolicy, Overflow};

/// What the queue task tells a connection task.
#[derive(Debug)]
pub enum ToConn {
    /// Send `msg` on our link `link`: unsettled with `token`, or settled
    /// (a browser's copy).
    Deliver {
        link: LinkId,
        token: u64,
        msg: Stored,
        settled: bool,
    },
    /// A message published on `link` is on disk (or, for a topic, with
    /// every subscription that takes it): accept it.
    Stored {
        link: LinkId,
        delivery: DeliveryRef,
        settled: bool,
    },
    /// Storing it failed.
    Failed {
        link: LinkId,
        delivery: DeliveryRef,
        settled: bool,
        why: String,
    },
    /// Not allowed (rejected with `amqp:unauthorized-access`).
    Refused {
        link: LinkId,
        delivery: DeliveryRef,
        settled: bool,
        why: String,
    },
    /// The state of every queue, for a `$stat` receiver on `link`.
    Stat {
        link: LinkId,
        body: serde_json::Value,
    },
    /// Nothing more to give a consumer that asked to drain.
    Drained { link: LinkId },
    /// The subscription of consumer `link` exists (a durable one on disk):
    /// answer its attach. `resumed`: it existed before this attach;
    /// `meta`: an MQTT session's state, as the gateway last stored it.
    Subscribed {
        link: LinkId,
        resumed: bool,
        meta: Option<String>,
    },
    /// Another attach took the durable subscription consumer `link` had:
    /// detach it with `amqp:link:stolen`.
    Stolen { link: LinkId },
    /// The retained messages a reader on `link` asked for.
    Snapshot { link: LinkId, messages: Vec<Bytes> },
    /// A message (or a coordinator's request) was not taken: rejected
    /// with `error`.
    Rejected {
        link: LinkId,
        delivery: DeliveryRef,
        settled: bool,
        error: AmqpErrorBody,
    },
    /// The durable subscription a receiver named by link name alone
    /// consumes now (`None`: there is none).
    Reattached {
        link: LinkId,
        record: Option<SubRecord>,
    },
    /// What a delivery held for transaction `txn` is (`None`: it is no
    /// longer out, so the transaction does not acknowledge it).
    Held {
        txn: Bytes,
        token: u64,
        acquired: Option<Acquired>,
    },
    /// A discharge is done: accepted, or rejected with `error`.
    Discharged {
        delivery: DeliveryRef,
        settled: bool,
        error: Option<AmqpErrorBody>,
    },
    /// A purge finished: answer on `link` (`None`: no such queue).
    Purged {
        link: LinkId,
        correlation: Option<String>,
        queue: String,
        count: Option<usize>,
    },
}

/// How a consumer settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Accepted or rejected: gone from the queue for good.
    Consumed,
    /// Released or modified: back to the queue (`failed` counts a delivery).
    Requeue { failed: bool },
}

/// Where a connection wants the outcome of a topic publish.
#[derive(Debug)]
pub struct PublishReply {
    pub tx: mpsc::UnboundedSender<ToConn>,
    pub link: LinkId,
    pub delivery: DeliveryRef,
    pub settled: bool,
}

impl PublishReply {
    /// Taken (stored, or with every subscription that takes it): accept it.
    pub fn stored(&self) {
        let _ = self.tx.send(ToConn::Stored {
            link: self.link,
            delivery: self.delivery,
            settled: self.settled,
        });
    }

    /// Storing it failed.
    pub fn failed(&self, why: String) {
        let _ = self.tx.send(ToConn::Failed {
            link: self.link,
            delivery: self.delivery,
            settled: self.settled,
            why,
        });
    }

    /// Not allowed.
    pub fn refused(&self, why: String) {
        let _ = self.tx.send(ToConn::Refused {
            link: self.link,
            delivery: self.delivery,
            settled: self.settled,
            why,
        });
    }

    /// Not taken, for `error`.
    pub fn rejected(&self, error: AmqpErrorBody) {
        let _ = self.tx.send(ToConn::Rejected {
            link: self.link,
            delivery: self.delivery,
            settled: self.settled,
            error,
        });
    }
}

/// A subscription a consumer asks for (made if it does not exist).
#[derive(Debug, Clone)]
pub struct SubSpec {
    pub record: SubRecord,
    pub selector: Option<Arc<Selector>>,
    pub durable: bool,
    /// An MQTT session's subscription (`record.session`).
    pub session: Option<SessionAttach>,
}

/// How an MQTT session attaches to its subscription.
#[derive(Debug, Clone, Default)]
pub struct SessionAttach {
    /// The topic filters it takes from now on (`None`: those it had).
    pub filters: Option<Vec<String>>,
    /// A clean start: whatever the session held is dropped first.
    pub fresh: bool,
}

/// What connection tasks tell the queue task.
#[derive(Debug)]
pub enum BrokerEvent {
    /// A message for `queue` is on disk (`reserved`: its producer counted
    /// it in the queue's gauge already).
    Stored {
        queue: String,
        msg: Stored,
        reserved: bool,
    },
    /// A topic message is on disk for these subscriptions.
    StoredMany {
        queues: Vec<String>,
        msg: Stored,
    },
    /// A message for topic `topic` in `space`.
    Publish {
        space: String,
        topic: String,
        payload: Bytes,
        expires: u64,
        /// When it may first be delivered (0: at once).
        due: u64,
        reply: Option<PublishReply>,
    },
    /// A consumer of queue `queue` (`browse`: it sees copies, takes nothing).
    Attach {
        queue: String,
        conn: u64,
        link: LinkId,
        tx: mpsc::UnboundedSender<ToConn>,
        browse: bool,
        /// It takes only the messages this selector matches.
        selector: Option<Arc<Selector>>,
    },
    /// A consumer of a subscription.
    Subscribe {
        spec: SubSpec,
        conn: u64,
        link: LinkId,
        tx: mpsc::UnboundedSender<ToConn>,
    },
    /// Makes a subscription that exists whether consumed or not (a
    /// `subscription` address).
    Ensure {
        spec: SubSpec,
    },
    Credit {
        conn: u64,
        link: LinkId,
        limit: u32,
        /// The consumer asks to use up its credit now (AMQP 1.0 §2.6.7).
        drain: bool,
    },
    /// A consumer's link detached; `closed` ends its subscription if it
    /// was durable (and it was the last consumer).
    Detach {
        conn: u64,
        link: LinkId,
        closed: bool,
    },
    Settle {
        token: u64,
        how: Settlement,
    },
    Gone {
        conn: u64,
    },
    /// The journal holds subscription `key`'s record as `seq`.
    SubRecorded {
        key: String,
        seq: u64,
    },
    /// Removes every message waiting in `queue`; answers how many on
    /// the connection's `link`.
    Purge {
        queue: String,
        tx: mpsc::UnboundedSender<ToConn>,
        link: LinkId,
        correlation: Option<String>,
    },
    /// The state of every queue (of `space`, if given), as JSON, to `link`.
    Stat {
        tx: mpsc::UnboundedSender<ToConn>,
        link: LinkId,
        space: Option<String>,
    },
    /// The state of every queue, for the console.
    Report {
        reply: tokio::sync::oneshot::Sender<serde_json::Value>,
    },
    /// Removes every message waiting in `queue` (a console command).
    PurgeNow {
        queue: String,
    },
    /// Sets the retained message of `topic` in `space` (an empty message
    /// clears it); `reply` hears once it is on disk.
    Retain {
        space: String,
        topic: String,
        message: Bytes,
        reply: PublishReply,
    },
    /// The journal holds retained message `version` as record `seq`.
    RetainRecorded {
        space: String,
        topic: String,
        version: u64,
        seq: u64,
    },
    /// Changes an MQTT session's subscription `key`: its topic filters,
    /// its state, its expiry; `reply` hears once it is on disk.
    SessionUpdate {
        key: String,
        filters: Option<Vec<String>>,
        meta: Option<String>,
        expiry: Option<Option<u32>>,
        reply: PublishReply,
    },
    /// Ends MQTT session `key` (if there is one): its consumers are
    /// detached (`amqp:link:stolen`) and it is deleted.
    /// `user` (the one connecting) must be the session's own user.
    SessionDelete {
        key: String,
        user: Option<String>,
        reply: PublishReply,
    },
    /// A receiver asks for the first of these durable subscriptions that
    /// exists (by link name alone), and consumes it.
    Reattach {
        keys: Vec<String>,
        conn: u64,
        link: LinkId,
        tx: mpsc::UnboundedSender<ToConn>,
    },
    /// The address spaces changed: address policies are looked up again.
    Tenancy(Arc<Tenancy>),
    /// An operator's request about one queue's messages (the console's
    /// queue browser); the answer is JSON.
    Inspect {
        queue: String,
        op: Inspect,
        reply: tokio::sync::oneshot::Sender<serde_json::Value>,
    },
    /// Keeps delivery `token` out until transaction `txn` (of connection
    /// `conn`) is discharged; the connection hears what it holds
    /// (`ToConn::Held`).
    Hold {
        token: u64,
        txn: Bytes,
        conn: u64,
        tx: mpsc::UnboundedSender<ToConn>,
    },
    /// A transaction rolled back: deliveries it held go back to their
    /// queues, counted as delivered (on task `shard`).
    TxRelease {
        shard: usize,
        tokens: Vec<u64>,
    },
    /// Commits a transaction of `space` (to the space's task): its
    /// messages and what it acknowledged, written as one batch.
    TxCommit {
        space: String,
        posts: Vec<TxPost>,
        acks: Vec<(Acquired, Settlement)>,
        reply: PublishReply,
    },
    /// A commit is on disk: the space's subscriptions take its messages
    /// (the queues' tasks got theirs from the journal directly).
    TxCommitted {
        space: String,
        first: u64,
        posts: Vec<Committed>,
        acks: Vec<(Acquired, Settlement)>,
        reply: PublishReply,
    },
    /// A delivery held by a committed transaction is settled `how`.
    TxSettled {
        token: u64,
        how: Settlement,
    },
    /// Time to tell the journal how far back this task needs it:
    /// everything before `upto` that concerns this task has been handled.
    Floor {
        upto: u64,
    },
    /// The retained messages of `space` whose topic `filter` matches, to
    /// the reader on `link`.
    ReadRetained {
        space: String,
        filter: String,
        tx: mpsc::UnboundedSender<ToConn>,
        link: LinkId,
    },
}

/// A delivery a transaction acquired: enough to acknowledge it in the
/// journal and settle it on its task.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub token: u64,
    pub queue: String,
    pub seq: u64,
    pub size: u32,
}

/// What an operator asks of a queue's messages.
#[derive(Debug, Clone)]
pub enum Inspect {
    /// The first `limit` messages waiting (scheduled ones after them).
    Browse { limit: usize },
    /// Moves messages (those with these ids, or all) back to the address
    /// they were dead-lettered or expired from.
    Retry { ids: Option<Vec<u64>> },
    /// Deletes one waiting message.
    Delete { id: u64 },
    /// Deletes every waiting message.
    Purge,
}

/// The message annotation that says which address a dead-lettered (or
/// expired) message came from, for retrying it.
pub const ORIGINAL_ADDRESS: &str = "x-opt-flotilla-original-address";

/// A transaction's message on its way to its queues: those it is stored
/// for (`record`: its record's place in the commit) and the non-durable
/// subscriptions that take it in memory.
#[derive(Debug)]
pub struct Committed {
    record: Option<u64>,
    /// Stored for these queues of this task (the space's subscriptions);
    /// the others' tasks get it from the journal's callback.
    local: Vec<String>,
    memory: Vec<String>,
    payload: Bytes,
    expires: u64,
    due: u64,
}

struct Consumer {
    conn: u64,
    link: LinkId,
    tx: mpsc::UnboundedSender<ToConn>,
    routed: u32,
    limit: u32,
    /// Browsers: the sequence number of the next message to show.
    browse: Option<u64>,
    /// Asked to drain: after this dispatch its credit is used up.
    drain: bool,
    /// A queue consumer's selector: it takes only the messages it matches.
    selector: Option<Arc<Selector>>,
}

impl Consumer {
    fn new(conn: u64, link: LinkId, tx: mpsc::UnboundedSender<ToConn>, browse: bool) -> Self {
        Consumer {
            conn,
            link,
            tx,
            routed: 0,
            limit: 0,
            browse: browse.then_some(0),
            drain: false,
            selector: None,
        }
    }

    /// Whether its selector (if any) takes `msg` (a body in memory).
    fn takes(&self, msg: &Stored) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| s.matches(&MessageFields::from_message(&msg.payload)))
    }

    fn credit(&self) -> u32 {
        let c = self.limit.wrapping_sub(self.routed);
        if c > (1 << 31) {
            0
        } else {
            c
        }
    }
}

#[derive(Default)]
struct Counters {
    enqueued: u64,
    delivered: u64,
    acked: u64,
    expired: u64,
    dead_lettered: u64,
    /// Dropped to make room (overflow `dropOldest`).
    dropped: u64,
    /// Per second, over the last tick.
    in_rate: u64,
    out_rate: u64,
    last_enqueued: u64,
    last_acked: u64,
}

struct Queue {
    messages: VecDeque<Stored>,
    consumers: Vec<Consumer>,
    rr: usize,
    /// Its messages are in the journal (queues and durable subscriptions).
    durable: bool,
    /// Messages that carry an expiry time.
    expiring: usize,
    /// Messages not due yet (scheduled delivery), by due time and seq.
    scheduled: BTreeMap<(u64, u64), Stored>,
    /// Message groups and the consumer (connection, link) each is with.
    groups: HashMap<Arc<str>, (u64, LinkId)>,
    /// It has had a message with a group: dispatch looks at groups.
    grouped: bool,
    /// What it holds, for producers checking its limits.
    gauge: Arc<Gauge>,
    /// Its address's policy, and the tenancy generation it was looked up
    /// in (looked up again when first needed after a tenancy change).
    policy: Option<(u64, Arc<AddressPolicy>)>,
    stats: Counters,
}

impl Queue {
    fn new(durable: bool) -> Self {
        Queue {
            messages: VecDeque::new(),
            consumers: Vec::new(),
            rr: 0,
            durable,
            expiring: 0,
            scheduled: BTreeMap::new(),
            groups: HashMap::new(),
            grouped: false,
            gauge: Arc::default(),
            policy: None,
            stats: Counters::default(),
        }
    }

    /// A new message: waiting for consumers, or, not due yet, scheduled
    /// (returns when it is due).
    fn push(&mut self, msg: Stored) -> Option<u64> {
        self.stats.enqueued += 1;
        self.grouped |= msg.group.is_some();
        if msg.due > now_ms() {
            let due = msg.due;
            self.scheduled.insert((due, msg.seq), msg);
            return Some(due);
        }
        if msg.expires != 0 {
            self.expiring += 1;
        }
        self.messages.push_back(msg);
        None
    }

    /// Moves the scheduled messages due by `now` among those waiting (in
    /// sequence order: a message due is as old as when it was sent).
    fn release_due(&mut self, now: u64) -> bool {
        let mut any = false;
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let msg = entry.remove();
            self.requeue(msg);
            any = true;
        }
        any
    }

    /// Every message it holds waiting (due or scheduled).
    fn held(&self) -> impl Iterator<Item = &Stored> {
        self.messages.iter().chain(self.scheduled.values())
    }

    /// Puts a message back in sequence order (usually at the front).
    fn requeue(&mut self, msg: Stored) {
        if msg.expires != 0 {
            self.expiring += 1;
        }
        let at = self.messages.partition_point(|m| m.seq < msg.seq);
        self.messages.insert(at, msg);
    }
}

struct Subscription {
    record: SubRecord,
    selector: Option<Arc<Selector>>,
    durable: bool,
    /// Seq of its journal record (durable; 0 until written).
    record_seq: u64,
    /// Since when nobody consumes it (durable ones with an expiry end
    /// that long after).
    idle_since: Option<Instant>,
}

/// The subscriptions of one address space, indexed for publishing: by
/// exact topic, and the patterns (checked one by one).
#[derive(Default)]
struct SpaceSubs {
    exact: HashMap<String, Vec<String>>,
    patterns: Vec<(String, String)>,
}

impl SpaceSubs {
    fn add(&mut self, pattern_or_topic: &str, key: &str) {
        if pattern::is_pattern(pattern_or_topic) {
            self.patterns
                .push((pattern_or_topic.to_string(), key.to_string()));
        } else {
            self.exact
                .entry(pattern_or_topic.to_string())
                .or_default()
                .push(key.to_string());
        }
    }

    fn remove(&mut self, pattern_or_topic: &str, key: &str) {
        if let Some(v) = self.exact.get_mut(pattern_or_topic) {
            v.retain(|k| k != key);
            if v.is_empty() {
                self.exact.remove(pattern_or_topic);
            }
        }
        self.patterns.retain(|(_, k)| k != key);
    }

    /// The keys of the subscriptions whose topic or pattern takes `topic`.
    fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.exact.get(topic).into_iter().flatten().chain(
            self.patterns
                .iter()
                .filter(move |(p, _)| pattern::matches_topic(p, topic))
                .map(|(_, k)| k),
        )
    }
}

/// The address a dead-lettered or expired message came from.
fn original_address(message: &[u8]) -> Option<String> {
    const KEY: &[u8] = ORIGINAL_ADDRESS.as_bytes();
    let head = &message[..message.len().min(4096)];
    if !head.windows(KEY.len()).any(|w| w == KEY) {
        return None;
    }
    MessageFields::from_message(message)
        .annotation(ORIGINAL_ADDRESS)
        .map(str::to_string)
}

/// True for a message an MQTT client published at QoS 0: the gateway
/// marks it with the annotation `x-opt-mqtt-qos` = ubyte 0, near the
/// start of the message (after at most a header).
fn mqtt_qos0(message: &[u8]) -> bool {
    const MARK: &[u8] = b"\xa3\x0ex-opt-mqtt-qos\x50\x00";
    let head = &message[..message.len().min(160)];
    head.windows(MARK.len()).any(|w| w == MARK)
}

/// A retained message: its journal record (0 until written) and the
/// version that wrote it (a rewrite of an older version must not win).
struct Retained {
    seq: u64,
    version: u64,
    message: Bytes,
}

struct Inflight {
    queue: String,
    conn: u64,
    link: LinkId,
    msg: Stored,
    /// Settled under this transaction: it stays out until the
    /// transaction is discharged, whatever happens to its consumer.
    txn: Option<Bytes>,
}

/// Where a dispatch hands messages: the deliveries out (by token) and
/// the QoS 0 messages of an MQTT session, settled at once.
struct Outgoing<'a> {
    queue: &'a str,
    session: bool,
    next_token: &'a mut u64,
    step: u64,
    inflight: &'a mut HashMap<u64, Inflight>,
    settled_now: Vec<(u64, u32)>,
}

impl Outgoing<'_> {
    /// Sends `msg` to consumer `c`; gives it back if the consumer's
    /// connection is gone.
    fn hand(&mut self, c: &mut Consumer, stats: &mut Counters, msg: Stored) -> Result<(), Stored> {
        if self.session && mqtt_qos0(&msg.payload) {
            let (seq, size) = (msg.seq, msg.size);
            let ev = ToConn::Deliver {
                link: c.link,
                token: 0,
                msg,
                settled: true,
            };
            if c.tx.send(ev).is_ok() {
                c.routed = c.routed.wrapping_add(1);
                stats.delivered += 1;
                stats.acked += 1;
                self.settled_now.push((seq, size));
            }
            return Ok(());
        }
        let token = *self.next_token;
        let ev = ToConn::Deliver {
            link: c.link,
            token,
            msg: msg.clone(),
            settled: false,
        };
        if c.tx.send(ev).is_err() {
            return Err(msg);
        }
        *self.next_token += self.step;
        c.routed = c.routed.wrapping_add(1);
        stats.delivered += 1;
        self.inflight.insert(
            token,
            Inflight {
                queue: self.queue.to_string(),
                conn: c.conn,
                link: c.link,
                msg,
                txn: None,
            },
        );
        Ok(())
    }
}

/// What happens to messages that fail or expire.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Deliveries (returned released-with-failure, modified, or abandoned)
    /// after which a message moves to `queue`.
    pub max_deliveries: u32,
    /// The dead-letter queue's address (in each address space).
    pub queue: String,
    /// Where expired messages go (in each space); `None`: dropped.
    pub expiry_queue: Option<String>,
}

/// Message bodies held in memory against the broker's limit. Past it,
/// bodies stay in the journal and are read back when they are delivered
/// (paging); only what waits in queues counts, not what is out with
/// consumers (bounded by their credit).
pub struct Memory {
    pub limit: usize,
    held: usize,
    reader: Option<JournalReader>,
    paged: u64,
    paged_in: u64,
}

impl Memory {
    /// A budget of `limit` bytes; `reader` reads paged bodies back.
    pub fn new(limit: usize, reader: Option<JournalReader>) -> Self {
        Memory {
            limit,
            held: 0,
            reader,
            paged: 0,
            paged_in: 0,
        }
    }

    /// A message about to wait in a queue: counted, or paged out.
    fn admit(&mut self, mut msg: Stored) -> Stored {
        if msg.paged {
            return msg;
        }
        let len = msg.payload.len();
        let pageable = msg.seq < MEMORY_SEQ_BASE && self.reader.is_some();
        if pageable && self.held + len > self.limit {
            msg.payload = Bytes::new();
            msg.paged = true;
            self.paged += 1;
        } else {
            self.held += len;
        }
        msg
    }

    /// A message left its queue.
    fn release(&mut self, msg: &Stored) {
        if !msg.paged {
            self.held = self.held.saturating_sub(msg.payload.len());
        }
    }

    /// Reads a paged message's body back. False if it cannot be read.
    fn load(&mut self, msg: &mut Stored) -> bool {
        if !msg.paged {
            return true;
        }
        let read = self.reader.as_mut().map(|r| r.read(msg.seq));
        match read {
            Some(Ok(rec)) => match store::payload_of(&rec) {
                Some(p) => {
                    msg.payload = p;
                    msg.paged = false;
                    self.paged_in += 1;
                    true
                }
                None => {
                    error!(seq = msg.seq, "a paged message's record is not a message");
                    false
                }
            },
            Some(Err(e)) => {
                error!(seq = msg.seq, error = %e, "cannot read a paged message back");
                false
            }
            None => false,
        }
    }
}

/// What a queue holds (waiting, scheduled, out with consumers, and on its
/// way to the journal): producers of a queue with a `maxDepth` or
/// `maxBytes` reserve room here before they store a message.
#[derive(Debug, Default)]
pub struct Gauge {
    pub messages: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl Gauge {
    fn add(&self, size: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        self.messages.fetch_add(1, Relaxed);
        self.bytes.fetch_add(u64::from(size), Relaxed);
    }

    /// A message left for good.
    pub fn sub(&self, size: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .messages
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        let _ = self.bytes.fetch_update(Relaxed, Relaxed, |n| {
            Some(n.saturating_sub(u64::from(size)))
        });
    }

    /// Takes room for a message of `size` bytes if the limits allow it.
    pub fn reserve(&self, size: u32, max_depth: Option<u64>, max_bytes: Option<u64>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.messages.fetch_add(1, Relaxed);
        let b = self.bytes.fetch_add(u64::from(size), Relaxed);
        if max_depth.is_some_and(|m| n >= m) || max_bytes.is_some_and(|m| b + u64::from(size) > m) {
            self.sub(size);
            return false;
        }
        true
    }

    /// Counts a message whose producer did not reserve room.
    pub fn count(&self, size: u32) {
        self.add(size);
    }

    fn full(&self, max_depth: Option<u64>, max_bytes: Option<u64>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        max_depth.is_some_and(|m| self.messages.load(Relaxed) >= m)
            || max_bytes.is_some_and(|m| self.bytes.load(Relaxed) >= m)
    }

    /// Messages and bytes it counts now.
    pub fn load(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.messages.load(Relaxed), self.bytes.load(Relaxed))
    }
}

/// Every queue's gauge, by queue key: shared by the queue task and the
/// producers.
pub type Gauges = Arc<std::sync::Mutex<HashMap<String, Arc<Gauge>>>>;

/// The gauge of queue `key` (made if it has none yet).
pub fn gauge_of(gauges: &Gauges, key: &str) -> Arc<Gauge> {
    gauges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.to_string())
        .or_default()
        .clone()
}

/// A cloneable handle to the queue tasks.
pub type QueueHandle = crate::shards::Shards;

/// Groups a queue remembers beyond those of its waiting messages.
const MAX_IDLE_GROUPS: usize = 10_000;

/// Sequence numbers for messages that never reach the journal (they only
/// order a non-durable subscription's queue).
const MEMORY_SEQ_BASE: u64 = 1 << 62;

use flotilla_core::time::now_ms;

/// Owns every queue and subscription of a broker.
pub struct QueueTask {
    /// Our own handle, for messages moved to the dead-letter queue (weak,
    /// so the task still ends when every connection's handle is gone).
    tx: mpsc::WeakSender<BrokerEvent>,
    dead_letter: DeadLetter,
    rx: mpsc::Receiver<BrokerEvent>,
    queues: HashMap<String, Queue>,
    subs: HashMap<String, Subscription>,
    inflight: HashMap<u64, Inflight>,
    next_token: u64,
    /// Tokens go up by the number of tasks (`token % tasks` is ours).
    token_step: u64,
    next_memory_seq: u64,
    /// The highest journal seq this task has seen stored: records above it
    /// may still be on their way here, so their segments must stay.
    seen: u64,
    journal: JournalHandle,
    acks_since_retire: u32,
    memory: Memory,
    /// Consumers of durable subscriptions whose record is not on disk yet.
    waiting: Vec<(String, Consumer)>,
    /// Bytes held per address space, counted every second.
    usage: Usage,
    /// Subscriptions by space, for publishing.
    index: HashMap<String, SpaceSubs>,
    /// Which queue each consumer takes from.
    consumer_at: HashMap<(u64, LinkId), String>,
    /// Retained messages by space and topic.
    retained: HashMap<String, BTreeMap<String, Retained>>,
    retain_version: u64,
    /// This task's number among the queue tasks, and the tasks.
    shard: usize,
    shards: WeakShards,
    /// What this task last counted into each space's usage.
    last_usage: HashMap<String, u64>,
    ticks: u64,
    /// The address spaces as last heard (for address policies), and how
    /// many times they changed.
    tenancy: Arc<Tenancy>,
    generation: u64,
    /// Every queue's gauge, shared with producers.
    gauges: Gauges,
    /// When queues' scheduled messages are due: (time, queue).
    timers: std::collections::BTreeSet<(u64, String)>,
}

/// Bytes of messages each address space holds (queued or out with
/// consumers), as of the last second: what publishes check against the
/// space's `storedBytes` quota.
pub type Usage = std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>>;

impl QueueTask {
    /// Queue task `shard` of `shards`, taking its events from `rx`,
    /// starting with its part of what the journal held.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (shard, shards, rx): (usize, &Shards, mpsc::Receiver<BrokerEvent>),
        journal: JournalHandle,
        recovered: store::Recovered,
        dead_letter: DeadLetter,
        mut memory: Memory,
        usage: Usage,
        gauges: Gauges,
    ) -> QueueTask {
        let weak = shards.downgrade();
        let tx = weak.own(shard);
        let n = shards.len() as u64;
        let mut queues = HashMap::new();
        let mut seen = 0;
        let mut timers = std::collections::BTreeSet::new();
        for (name, messages) in recovered.queues {
            let mut q = Queue::new(true);
            q.gauge = gauge_of(&gauges, &name);
            for m in messages {
                seen = seen.max(m.seq);
                q.gauge.count(m.size);
                if let Some(due) = q.push(memory.admit(m)) {
                    timers.insert((due, name.clone()));
                }
            }
            q.stats = Counters::default();
            queues.insert(name, q);
        }
        let mut subs = HashMap::new();
        let mut index: HashMap<String, SpaceSubs> = HashMap::new();
        let now = Instant::now();
        for (seq, record) in recovered.subscriptions {
            seen = seen.max(seq);
            let selector = record
                .selector
                .as_deref()
                .and_then(|s| Selector::parse(s).ok().map(Arc::new));
            queues.entry(record.key.clone()).or_insert_with(|| {
                let mut q = Queue::new(true);
                q.gauge = gauge_of(&gauges, &record.key);
                q
            });
            let ix = index.entry(record.space.clone()).or_default();
            for f in record.filters() {
                ix.add(f, &record.key);
            }
            subs.insert(
                record.key.clone(),
                Subscription {
                    record,
                    selector,
                    durable: true,
                    record_seq: seq,
                    // Nobody consumes after a restart: expiry counts from now.
                    idle_since: Some(now),
                },
            );
        }
        let mut retained: HashMap<String, BTreeMap<String, Retained>> = HashMap::new();
        for (seq, space, topic, message) in recovered.retained {
            seen = seen.max(seq);
            retained.entry(space).or_default().insert(
                topic,
                Retained {
                    seq,
                    version: 0,
                    message,
                },
            );
        }
        QueueTask {
            tx,
            dead_letter,
            rx,
            queues,
            subs,
            inflight: HashMap::new(),
            // Tokens name their task: token % shards.
            next_token: shard as u64 + n,
            token_step: n,
            next_memory_seq: MEMORY_SEQ_BASE,
            seen,
            journal,
            acks_since_retire: 0,
            memory,
            waiting: Vec::new(),
            usage,
            index,
            consumer_at: HashMap::new(),
            retained,
            retain_version: 0,
            shard,
            shards: weak,
            last_usage: HashMap::new(),
            ticks: 0,
            timers,
            tenancy: Arc::new(Tenancy::default()),
            generation: 0,
            gauges,
        }
    }

    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = self.timers.first().map(|(due, _)| *due);
            let wake = async {
                match next_due {
                    Some(due) => {
                        let wait = due.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let n = tokio::select! {
                n = self.rx.recv_many(&mut batch, 256) => n,
                _ = tick.tick() => {
                    self.tick();
                    continue;
                }
                _ = wake => {
                    for q in self.release_due() {
                        self.dispatch(&q);
                    }
                    continue;
                }
            };
            if n == 0 {
                return;
            }
            let mut touched: Vec<String> = Vec::new();
            for ev in batch.drain(..) {
                for q in self.handle(ev) {
                    if !touched.contains(&q) {
                        touched.push(q);
                    }
                }
            }
            for q in touched {
                self.dispatch(&q);
            }
        }
    }

    /// Handles one event; returns the queues that may now have work.
    fn handle(&mut self, ev: BrokerEvent) -> Vec<String> {
        match ev {
            BrokerEvent::Stored {
                queue,
                msg,
                reserved,
            } => {
                self.seen = self.seen.max(msg.seq);
                self.make_queue(&queue);
                if reserved {
                    self.enqueue_counted(&queue, msg);
                } else {
                    self.enqueue(&queue, msg);
                }
                vec![queue]
            }
            BrokerEvent::StoredMany { queues, msg } => {
                self.seen = self.seen.max(msg.seq);
                let mut touched = Vec::new();
                for name in queues {
                    // A subscription deleted while the message was stored
                    // does not get it.
                    if self.enqueue(&name, msg.clone()) {
                        touched.push(name);
                    }
                }
                touched
            }
            BrokerEvent::Publish {
                space,
                topic,
                payload,
                expires,
                due,
                reply,
            } => self.publish(&space, &topic, payload, (expires, due), reply),
            BrokerEvent::Attach {
                queue,
                conn,
                link,
                tx,
                browse,
                selector,
            } => {
                self.make_queue(&queue);
                let Some(q) = self.queues.get_mut(&queue) else {
                    return Vec::new();
                };
                let mut c = Consumer::new(conn, link, tx, browse);
                c.selector = selector;
                q.consumers.push(c);
                self.consumer_at.insert((conn, link), queue.clone());
                vec![queue]
            }
            BrokerEvent::Subscribe {
                spec,
                conn,
                link,
                tx,
            } => {
                let steal = (spec.durable && !spec.record.shared) || spec.session.is_some();
                let mut touched = Vec::new();
                let key = spec.record.key.clone();
                if steal {
                    touched = self.steal(&key, conn, link);
                }
                let session = spec.session.clone();
                if session.as_ref().is_some_and(|s| s.fresh) && self.subs.contains_key(&key) {
                    debug!(subscription = %key, "session starts afresh");
                    self.delete_subscription(&key);
                }
                let (key, made) = self.ensure(spec);
                if let Some(filters) = session.and_then(|s| s.filters) {
                    self.set_filters(&key, filters);
                }
                let c = Consumer::new(conn, link, tx, false);
                if self
                    .subs
                    .get(&key)
                    .is_some_and(|s| s.durable && s.record_seq == 0)
                {
                    // Answered once its record is on disk (`SubRecorded`).
                    self.waiting.push((key, c));
                    return touched;
                }
                let meta = if made {
                    None
                } else {
                    self.subs.get(&key).and_then(|s| s.record.meta.clone())
                };
                let _ = c.tx.send(ToConn::Subscribed {
                    link,
                    resumed: !made,
                    meta,
                });
                self.add_consumer(&key, c);
                touched.push(key);
                touched
            }
            BrokerEvent::Ensure { spec } => {
                self.ensure(spec);
                Vec::new()
            }
            BrokerEvent::SubRecorded { key, seq } => {
                if let Some(s) = self.subs.get_mut(&key) {
                    s.record_seq = seq;
                    s.record.since.get_or_insert(seq);
                }
                let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
                    .into_iter()
                    .partition(|(k, _)| *k == key);
                self.waiting = still;
                for (_, c) in ready {
                    let _ = c.tx.send(ToConn::Subscribed {
                        link: c.link,
                        resumed: false,
                        meta: None,
                    });
                    self.add_consumer(&key, c);
                }
                vec![key]
            }
            BrokerEvent::Credit {
                conn,
                link,
                limit,
                drain,
            } => {
                let Some(name) = self.consumer_at.get(&(conn, link)) else {
                    return Vec::new();
                };
                let Some(q) = self.queues.get_mut(name) else {
                    return Vec::new();
                };
                if let Some(c) = q
                    .consumers
                    .iter_mut()
                    .find(|c| c.conn == conn && c.link == link)
                {
                    c.limit = limit;
                    c.drain = drain;
                }
                vec![name.clone()]
            }
            BrokerEvent::Detach { conn, link, closed } => self.drop_consumers(
                |c| c.conn == conn && c.link == link,
                |f| f.conn == conn && f.link == link,
                closed,
            ),
            BrokerEvent::Gone { conn } => {
                self.drop_consumers(|c| c.conn == conn, |f| f.conn == conn, false)
            }
            BrokerEvent::Reattach {
                keys,
                conn,
                link,
                tx,
            } => {
                let found = keys.into_iter().find(|k| {
                    self.subs
                        .get(k)
                        .is_some_and(|s| s.durable && s.record_seq != 0)
                });
                let Some(key) = found else {
                    let _ = tx.send(ToConn::Reattached { link, record: None });
                    return Vec::new();
                };
                let record = self.subs.get(&key).map(|s| s.record.clone());
                let _ = tx.send(ToConn::Reattached { link, record });
                self.add_consumer(&key, Consumer::new(conn, link, tx, false));
                vec![key]
            }
            BrokerEvent::Inspect { queue, op, reply } => {
                let (answer, touched) = self.inspect(&queue, op);
                let _ = reply.send(answer);
                touched
            }
            BrokerEvent::Tenancy(t) => {
                // Each queue's policy is looked up again when next needed
                // (not here: that would cost every queue per change).
                self.tenancy = t;
                self.generation += 1;
                Vec::new()
            }
            BrokerEvent::Settle { token, how } => {
                let Some(f) = self.inflight.remove(&token) else {
                    return Vec::new();
                };
                match how {
                    Settlement::Consumed => {
                        if let Some(q) = self.queues.get_mut(&f.queue) {
                            q.stats.acked += 1;
                        }
                        self.ack(&f.queue, f.msg.seq, f.msg.size);
                        Vec::new()
                    }
                    Settlement::Requeue { failed } => {
                        self.redeliver(f.queue, f.msg, failed).into_iter().collect()
                    }
                }
            }
            BrokerEvent::Purge {
                queue,
                tx,
                link,
                correlation,
            } => {
                let count = self.purge(&queue);
                let _ = tx.send(ToConn::Purged {
                    link,
                    correlation,
                    queue,
                    count,
                });
                Vec::new()
            }
            BrokerEvent::Report { reply } => {
                let _ = reply.send(self.stat());
                Vec::new()
            }
            BrokerEvent::PurgeNow { queue } => {
                self.purge(&queue);
                Vec::new()
            }
            BrokerEvent::Hold {
                token,
                txn,
                conn,
                tx,
            } => {
                let acquired = match self.inflight.get_mut(&token) {
                    Some(f) if f.conn == conn => {
                        f.txn = Some(txn.clone());
                        Some(Acquired {
                            token,
                            queue: f.queue.clone(),
                            seq: f.msg.seq,
                            size: f.msg.size,
                        })
                    }
                    _ => None,
                };
                let _ = tx.send(ToConn::Held {
                    txn,
                    token,
                    acquired,
                });
                Vec::new()
            }
            BrokerEvent::TxRelease { tokens, .. } => self.give_back(tokens),
            BrokerEvent::TxCommit {
                space,
                posts,
                acks,
                reply,
            } => {
                self.commit(space, posts, acks, reply);
                Vec::new()
            }
            BrokerEvent::TxCommitted {
                first,
                posts,
                acks,
                reply,
                ..
            } => {
                let mut touched = Vec::new();
                for p in posts {
                    let seq = p.record.map(|i| first + i);
                    if let Some(seq) = seq {
                        self.seen = self.seen.max(seq);
                    }
                    for q in &p.local {
                        let seq = seq.unwrap_or_else(|| {
                            self.next_memory_seq += 1;
                            self.next_memory_seq
                        });
                        let mut msg = Stored::new(seq, p.payload.clone(), p.expires);
                        msg.due = p.due;
                        if self.enqueue(q, msg) && !touched.contains(q) {
                            touched.push(q.clone());
                        }
                    }
                    for q in p.memory {
                        self.next_memory_seq += 1;
                        let mut m = Stored::new(self.next_memory_seq, p.payload.clone(), p.expires);
                        m.due = p.due;
                        if self.enqueue(&q, m) && !touched.contains(&q) {
                            touched.push(q);
                        }
                    }
                }
                for (a, how) in acks {
                    self.shards.send_soon(BrokerEvent::TxSettled {
                        token: a.token,
                        how,
                    });
                }
                let _ = reply.tx.send(ToConn::Discharged {
                    delivery: reply.delivery,
                    settled: reply.settled,
                    error: None,
                });
                touched
            }
            BrokerEvent::TxSettled { token, how } => {
                let Some(f) = self.inflight.remove(&token) else {
                    return Vec::new();
                };
                match how {
                    Settlement::Consumed => {
                        if let Some(q) = self.queues.get_mut(&f.queue) {
                            q.stats.acked += 1;
                            q.gauge.sub(f.msg.size);
                        }
                        self.acks_since_retire += 1;
                        Vec::new()
                    }
                    Settlement::Requeue { failed } => {
                        self.redeliver(f.queue, f.msg, failed).into_iter().collect()
                    }
                }
            }
            BrokerEvent::Floor { upto } => {
                self.floor(upto);
                Vec::new()
            }
            BrokerEvent::Retain {
                space,
                topic,
                message,
                reply,
            } => {
                self.retain(space, topic, message, reply);
                Vec::new()
            }
            BrokerEvent::RetainRecorded {
                space,
                topic,
                version,
                seq,
            } => {
                self.seen = self.seen.max(seq);
                if let Some(r) = self
                    .retained
                    .get_mut(&space)
                    .and_then(|m| m.get_mut(&topic))
                    .filter(|r| r.version == version)
                {
                    r.seq = seq;
                }
                Vec::new()
            }
            BrokerEvent::SessionUpdate {
                key,
                filters,
                meta,
                expiry,
                reply,
            } => {
                self.update_session(&key, filters, meta, expiry, reply);
                Vec::new()
            }
            BrokerEvent::SessionDelete { key, user, reply } => {
                // Another user's client id does not clear this session.
                let owner = self
                    .subs
                    .get(&key)
                    .and_then(|s| s.record.meta.as_deref())
                    .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                    .map(|m| m["user"].as_str().map(str::to_string));
                if owner.is_some_and(|o| o != user) {
                    reply.refused("the session belongs to another user".into());
                    return Vec::new();
                }
                let touched = self.steal(&key, u64::MAX, LinkId(u32::MAX));
                if self.subs.get(&key).is_some_and(|s| s.record.session) {
                    debug!(subscription = %key, "session ended by a clean start");
                    self.delete_subscription(&key);
                }
                reply.stored();
                touched.into_iter().filter(|k| *k != key).collect()
            }
            BrokerEvent::ReadRetained {
                space,
                filter,
                tx,
                link,
            } => {
                let messages = self.read_retained(&space, &filter);
                let _ = tx.send(ToConn::Snapshot { link, messages });
                Vec::new()
            }
            BrokerEvent::Stat { tx, link, space } => {
                let mut body = self.stat();
                if let Some(space) = space {
                    crate::shards::only_space(&mut body, &space);
                }
                let _ = tx.send(ToConn::Stat { link, body });
                Vec::new()
            }
        }
    }

    /// Makes the subscription `spec` names if it does not exist (or
    /// changed its topic or selector while nobody consumed it); returns
    /// its queue's key, and whether it was made now.
    fn ensure(&mut self, spec: SubSpec) -> (String, bool) {
        let key = spec.record.key.clone();
        if let Some(s) = self.subs.get_mut(&key) {
            let same = s.record.pattern == spec.record.pattern
                && s.record.selector == spec.record.selector;
            let idle = self.queues.get(&key).is_none_or(|q| q.consumers.is_empty());
            if same || !idle {
                let durable_changed = spec.record.session && s.durable != spec.durable;
                if durable_changed {
                    // An MQTT session resumed with another expiry: kept
                    // on disk from now on, or no longer.
                    s.durable = spec.durable;
                    if let Some(q) = self.queues.get_mut(&key) {
                        q.durable = spec.durable;
                    }
                    if !spec.durable {
                        let _ = self
                            .journal
                            .append_then(store::unsubscribe(&key), Box::new(|_| {}));
                        s.record_seq = 0;
                    }
                }
                if s.durable && (durable_changed || (same && s.record.expiry != spec.record.expiry))
                {
                    // A session resumed with another expiry interval.
                    s.record.expiry = spec.record.expiry;
                    let tx = self.tx.clone();
                    let k = key.clone();
                    let _ = self.journal.append_then(
                        store::subscribe(&s.record),
                        Box::new(move |r: Result<u64, JournalError>| {
                            if let (Ok(seq), Some(tx)) = (r, tx.upgrade()) {
                                crate::shards::send_waiting(
                                    &tx,
                                    BrokerEvent::SubRecorded { key: k, seq },
                                );
                            }
                        }),
                    );
                }
                return (key, false);
            }
            // A durable subscriber came back with another topic or
            // selector: a new subscription replaces the old (JMS).
            info!(subscription = %key, "subscription changed; its messages are dropped");
            self.delete_subscription(&key);
        }
        debug!(subscription = %key, pattern = %spec.record.pattern, durable = spec.durable, "subscription made");
        if spec.durable {
            let tx = self.tx.clone();
            let k = key.clone();
            let _ = self.journal.append_then(
                store::subscribe(&spec.record),
                Box::new(move |r: Result<u64, JournalError>| {
                    if let (Ok(seq), Some(tx)) = (r, tx.upgrade()) {
                        crate::shards::send_waiting(&tx, BrokerEvent::SubRecorded { key: k, seq });
                    }
                }),
            );
        }
        let mut q = Queue::new(spec.durable);
        q.gauge = gauge_of(&self.gauges, &key);
        self.queues.insert(key.clone(), q);
        let ix = self.index.entry(spec.record.space.clone()).or_default();
        for f in spec.record.filters() {
            ix.add(f, &key);
        }
        self.subs.insert(
            key.clone(),
            Subscription {
                record: spec.record,
                selector: spec.selector,
                durable: spec.durable,
                record_seq: 0,
                idle_since: Some(Instant::now()),
            },
        );
        (key, true)
    }

    /// A consumer takes from queue `key`.
    fn add_consumer(&mut self, key: &str, c: Consumer) {
        if let Some(s) = self.subs.get_mut(key) {
            s.idle_since = None;
        }
        if let Some(q) = self.queues.get_mut(key) {
            self.consumer_at.insert((c.conn, c.link), key.to_string());
            q.consumers.push(c);
        }
    }

    /// A consumer attaches to subscription `key` that is one consumer's
    /// (durable, or an MQTT session's): whoever consumed it before loses
    /// it, and their deliveries go back to it (it stays, whatever its
    /// durability: the new consumer takes it). Returns the queues that
    /// may now have work.
    fn steal(&mut self, key: &str, conn: u64, link: LinkId) -> Vec<String> {
        let Some(q) = self.queues.get_mut(key) else {
            return Vec::new();
        };
        let mut old = Vec::new();
        q.consumers.retain(|c| {
            let keep = c.conn == conn && c.link == link;
            if !keep {
                old.push((c.conn, c.link, c.tx.clone()));
            }
            keep
        });
        if old.is_empty() {
            return Vec::new();
        }
        info!(subscription = %key, "subscription taken over by a new attach");
        let mut gone = std::collections::HashSet::new();
        for (c, l, tx) in old {
            self.consumer_at.remove(&(c, l));
            let _ = tx.send(ToConn::Stolen { link: l });
            gone.insert((c, l));
        }
        let back: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| gone.contains(&(f.conn, f.link)) && f.txn.is_none())
            .map(|(t, _)| *t)
            .collect();
        for token in back {
            if let Some(f) = self.inflight.remove(&token) {
                self.redeliver(f.queue, f.msg, true);
            }
        }
        vec![key.to_string()]
    }

    /// An MQTT session's subscription takes what `filters` match from now on.
    fn set_filters(&mut self, key: &str, filters: Vec<String>) {
        let Some(s) = self.subs.get_mut(key) else {
            return;
        };
        if s.record.patterns == filters {
            return;
        }
        let ix = self.index.entry(s.record.space.clone()).or_default();
        for f in s.record.filters() {
            ix.remove(f, key);
        }
        s.record.patterns = filters;
        for f in s.record.filters() {
            ix.add(f, key);
        }
    }

    /// The gateway changes an MQTT session: its filters, state or expiry;
    /// on disk (a durable session) before the gateway hears it is done.
    fn update_session(
        &mut self,
        key: &str,
        filters: Option<Vec<String>>,
        meta: Option<String>,
        expiry: Option<Option<u32>>,
        reply: PublishReply,
    ) {
        if !self.subs.get(key).is_some_and(|s| s.record.session) {
            reply.failed("no such session".into());
            return;
        }
        if let Some(f) = filters {
            self.set_filters(key, f);
        }
        let Some(s) = self.subs.get_mut(key) else {
            return;
        };
        if let Some(m) = meta {
            s.record.meta = Some(m);
        }
        if let Some(e) = expiry {
            s.record.expiry = e;
        }
        if !s.durable {
            reply.stored();
            return;
        }
        let (tx, k) = (self.tx.clone(), key.to_string());
        let done = Box::new(move |r: Result<u64, JournalError>| match r {
            Ok(seq) => {
                if let Some(tx) = tx.upgrade() {
                    crate::shards::send_waiting(&tx, BrokerEvent::SubRecorded { key: k, seq });
                }
                reply.stored();
            }
            Err(e) => reply.failed(e.to_string()),
        });
        let _ = self.journal.append_then(store::subscribe(&s.record), done);
    }

    /// Sets or clears a retained message: in memory at once (so a rewrite
    /// for compaction always writes the newest), accepted once on disk.
    fn retain(&mut self, space: String, topic: String, message: Bytes, reply: PublishReply) {
        self.retain_version += 1;
        let version = self.retain_version;
        let map = self.retained.entry(space.clone()).or_default();
        if message.is_empty() {
            map.remove(&topic);
        } else {
            map.insert(
                topic.clone(),
                Retained {
                    seq: 0,
                    version,
                    message: message.clone(),
                },
            );
        }
        self.record_retained(space, topic, version, &message, move |r| match r {
            Ok(()) => reply.stored(),
            Err(e) => reply.failed(e),
        });
    }

    /// Writes retained message `version` of (`space`, `topic`) to the
    /// journal; once it is there, the task learns its sequence number
    /// (`RetainRecorded`) and `then` hears how it went.
    fn record_retained(
        &self,
        space: String,
        topic: String,
        version: u64,
        message: &Bytes,
        then: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        let tx = self.tx.clone();
        let record = store::retain(&space, &topic, message);
        let done = Box::new(move |r: Result<u64, JournalError>| match r {
            Ok(seq) => {
                if let Some(tx) = tx.upgrade() {
                    crate::shards::send_waiting(
                        &tx,
                        BrokerEvent::RetainRecorded {
                            space,
                            topic,
                            version,
                            seq,
                        },
                    );
                }
                then(Ok(()));
            }
            Err(e) => then(Err(e.to_string())),
        });
        let _ = self.journal.append_then(record, done);
    }

    /// The retained messages of `space` whose topic `filter` matches, in
    /// topic order.
    fn read_retained(&self, space: &str, filter: &str) -> Vec<Bytes> {
        let Some(map) = self.retained.get(space) else {
            return Vec::new();
        };
        if !pattern::is_pattern(filter) {
            return map
                .get(filter)
                .map(|r| r.message.clone())
                .into_iter()
                .collect();
        }
        map.iter()
            .filter(|(t, _)| pattern::matches_topic(filter, t))
            .map(|(_, r)| r.message.clone())
            .collect()
    }

    /// Deletes a subscription and what it held.
    fn delete_subscription(&mut self, key: &str) {
        let Some(s) = self.subs.remove(key) else {
            return;
        };
        if let Some(ix) = self.index.get_mut(&s.record.space) {
            for f in s.record.filters() {
                ix.remove(f, key);
            }
        }
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(q) = self.queues.remove(key) {
            for m in &q.messages {
                self.memory.release(m);
            }
            for c in &q.consumers {
                self.consumer_at.remove(&(c.conn, c.link));
            }
        }
        if s.durable {
            // Recovery drops the messages of a subscription that is gone.
            let _ = self
                .journal
                .append_then(store::unsubscribe(key), Box::new(|_| {}));
        }
        debug!(subscription = %key, "subscription deleted");
    }

    /// A topic message: to every subscription in `space` that takes it;
    /// on disk first for the durable ones.
    fn publish(
        &mut self,
        space: &str,
        topic: &str,
        payload: Bytes,
        (expires, due): (u64, u64),
        reply: Option<PublishReply>,
    ) -> Vec<String> {
        let (durable, memory, payload) = self.route_topic(space, topic, payload);
        // A subscription that is full and refuses more refuses the message
        // for all (as a full queue would).
        let full = durable.iter().chain(&memory).find(|k| {
            let p = self.policy(k);
            p.overflow != Some(Overflow::DropOldest)
                && p.bounded()
                && self
                    .queues
                    .get(k.as_str())
                    .is_some_and(|q| q.gauge.full(p.max_depth, p.max_bytes))
        });
        if let Some(k) = full {
            let error = amqp_error(
                AmqpError::ResourceLimitExceeded,
                format!("subscription {k:?} of topic {topic:?} is full (its address policy's maxDepth/maxBytes)"),
            );
            if let Some(r) = reply {
                r.rejected(error);
            }
            return Vec::new();
        }
        for key in &memory {
            self.next_memory_seq += 1;
            let mut msg = Stored::new(self.next_memory_seq, payload.clone(), expires);
            msg.due = due;
            self.enqueue(key, msg);
        }
        if durable.is_empty() {
            if let Some(r) = reply {
                r.stored();
            }
            return memory;
        }
        let names: Vec<&str> = durable.iter().map(String::as_str).collect();
        let record = store::publish_at(&names, expires, due, &payload);
        let tx = self.tx.clone();
        let done = Box::new(move |r: Result<u64, JournalError>| match r {
            Ok(seq) => {
                if let Some(tx) = tx.upgrade() {
                    let mut msg = Stored::new(seq, payload, expires);
                    msg.due = due;
                    crate::shards::send_waiting(
                        &tx,
                        BrokerEvent::StoredMany {
                            queues: durable,
                            msg,
                        },
                    );
                }
                if let Some(r) = reply {
                    r.stored();
                }
            }
            Err(e) => {
                if let Some(r) = reply {
                    r.failed(e.to_string());
                }
            }
        });
        let _ = self.journal.append_then(record, done);
        memory
    }

    /// The subscriptions a message for `topic` in `space` goes to: the
    /// durable ones (it is stored for them) and the others (in memory);
    /// and the message as they get it.
    fn route_topic(
        &self,
        space: &str,
        topic: &str,
        payload: Bytes,
    ) -> (Vec<String>, Vec<String>, Bytes) {
        let mut fields: Option<MessageFields> = None;
        let mut durable: Vec<String> = Vec::new();
        let mut memory: Vec<String> = Vec::new();
        let none = SpaceSubs::default();
        let index = self.index.get(space).unwrap_or(&none);
        let mut session = false;
        for key in index.matching(topic) {
            // A session's filters may overlap: it takes the message once.
            if memory.contains(key) || durable.contains(key) {
                continue;
            }
            let Some(s) = self.subs.get(key) else {
                continue;
            };
            if let Some(sel) = &s.selector {
                let f = fields.get_or_insert_with(|| MessageFields::from_message(&payload));
                if !sel.matches(f) {
                    continue;
                }
            }
            session |= s.record.session;
            if s.durable {
                durable.push(key.clone());
            } else {
                memory.push(key.clone());
            }
        }
        // A subscriber of many topics (an MQTT session) learns each
        // message's topic from its `to`: set once, and only for them.
        let payload = if !session {
            payload
        } else {
            match flotilla_amqp::message::to_address(&payload) {
                Ok(Some(t)) if t == topic => payload,
                _ => flotilla_amqp::message::with_to(&payload, topic),
            }
        };
        (durable, memory, payload)
    }

    /// A message joins queue `key` (if it still exists): counted in its
    /// gauge, admitted against the memory budget, and timed if it is not
    /// due yet.
    fn enqueue(&mut self, key: &str, msg: Stored) -> bool {
        let Some(q) = self.queues.get_mut(key) else {
            return false;
        };
        q.gauge.count(msg.size);
        self.enqueue_counted(key, msg)
    }

    /// [`QueueTask::enqueue`] for a message its producer counted already.
    /// Past the queue's limits with overflow `dropOldest`, the oldest
    /// waiting messages are dropped.
    fn enqueue_counted(&mut self, key: &str, msg: Stored) -> bool {
        let policy = self.policy(key);
        let Some(q) = self.queues.get_mut(key) else {
            return false;
        };
        if let Some(due) = q.push(self.memory.admit(msg)) {
            self.timers.insert((due, key.to_string()));
        }
        if policy.overflow == Some(Overflow::DropOldest) && policy.bounded() {
            let mut dropped = Vec::new();
            let (mut n, mut bytes) = q.gauge.load();
            while policy.max_depth.is_some_and(|m| n > m)
                || policy.max_bytes.is_some_and(|m| bytes > m)
            {
                let Some(m) = q.messages.pop_front() else {
                    break;
                };
                n = n.saturating_sub(1);
                bytes = bytes.saturating_sub(u64::from(m.size));
                self.memory.release(&m);
                q.stats.dropped += 1;
                q.stats.acked += 1;
                dropped.push((m.seq, m.size));
            }
            if !dropped.is_empty() {
                debug!(queue = %key, n = dropped.len(), "oldest messages dropped: the queue is full");
            }
            for (seq, size) in dropped {
                self.ack(key, seq, size);
            }
        }
        true
    }

    /// Makes queue `key` if it does not exist (a queue is made by its
    /// first message or consumer), sharing the gauge producers use.
    fn make_queue(&mut self, key: &str) {
        if !self.queues.contains_key(key) {
            let mut q = Queue::new(true);
            q.gauge = gauge_of(&self.gauges, key);
            self.queues.insert(key.to_string(), q);
        }
    }

    /// The policy of queue `key`'s address: its own, its space's defaults,
    /// its plan's (then the broker's flags, where it is used).
    fn policy(&mut self, key: &str) -> Arc<AddressPolicy> {
        let generation = self.generation;
        if let Some((_, p)) = self
            .queues
            .get(key)
            .and_then(|q| q.policy.as_ref())
            .filter(|(g, _)| *g == generation)
        {
            return p.clone();
        }
        let (space, address) = key.split_once('/').unwrap_or(("", key));
        let address = match self.subs.get(key) {
            // A subscription follows its topic's policy.
            Some(s) => s.record.pattern.as_str(),
            None => address,
        };
        let p = self
            .tenancy
            .spaces
            .get(space)
            .map(|s| s.policy(address))
            .unwrap_or_default();
        if let Some(q) = self.queues.get_mut(key) {
            q.policy = Some((generation, p.clone()));
        }
        p
    }

    /// Scheduled messages now due join their queues; returns those queues.
    fn release_due(&mut self) -> Vec<String> {
        let now = now_ms();
        let mut touched = Vec::new();
        while let Some((due, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            let Some((_, key)) = self.timers.pop_first() else {
                break;
            };
            if let Some(q) = self.queues.get_mut(&key) {
                if q.release_due(now) && !touched.contains(&key) {
                    touched.push(key);
                }
            }
        }
        touched
    }

    /// A delivered message came back: `failed` counts the delivery (kept
    /// in the journal for a durable queue, so a restart keeps it), then
    /// it goes back to its queue or on to the dead-letter queue.
    fn redeliver(&mut self, queue: String, mut msg: Stored, failed: bool) -> Option<String> {
        if failed {
            msg.delivery_count += 1;
            let durable = self.queues.get(&queue).is_some_and(|q| q.durable);
            if durable && msg.seq < MEMORY_SEQ_BASE {
                let record = store::delivered(msg.seq, &queue, msg.delivery_count);
                let _ = self.journal.append_then(record, Box::new(|_| {}));
            }
        }
        self.put_back(queue, msg)
    }

    /// Commits a transaction of `space` (on the space's task): its
    /// messages and acknowledgements are written as one batch ending with
    /// a `Commit` record, in one sync. Once it is on disk, each queue's
    /// task gets its messages straight from the journal's callback (in
    /// journal order, before anything written after), this task its
    /// subscriptions' (`BrokerEvent::TxCommitted`), the deliveries it
    /// acknowledged are settled on their tasks, and the discharge is
    /// accepted.
    fn commit(
        &mut self,
        space: String,
        posts: Vec<TxPost>,
        acks: Vec<(Acquired, Settlement)>,
        reply: PublishReply,
    ) {
        let mut records = Vec::new();
        let mut committed = Vec::with_capacity(posts.len());
        // Messages for queues of other tasks: (record index, queue, message).
        let mut remote: Vec<(u64, String, Stored)> = Vec::new();
        for p in posts {
            let (durable, memory, payload) = match p.to {
                TxDest::Queue(key) => (vec![key], Vec::new(), p.payload),
                TxDest::Topic(topic) => self.route_topic(&space, &topic, p.payload),
            };
            let record = (!durable.is_empty()).then(|| {
                let names: Vec<&str> = durable.iter().map(String::as_str).collect();
                records.push(store::tx_publish(&names, p.expires, p.due, &payload));
                (records.len() - 1) as u64
            });
            let mut local = Vec::new();
            for q in durable {
                if store::is_subscription(&q) {
                    local.push(q);
                } else if let Some(i) = record {
                    let mut msg = Stored::new(0, payload.clone(), p.expires);
                    msg.due = p.due;
                    remote.push((i, q, msg));
                }
            }
            committed.push(Committed {
                record,
                local,
                memory,
                payload,
                expires: p.expires,
                due: p.due,
            });
        }
        for (a, how) in &acks {
            // Queues are durable; a subscription's acknowledgement counts
            // only if it is (its messages are in the journal at all).
            let durable = !store::is_subscription(&a.queue)
                || self.subs.get(&a.queue).is_some_and(|s| s.durable);
            if *how == Settlement::Consumed && durable && a.seq < MEMORY_SEQ_BASE {
                records.push(store::tx_ack(a.seq, &a.queue));
            }
        }
        let n = records.len() as u32;
        debug!(space = %space, records = n, "transaction committing");
        let event = move |first: u64| BrokerEvent::TxCommitted {
            space,
            first,
            posts: committed,
            acks,
            reply,
        };
        if n == 0 {
            // Nothing durable: it takes effect at once.
            self.shards.send_soon(event(0));
            return;
        }
        records.push(store::commit(n));
        let (tx, shards) = (self.tx.clone(), self.shards.clone());
        let done = Box::new(move |r: Result<u64, JournalError>| match r {
            Ok(first) => {
                for (i, queue, mut msg) in remote {
                    msg.seq = first + i;
                    shards.send_blocking(BrokerEvent::Stored {
                        queue,
                        msg,
                        reserved: false,
                    });
                }
                if let Some(tx) = tx.upgrade() {
                    crate::shards::send_waiting(&tx, event(first));
                }
            }
            Err(e) => {
                let BrokerEvent::TxCommitted { reply, .. } = event(0) else {
                    return;
                };
                let _ = reply.tx.send(ToConn::Discharged {
                    delivery: reply.delivery,
                    settled: reply.settled,
                    error: Some(amqp_error(
                        AmqpError::InternalError,
                        format!("the transaction was not committed: {e}"),
                    )),
                });
            }
        });
        let _ = self.journal.append_many(records, done);
    }

    /// Records that `queue` consumed message `seq` (of `size` bytes) for
    /// good.
    fn ack(&mut self, queue: &str, seq: u64, size: u32) {
        if let Some(q) = self.queues.get(queue) {
            q.gauge.sub(size);
        }
        let durable = self.queues.get(queue).is_some_and(|q| q.durable);
        if !durable || seq >= MEMORY_SEQ_BASE {
            return;
        }
        // Not waited for: losing it costs a redelivery, never a message.
        let record = if store::is_subscription(queue) {
            store::ack_one(seq, queue)
        } else {
            store::ack(seq)
        };
        let _ = self.journal.append_then(record, Box::new(|_| {}));
        self.acks_since_retire += 1;
        if self.acks_since_retire >= 1000 {
            self.acks_since_retire = 0;
            self.retire();
        }
    }

    /// Removes consumers; what they held goes back to their queues as
    /// delivered once (it may have reached them). Subscriptions left
    /// without consumers end unless durable (or, `closed`, even then).
    fn drop_consumers(
        &mut self,
        mut which: impl FnMut(&Consumer) -> bool,
        mut held: impl FnMut(&Inflight) -> bool,
        closed: bool,
    ) -> Vec<String> {
        self.waiting.retain(|(_, c)| !which(c));
        let mut emptied = Vec::new();
        let consumer_at = &mut self.consumer_at;
        for (name, q) in &mut self.queues {
            let before = q.consumers.len();
            q.consumers.retain(|c| {
                let gone = which(c);
                if gone {
                    consumer_at.remove(&(c.conn, c.link));
                }
                !gone
            });
            if q.consumers.len() < before && q.consumers.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            let Some(s) = self.subs.get_mut(&name) else {
                continue;
            };
            if !s.durable || closed {
                self.delete_subscription(&name);
            } else {
                s.idle_since = Some(Instant::now());
            }
        }
        // What a transaction settled waits for its discharge.
        let back: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| held(f) && f.txn.is_none())
            .map(|(s, _)| *s)
            .collect();
        self.give_back(back)
    }

    /// Deliveries that came back without an outcome (their consumer or
    /// transaction is gone): into their queues again, counted as
    /// delivered. Returns the queues that got some.
    fn give_back(&mut self, tokens: Vec<u64>) -> Vec<String> {
        let mut touched = Vec::new();
        for token in tokens {
            if let Some(f) = self.inflight.remove(&token) {
                if let Some(q) = self.redeliver(f.queue, f.msg, true) {
                    if !touched.contains(&q) {
                        touched.push(q);
                    }
                }
            }
        }
        touched
    }

    /// The space part of a queue key.
    fn space_of(queue: &str) -> &str {
        queue.split_once('/').map_or("", |(s, _)| s)
    }

    /// A message came back: into its queue again, or, delivered too many
    /// times, to the dead-letter queue. Returns the queue that got it.
    fn put_back(&mut self, queue: String, msg: Stored) -> Option<String> {
        if !self.queues.contains_key(&queue) {
            // Its subscription is gone.
            return None;
        }
        let policy = self.policy(&queue);
        let dead_letter = policy
            .dead_letter_address
            .as_deref()
            .unwrap_or(&self.dead_letter.queue);
        let dlq = store::queue_key(Self::space_of(&queue), dead_letter);
        let max = policy
            .max_deliveries
            .unwrap_or(self.dead_letter.max_deliveries);
        if msg.delivery_count < max || queue == dlq {
            let msg = self.memory.admit(msg);
            self.queues.get_mut(&queue)?.requeue(msg);
            return Some(queue);
        }
        debug!(queue = %queue, seq = msg.seq, deliveries = msg.delivery_count, "dead-lettered");
        if let Some(q) = self.queues.get_mut(&queue) {
            q.stats.dead_lettered += 1;
        }
        self.move_to(&queue, msg, dlq);
        None
    }

    /// Moves a message to another queue: stored there first, then
    /// acknowledged where it was (a crash in between leaves a duplicate,
    /// never a loss).
    fn move_to(&mut self, from: &str, mut msg: Stored, to: String) {
        if !self.memory.load(&mut msg) {
            return;
        }
        // Where it came from, for a retry (the first place it left, if it
        // moves again).
        let payload = if original_address(&msg.payload).is_some() {
            msg.payload.clone()
        } else {
            let (_, address) = from.split_once('/').unwrap_or(("", from));
            flotilla_amqp::message::with_annotation(&msg.payload, ORIGINAL_ADDRESS, address)
        };
        self.move_payload(from, &msg, payload, to);
    }

    /// Stores `payload` (message `msg` of `from`, perhaps changed) in queue
    /// `to`, then acknowledges `msg` where it was.
    fn move_payload(&mut self, from: &str, msg: &Stored, payload: Bytes, to: String) {
        let record = store::publish(&[to.as_str()], 0, &payload);
        // Straight to the task that owns `to` (perhaps another).
        let shards = self.shards.clone();
        let stored = Box::new(move |r: Result<u64, JournalError>| {
            if let Ok(seq) = r {
                shards.send_blocking(BrokerEvent::Stored {
                    queue: to,
                    msg: Stored::new(seq, payload, 0),
                    reserved: false,
                });
            }
        });
        let _ = self.journal.append_then(record, stored);
        self.ack(from, msg.seq, msg.size);
    }

    /// Expired messages: to the expiry queue, or dropped.
    fn expire(&mut self, queue: &str, expired: Vec<Stored>) {
        if expired.is_empty() {
            return;
        }
        if let Some(q) = self.queues.get_mut(queue) {
            q.stats.expired += expired.len() as u64;
        }
        debug!(queue = %queue, n = expired.len(), "expired");
        let policy = self.policy(queue);
        let to = policy
            .expiry_address
            .as_deref()
            .or(self.dead_letter.expiry_queue.as_deref())
            .map(|e| store::queue_key(Self::space_of(queue), e));
        for m in expired {
            match &to {
                Some(t) if t != queue => self.move_to(queue, m, t.clone()),
                _ => self.ack(queue, m.seq, m.size),
            }
        }
    }

    /// Hands queued messages to consumers with credit, round robin;
    /// browsers get copies of what they have not seen. Where consumers
    /// have selectors or messages have groups, each message goes to a
    /// consumer that may take it (its selector matches; the consumer that
    /// holds its group, if one does), and messages nobody may take yet
    /// stay where they are.
    fn dispatch(&mut self, name: &str) {
        let now = now_ms();
        let mut expired = Vec::new();
        let mut unreadable = Vec::new();
        // An MQTT session takes QoS 0 messages settled: at most once is
        // what QoS 0 promises, and it saves a disposition per message.
        let session = self.subs.get(name).is_some_and(|s| s.record.session);
        let mut out = Outgoing {
            queue: name,
            session,
            next_token: &mut self.next_token,
            step: self.token_step,
            inflight: &mut self.inflight,
            settled_now: Vec::new(),
        };
        let QueueTask {
            queues,
            memory,
            consumer_at,
            ..
        } = self;
        let Some(q) = queues.get_mut(name) else {
            return;
        };
        while let Some(m) = q.messages.front() {
            if m.expires != 0 && m.expires <= now {
                let m = q.messages.pop_front().expect("front exists");
                memory.release(&m);
                expired.push(m);
            } else {
                break;
            }
        }
        for c in q.consumers.iter_mut().filter(|c| c.browse.is_some()) {
            let from = c.browse.unwrap_or(0);
            let start = q.messages.partition_point(|m| m.seq < from);
            for m in q.messages.iter().skip(start) {
                if c.credit() == 0 {
                    break;
                }
                let mut copy = m.clone();
                c.browse = Some(m.seq + 1);
                if !memory.load(&mut copy) {
                    continue;
                }
                if !c.takes(&copy) {
                    continue;
                }
                let ev = ToConn::Deliver {
                    link: c.link,
                    token: 0,
                    msg: copy,
                    settled: true,
                };
                if c.tx.send(ev).is_err() {
                    break;
                }
                c.routed = c.routed.wrapping_add(1);
            }
        }
        let choosy = q.grouped
            || q.consumers
                .iter()
                .any(|c| c.browse.is_none() && c.selector.is_some());
        if choosy {
            Self::dispatch_choosy(q, memory, &mut out, now, &mut expired, &mut unreadable);
        }
        while !choosy && !q.messages.is_empty() {
            let n = q.consumers.len();
            let Some(i) = (0..n)
                .map(|k| (q.rr + k) % n.max(1))
                .find(|&i| q.consumers[i].browse.is_none() && q.consumers[i].credit() > 0)
            else {
                break;
            };
            q.rr = i + 1;
            let mut msg = q.messages.pop_front().expect("checked non-empty");
            memory.release(&msg);
            if msg.expires != 0 && msg.expires <= now {
                expired.push(msg);
                continue;
            }
            if !memory.load(&mut msg) {
                unreadable.push((msg.seq, msg.size));
                continue;
            }
            if let Err(msg) = out.hand(&mut q.consumers[i], &mut q.stats, msg) {
                debug!(queue = name, "consumer's connection is gone");
                let c = q.consumers.remove(i);
                consumer_at.remove(&(c.conn, c.link));
                q.messages.push_front(memory.admit(msg));
            }
        }
        for c in q.consumers.iter_mut().filter(|c| c.drain) {
            c.drain = false;
            c.routed = c.limit;
            let _ = c.tx.send(ToConn::Drained { link: c.link });
        }
        let settled_now = std::mem::take(&mut out.settled_now);
        for (seq, size) in settled_now {
            self.ack(name, seq, size);
        }
        // A message whose body cannot be read back is lost to the disk;
        // keeping it would block the queue forever.
        for (seq, size) in unreadable {
            self.ack(name, seq, size);
        }
        self.expire(name, expired);
    }

    /// [`QueueTask::dispatch`] for a queue with selectors or groups: the
    /// messages in order, each to the next consumer (round robin) with
    /// credit that may take it.
    fn dispatch_choosy(
        q: &mut Queue,
        memory: &mut Memory,
        out: &mut Outgoing<'_>,
        now: u64,
        expired: &mut Vec<Stored>,
        unreadable: &mut Vec<(u64, u32)>,
    ) {
        // Groups whose consumer left are free again (rebalanced); when
        // the map outgrows what waits, groups with nothing waiting are
        // free too (a peer sending ever new group ids grows nothing).
        if !q.groups.is_empty() {
            let consumers = &q.consumers;
            q.groups.retain(|_, (conn, link)| {
                consumers.iter().any(|c| c.conn == *conn && c.link == *link)
            });
            if q.groups.len() > MAX_IDLE_GROUPS.max(q.messages.len()) {
                let waiting: std::collections::HashSet<&str> = q
                    .messages
                    .iter()
                    .filter_map(|m| m.group.as_deref())
                    .collect();
                q.groups.retain(|g, _| waiting.contains(&**g));
            }
        }
        let mut i = 0;
        while i < q.messages.len() {
            if !q
                .consumers
                .iter()
                .any(|c| c.browse.is_none() && c.credit() > 0)
            {
                break;
            }
            let m = &q.messages[i];
            if m.expires != 0 && m.expires <= now {
                let m = q.messages.remove(i).expect("index in range");
                memory.release(&m);
                expired.push(m);
                continue;
            }
            let mut msg = m.clone();
            if !memory.load(&mut msg) {
                let m = q.messages.remove(i).expect("index in range");
                memory.release(&m);
                unreadable.push((m.seq, m.size));
                continue;
            }
            let owner = msg.group.as_ref().and_then(|g| q.groups.get(g)).copied();
            let n = q.consumers.len();
            let pick = (0..n).map(|k| (q.rr + k) % n.max(1)).find(|&c| {
                let c = &q.consumers[c];
                c.browse.is_none()
                    && c.credit() > 0
                    && owner.is_none_or(|(conn, link)| c.conn == conn && c.link == link)
                    && c.takes(&msg)
            });
            let Some(c) = pick else {
                i += 1;
                continue;
            };
            q.rr = c + 1;
            let original = q.messages.remove(i).expect("index in range");
            memory.release(&original);
            if let (Some(g), None) = (&msg.group, owner) {
                q.groups
                    .insert(g.clone(), (q.consumers[c].conn, q.consumers[c].link));
            }
            if let Err(msg) = out.hand(&mut q.consumers[c], &mut q.stats, msg) {
                // Its connection is gone: the message stays; the consumer
                // goes with its connection's `Gone`.
                q.consumers[c].limit = q.consumers[c].routed;
                q.messages.insert(i, memory.admit(msg));
                i += 1;
            }
        }
    }

    /// Carries out an operator's request on queue `key`; returns the
    /// answer and the queues that may now have work.
    fn inspect(&mut self, key: &str, op: Inspect) -> (serde_json::Value, Vec<String>) {
        let Some(q) = self.queues.get(key) else {
            return (json!({"found": false}), Vec::new());
        };
        match op {
            Inspect::Browse { limit } => {
                let list: Vec<Stored> = q.held().take(limit).cloned().collect();
                let messages: Vec<serde_json::Value> = list
                    .into_iter()
                    .map(|mut m| {
                        let mut v = if self.memory.load(&mut m) {
                            crate::inspect::describe(&m.payload)
                        } else {
                            json!({"unreadable": true})
                        };
                        v["id"] = json!(m.seq);
                        v["size"] = json!(m.size);
                        v["deliveryCount"] = json!(m.delivery_count);
                        if m.expires != 0 {
                            v["expires"] = json!(m.expires);
                        }
                        if m.due != 0 {
                            v["due"] = json!(m.due);
                        }
                        v
                    })
                    .collect();
                let depth = q.messages.len() + q.scheduled.len();
                (
                    json!({"found": true, "depth": depth, "messages": messages}),
                    Vec::new(),
                )
            }
            Inspect::Purge => {
                let n = self.purge(key).unwrap_or(0);
                (json!({"found": true, "purged": n}), Vec::new())
            }
            Inspect::Delete { id } => {
                let q = self.queues.get_mut(key).expect("checked above");
                let at = q.messages.iter().position(|m| m.seq == id);
                let m = match at {
                    Some(i) => q.messages.remove(i),
                    None => q
                        .scheduled
                        .iter()
                        .find(|(_, m)| m.seq == id)
                        .map(|(k, _)| *k)
                        .and_then(|k| q.scheduled.remove(&k)),
                };
                let Some(m) = m else {
                    return (json!({"found": true, "deleted": false}), Vec::new());
                };
                self.memory.release(&m);
                q.stats.acked += 1;
                info!(queue = %key, id, "message deleted by an operator");
                self.ack(key, m.seq, m.size);
                (json!({"found": true, "deleted": true}), Vec::new())
            }
            Inspect::Retry { ids } => {
                let space = Self::space_of(key).to_string();
                let q = self.queues.get_mut(key).expect("checked above");
                let mut take = Vec::new();
                let mut keep = VecDeque::with_capacity(q.messages.len());
                for m in q.messages.drain(..) {
                    if ids.as_ref().is_none_or(|ids| ids.contains(&m.seq)) {
                        take.push(m);
                    } else {
                        keep.push_back(m);
                    }
                }
                q.messages = keep;
                let (mut moved, mut skipped) = (0u64, 0u64);
                let mut touched = Vec::new();
                for mut m in take {
                    self.memory.release(&m);
                    let target = if self.memory.load(&mut m) {
                        original_address(&m.payload).map(|a| store::queue_key(&space, &a))
                    } else {
                        None
                    };
                    // Back to a queue, or a subscription that still exists.
                    let target = target.filter(|t| {
                        t != key && (!store::is_subscription(t) || self.subs.contains_key(t))
                    });
                    match target {
                        Some(t) => {
                            if let Some(q) = self.queues.get_mut(key) {
                                q.stats.acked += 1;
                            }
                            let payload = m.payload.clone();
                            self.move_payload(key, &m, payload, t.clone());
                            if !touched.contains(&t) {
                                touched.push(t);
                            }
                            moved += 1;
                        }
                        None => {
                            skipped += 1;
                            let msg = self.memory.admit(m);
                            if let Some(q) = self.queues.get_mut(key) {
                                q.requeue(msg);
                            }
                        }
                    }
                }
                info!(queue = %key, moved, skipped, "messages retried by an operator");
                touched.push(key.to_string());
                (
                    json!({"found": true, "moved": moved, "skipped": skipped}),
                    touched,
                )
            }
        }
    }

    /// Once a second: expire what is due anywhere in a queue, and rates.
    fn tick(&mut self) {
        let mut usage: HashMap<String, u64> = HashMap::new();
        for (name, q) in &self.queues {
            let n: u64 = q.held().map(|m| u64::from(m.size)).sum();
            *usage.entry(Self::space_of(name).to_string()).or_default() += n;
        }
        for f in self.inflight.values() {
            *usage
                .entry(Self::space_of(&f.queue).to_string())
                .or_default() += u64::from(f.msg.size);
        }
        for (space, m) in &self.retained {
            let n: u64 = m.values().map(|r| r.message.len() as u64).sum();
            *usage.entry(space.clone()).or_default() += n;
        }
        {
            // Other tasks count their queues into the same spaces: take
            // back what this one counted last time, add what it counts now.
            let mut shared = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            for (space, n) in self.last_usage.drain() {
                if let Some(v) = shared.get_mut(&space) {
                    *v = v.saturating_sub(n);
                }
            }
            for (space, n) in &usage {
                *shared.entry(space.clone()).or_default() += n;
            }
            shared.retain(|_, v| *v > 0);
        }
        self.last_usage = usage;
        // Every few seconds even when idle: the journal retires only below
        // every task's floor.
        self.ticks += 1;
        if self.ticks.is_multiple_of(5) {
            self.retire();
        }
        // Durable subscriptions nobody consumed for their expiry interval
        // (an MQTT session that did not come back) end.
        let expired: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| {
                s.durable
                    && s.record.expiry.is_some_and(|e| {
                        s.idle_since
                            .is_some_and(|t| t.elapsed() >= Duration::from_secs(u64::from(e)))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if self.queues.get(&key).is_none_or(|q| q.consumers.is_empty()) {
                info!(subscription = %key, "durable subscription expired");
                self.delete_subscription(&key);
            }
        }
        let now = now_ms();
        let due: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.expiring > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for name in due {
            let Some(q) = self.queues.get_mut(&name) else {
                continue;
            };
            let mut expired = Vec::new();
            let mut keep = VecDeque::with_capacity(q.messages.len());
            let mut expiring = 0;
            for m in q.messages.drain(..) {
                if m.expires != 0 && m.expires <= now {
                    self.memory.release(&m);
                    expired.push(m);
                } else {
                    expiring += usize::from(m.expires != 0);
                    keep.push_back(m);
                }
            }
            q.messages = keep;
            q.expiring = expiring;
            self.expire(&name, expired);
        }
        for q in self.queues.values_mut() {
            let s = &mut q.stats;
            s.in_rate = s.enqueued - s.last_enqueued;
            s.out_rate = s.acked - s.last_acked;
            s.last_enqueued = s.enqueued;
            s.last_acked = s.acked;
        }
    }

    /// Removes the messages waiting in `queue` (not those delivered and
    /// not yet settled). `None` if there is no such queue.
    fn purge(&mut self, queue: &str) -> Option<usize> {
        let q = self.queues.get_mut(queue)?;
        let mut gone = Vec::with_capacity(q.messages.len());
        let scheduled = std::mem::take(&mut q.scheduled).into_values();
        for m in q.messages.drain(..).chain(scheduled) {
            self.memory.release(&m);
            gone.push((m.seq, m.size));
        }
        q.expiring = 0;
        q.stats.acked += gone.len() as u64;
        info!(queue = %queue, messages = gone.len(), "purged");
        for (seq, size) in &gone {
            self.ack(queue, *seq, *size);
        }
        Some(gone.len())
    }

    fn stat(&self) -> serde_json::Value {
        // Deliveries out per queue, counted in one pass (not once per queue).
        let mut out: HashMap<&str, usize> = HashMap::new();
        for f in self.inflight.values() {
            *out.entry(f.queue.as_str()).or_default() += 1;
        }
        let mut queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .map(|(key, q)| {
                let (space, address) = key.split_once('/').unwrap_or(("", key));
                let inflight = out.get(key.as_str()).copied().unwrap_or(0);
                let mut v = json!({
                    "bytes": q.gauge.bytes.load(std::sync::atomic::Ordering::Relaxed),
                    "space": space,
                    "address": address,
                    "durable": q.durable,
                    "depth": q.messages.len(),
                    "scheduled": q.scheduled.len(),
                    "unsettled": inflight,
                    "consumers": q.consumers.iter().filter(|c| c.browse.is_none()).count(),
                    "browsers": q.consumers.iter().filter(|c| c.browse.is_some()).count(),
                    "enqueued": q.stats.enqueued,
                    "delivered": q.stats.delivered,
                    "acknowledged": q.stats.acked,
                    "expired": q.stats.expired,
                    "deadLettered": q.stats.dead_lettered,
                    "dropped": q.stats.dropped,
                    "inRate": q.stats.in_rate,
                    "outRate": q.stats.out_rate,
                });
                if let Some(s) = self.subs.get(key) {
                    v["subscription"] = json!({
                        "topic": s.record.pattern,
                        "selector": s.record.selector,
                        "shared": s.record.shared,
                    });
                }
                v
            })
            .collect();
        queues.sort_by(|a, b| {
            (a["space"].as_str(), a["address"].as_str())
                .cmp(&(b["space"].as_str(), b["address"].as_str()))
        });
        let retained: serde_json::Map<String, serde_json::Value> = self
            .retained
            .iter()
            .map(|(space, m)| (space.clone(), json!(m.len())))
            .collect();
        json!({
            "kind": "broker",
            "retained": retained,
            "journal": {
                "records": self.journal.stats.records.load(std::sync::atomic::Ordering::Relaxed),
                "syncs": self.journal.stats.syncs.load(std::sync::atomic::Ordering::Relaxed),
            },
            "memory": {
                "limit": self.memory.limit,
                "held": self.memory.held,
                "pagedOut": self.memory.paged,
                "pagedIn": self.memory.paged_in,
            },
            "queues": queues,
        })
    }

    /// Asks the journal how far it has got: once every record before
    /// `upto` has been handed to its task (`BrokerEvent::Floor`), this
    /// task tells the journal the oldest record it still needs.
    fn retire(&mut self) {
        let tx = self.tx.clone();
        self.journal.barrier_then(Box::new(move |upto| {
            if let Some(tx) = tx.upgrade() {
                crate::shards::send_waiting(&tx, BrokerEvent::Floor { upto });
            }
        }));
    }

    /// Tells the journal the oldest record this task still needs: the
    /// oldest message it holds, its oldest subscription and retained
    /// records, and nothing from `upto` on (records it may not have been
    /// handed yet). The journal deletes segments below every task's
    /// floor. Subscription records far behind are written again so they
    /// do not hold old segments forever.
    fn floor(&mut self, upto: u64) {
        let oldest_queued = self
            .queues
            .values()
            .filter(|q| q.durable)
            .filter_map(|q| {
                let first = q.messages.front().map(|m| m.seq);
                let scheduled = q.scheduled.values().map(|m| m.seq).min();
                first.into_iter().chain(scheduled).min()
            })
            .min();
        let oldest_inflight = self
            .inflight
            .values()
            .map(|f| f.msg.seq)
            .filter(|s| *s < MEMORY_SEQ_BASE)
            .min();
        let oldest_msg = oldest_queued
            .into_iter()
            .chain(oldest_inflight)
            .min()
            .unwrap_or(u64::MAX)
            .min(upto);
        let mut oldest = oldest_msg;
        // Only records that alone keep the oldest segment are written
        // again (not every record behind the oldest message each time).
        let pinned = oldest_msg.min(
            self.journal
                .stats
                .oldest_segment_end
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let stale: Vec<SubRecord> = self
            .subs
            .values()
            .filter(|s| s.durable && s.record_seq != 0 && s.record_seq < pinned)
            .map(|s| s.record.clone())
            .collect();
        for s in &self.subs {
            if s.1.durable {
                oldest = oldest.min(s.1.record_seq);
            }
        }
        // Retained messages far behind are written again, like
        // subscription records.
        let mut stale_retained = Vec::new();
        for (space, m) in &self.retained {
            for (topic, r) in m {
                if r.seq == 0 {
                    continue;
                }
                if r.seq < pinned {
                    stale_retained.push((
                        space.clone(),
                        topic.clone(),
                        r.version,
                        r.message.clone(),
                    ));
                }
                oldest = oldest.min(r.seq);
            }
        }
        for (space, topic, version, message) in stale_retained {
            self.record_retained(space, topic, version, &message, |_| {});
        }
        for record in stale {
            let tx = self.tx.clone();
            let key = record.key.clone();
            let _ = self.journal.append_then(
                store::subscribe(&record),
                Box::new(move |r: Result<u64, JournalError>| {
                    if let (Ok(seq), Some(tx)) = (r, tx.upgrade()) {
                        crate::shards::send_waiting(&tx, BrokerEvent::SubRecorded { key, seq });
                    }
                }),
            );
        }
        self.journal.floor(self.shard, oldest.max(1));
    }
}
