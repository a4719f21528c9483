//! One task per client connection: publishes go to the journal and, once
//! durable, to their queue and back to the producer as `accepted`;
//! consumers' credit and settlements go to the queue task, and the
//! deliveries it hands out go onto the socket.

use std::collections::HashMap;
use std::time::Instant;

use bytes::BytesMut;
use flotilla_amqp::connection::{
    amqp_error, AttachReply, Connection, ConnectionConfig, Event, LinkId,
};
use flotilla_amqp::frame;
use flotilla_amqp::transport::BoxIo;
use flotilla_amqp::types::definitions::{AmqpError, Role};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Rejected, TargetArchetype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::journal::JournalHandle;
use crate::queues::{BrokerEvent, QueueHandle, Settlement, ToConn};
use crate::store::{self, Stored};

/// Credit a producer link gets: messages not yet on disk count against it.
const WINDOW: u32 = 1000;

struct Producer {
    queue: String,
    /// Published, not yet durable.
    storing: u32,
}

pub(crate) struct BrokerConnection {
    id: u64,
    conn: Connection,
    queues: QueueHandle,
    journal: JournalHandle,
    tx: mpsc::UnboundedSender<ToConn>,
    rx: mpsc::UnboundedReceiver<ToConn>,
    producers: HashMap<LinkId, Producer>,
    consumers: HashMap<LinkId, String>,
    events: Vec<Event>,
    closing: bool,
}

impl BrokerConnection {
    pub(crate) fn new(
        id: u64,
        container_id: &str,
        queues: QueueHandle,
        journal: JournalHandle,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = ConnectionConfig {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        BrokerConnection {
            id,
            conn: Connection::new(cfg),
            queues,
            journal,
            tx,
            rx,
            producers: HashMap::new(),
            consumers: HashMap::new(),
            events: Vec::new(),
            closing: false,
        }
    }

    pub(crate) async fn run(mut self, io: BoxIo, mut rbuf: BytesMut, shutdown: CancellationToken) {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut wbuf = BytesMut::new();
        let mut batch = Vec::with_capacity(256);
        let mut next_tick = Instant::now();
        let mut eof = false;
        self.input(&mut rbuf);
        loop {
            if self.conn.has_output() {
                let out = self.conn.take_output();
                wbuf.extend_from_slice(&out);
            }
            if wbuf.is_empty()
                && (eof || self.conn.is_closed() || (self.closing && self.conn.close_sent()))
            {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled(), if !self.closing => {
                    self.closing = true;
                    self.conn.close(Some(amqp_error(flotilla_amqp::types::definitions::ConnectionError::ConnectionForced, "broker shutting down")));
                }
                r = rd.read_buf(&mut rbuf), if !eof => match r {
                    Ok(0) | Err(_) => eof = true,
                    Ok(_) => self.input(&mut rbuf),
                },
                n = self.rx.recv_many(&mut batch, 256) => {
                    if n > 0 {
                        for m in batch.drain(..) {
                            self.handle_queue_event(m);
                        }
                    }
                }
                r = wr.write(&wbuf), if !wbuf.is_empty() => match r {
                    Ok(n) => { let _ = wbuf.split_to(n); }
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(next_tick.into()) => match self.conn.tick(Instant::now()) {
                    Ok(t) => next_tick = t,
                    Err(e) => { self.closing = true; self.conn.close(Some(e.0)); }
                },
            }
        }
        let _ = wr.shutdown().await;
        let _ = self.queues.send(BrokerEvent::Gone { conn: self.id });
    }

    fn input(&mut self, rbuf: &mut BytesMut) {
        loop {
            match frame::decode_frame(rbuf, self.conn.max_frame_size()) {
                Ok(Some(f)) => {
                    let mut events = std::mem::take(&mut self.events);
                    let r = self.conn.handle_frame(f, &mut events);
                    for e in events.drain(..) {
                        self.handle_event(e);
                    }
                    self.events = events;
                    if let Err(e) = r {
                        info!(conn.id = self.id, error = %e, "closing connection: protocol error");
                        self.closing = true;
                        self.conn.close(Some(e.0));
                        rbuf.clear();
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    info!(conn.id = self.id, error = %e, "closing connection: bad frame");
                    self.closing = true;
                    self.conn.close(Some(e.to_amqp_error()));
                    rbuf.clear();
                    return;
                }
            }
        }
    }

    fn handle_event(&mut self, e: Event) {
        match e {
            Event::Open(_) => self.conn.open(),
            Event::Attach {
                link,
                attach,
                reply: false,
            } => self.attach(link, &attach),
            Event::Flow { link } => {
                if self.consumers.contains_key(&link) {
                    if let Some(l) = self.conn.link(link) {
                        let limit = l.delivery_count.wrapping_add(l.credit);
                        let _ = self.queues.send(BrokerEvent::Credit {
                            conn: self.id,
                            link,
                            limit,
                        });
                    }
                }
            }
            Event::Delivery { link, delivery } => self.publish(link, delivery),
            Event::Outcome {
                token,
                state,
                settled,
                ..
            } => {
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
                let _ = self.queues.send(BrokerEvent::Settle { seq: token, how });
            }
            Event::Detach {
                link, unsettled, ..
            } => {
                self.producers.remove(&link);
                if self.consumers.remove(&link).is_some() {
                    let _ = unsettled;
                    let _ = self.queues.send(BrokerEvent::Detach {
                        conn: self.id,
                        link,
                    });
                }
            }
            Event::Close { .. } => self.closing = true,
            Event::Attach { .. } | Event::Begin { .. } | Event::End { .. } => {}
        }
    }

    fn attach(&mut self, link: LinkId, attach: &flotilla_amqp::types::performatives::Attach) {
        match attach.role {
            Role::Sender => {
                let target = match attach.target.as_deref() {
                    Some(TargetArchetype::Target(t)) => Some(t.clone()),
                    _ => None,
                };
                let Some(queue) = target
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .filter(|a| !a.is_empty())
                else {
                    return self.conn.refuse_attach(
                        link,
                        amqp_error(AmqpError::InvalidField, "a producer needs a target queue"),
                    );
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
                debug!(conn.id = self.id, queue = %queue, "producer attached");
                self.producers.insert(link, Producer { queue, storing: 0 });
            }
            Role::Receiver => {
                let source = attach.source.as_deref().cloned().unwrap_or_default();
                let Some(queue) = source.address.clone().filter(|a| !a.is_empty()) else {
                    return self.conn.refuse_attach(
                        link,
                        amqp_error(AmqpError::InvalidField, "a consumer needs a source queue"),
                    );
                };
                let target = match attach.target.as_deref() {
                    Some(TargetArchetype::Target(t)) => Some(t.clone()),
                    _ => None,
                };
                self.conn.accept_attach(
                    link,
                    AttachReply {
                        source: Some(source),
                        target,
                        ..Default::default()
                    },
                );
                debug!(conn.id = self.id, queue = %queue, "consumer attached");
                let _ = self.queues.send(BrokerEvent::Attach {
                    queue: queue.clone(),
                    conn: self.id,
                    link,
                    tx: self.tx.clone(),
                });
                self.consumers.insert(link, queue);
            }
        }
    }

    /// A message from a producer: to the journal; once durable, to its
    /// queue and `accepted` to the producer.
    fn publish(&mut self, link: LinkId, d: flotilla_amqp::connection::Delivery) {
        let Some(p) = self.producers.get_mut(&link) else {
            return;
        };
        p.storing += 1;
        let queue = p.queue.clone();
        let queues = self.queues.clone();
        let me = self.tx.clone();
        let (dref, settled) = (d.id, d.settled);
        let payload = d.payload;
        let record = store::publish(&queue, &payload);
        let done = Box::new(
            move |r: Result<u64, crate::journal::JournalError>| match r {
                Ok(seq) => {
                    let _ = queues.send(BrokerEvent::Stored {
                        queue,
                        msg: Stored {
                            seq,
                            payload,
                            delivery_count: 0,
                        },
                    });
                    let _ = me.send(ToConn::Stored {
                        link,
                        delivery: dref,
                        settled,
                    });
                }
                Err(e) => {
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

    fn handle_queue_event(&mut self, m: ToConn) {
        match m {
            ToConn::Deliver { link, msg } => {
                if !self.conn.send(link, &msg.payload, false, msg.seq) {
                    let _ = self.queues.send(BrokerEvent::Settle {
                        seq: msg.seq,
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
                if !settled {
                    let e = amqp_error(AmqpError::InternalError, format!("not stored: {why}"));
                    self.conn.settle(
                        delivery,
                        DeliveryState::Rejected(Rejected { error: Some(e) }),
                    );
                }
                self.stored_one(link);
            }
        }
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
