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
//! A transaction belongs to the connection that declared it (through a
//! router, the router's connection), which keeps its [`Txn`], and to one
//! address space: its id is random, and an id used from elsewhere is
//! unknown. A delivery settled under it is held on its queue task
//! (`BrokerEvent::Hold`) until the discharge; the commit itself runs on
//! the space's task (`BrokerEvent::TxCommit`), which writes the batch.

use bytes::Bytes;
use flotilla_amqp::message::sections;
use flotilla_amqp::types::definitions::{AmqpError, Error as AmqpErrorBody};
use flotilla_amqp::types::messaging::{DeliveryState, Outcome};
use flotilla_amqp::types::transaction::{Declare, Discharge, TransactionError};

use crate::queues::{Acquired, Settlement};

/// What a connection's open transactions hold together is bounded: past
/// this many messages or bytes the one that went over can only roll back
/// (a connection's memory follows its windows).
pub const MAX_MESSAGES: usize = 100_000;
pub const MAX_BYTES: usize = 64 << 20;
/// Open transactions per connection.
pub const MAX_OPEN: usize = 64;

/// What a message to the coordinator asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    Declare,
    Discharge { txn: Bytes, fail: bool },
}

/// Decodes a coordinator message: its amqp-value body is a `declare` or a
/// `discharge` (AMQP 1.0 §4.5.2, §4.5.3).
pub fn decode(message: &[u8]) -> Result<Control, AmqpErrorBody> {
    const AMQP_VALUE: u64 = 0x77;
    let bad = |why: &str| {
        AmqpErrorBody::new(
            AmqpError::DecodeError,
            Some(format!("a coordinator message {why}")),
            None,
        )
    };
    let value = sections(message)
        .filter_map(Result::ok)
        .find(|s| s.code == AMQP_VALUE)
        .ok_or_else(|| bad("needs an amqp-value body"))?
        .value;
    // The descriptor may be the code (0x31, 0x32, in any ulong encoding)
    // or the symbolic name: the codec checks it.
    if let Ok(d) = serde_amqp::from_slice::<Declare>(value) {
        if d.global_id.is_some() {
            return Err(AmqpErrorBody::new(
                AmqpError::NotImplemented,
                Some("distributed transactions (a declare with a global-id) are not supported: local transactions only".into()),
                None,
            ));
        }
        return Ok(Control::Declare);
    }
    match serde_amqp::from_slice::<Discharge>(value) {
        Ok(d) => Ok(Control::Discharge {
            txn: Bytes::from(d.txn_id.into_vec()),
            fail: d.fail.unwrap_or(false),
        }),
        Err(_) => Err(bad("is neither a declare nor a discharge")),
    }
}

/// The transaction a transfer or disposition is under, and the outcome it
/// carries (`None`: not transactional).
pub fn state_of(state: Option<&DeliveryState>) -> Option<(Bytes, Option<&Outcome>)> {
    match state? {
        DeliveryState::TransactionalState(t) => Some((
            Bytes::copy_from_slice(t.txn_id.as_slice()),
            t.outcome.as_ref(),
        )),
        _ => None,
    }
}

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

/// The error for a transaction id that is not one of ours (or not the
/// caller's).
pub fn unknown(txn: &[u8]) -> AmqpErrorBody {
    AmqpErrorBody::new(
        TransactionError::UnknownId,
        Some(format!(
            "transaction {} is unknown here: it was discharged, belongs to another connection, or was declared on another broker (a transaction spans the queues of one broker)",
            hex(txn)
        )),
        None,
    )
}

/// The error for a commit of a transaction that can only roll back.
pub fn rolled_back(why: &str) -> AmqpErrorBody {
    AmqpErrorBody::new(
        TransactionError::Rollback,
        Some(format!("the transaction was rolled back: {why}")),
        None,
    )
}

/// A transaction id for logs and errors.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh transaction id: 16 random bytes.
pub fn new_id() -> Bytes {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    Bytes::copy_from_slice(&b)
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
    pub fn new(space: String) -> Txn {
        Txn {
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_amqp::message::{encode_message, MessageParts};

    fn with_value(value: &[u8]) -> Vec<u8> {
        let mut m = vec![0x00, 0x53, 0x77];
        m.extend_from_slice(value);
        m
    }

    #[test]
    fn declare_and_discharge_decode_and_anything_else_is_a_decode_error() {
        let declare = serde_amqp::to_vec(&Declare { global_id: None }).unwrap();
        assert_eq!(decode(&with_value(&declare)).unwrap(), Control::Declare);
        let discharge = serde_amqp::to_vec(&Discharge {
            txn_id: vec![1, 2, 3].into(),
            fail: Some(true),
        })
        .unwrap();
        assert_eq!(
            decode(&with_value(&discharge)).unwrap(),
            Control::Discharge {
                txn: Bytes::from_static(&[1, 2, 3]),
                fail: true
            }
        );
        let global = serde_amqp::to_vec(&Declare {
            global_id: Some(vec![9].into()),
        })
        .unwrap();
        assert!(decode(&with_value(&global)).is_err());
        let text = encode_message(&MessageParts {
            body: b"declare",
            text: true,
            ..Default::default()
        });
        assert!(decode(&text).is_err());
        assert!(decode(&[0x00, 0x53, 0x77, 0x00, 0x53, 0x32, 0x45]).is_err());
        assert!(decode(&[]).is_err());
    }
}
