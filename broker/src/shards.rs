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

/// A cloneable handle to every queue task.
#[derive(Clone, Debug)]
pub struct Shards {
    tasks: Arc<[mpsc::UnboundedSender<BrokerEvent>]>,
}

/// [`Shards`] that does not keep the tasks running (their own handle to
/// each other, and the operations listener's).
#[derive(Clone, Debug)]
pub struct WeakShards {
    tasks: Arc<[mpsc::WeakUnboundedSender<BrokerEvent>]>,
}

impl WeakShards {
    pub fn upgrade(&self) -> Option<Shards> {
        let tasks: Option<Vec<_>> = self.tasks.iter().map(|t| t.upgrade()).collect();
        tasks.map(|t| Shards { tasks: t.into() })
    }

    /// Task `i`'s own handle to itself.
    pub fn own(&self, i: usize) -> mpsc::WeakUnboundedSender<BrokerEvent> {
        self.tasks[i].clone()
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Sends to task `i` (if it still runs).
    pub fn send_to(&self, i: usize, ev: BrokerEvent) {
        if let Some(t) = self.tasks.get(i).and_then(|t| t.upgrade()) {
            let _ = t.send(ev);
        }
    }

    /// Sends to the task that owns what `ev` names.
    pub fn send(&self, ev: BrokerEvent) {
        let i = route(self.tasks.len(), &ev);
        match i {
            Some(i) => self.send_to(i, ev),
            None => {
                if let Some(s) = self.upgrade() {
                    let _ = s.send(ev);
                }
            }
        }
    }
}

/// The channel closed: the tasks have stopped.
#[derive(Debug)]
pub struct Closed;

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
    pub fn new(n: usize) -> (Shards, Vec<mpsc::UnboundedReceiver<BrokerEvent>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
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

    /// Sends to task `i`.
    ///
    /// # Errors
    /// The task has stopped.
    pub fn send_to(&self, i: usize, ev: BrokerEvent) -> Result<(), Closed> {
        self.tasks
            .get(i)
            .ok_or(Closed)?
            .send(ev)
            .map_err(|_| Closed)
    }

    /// The task of queue or subscription `key`.
    pub fn of_key(&self, key: &str) -> usize {
        of_key(self.tasks.len(), key)
    }

    /// Sends `ev` where it belongs: to the task that owns what it names;
    /// to every task (a connection gone, the tenancy); or, for the state
    /// of every queue, to every task, merging their answers.
    ///
    /// # Errors
    /// The tasks have stopped.
    pub fn send(&self, ev: BrokerEvent) -> Result<(), Closed> {
        let n = self.tasks.len();
        if n == 1 {
            return self.send_to(0, ev);
        }
        if let Some(i) = route(n, &ev) {
            return self.send_to(i, ev);
        }
        match ev {
            BrokerEvent::Gone { conn } => {
                for t in self.tasks.iter() {
                    t.send(BrokerEvent::Gone { conn }).map_err(|_| Closed)?;
                }
                Ok(())
            }
            BrokerEvent::Tenancy(t) => {
                for task in self.tasks.iter() {
                    task.send(BrokerEvent::Tenancy(t.clone()))
                        .map_err(|_| Closed)?;
                }
                Ok(())
            }
            BrokerEvent::Report { reply } => {
                let merged = self.gather();
                tokio::spawn(async move {
                    let _ = reply.send(merged.await);
                });
                Ok(())
            }
            BrokerEvent::Stat { tx, link, space } => {
                let merged = self.gather();
                tokio::spawn(async move {
                    let mut body = merged.await;
                    if let Some(space) = space {
                        if let Some(q) = body["queues"].as_array_mut() {
                            q.retain(|v| v["space"] == space.as_str());
                        }
                        if let Some(r) = body["retained"].as_object_mut() {
                            r.retain(|s, _| *s == space);
                        }
                    }
                    let _ = tx.send(ToConn::Stat { link, body });
                });
                Ok(())
            }
            _ => Err(Closed),
        }
    }

    /// Every task's report, merged into one.
    fn gather(&self) -> impl std::future::Future<Output = Value> + Send + 'static {
        let waits: Vec<_> = self
            .tasks
            .iter()
            .map(|t| {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let _ = t.send(BrokerEvent::Report { reply });
                rx
            })
            .collect();
        async move {
            let mut parts = Vec::with_capacity(waits.len());
            for w in waits {
                if let Ok(v) = w.await {
                    parts.push(v);
                }
            }
            merge(parts)
        }
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
