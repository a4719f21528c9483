//! The queues: one task owns them all. Connection tasks tell it what was
//! stored, who consumes, with how much credit, and how deliveries were
//! settled; it hands each message to one consumer with credit (competing
//! consumers, round robin), keeps order per queue, and puts back what
//! comes back (released, modified, or with its consumer gone).

use std::collections::{HashMap, VecDeque};

use flotilla_amqp::connection::LinkId;
use tokio::sync::mpsc;
use tracing::debug;

use crate::journal::JournalHandle;
use crate::store::{self, Stored};

/// What the queue task tells a connection task.
#[derive(Debug)]
pub enum ToConn {
    /// Send `msg` on our link `link` (unsettled; its token is `msg.seq`).
    Deliver { link: LinkId, msg: Stored },
    /// A message published on `link` is on disk: accept it.
    Stored {
        link: LinkId,
        delivery: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
    },
    /// Storing it failed.
    Failed {
        link: LinkId,
        delivery: flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        why: String,
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

/// What connection tasks tell the queue task.
#[derive(Debug)]
pub enum BrokerEvent {
    Stored {
        queue: String,
        msg: Stored,
    },
    Attach {
        queue: String,
        conn: u64,
        link: LinkId,
        tx: mpsc::UnboundedSender<ToConn>,
    },
    Credit {
        conn: u64,
        link: LinkId,
        limit: u32,
    },
    Detach {
        conn: u64,
        link: LinkId,
    },
    Settle {
        seq: u64,
        how: Settlement,
    },
    Gone {
        conn: u64,
    },
}

struct Consumer {
    conn: u64,
    link: LinkId,
    tx: mpsc::UnboundedSender<ToConn>,
    routed: u32,
    limit: u32,
}

impl Consumer {
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
struct Queue {
    messages: VecDeque<Stored>,
    consumers: Vec<Consumer>,
    rr: usize,
}

impl Queue {
    /// Puts a message back in sequence order (usually at the front).
    fn requeue(&mut self, msg: Stored) {
        let at = self.messages.partition_point(|m| m.seq < msg.seq);
        self.messages.insert(at, msg);
    }
}

struct Inflight {
    queue: String,
    conn: u64,
    link: LinkId,
    msg: Stored,
}

/// Owns every queue of a broker.
pub struct QueueTask {
    /// Our own handle, for messages moved to the dead-letter queue (weak,
    /// so the task still ends when every connection's handle is gone).
    tx: mpsc::WeakUnboundedSender<BrokerEvent>,
    dead_letter: DeadLetter,
    rx: mpsc::UnboundedReceiver<BrokerEvent>,
    queues: HashMap<String, Queue>,
    inflight: HashMap<u64, Inflight>,
    journal: JournalHandle,
    acks_since_retire: u32,
}

/// Where messages go that were delivered too often without being consumed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Deliveries (returned released-with-failure, modified, or abandoned)
    /// after which a message moves to `queue`.
    pub max_deliveries: u32,
    pub queue: String,
}

/// A cloneable sender to the queue task.
pub type QueueHandle = mpsc::UnboundedSender<BrokerEvent>;

impl QueueTask {
    /// A queue task starting with the recovered `queues`.
    pub fn new(
        journal: JournalHandle,
        recovered: std::collections::BTreeMap<String, VecDeque<Stored>>,
        dead_letter: DeadLetter,
    ) -> (QueueTask, QueueHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queues = recovered
            .into_iter()
            .map(|(name, messages)| {
                (
                    name,
                    Queue {
                        messages,
                        ..Default::default()
                    },
                )
            })
            .collect();
        (
            QueueTask {
                tx: tx.downgrade(),
                dead_letter,
                rx,
                queues,
                inflight: HashMap::new(),
                journal,
                acks_since_retire: 0,
            },
            tx,
        )
    }

    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(256);
        loop {
            if self.rx.recv_many(&mut batch, 256).await == 0 {
                return;
            }
            let mut touched: Vec<String> = Vec::new();
            for ev in batch.drain(..) {
                if let Some(q) = self.handle(ev) {
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

    /// Handles one event; returns the queue that may now have work.
    fn handle(&mut self, ev: BrokerEvent) -> Option<String> {
        match ev {
            BrokerEvent::Stored { queue, msg } => {
                self.queues
                    .entry(queue.clone())
                    .or_default()
                    .messages
                    .push_back(msg);
                Some(queue)
            }
            BrokerEvent::Attach {
                queue,
                conn,
                link,
                tx,
            } => {
                self.queues
                    .entry(queue.clone())
                    .or_default()
                    .consumers
                    .push(Consumer {
                        conn,
                        link,
                        tx,
                        routed: 0,
                        limit: 0,
                    });
                Some(queue)
            }
            BrokerEvent::Credit { conn, link, limit } => {
                let (name, q) = self
                    .queues
                    .iter_mut()
                    .find(|(_, q)| q.consumers.iter().any(|c| c.conn == conn && c.link == link))?;
                if let Some(c) = q
                    .consumers
                    .iter_mut()
                    .find(|c| c.conn == conn && c.link == link)
                {
                    c.limit = limit;
                }
                Some(name.clone())
            }
            BrokerEvent::Detach { conn, link } => self.drop_consumers(
                |c| c.conn == conn && c.link == link,
                |f| f.conn == conn && f.link == link,
            ),
            BrokerEvent::Gone { conn } => {
                self.drop_consumers(|c| c.conn == conn, |f| f.conn == conn)
            }
            BrokerEvent::Settle { seq, how } => {
                let f = self.inflight.remove(&seq)?;
                match how {
                    Settlement::Consumed => {
                        // Durable or not, the ack only saves a redelivery.
                        let _ = self.journal.append_then(store::ack(seq), Box::new(|_| {}));
                        self.acks_since_retire += 1;
                        if self.acks_since_retire >= 1000 {
                            self.acks_since_retire = 0;
                            self.retire();
                        }
                        None
                    }
                    Settlement::Requeue { failed } => {
                        let mut msg = f.msg;
                        msg.delivery_count += u32::from(failed);
                        self.put_back(f.queue, msg)
                    }
                }
            }
        }
    }

    /// Removes consumers; what they held goes back to their queues as
    /// delivered once (it may have reached them).
    fn drop_consumers(
        &mut self,
        mut which: impl FnMut(&Consumer) -> bool,
        mut held: impl FnMut(&Inflight) -> bool,
    ) -> Option<String> {
        for q in self.queues.values_mut() {
            q.consumers.retain(|c| !which(c));
        }
        let back: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| held(f))
            .map(|(s, _)| *s)
            .collect();
        let mut touched = Vec::new();
        for seq in back {
            if let Some(f) = self.inflight.remove(&seq) {
                let mut msg = f.msg;
                msg.delivery_count += 1;
                if let Some(q) = self.put_back(f.queue, msg) {
                    if !touched.contains(&q) {
                        touched.push(q);
                    }
                }
            }
        }
        // Other consumers of those queues get the returned messages.
        for q in touched {
            self.dispatch(&q);
        }
        None
    }

    /// A message came back: into its queue again, or, delivered too many
    /// times, to the dead-letter queue. Returns the queue that got it.
    fn put_back(&mut self, queue: String, msg: Stored) -> Option<String> {
        let dl = &self.dead_letter;
        if msg.delivery_count < dl.max_deliveries || queue == dl.queue {
            self.queues.entry(queue.clone()).or_default().requeue(msg);
            return Some(queue);
        }
        debug!(queue = %queue, seq = msg.seq, deliveries = msg.delivery_count, "dead-lettered");
        // Stored in the dead-letter queue first, then acknowledged where it
        // was: a crash in between leaves a duplicate, never a loss.
        let (tx, dlq, payload) = (self.tx.clone(), dl.queue.clone(), msg.payload.clone());
        let stored = Box::new(move |r: Result<u64, crate::journal::JournalError>| {
            if let (Ok(seq), Some(tx)) = (r, tx.upgrade()) {
                let _ = tx.send(BrokerEvent::Stored {
                    queue: dlq,
                    msg: Stored {
                        seq,
                        payload,
                        delivery_count: 0,
                    },
                });
            }
        });
        let _ = self
            .journal
            .append_then(store::publish(&dl.queue, &msg.payload), stored);
        let _ = self
            .journal
            .append_then(store::ack(msg.seq), Box::new(|_| {}));
        None
    }

    /// Hands queued messages to consumers with credit, round robin.
    fn dispatch(&mut self, name: &str) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        while !q.messages.is_empty() {
            let n = q.consumers.len();
            let Some(i) = (0..n)
                .map(|k| (q.rr + k) % n.max(1))
                .find(|&i| q.consumers[i].credit() > 0)
            else {
                break;
            };
            q.rr = i + 1;
            let msg = q.messages.pop_front().expect("checked non-empty");
            let c = &mut q.consumers[i];
            match c.tx.send(ToConn::Deliver {
                link: c.link,
                msg: msg.clone(),
            }) {
                Ok(()) => {
                    c.routed = c.routed.wrapping_add(1);
                    self.inflight.insert(
                        msg.seq,
                        Inflight {
                            queue: name.to_string(),
                            conn: c.conn,
                            link: c.link,
                            msg,
                        },
                    );
                }
                Err(_) => {
                    debug!(queue = name, "consumer's connection is gone");
                    q.consumers.remove(i);
                    q.messages.push_front(msg);
                }
            }
        }
    }

    /// Deletes journal segments below the oldest message still held.
    fn retire(&self) {
        let oldest_queued = self
            .queues
            .values()
            .filter_map(|q| q.messages.front().map(|m| m.seq))
            .min();
        let oldest_inflight = self.inflight.keys().min().copied();
        let oldest = match (oldest_queued, oldest_inflight) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => u64::MAX,
        };
        self.journal.retire_before(oldest);
    }
}
