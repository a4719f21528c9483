//! What the broker writes in its journal, and rebuilding its state from it
//! on start:
//!
//! - `Publish`: a message and the queues it went to (a queue, or the
//!   durable subscriptions of a topic that took it), with its expiry time;
//!   `PublishAt` the same with the time it is due (scheduled delivery);
//! - `Ack`: a message consumed from every queue it went to, or `AckOne`:
//!   from one of them;
//! - `Delivered`: how many times a message went out and came back (so a
//!   restart keeps the count, and `--max-deliveries` holds across it);
//! - `Subscribe` / `Unsubscribe`: a durable subscription made or deleted;
//! - `Retain`: the retained message of a topic set (or, empty, cleared);
//! - `TxPublish` / `TxAck`: a transaction's work, and `Commit`: the `n`
//!   records just before it are one committed transaction. They are
//!   written together, with consecutive sequence numbers; without their
//!   `Commit` (a crash in the middle) recovery ignores them.
//!
//! Queue keys are `SPACE/ADDRESS` for queues and `SPACE/$sub/NAME` for
//! subscriptions (space names are DNS labels, so the first `/` splits).
//!
//! Recovery reads the journal twice, a segment at a time: first what was
//! consumed, subscribed and committed, then the messages still held, whose
//! bodies stay in memory only up to the broker's memory budget; past it
//! they are left in the journal (paged) and read back when delivered.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::journal::Record;

const PUBLISH: u8 = 3;
const ACK: u8 = 2;
const ACK_ONE: u8 = 4;
const SUBSCRIBE: u8 = 5;
const UNSUBSCRIBE: u8 = 6;
const RETAIN: u8 = 7;
const TX_PUBLISH: u8 = 8;
const TX_ACK: u8 = 9;
const COMMIT: u8 = 10;
const DELIVERED: u8 = 11;
const PUBLISH_AT: u8 = 12;

/// A message held by a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub payload: Bytes,
    /// Times it was handed to a consumer and came back.
    pub delivery_count: u32,
    /// When it expires (ms since the Unix epoch; 0: never).
    pub expires: u64,
    /// The payload is not in memory: read it back from the journal
    /// (record `seq`) when it is needed.
    pub paged: bool,
    /// The payload's size, paged or not.
    pub size: u32,
    /// When it may be delivered (ms since the Unix epoch; 0: at once).
    pub due: u64,
    /// Its `group-id`: a group's messages go to one consumer at a time.
    pub group: Option<Arc<str>>,
}

impl Stored {
    /// A message as stored, in memory.
    pub fn new(seq: u64, payload: Bytes, expires: u64) -> Stored {
        Stored {
            size: payload.len().min(u32::MAX as usize) as u32,
            seq,
            group: flotilla_amqp::message::group_id(&payload).map(Arc::from),
            payload,
            delivery_count: 0,
            expires,
            paged: false,
            due: 0,
        }
    }

    /// A message stored in the journal and left there (over the memory
    /// budget): its body is read back when it is delivered.
    pub fn paged(seq: u64, size: usize, expires: u64, group: Option<Arc<str>>) -> Stored {
        Stored {
            group,
            size: size.min(u32::MAX as usize) as u32,
            seq,
            payload: Bytes::new(),
            delivery_count: 0,
            expires,
            paged: true,
            due: 0,
        }
    }
}

/// The message in a `Publish` record read back from the journal.
pub fn payload_of(record: &Bytes) -> Option<Bytes> {
    let p = parse_publish(record)?;
    Some(record.slice(p.at..))
}

/// A durable subscription as the journal keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRecord {
    /// Its queue's key.
    pub key: String,
    pub space: String,
    /// The topic address or pattern it takes messages from.
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Several consumers share it.
    #[serde(default)]
    pub shared: bool,
    /// The seq of the record that first made it: it holds only messages
    /// published after. Unset in that first record (its own seq), set when
    /// the record is written again (compaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Seconds it outlives its last consumer (the terminus timeout, an
    /// MQTT session's expiry interval); `None`: for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<u32>,
    /// An MQTT session's subscription: it takes what any of `patterns`
    /// matches (its topic filters, changed in place), and keeps the
    /// gateway's state of the session in `meta`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<String>,
}

impl SubRecord {
    /// The topics or patterns it takes messages from.
    pub fn filters(&self) -> &[String] {
        if self.session {
            &self.patterns
        } else {
            std::slice::from_ref(&self.pattern)
        }
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    b.put_slice(&s.as_bytes()[..n]);
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    if b.len() < 2 {
        return None;
    }
    let n = b.get_u16() as usize;
    let s = std::str::from_utf8(b.get(..n)?).ok()?.to_string();
    b.advance(n);
    Some(s)
}

/// Encodes a `Publish` record of a message for `queues`.
pub fn publish(queues: &[&str], expires: u64, payload: &[u8]) -> Bytes {
    publish_record(PUBLISH, queues, expires, 0, payload)
}

/// Encodes a `PublishAt` record: a message for `queues` not to be
/// delivered before `due` (ms since the Unix epoch).
pub fn publish_at(queues: &[&str], expires: u64, due: u64, payload: &[u8]) -> Bytes {
    if due == 0 {
        return publish(queues, expires, payload);
    }
    publish_record(PUBLISH_AT, queues, expires, due, payload)
}

/// Encodes a `TxPublish` record: a message posted under a transaction,
/// stored only if the `Commit` that follows it is there too.
pub fn tx_publish(queues: &[&str], expires: u64, due: u64, payload: &[u8]) -> Bytes {
    publish_record(TX_PUBLISH, queues, expires, due, payload)
}

fn publish_record(kind: u8, queues: &[&str], expires: u64, due: u64, payload: &[u8]) -> Bytes {
    let names: usize = queues.iter().map(|q| 2 + q.len()).sum();
    let mut b = BytesMut::with_capacity(19 + names + payload.len());
    b.put_u8(kind);
    b.put_u64(expires);
    if kind != PUBLISH {
        b.put_u64(due);
    }
    b.put_u16(queues.len().min(u16::MAX as usize) as u16);
    for q in queues.iter().take(u16::MAX as usize) {
        put_str(&mut b, q);
    }
    b.put_slice(payload);
    b.freeze()
}

/// Encodes a `TxAck` record: under a transaction, message `seq` is
/// consumed from `queue` (from every queue it went to, for a queue's).
pub fn tx_ack(seq: u64, queue: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(11 + queue.len());
    b.put_u8(TX_ACK);
    b.put_u64(seq);
    put_str(&mut b, queue);
    b.freeze()
}

/// Encodes a `Commit` record: the `n` records just before it are one
/// committed transaction.
pub fn commit(n: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.put_u8(COMMIT);
    b.put_u32(n);
    b.freeze()
}

/// Encodes a `Delivered` record: message `seq` of `queue` went out and
/// came back `count` times.
pub fn delivered(seq: u64, queue: &str, count: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(15 + queue.len());
    b.put_u8(DELIVERED);
    b.put_u64(seq);
    b.put_u32(count);
    put_str(&mut b, queue);
    b.freeze()
}

/// Encodes an `Ack` record: the message stored as `seq` is consumed
/// everywhere.
pub fn ack(seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(9);
    b.put_u8(ACK);
    b.put_u64(seq);
    b.freeze()
}

/// Encodes an `AckOne` record: consumed from `queue` only.
pub fn ack_one(seq: u64, queue: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(11 + queue.len());
    b.put_u8(ACK_ONE);
    b.put_u64(seq);
    put_str(&mut b, queue);
    b.freeze()
}

/// Encodes a `Subscribe` record.
pub fn subscribe(s: &SubRecord) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(SUBSCRIBE);
    b.put_slice(&serde_json::to_vec(s).unwrap_or_default());
    b.freeze()
}

/// Encodes an `Unsubscribe` record.
pub fn unsubscribe(key: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(UNSUBSCRIBE);
    put_str(&mut b, key);
    b.freeze()
}

/// Encodes a `Retain` record: `message` is now the retained message of
/// `topic` in `space` (an empty `message` clears it).
pub fn retain(space: &str, topic: &str, message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + space.len() + topic.len() + message.len());
    b.put_u8(RETAIN);
    put_str(&mut b, space);
    put_str(&mut b, topic);
    b.put_slice(message);
    b.freeze()
}

/// A `Retain` record's space, topic and message.
fn parse_retain(record: &Bytes) -> Option<(String, String, Bytes)> {
    let mut b = record.get(1..)?;
    let space = get_str(&mut b)?;
    let topic = get_str(&mut b)?;
    let at = record.len() - b.len();
    Some((space, topic, record.slice(at..)))
}

/// A retained message as recovered: its record's seq, space, topic and
/// the message.
pub type RetainedRecord = (u64, String, String, Bytes);

/// What the journal leaves: each queue's messages not consumed, in the
/// order they were stored, the durable subscriptions with the seq of
/// the record that made each, and the retained message of each topic.
#[derive(Debug, Default)]
pub struct Recovered {
    pub queues: BTreeMap<String, VecDeque<Stored>>,
    pub subscriptions: Vec<(u64, SubRecord)>,
    pub retained: Vec<RetainedRecord>,
}

/// A message record's fields (`Publish`, `PublishAt`, `TxPublish`).
struct Published {
    transactional: bool,
    expires: u64,
    due: u64,
    queues: Vec<String>,
    /// Where the message starts.
    at: usize,
}

fn parse_publish(p: &[u8]) -> Option<Published> {
    let kind = *p.first()?;
    if !matches!(kind, PUBLISH | PUBLISH_AT | TX_PUBLISH) {
        return None;
    }
    let mut b = p.get(1..)?;
    if b.len() < 10 {
        return None;
    }
    let expires = b.get_u64();
    let due = if kind == PUBLISH {
        0
    } else {
        if b.len() < 10 {
            return None;
        }
        b.get_u64()
    };
    let n = b.get_u16();
    let mut queues = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        queues.push(get_str(&mut b)?);
    }
    Some(Published {
        transactional: kind == TX_PUBLISH,
        expires,
        due,
        queues,
        at: p.len() - b.len(),
    })
}

/// A seq and a queue from an `AckOne`, `TxAck` or `Delivered` record
/// (after `skip` bytes of other fields).
fn seq_and_queue(p: &[u8], skip: usize) -> Option<(u64, String)> {
    let seq = u64::from_be_bytes(p.get(1..9)?.try_into().ok()?);
    let mut b = p.get(9 + skip..)?;
    Some((seq, get_str(&mut b)?))
}

/// Reads every record of the journal in order, handing each to the visitor.
pub type Replay<'a> =
    dyn FnMut(&mut dyn FnMut(Record)) -> Result<(), crate::journal::JournalError> + 'a;

/// Rebuilds the broker's state from the journal, reading it twice through
/// `replay`; message bodies are kept in memory up to `budget` bytes, the
/// rest left paged.
///
/// # Errors
/// Reading the journal failed.
pub fn recover(
    replay: &mut Replay<'_>,
    budget: usize,
) -> Result<Recovered, crate::journal::JournalError> {
    let mut acked: HashSet<u64> = HashSet::new();
    let mut acked_one: HashSet<(u64, String)> = HashSet::new();
    let mut counts: HashMap<(u64, String), u32> = HashMap::new();
    let mut subs: HashMap<String, (u64, SubRecord)> = HashMap::new();
    let mut retained: BTreeMap<(String, String), (u64, Bytes)> = BTreeMap::new();
    // Transactions: the acknowledgements they hold, and which ranges of
    // records were committed.
    let mut tx_acks: Vec<(u64, u64, String)> = Vec::new();
    let mut commits: Vec<(u64, u64)> = Vec::new();
    replay(&mut |r: Record| {
        let p = &r.payload;
        match p.first() {
            Some(&RETAIN) => {
                if let Some((space, topic, msg)) = parse_retain(p) {
                    if msg.is_empty() {
                        retained.remove(&(space, topic));
                    } else {
                        retained.insert((space, topic), (r.seq, Bytes::copy_from_slice(&msg)));
                    }
                }
            }
            Some(&ACK) if p.len() == 9 => {
                acked.insert(u64::from_be_bytes(p[1..9].try_into().unwrap_or_default()));
            }
            Some(&ACK_ONE) => {
                if let Some(k) = seq_and_queue(p, 0) {
                    acked_one.insert(k);
                }
            }
            Some(&DELIVERED) => {
                if let (Some(k), Some(n)) = (
                    seq_and_queue(p, 4),
                    p.get(9..13).and_then(|b| b.try_into().ok()),
                ) {
                    counts.insert(k, u32::from_be_bytes(n));
                }
            }
            Some(&TX_ACK) => {
                if let Some((seq, q)) = seq_and_queue(p, 0) {
                    tx_acks.push((r.seq, seq, q));
                }
            }
            Some(&COMMIT) if p.len() == 5 => {
                let n = u64::from(u32::from_be_bytes(p[1..5].try_into().unwrap_or_default()));
                commits.push((r.seq.saturating_sub(n), r.seq));
            }
            Some(&SUBSCRIBE) => {
                if let Ok(mut s) = serde_json::from_slice::<SubRecord>(&p[1..]) {
                    s.since.get_or_insert(r.seq);
                    subs.insert(s.key.clone(), (r.seq, s));
                }
            }
            Some(&UNSUBSCRIBE) => {
                let mut b = &p[1..];
                if let Some(k) = get_str(&mut b) {
                    subs.remove(&k);
                }
            }
            _ => {}
        }
    })?;
    let committed = |seq: u64| {
        let i = commits.partition_point(|(_, end)| *end <= seq);
        commits
            .get(i)
            .is_some_and(|(from, end)| *from <= seq && seq < *end)
    };
    for (rec, seq, q) in tx_acks {
        if committed(rec) {
            if is_subscription(&q) {
                acked_one.insert((seq, q));
            } else {
                acked.insert(seq);
            }
        }
    }
    let mut out = Recovered::default();
    let mut held = 0usize;
    replay(&mut |r: Record| {
        if acked.contains(&r.seq) {
            return;
        }
        let Some(p) = parse_publish(&r.payload) else {
            return;
        };
        if p.transactional && !committed(r.seq) {
            return;
        }
        let len = r.payload.len() - p.at;
        let group: Option<Arc<str>> =
            flotilla_amqp::message::group_id(&r.payload[p.at..]).map(Arc::from);
        // Kept in memory (copied, so the segment read is freed), or left
        // in the journal.
        let mut body: Option<Bytes> = None;
        for q in p.queues {
            if acked_one.contains(&(r.seq, q.clone())) {
                continue;
            }
            // A subscription deleted since keeps nothing, and one made
            // again under the same name nothing from before.
            if is_subscription(&q)
                && subs
                    .get(&q)
                    .is_none_or(|(_, s)| s.since.is_some_and(|since| r.seq < since))
            {
                continue;
            }
            if body.is_none() && held + len <= budget {
                held += len;
                body = Some(Bytes::copy_from_slice(&r.payload[p.at..]));
            }
            let mut m = match &body {
                Some(b) => Stored::new(r.seq, b.clone(), p.expires),
                None => Stored::paged(r.seq, len, p.expires, group.clone()),
            };
            m.due = p.due;
            m.delivery_count = counts.get(&(r.seq, q.clone())).copied().unwrap_or(0);
            out.queues.entry(q).or_default().push_back(m);
        }
    })?;
    let mut subs: Vec<(u64, SubRecord)> = subs.into_values().collect();
    subs.sort_by_key(|(seq, _)| *seq);
    out.subscriptions = subs;
    out.retained = retained
        .into_iter()
        .map(|((space, topic), (seq, msg))| (seq, space, topic, msg))
        .collect();
    Ok(out)
}

/// [`recover`] from records in memory, with no memory budget.
pub fn recover_records(records: Vec<Record>) -> Recovered {
    recover(
        &mut |f: &mut dyn FnMut(Record)| {
            records.iter().cloned().for_each(&mut *f);
            Ok(())
        },
        usize::MAX,
    )
    .unwrap_or_default()
}

/// True for a subscription's queue key.
pub fn is_subscription(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(_, rest)| rest.starts_with("$sub/"))
}

/// The key of queue `address` in `space`.
pub fn queue_key(space: &str, address: &str) -> String {
    format!("{space}/{address}")
}

/// The key of subscription `name` in `space`.
pub fn sub_key(space: &str, name: &str) -> String {
    format!("{space}/$sub/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, payload: Bytes) -> Record {
        Record { seq, payload }
    }

    #[test]
    fn acknowledged_messages_do_not_come_back() {
        let q = recover_records(vec![
            rec(1, publish(&["s/q"], 0, b"a")),
            rec(2, publish(&["s/q"], 7, b"b")),
            rec(3, publish(&["s/r"], 0, b"c")),
            rec(4, ack(1)),
        ]);
        let got: Vec<_> = q.queues["s/q"].iter().map(|s| s.payload.clone()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"b")]);
        assert_eq!(q.queues["s/q"][0].expires, 7);
        assert_eq!(q.queues["s/r"][0].seq, 3);
    }

    #[test]
    fn a_topic_message_stays_for_each_subscription_until_it_consumes_it() {
        let a = SubRecord {
            key: sub_key("s", "a"),
            space: "s".into(),
            pattern: "t".into(),
            selector: Some("x = 1".into()),
            shared: false,
            since: None,
            expiry: None,
            ..Default::default()
        };
        let mut b = a.clone();
        b.key = sub_key("s", "b");
        let mut c = a.clone();
        c.key = sub_key("s", "c");
        let q = recover_records(vec![
            rec(1, subscribe(&a)),
            rec(2, subscribe(&b)),
            rec(3, subscribe(&c)),
            rec(4, publish(&[&a.key, &b.key, &c.key], 0, b"m")),
            rec(5, ack_one(4, &a.key)),
            rec(6, unsubscribe(&c.key)),
        ]);
        assert!(!q.queues.contains_key(&a.key));
        assert_eq!(q.queues[&b.key].len(), 1);
        assert!(!q.queues.contains_key(&c.key));
        let keys: Vec<_> = q.subscriptions.iter().map(|(_, s)| s.key.clone()).collect();
        assert_eq!(keys, vec![a.key.clone(), b.key.clone()]);
        assert_eq!(q.subscriptions[0].1.since, Some(1));
        assert_eq!(q.subscriptions[0].1.pattern, a.pattern);
    }

    #[test]
    fn a_subscription_made_again_gets_nothing_from_before_and_compaction_keeps_its_start() {
        let a = SubRecord {
            key: sub_key("s", "a"),
            space: "s".into(),
            pattern: "t".into(),
            selector: None,
            shared: false,
            since: None,
            expiry: Some(30),
            ..Default::default()
        };
        let rewritten = SubRecord {
            since: Some(5),
            ..a.clone()
        };
        let q = recover_records(vec![
            rec(1, subscribe(&a)),
            rec(2, publish(&[&a.key], 0, b"old")),
            rec(3, unsubscribe(&a.key)),
            rec(4, publish(&[&a.key], 0, b"lost with it")),
            rec(5, subscribe(&a)),
            rec(6, publish(&[&a.key], 0, b"new")),
            // Written again later (compaction): still starts at 5.
            rec(7, subscribe(&rewritten)),
        ]);
        let got: Vec<_> = q.queues[&a.key].iter().map(|m| m.payload.clone()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"new")]);
        assert_eq!(q.subscriptions[0].1.since, Some(5));
        assert_eq!(q.subscriptions[0].1.expiry, Some(30));
    }

    #[test]
    fn the_last_retained_message_of_a_topic_stays_and_an_empty_one_clears_it() {
        let q = recover_records(vec![
            rec(1, retain("s", "a/b", b"one")),
            rec(2, retain("s", "a/b", b"two")),
            rec(3, retain("s", "a/c", b"gone")),
            rec(4, retain("t", "a/b", b"other space")),
            rec(5, retain("s", "a/c", b"")),
        ]);
        let got: Vec<_> = q
            .retained
            .iter()
            .map(|(seq, s, t, m)| (*seq, s.as_str(), t.as_str(), m.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "s", "a/b", Bytes::from_static(b"two")),
                (4, "t", "a/b", Bytes::from_static(b"other space")),
            ]
        );
    }

    #[test]
    fn a_transaction_counts_only_with_its_commit_record() {
        let q = recover_records(vec![
            rec(1, publish(&["s/q"], 0, b"plain")),
            rec(2, publish(&["s/q"], 0, b"taken in a transaction")),
            // Committed: a message and the acknowledgement of seq 2.
            rec(3, tx_publish(&["s/q"], 0, 0, b"committed")),
            rec(4, tx_ack(2, "s/q")),
            rec(5, commit(2)),
            // Cut off by a crash before its commit record: nothing of it.
            rec(6, tx_publish(&["s/q"], 0, 0, b"torn")),
            rec(7, tx_ack(1, "s/q")),
        ]);
        let got: Vec<_> = q.queues["s/q"].iter().map(|m| m.payload.clone()).collect();
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"plain"),
                Bytes::from_static(b"committed")
            ]
        );
        // A commit covers only the records just before it.
        let q = recover_records(vec![
            rec(1, tx_publish(&["s/q"], 0, 0, b"orphan")),
            rec(2, tx_publish(&["s/q"], 0, 0, b"mine")),
            rec(3, commit(1)),
        ]);
        let got: Vec<_> = q.queues["s/q"].iter().map(|m| m.payload.clone()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"mine")]);
        let rec2 = tx_publish(&["s/q"], 0, 0, b"mine");
        assert_eq!(payload_of(&rec2), Some(Bytes::from_static(b"mine")));
    }

    #[test]
    fn delivery_counts_and_due_times_survive_and_bodies_past_the_budget_stay_paged() {
        let records = vec![
            rec(1, publish(&["s/q"], 0, b"0123456789")),
            rec(2, publish_at(&["s/q"], 0, 99, b"0123456789")),
            rec(3, publish(&["s/q"], 0, b"0123456789")),
            rec(4, delivered(1, "s/q", 2)),
            rec(5, delivered(1, "s/q", 3)),
        ];
        let q = recover(
            &mut |f: &mut dyn FnMut(Record)| {
                records.iter().cloned().for_each(&mut *f);
                Ok(())
            },
            25,
        )
        .unwrap();
        let q = &q.queues["s/q"];
        assert_eq!(q[0].delivery_count, 3);
        assert_eq!(q[1].due, 99);
        assert_eq!(q[1].delivery_count, 0);
        assert!(!q[0].paged && !q[1].paged, "two bodies fit the budget");
        assert!(q[2].paged && q[2].payload.is_empty() && q[2].size == 10);
    }

    #[test]
    fn damaged_records_are_skipped() {
        let q = recover_records(vec![
            rec(1, Bytes::from_static(&[PUBLISH, 0, 0])),
            rec(2, Bytes::from_static(&[ACK_ONE, 1])),
            rec(3, Bytes::from_static(&[SUBSCRIBE, b'{'])),
            rec(4, Bytes::from_static(&[UNSUBSCRIBE, 0, 9])),
            rec(5, Bytes::from_static(&[RETAIN, 0, 9, b'x'])),
            rec(6, Bytes::from_static(&[TX_PUBLISH, 0, 0])),
            rec(7, Bytes::from_static(&[TX_ACK, 1])),
            rec(8, Bytes::from_static(&[COMMIT, 1])),
            rec(
                9,
                Bytes::from_static(&[DELIVERED, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            ),
            rec(
                10,
                Bytes::from_static(&[PUBLISH_AT, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            rec(11, commit(u32::MAX)),
        ]);
        assert!(q.queues.is_empty() && q.subscriptions.is_empty() && q.retained.is_empty());
        assert!(is_subscription("s/$sub/x") && !is_subscription("s/q"));
    }
}
