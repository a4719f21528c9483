//! Local transactions (AMQP 1.0 §4): what a coordinator link carries, and
//! the work a transaction holds until it is discharged.
//!
//! A client attaches a sender to a `coordinator` target and sends it
//! `declare` (answered with `declared` and a transaction id) and
//! `discharge` (`fail`: roll back). Under a transaction, messages it posts
//! (transfers carrying `transactional-state`) and deliveries it settles
//! (dispositions carrying one) wait in the queue task's [`Txn`] and take
//! effect only at commit: one batch of journal records ending with a
//! `Commit` record, written in one sync (`store::tx_publish`,
//! `store::tx_ack`, `store::commit`). A rollback drops the posts and puts
//! the acquired messages back, counted as a delivery.
//!
//! A transaction belongs to the connection that declared it, which keeps
//! its [`Txn`], to its coordinator link (a coordinator cannot be resumed:
//! when its link goes, its transactions roll back), and to one address
//! space: its id is random, and an id used from elsewhere is unknown.
//! Through a router, each client's coordinator link towards this broker is
//! its own, so the bounds below are per coordinator link there, and per
//! connection for a client connected directly. A delivery settled under it is held on its queue task
//! (`BrokerEvent::Hold`) until the discharge; the commit itself runs on
//! the space's task (`BrokerEvent::TxCommit`), which writes the batch.

use bytes::Bytes;
use flotilla_amqp::types::messaging::Outcome;

use crate::queues::{Acquired, Settlement};

/// What a client's open transactions hold together is bounded: past this
/// many messages or bytes the one that went over can only roll back (its
/// memory follows its windows).
pub const MAX_MESSAGES: usize = 100_000;
pub const MAX_BYTES: usize = 64 << 20;
/// Open transactions per client.
pub const MAX_OPEN: usize = 64;

pub use flotilla_amqp::txn::{
    decode, hex, new_id, rolled_back, state_of, unknown, Control, DISCARDED,
};

/// How an outcome given under a transaction settles the delivery at
/// commit (`None`: no outcome yet).
pub fn settlement(outcome: Option<&Outcome>) -> Option<Settlement> {
    Some(match outcome? {
        Outcome::Accepted(_) | Outcome::Rejected(_) => Settlement::Consumed,
        Outcome::Released(_) => Settlement::Requeue { failed: false },
        Outcome::Modified(m) => Settlement::Requeue {
            failed: m.delivery_failed.unwrap_or(false),
        },
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// Where a message posted under a transaction goes.
#[derive(Debug, Clone)]
pub enum TxDest {
    /// A queue (its key).
    Queue(String),
    /// A topic of the transaction's space.
    Topic(String),
}

/// A message posted under a transaction.
#[derive(Debug)]
pub struct TxPost {
    pub to: TxDest,
    pub payload: Bytes,
    pub expires: u64,
    pub due: u64,
}

/// A transaction's work until it is discharged, kept by the connection
/// that declared it.
#[derive(Debug)]
pub struct Txn {
    /// The coordinator link that declared it.
    pub controller: flotilla_amqp::connection::LinkId,
    /// The address space of its coordinator link: everything it touches
    /// is of this space.
    pub space: String,
    pub posts: Vec<TxPost>,
    pub bytes: usize,
    /// Deliveries settled under it (token and outcome), each asked to be
    /// held on its queue task.
    pub holds: Vec<(u64, Settlement)>,
    /// Holds not answered yet: a discharge waits for them.
    pub pending: usize,
    /// What the holds found: the deliveries it acknowledges or returns.
    pub acquired: Vec<(Acquired, Settlement)>,
    /// Why it can only roll back.
    pub doomed: Option<String>,
    /// A discharge waiting for the holds: its delivery, whether it was
    /// settled, and `fail`.
    pub discharge: Option<(flotilla_amqp::connection::DeliveryRef, bool, bool)>,
}

impl Txn {
    pub fn new(controller: flotilla_amqp::connection::LinkId, space: String) -> Txn {
        Txn {
            controller,
            space,
            posts: Vec::new(),
            bytes: 0,
            holds: Vec::new(),
            pending: 0,
            acquired: Vec::new(),
            doomed: None,
            discharge: None,
        }
    }
}
