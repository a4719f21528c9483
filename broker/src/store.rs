//! What the broker writes in its journal, and rebuilding the queues from
//! it on start: a `Publish` record per stored message, an `Ack` record when
//! a consumer has taken one for good.

use std::collections::{BTreeMap, HashSet, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use crate::journal::Record;

const PUBLISH: u8 = 1;
const ACK: u8 = 2;

/// A message held by a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub payload: Bytes,
    /// Times it was handed to a consumer and came back.
    pub delivery_count: u32,
}

/// Encodes a `Publish` record.
pub fn publish(queue: &str, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(3 + queue.len() + payload.len());
    b.put_u8(PUBLISH);
    b.put_u16(queue.len().min(u16::MAX as usize) as u16);
    b.put_slice(&queue.as_bytes()[..queue.len().min(u16::MAX as usize)]);
    b.put_slice(payload);
    b.freeze()
}

/// Encodes an `Ack` record for the message stored as `seq`.
pub fn ack(seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(9);
    b.put_u8(ACK);
    b.put_u64(seq);
    b.freeze()
}

/// The queues as the journal leaves them: every published message not
/// acknowledged, per queue, in the order it was stored.
pub fn recover(records: Vec<Record>) -> BTreeMap<String, VecDeque<Stored>> {
    let mut acked = HashSet::new();
    for r in &records {
        if r.payload.first() == Some(&ACK) && r.payload.len() == 9 {
            acked.insert(u64::from_be_bytes(
                r.payload[1..9].try_into().unwrap_or_default(),
            ));
        }
    }
    let mut queues: BTreeMap<String, VecDeque<Stored>> = BTreeMap::new();
    for r in records {
        let p = &r.payload;
        if p.first() != Some(&PUBLISH) || p.len() < 3 || acked.contains(&r.seq) {
            continue;
        }
        let qlen = u16::from_be_bytes([p[1], p[2]]) as usize;
        let Some(name) = p.get(3..3 + qlen).and_then(|n| std::str::from_utf8(n).ok()) else {
            continue;
        };
        let stored = Stored {
            seq: r.seq,
            payload: r.payload.slice(3 + qlen..),
            delivery_count: 0,
        };
        queues
            .entry(name.to_string())
            .or_default()
            .push_back(stored);
    }
    queues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_messages_do_not_come_back() {
        let recs = vec![
            Record {
                seq: 1,
                payload: publish("q", b"a"),
            },
            Record {
                seq: 2,
                payload: publish("q", b"b"),
            },
            Record {
                seq: 3,
                payload: publish("r", b"c"),
            },
            Record {
                seq: 4,
                payload: ack(1),
            },
        ];
        let q = recover(recs);
        assert_eq!(
            q["q"].iter().map(|s| s.payload.clone()).collect::<Vec<_>>(),
            vec![Bytes::from_static(b"b")]
        );
        assert_eq!(q["r"][0].seq, 3);
    }
}
