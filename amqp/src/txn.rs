//! Local transactions (AMQP 1.0 §4) on the wire: what a coordinator link
//! carries, the transaction a transfer or disposition is under, and the
//! errors a coordinator answers with. The broker keeps the transactions;
//! a router answers `declare` for its clients and declares at the broker
//! of the transaction's first address (both use this).

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::sections;
use crate::types::definitions::{AmqpError, Error as AmqpErrorBody};
use crate::types::messaging::{DeliveryState, Outcome};
use crate::types::transaction::{Declare, Discharge, TransactionError, TransactionalState};

/// Why a transaction can only roll back when a message under it was
/// dropped because it came on a link that had been detached (see
/// [`crate::connection::Event::Discarded`]).
pub const DISCARDED: &str =
    "a message under it came on a link that had been detached, and was dropped";

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
    if let Ok(d) = crate::frame::decode_checked::<Declare>(value) {
        if d.global_id.is_some() {
            return Err(AmqpErrorBody::new(
                AmqpError::NotImplemented,
                Some("distributed transactions (a declare with a global-id) are not supported: local transactions only".into()),
                None,
            ));
        }
        return Ok(Control::Declare);
    }
    match crate::frame::decode_checked::<Discharge>(value) {
        Ok(d) => Ok(Control::Discharge {
            txn: Bytes::from(d.txn_id.into_vec()),
            fail: d.fail.unwrap_or(false),
        }),
        Err(_) => Err(bad("is neither a declare nor a discharge")),
    }
}

/// A coordinator message: `declare` or `discharge` as an amqp-value body.
pub fn encode(c: &Control) -> Bytes {
    let value = match c {
        Control::Declare => serde_amqp::to_vec(&Declare { global_id: None }),
        Control::Discharge { txn, fail } => serde_amqp::to_vec(&Discharge {
            txn_id: txn.to_vec().into(),
            fail: Some(*fail),
        }),
    }
    .unwrap_or_default();
    let mut m = BytesMut::with_capacity(value.len() + 3);
    m.put_slice(&[0x00, 0x53, 0x77]);
    m.put_slice(&value);
    m.freeze()
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

/// `state` with its transaction id replaced by `id` (a router's and a
/// broker's ids for one transaction differ).
pub fn with_id(state: DeliveryState, id: &[u8]) -> DeliveryState {
    match state {
        DeliveryState::TransactionalState(t) => {
            DeliveryState::TransactionalState(TransactionalState {
                txn_id: id.to_vec().into(),
                outcome: t.outcome,
            })
        }
        other => other,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{encode_message, MessageParts};

    #[test]
    fn what_is_encoded_decodes_and_anything_else_is_a_decode_error() {
        assert_eq!(
            decode(&encode(&Control::Declare)).unwrap(),
            Control::Declare
        );
        let discharge = Control::Discharge {
            txn: Bytes::from_static(&[1, 2, 3]),
            fail: true,
        };
        assert_eq!(decode(&encode(&discharge)).unwrap(), discharge);
        let global = serde_amqp::to_vec(&Declare {
            global_id: Some(vec![9].into()),
        })
        .unwrap();
        let mut m = vec![0x00, 0x53, 0x77];
        m.extend_from_slice(&global);
        assert!(decode(&m).is_err());
        let text = encode_message(&MessageParts {
            body: b"declare",
            text: true,
            ..Default::default()
        });
        assert!(decode(&text).is_err());
        assert!(decode(&[0x00, 0x53, 0x77, 0x00, 0x53, 0x32, 0x45]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn an_id_is_replaced_and_the_outcome_kept() {
        let s = DeliveryState::TransactionalState(TransactionalState {
            txn_id: vec![1].into(),
            outcome: Some(Outcome::Accepted(crate::types::messaging::Accepted {})),
        });
        let (id, outcome) = state_of(Some(&with_id(s, &[7, 7])))
            .map(|(i, o)| (i, o.is_some()))
            .unwrap();
        assert_eq!((&id[..], outcome), (&[7u8, 7][..], true));
    }
}
