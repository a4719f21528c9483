//! The queue tasks (`--queue-shards`, one per core by default): each owns
//! some of the queues and subscriptions, so the broker uses more than one
//! core. A queue belongs to the task its key hashes to; the subscriptions,
//! retained messages and MQTT sessions of an address space all belong to
//! the task its name hashes to, so a topic message fans out within one
//! task. Order per queue is the order its one task keeps.
//!
//! [`Shards`] is the handle connections send through: it routes each
//! event to the task that owns what it names, broadcasts what concerns
//! every task (a connection gone, the tenancy), and merges their reports.
//! Delivery tokens carry their task (`token % shards`).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::queues::{BrokerEvent, ToConn};
use crate::store;

/// Events a queue task's channel holds. Producers are bounded by their
/// credit and consumers by theirs, so a full channel means the task is
/// behind: connections stop reading until there is room, the journal's
/// committer waits.
pub const CAPACITY: usize = 1 << 14;

/// From a thread that is not a runtime's (the journal's committer): sends
/// at once when there is room (the common case, and cheap), else waits.
pub fn send_waiting(task: &mpsc::Sender<BrokerEvent>, ev: BrokerEvent) {
    if let Err(mpsc::error::TrySendError::Full(ev)) = task.try_send(ev) {
        let _ = task.blocking_send(ev);
    }
}

/// A cloneable handle to every queue task.
#[derive(Clone, Debug)]
pub struct Shards {
    tasks: Arc<[mpsc::Sender<BrokerEvent>]>,
}

/// [`Shards`] that does not keep the tasks running (their own handle to
/// each other, and the operations listener's).
#[derive(Clone, Debug)]
pub struct WeakShards {
    tasks: Arc<[mpsc::WeakSender<BrokerEvent>]>,
}

impl WeakShards {
    pub fn upgrade(&self) -> Option<Shards> {
        let tasks: Option<Vec<_>> = self.tasks.iter().map(|t| t.upgrade()).collect();
        tasks.map(|t| Shards { tasks: t.into() })
    }

    /// Task `i`'s own handle to itself.
    pub fn own(&self, i: usize) -> mpsc::WeakSender<BrokerEvent> {
        self.tasks[i].clone()
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// From the journal's committer thread: to the task that owns what
    /// `ev` names, waiting for room.
    pub fn send_blocking(&self, ev: BrokerEvent) {
        if let Some(s) = self.upgrade() {
            s.send_blocking(ev);
        }
    }

    /// From a queue task: at once if there is room, else by a task that
    /// waits for it (a queue task never waits for another).
    pub fn send_soon(&self, ev: BrokerEvent) {
        if let Some(s) = self.upgrade() {
            s.send_soon(ev);
        }
    }
}

fn hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The task of queue (or subscription) `key` among `n`.
pub fn of_key(n: usize, key: &str) -> usize {
    if n <= 1 {
        return 0;
    }
    if store::is_subscription(key) {
        let space = key.split_once('/').map_or(key, |(s, _)| s);
        return of_space(n, space);
    }
    (hash(key) % n as u64) as usize
}

/// The task of everything of address space `space` that is not a queue:
/// its subscriptions, retained messages and topic publishes.
pub fn of_space(n: usize, space: &str) -> usize {
    if n <= 1 {
        return 0;
    }
    (hash(&format!("space:{space}")) % n as u64) as usize
}

/// The task of a delivery token.
pub fn of_token(n: usize, token: u64) -> usize {
    (token % n.max(1) as u64) as usize
}

/// Where `ev` goes: one task, or (`None`) every task or a merge.
fn route(n: usize, ev: &BrokerEvent) -> Option<usize> {
    use BrokerEvent as E;
    Some(match ev {
        E::Stored { queue, .. } | E::Attach { queue, .. } => of_key(n, queue),
        E::StoredMany { queues, .. } => queues.first().map_or(0, |q| of_key(n, q)),
        E::Publish { space, .. }
        | E::Retain { space, .. }
        | E::RetainRecorded { space, .. }
        | E::ReadRetained { space, .. } => of_space(n, space),
        E::Subscribe { spec, .. } | E::Ensure { spec } => of_key(n, &spec.record.key),
        E::SubRecorded { key, .. }
        | E::SessionUpdate { key, .. }
        | E::SessionDelete { key, .. } => of_key(n, key),
        E::Reattach { keys, .. } => keys.first().map_or(0, |k| of_key(n, k)),
        E::Settle { token, .. } | E::Hold { token, .. } | E::TxSettled { token, .. } => {
            of_token(n, *token)
        }
        E::Purge { queue, .. } | E::PurgeNow { queue } | E::Inspect { queue, .. } => {
            of_key(n, queue)
        }
        E::TxCommit { space, .. } | E::TxCommitted { space, .. } => of_space(n, space),
        E::TxRelease { shard, .. } => *shard,
        // Each task asks for its own (through the journal's barrier).
        E::Floor { .. } => 0,
        // A consumer's credit and detach go to its task: the connection
        // sends them with `send_to`.
        E::Credit { .. } | E::Detach { .. } => 0,
        E::Gone { .. } | E::Tenancy(_) | E::Stat { .. } | E::Report { .. } => return None,
    })
}

impl Shards {
    /// `n` queue tasks' channels, and their receivers.
    pub fn new(n: usize) -> (Shards, Vec<mpsc::Receiver<BrokerEvent>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n.max(1)).map(|_| mpsc::channel(CAPACITY)).unzip();
        (Shards { tasks: txs.into() }, rxs)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn downgrade(&self) -> WeakShards {
        WeakShards {
            tasks: self.tasks.iter().map(|t| t.downgrade()).collect(),
        }
    }

    /// The task of queue or subscription `key`.
    pub fn of_key(&self, key: &str) -> usize {
        of_key(self.tasks.len(), key)
    }

    /// The task `ev` goes to (`None`: every task, or a merge of their
    /// answers).
    pub fn task_of(&self, ev: &BrokerEvent) -> Option<usize> {
        if self.tasks.len() == 1 {
            return match ev {
                BrokerEvent::Stat { .. } | BrokerEvent::Report { .. } => None,
                _ => Some(0),
            };
        }
        route(self.tasks.len(), ev)
    }

    /// Task `i`'s channel (to wait for room in it).
    pub fn sender(&self, i: usize) -> Option<&mpsc::Sender<BrokerEvent>> {
        self.tasks.get(i)
    }

    /// Sends to task `i` if there is room; gives the event back if not
    /// (a task that stopped takes nothing: the event is dropped).
    ///
    /// # Errors
    /// The task's channel is full.
    pub fn try_send_to(&self, i: usize, ev: BrokerEvent) -> Result<(), BrokerEvent> {
        match self.tasks.get(i).map(|t| t.try_send(ev)) {
            Some(Err(mpsc::error::TrySendError::Full(ev))) => Err(ev),
            _ => Ok(()),
        }
    }

    /// Sends `ev` where it belongs if there is room: to the task that owns
    /// what it names; what goes to every task (a connection gone, the
    /// tenancy) or merges their answers (the state of every queue) is
    /// handed to a task that waits for room.
    ///
    /// # Errors
    /// The owning task's channel is full: the event and its task.
    pub fn try_send(&self, ev: BrokerEvent) -> Result<(), (usize, BrokerEvent)> {
        match self.task_of(&ev) {
            Some(i) => self.try_send_to(i, ev).map_err(|ev| (i, ev)),
            None => {
                let s = self.clone();
                tokio::spawn(async move { s.send(ev).await });
                Ok(())
            }
        }
    }

    /// [`Shards::try_send`], or, when the task is full, by a task that
    /// waits for room (for senders that must not wait and send rarely).
    pub fn send_soon(&self, ev: BrokerEvent) {
        if let Err((i, ev)) = self.try_send(ev) {
            let s = self.clone();
            tokio::spawn(async move { s.send_to(i, ev).await });
        }
    }

    /// Sends to task `i`, waiting for room.
    pub async fn send_to(&self, i: usize, ev: BrokerEvent) {
        if let Some(t) = self.tasks.get(i) {
            let _ = t.send(ev).await;
        }
    }

    /// From the journal's committer thread (not a runtime's): to the task
    /// that owns what `ev` names, waiting for room.
    pub fn send_blocking(&self, ev: BrokerEvent) {
        match self.task_of(&ev) {
            Some(i) => {
                if let Some(t) = self.tasks.get(i) {
                    send_waiting(t, ev);
                }
            }
            None => {
                if let BrokerEvent::Gone { conn } = ev {
                    for t in self.tasks.iter() {
                        send_waiting(t, BrokerEvent::Gone { conn });
                    }
                }
            }
        }
    }

    /// Sends `ev` where it belongs, waiting for room: to the task that
    /// owns what it names; to every task (a connection gone, the
    /// tenancy); or, for the state of every queue, to every task, merging
    /// their answers.
    pub async fn send(&self, ev: BrokerEvent) {
        if let Some(i) = self.task_of(&ev) {
            return self.send_to(i, ev).await;
        }
        match ev {
            BrokerEvent::Gone { conn } => {
                for t in self.tasks.iter() {
                    let _ = t.send(BrokerEvent::Gone { conn }).await;
                }
            }
            BrokerEvent::Tenancy(t) => {
                for task in self.tasks.iter() {
                    let _ = task.send(BrokerEvent::Tenancy(t.clone())).await;
                }
            }
            BrokerEvent::Report { reply } => {
                let _ = reply.send(self.gather().await);
            }
            BrokerEvent::Stat { tx, link, space } => {
                let mut body = self.gather().await;
                if let Some(space) = space {
                    only_space(&mut body, &space);
                }
                let _ = tx.send(ToConn::Stat { link, body });
            }
            _ => {}
        }
    }

    /// Every task's report, merged into one.
    async fn gather(&self) -> Value {
        let mut waits = Vec::with_capacity(self.tasks.len());
        for t in self.tasks.iter() {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if t.send(BrokerEvent::Report { reply }).await.is_ok() {
                waits.push(rx);
            }
        }
        let mut parts = Vec::with_capacity(waits.len());
        for w in waits {
            if let Ok(v) = w.await {
                parts.push(v);
            }
        }
        if parts.len() == 1 {
            return parts.pop().unwrap_or_default();
        }
        merge(parts)
    }
}

/// A report cut down to one address space's queues and retained messages.
pub fn only_space(body: &mut Value, space: &str) {
    if let Some(q) = body["queues"].as_array_mut() {
        q.retain(|v| v["space"] == space);
    }
    if let Some(r) = body["retained"].as_object_mut() {
        r.retain(|s, _| *s == space);
    }
}

/// The tasks' reports as one: queues side by side (sorted), retained
/// counts and memory added up.
pub fn merge(parts: Vec<Value>) -> Value {
    let mut it = parts.into_iter();
    let Some(mut out) = it.next() else {
        return Value::Null;
    };
    for p in it {
        if let (Some(q), Some(more)) = (out["queues"].as_array_mut(), p["queues"].as_array()) {
            q.extend(more.iter().cloned());
        }
        if let (Some(r), Some(more)) = (out["retained"].as_object_mut(), p["retained"].as_object())
        {
            for (k, v) in more {
                r.insert(k.clone(), v.clone());
            }
        }
        for k in ["limit", "held", "pagedOut", "pagedIn"] {
            let sum = out["memory"][k].as_u64().unwrap_or(0) + p["memory"][k].as_u64().unwrap_or(0);
            out["memory"][k] = sum.into();
        }
    }
    if let Some(q) = out["queues"].as_array_mut() {
        q.sort_by(|a, b| {
            (a["space"].as_str(), a["address"].as_str())
                .cmp(&(b["space"].as_str(), b["address"].as_str()))
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_task_gives_the_event_back_and_takes_it_once_there_is_room() {
        let (s, mut rx) = Shards::new(1);
        let purge = || BrokerEvent::PurgeNow {
            queue: "s/q".into(),
        };
        for _ in 0..CAPACITY {
            assert!(s.try_send(purge()).is_ok());
        }
        let Err((task, ev)) = s.try_send(purge()) else {
            panic!("a full channel takes no more");
        };
        assert_eq!(task, 0);
        assert!(rx[0].try_recv().is_ok());
        s.send_to(task, ev).await;
        let mut n = 0;
        while rx[0].try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(
            n, CAPACITY,
            "what was given back went in once there was room"
        );
    }

    #[test]
    fn a_spaces_subscriptions_share_a_task_and_queues_spread() {
        let n = 4;
        let a = of_key(n, &store::sub_key("s", "durable/c/one"));
        let b = of_key(n, &store::sub_key("s", "shared/global/two"));
        assert_eq!(a, b);
        assert_eq!(a, of_space(n, "s"));
        let tasks: std::collections::HashSet<usize> =
            (0..64).map(|i| of_key(n, &format!("s/q{i}"))).collect();
        assert_eq!(tasks.len(), n, "queues spread over every task");
        assert_eq!(of_key(1, "s/q"), 0);
        assert_eq!(of_token(3, 7), 1);
    }
}
