//! AMQP 1.0 framing (AMQP 1.0 §2.3): protocol headers and frames, with no I/O.
//!
//! [`decode_frame`] takes bytes from a read buffer and answers a whole frame,
//! "need more bytes" (`Ok(None)`), or an error; frame bodies stay `Bytes`
//! slices of the read buffer, so a transfer's payload is never copied on the
//! way in. Performatives are decoded by descriptor code with `serde_amqp`
//! into `fe2o3-amqp-types` structs, except that the hot-path transfer header
//! is written by hand ([`encode_transfer`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{
    AmqpError, ConnectionError, Error as AmqpErrorBody, ErrorCondition,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Transfer,
};
use fe2o3_amqp_types::sasl::{SaslChallenge, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse};
use serde::Serialize;

/// `AMQP 0 1.0.0`: plain AMQP.
pub const HEADER_AMQP: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP 2 1.0.0`: TLS upgrade (AMQP 1.0 §5.2.1).
pub const HEADER_TLS: [u8; 8] = *b"AMQP\x02\x01\x00\x00";
/// `AMQP 3 1.0.0`: SASL layer (AMQP 1.0 §5.3.1).
pub const HEADER_SASL: [u8; 8] = *b"AMQP\x03\x01\x00\x00";

/// The smallest max-frame-size a peer may announce (AMQP 1.0 §2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

const FRAME_TYPE_AMQP: u8 = 0x00;
const FRAME_TYPE_SASL: u8 = 0x01;

/// What went wrong decoding a frame; maps to the AMQP error condition the
/// connection is closed with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds max-frame-size {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("malformed frame header: {0}")]
    Malformed(&'static str),
    #[error("cannot decode {what}: {msg}")]
    Decode { what: &'static str, msg: String },
    #[error("unexpected frame type {0:#04x}")]
    UnknownType(u8),
}

impl FrameError {
    /// The AMQP error to close the connection with.
    pub fn to_amqp_error(&self) -> AmqpErrorBody {
        let condition: ErrorCondition = match self {
            FrameError::TooLarge { .. } | FrameError::Malformed(_) | FrameError::UnknownType(_) => {
                ConnectionError::FramingError.into()
            }
            FrameError::Decode { .. } => AmqpError::DecodeError.into(),
        };
        AmqpErrorBody::new(condition, Some(self.to_string()), None)
    }
}

/// A decoded AMQP performative.
#[derive(Debug, Clone)]
pub enum Performative {
    Open(Box<Open>),
    Begin(Begin),
    Attach(Box<Attach>),
    Flow(Flow),
    Transfer(Transfer),
    Disposition(Disposition),
    Detach(Detach),
    End(End),
    Close(Close),
}

/// A decoded SASL frame body (AMQP 1.0 §5.3.3).
#[derive(Debug, Clone)]
pub enum SaslFrame {
    Mechanisms(SaslMechanisms),
    Init(SaslInit),
    Challenge(SaslChallenge),
    Response(SaslResponse),
    Outcome(SaslOutcome),
}

/// One frame.
#[derive(Debug, Clone)]
pub enum Frame {
    /// An empty AMQP frame: a heartbeat (AMQP 1.0 §2.4.5).
    Empty {
        channel: u16,
    },
    /// A performative and, for transfers, the payload bytes after it.
    Amqp {
        channel: u16,
        performative: Performative,
        payload: Bytes,
    },
    Sasl(SaslFrame),
}

/// Reads one frame from the front of `buf`, or `Ok(None)` when `buf` does not
/// yet hold a whole frame.
///
/// # Errors
/// The frame header is malformed, the frame is larger than `max_frame_size`,
/// or the body does not decode.
pub fn decode_frame(buf: &mut BytesMut, max_frame_size: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let doff = buf[4];
    let ftype = buf[5];
    let channel = u16::from_be_bytes([buf[6], buf[7]]);
    if size < 8 {
        return Err(FrameError::Malformed("size below 8"));
    }
    if size > max_frame_size {
        return Err(FrameError::TooLarge {
            size,
            max: max_frame_size,
        });
    }
    if doff < 2 || u32::from(doff) * 4 > size {
        return Err(FrameError::Malformed("data offset out of range"));
    }
    if buf.len() < size as usize {
        return Ok(None);
    }
    let mut frame = buf.split_to(size as usize).freeze();
    frame.advance(usize::from(doff) * 4);
    let body = frame;
    match ftype {
        FRAME_TYPE_AMQP => {
            if body.is_empty() {
                return Ok(Some(Frame::Empty { channel }));
            }
            let (performative, payload) = decode_performative(body)?;
            Ok(Some(Frame::Amqp {
                channel,
                performative,
                payload,
            }))
        }
        FRAME_TYPE_SASL => Ok(Some(Frame::Sasl(decode_sasl(&body)?))),
        t => Err(FrameError::UnknownType(t)),
    }
}

/// The descriptor code and encoded length of the described list at the
/// front of `b` (a performative, a SASL body, or a message section).
pub fn described_list_len(b: &[u8]) -> Result<(u64, usize), FrameError> {
    let bad = |m| FrameError::Malformed(m);
    if b.first() != Some(&0x00) {
        return Err(bad("body is not a described type"));
    }
    let (code, mut at) = match b.get(1) {
        Some(0x53) => (u64::from(*b.get(2).ok_or(bad("short descriptor"))?), 3),
        Some(0x80) => {
            let c = b.get(2..10).ok_or(bad("short descriptor"))?;
            (
                u64::from_be_bytes(c.try_into().map_err(|_| bad("short descriptor"))?),
                10,
            )
        }
        Some(0x44) => (0, 2),
        _ => return Err(bad("descriptor is not a ulong code")),
    };
    let len = match b.get(at) {
        Some(0x45) => 1,
        Some(0xc0) => 2 + usize::from(*b.get(at + 1).ok_or(bad("short list"))?),
        Some(0xd0) => {
            let s = b.get(at + 1..at + 5).ok_or(bad("short list"))?;
            5 + u32::from_be_bytes(s.try_into().map_err(|_| bad("short list"))?) as usize
        }
        _ => return Err(bad("performative is not a list")),
    };
    at += len;
    if at > b.len() {
        return Err(bad("list overruns frame"));
    }
    Ok((code, at))
}

/// How deep values may nest in a performative (lists in maps in described
/// types...); real performatives stay under ten.
const MAX_NESTING: u32 = 32;

const OVERRUN: &str = "value overruns its container";

/// The length of the encoded value at the front of `b`, constructor
/// included, after checking that it and every value nested in it fit in the
/// bytes their container declares.
fn checked_value_len(b: &[u8], depth: u32) -> Result<usize, &'static str> {
    if depth > MAX_NESTING {
        return Err("values nested too deep");
    }
    match b.first() {
        None => Err(OVERRUN),
        Some(0x00) => {
            let d = checked_value_len(&b[1..], depth + 1)?;
            let v = checked_value_len(&b[1 + d..], depth + 1)?;
            Ok(1 + d + v)
        }
        Some(&code) => Ok(1 + checked_body_len(code, &b[1..], depth)?),
    }
}

/// The length of what follows constructor `code` at the front of `b` (for
/// array elements, which share one constructor), checked as above.
fn checked_body_len(code: u8, b: &[u8], depth: u32) -> Result<usize, &'static str> {
    let fixed = match code {
        0x40..=0x45 => Some(0),
        0x50..=0x56 => Some(1),
        0x60 | 0x61 => Some(2),
        0x70..=0x74 => Some(4),
        0x80..=0x84 => Some(8),
        0x94 | 0x98 => Some(16),
        0xa0 | 0xa1 | 0xa3 | 0xb0 | 0xb1 | 0xb3 => None,
        0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0 => None,
        _ => return Err("unknown type constructor"),
    };
    if let Some(n) = fixed {
        return if n <= b.len() { Ok(n) } else { Err(OVERRUN) };
    }
    // Variable width: a size (and, for compounds, a count) of one byte for
    // the 0xa_/0xc_/0xe_ codes, four for 0xb_/0xd_/0xf_.
    let w = if matches!(code >> 4, 0xa | 0xc | 0xe) {
        1
    } else {
        4
    };
    let read = |s: &[u8]| -> Result<usize, &'static str> {
        let s = s.get(..w).ok_or(OVERRUN)?;
        Ok(s.iter().fold(0usize, |n, &x| n << 8 | usize::from(x)))
    };
    let size = read(b)?;
    let body = b[w..].get(..size).ok_or(OVERRUN)?;
    if matches!(code >> 4, 0xa | 0xb) {
        return Ok(w + size);
    }
    let count = read(body)?;
    // A map's count is keys plus values (AMQP 1.0 §1.6.23); serde_amqp
    // 0.18 subtracts 2 per entry and overflows on an odd count.
    if matches!(code, 0xc1 | 0xd1) && count % 2 != 0 {
        return Err("map with an odd number of items");
    }
    let mut rest = &body[w..];
    if matches!(code >> 4, 0xc | 0xd) {
        // Every list or map item takes at least its constructor byte, so a
        // count larger than the bytes fails here instead of looping long.
        for _ in 0..count {
            let n = checked_value_len(rest, depth + 1)?;
            rest = &rest[n..];
        }
    } else if count > 0 {
        // Array: one element constructor (possibly described), then bare
        // element bodies.
        if rest.first() == Some(&0x00) {
            let d = checked_value_len(&rest[1..], depth + 1)?;
            rest = &rest[1 + d..];
        }
        let elem = *rest.first().ok_or(OVERRUN)?;
        rest = &rest[1..];
        for _ in 0..count {
            let n = checked_body_len(elem, rest, depth + 1)?;
            if n == 0 {
                break;
            }
            rest = &rest[n..];
        }
    }
    // The size is the items' exactly: serde_amqp reads items, not the
    // size, so bytes left inside it would be read as the next value.
    if !rest.is_empty() {
        return Err("a list, map or array is larger than its items");
    }
    Ok(w + size)
}

/// Decodes one encoded value with `serde_amqp` after checking every size
/// it declares against its bytes (see `de`): the only safe way to decode
/// bytes a peer sent. Fails if anything is left over.
///
/// # Errors
/// The value is malformed, nests too deep, or does not decode as `T`.
pub fn decode_checked<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Result<T, String> {
    if checked_value_len(b, 0)? != b.len() {
        return Err("bytes after the value".into());
    }
    serde_amqp::from_slice(b).map_err(|e| e.to_string())
}

fn de<'a, T: serde::Deserialize<'a>>(what: &'static str, b: &'a [u8]) -> Result<T, FrameError> {
    // serde_amqp (0.18) allocates a string's, symbol's or binary's declared
    // length before looking for the bytes: unchecked, a 19-byte frame
    // declaring a 4 GiB container-id makes it allocate 4 GiB. Check every
    // declared size against the bytes first.
    checked_value_len(b, 0).map_err(|m| FrameError::Decode {
        what,
        msg: m.to_string(),
    })?;
    serde_amqp::from_slice(b).map_err(|e| FrameError::Decode {
        what,
        msg: e.to_string(),
    })
}

fn decode_performative(body: Bytes) -> Result<(Performative, Bytes), FrameError> {
    let (code, len) = described_list_len(&body)?;
    let b = &body[..len];
    let p = match code {
        0x10 => Performative::Open(Box::new(de("open", b)?)),
        0x11 => Performative::Begin(de("begin", b)?),
        0x12 => Performative::Attach(Box::new(de("attach", b)?)),
        0x13 => Performative::Flow(de("flow", b)?),
        0x14 => Performative::Transfer(de("transfer", b)?),
        0x15 => Performative::Disposition(de("disposition", b)?),
        0x16 => Performative::Detach(de("detach", b)?),
        0x17 => Performative::End(de("end", b)?),
        0x18 => Performative::Close(de("close", b)?),
        _ => {
            return Err(FrameError::Decode {
                what: "performative",
                msg: format!("unknown descriptor {code:#x}"),
            })
        }
    };
    Ok((p, body.slice(len..)))
}

fn decode_sasl(b: &[u8]) -> Result<SaslFrame, FrameError> {
    let (code, len) = described_list_len(b)?;
    let b = &b[..len];
    Ok(match code {
        0x40 => SaslFrame::Mechanisms(de("sasl-mechanisms", b)?),
        0x41 => SaslFrame::Init(de("sasl-init", b)?),
        0x42 => SaslFrame::Challenge(de("sasl-challenge", b)?),
        0x43 => SaslFrame::Response(de("sasl-response", b)?),
        0x44 => SaslFrame::Outcome(de("sasl-outcome", b)?),
        _ => {
            return Err(FrameError::Decode {
                what: "sasl frame",
                msg: format!("unknown descriptor {code:#x}"),
            })
        }
    })
}

fn put_header(out: &mut BytesMut, size: usize, ftype: u8, channel: u16) {
    out.put_u32(size as u32);
    out.put_u8(2);
    out.put_u8(ftype);
    out.put_u16(channel);
}

fn put_serialized<T: Serialize>(out: &mut BytesMut, value: &T, ftype: u8, channel: u16) {
    // The performative types serialize infallibly: every field is a plain
    // AMQP type, and serde_amqp only errors on unsupported serde shapes.
    let body = serde_amqp::to_vec(value).expect("performatives always serialize");
    put_header(out, 8 + body.len(), ftype, channel);
    out.put_slice(&body);
}

/// Appends an AMQP frame holding `performative` (and no payload).
pub fn encode_performative(out: &mut BytesMut, channel: u16, performative: &Performative) {
    match performative {
        Performative::Open(p) => put_serialized(out, p.as_ref(), FRAME_TYPE_AMQP, channel),
        Performative::Begin(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::Attach(p) => put_serialized(out, p.as_ref(), FRAME_TYPE_AMQP, channel),
        Performative::Flow(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::Transfer(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::Disposition(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::Detach(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::End(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
        Performative::Close(p) => put_serialized(out, p, FRAME_TYPE_AMQP, channel),
    }
}

/// Appends a SASL frame.
pub fn encode_sasl(out: &mut BytesMut, frame: &SaslFrame) {
    match frame {
        SaslFrame::Mechanisms(p) => put_serialized(out, p, FRAME_TYPE_SASL, 0),
        SaslFrame::Init(p) => put_serialized(out, p, FRAME_TYPE_SASL, 0),
        SaslFrame::Challenge(p) => put_serialized(out, p, FRAME_TYPE_SASL, 0),
        SaslFrame::Response(p) => put_serialized(out, p, FRAME_TYPE_SASL, 0),
        SaslFrame::Outcome(p) => put_serialized(out, p, FRAME_TYPE_SASL, 0),
    }
}

/// Appends an empty frame (heartbeat).
pub fn encode_empty(out: &mut BytesMut) {
    put_header(out, 8, FRAME_TYPE_AMQP, 0);
}

/// The fields of an outgoing transfer frame (AMQP 1.0 §2.7.5) the engine sets.
#[derive(Debug, Clone, Copy)]
pub struct TransferHeader<'a> {
    pub handle: u32,
    /// Present on the first frame of a delivery.
    pub first: Option<(u32, &'a [u8])>,
    pub message_format: u32,
    pub settled: bool,
    pub more: bool,
}

fn put_uint(out: &mut BytesMut, v: u32) {
    if v == 0 {
        out.put_u8(0x43);
    } else if v < 256 {
        out.put_u8(0x52);
        out.put_u8(v as u8);
    } else {
        out.put_u8(0x70);
        out.put_u32(v);
    }
}

/// Appends a transfer frame with `payload`, written by hand: this is the
/// router's hot path, and the header has at most six simple fields.
pub fn encode_transfer(out: &mut BytesMut, channel: u16, t: &TransferHeader<'_>, payload: &[u8]) {
    encode_transfer_parts(out, channel, t, &[payload]);
}

/// [`encode_transfer`] with a payload in pieces (e.g. a routing header
/// and the message it routes), written without joining them first.
pub fn encode_transfer_parts(
    out: &mut BytesMut,
    channel: u16,
    t: &TransferHeader<'_>,
    parts: &[&[u8]],
) {
    encode_transfer_with_state(out, channel, t, None, parts);
}

/// [`encode_transfer_parts`] with the transfer's `state` field (an encoded
/// delivery state, e.g. a `transactional-state`; AMQP 1.0 §2.7.5).
pub fn encode_transfer_with_state(
    out: &mut BytesMut,
    channel: u16,
    t: &TransferHeader<'_>,
    state: Option<&[u8]>,
    parts: &[&[u8]],
) {
    let start = out.len();
    out.put_bytes(0, 8);
    out.put_slice(&[0x00, 0x53, 0x14, 0xd0]);
    let list_at = out.len();
    out.put_u32(0); // list size, patched below
    let count: u32 = if state.is_some() {
        8
    } else if t.more {
        6
    } else {
        5
    };
    out.put_u32(count);
    put_uint(out, t.handle);
    match t.first {
        Some((id, tag)) => {
            put_uint(out, id);
            if tag.len() < 256 {
                out.put_u8(0xa0);
                out.put_u8(tag.len() as u8);
            } else {
                out.put_u8(0xb0);
                out.put_u32(tag.len() as u32);
            }
            out.put_slice(tag);
            put_uint(out, t.message_format);
        }
        None => {
            out.put_u8(0x40);
            out.put_u8(0x40);
            out.put_u8(0x40);
        }
    }
    out.put_u8(if t.settled { 0x41 } else { 0x42 });
    if let Some(state) = state {
        out.put_u8(if t.more { 0x41 } else { 0x42 });
        out.put_u8(0x40); // rcv-settle-mode
        out.put_slice(state);
    } else if t.more {
        out.put_u8(0x41);
    }
    let list_size = (out.len() - list_at - 4) as u32;
    out[list_at..list_at + 4].copy_from_slice(&list_size.to_be_bytes());
    for p in parts {
        out.put_slice(p);
    }
    let size = (out.len() - start) as u32;
    let mut hdr = &mut out[start..start + 8];
    hdr.put_u32(size);
    hdr.put_u8(2);
    hdr.put_u8(FRAME_TYPE_AMQP);
    hdr.put_u16(channel);
}

/// Bytes a transfer frame adds around its payload, at most (for splitting
/// deliveries by the peer's max-frame-size).
pub fn transfer_overhead(tag_len: usize) -> usize {
    8 + 4 + 8 + 5 + 5 + 5 + tag_len + 5 + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compound_larger_than_its_items_is_refused_not_decoded() {
        // A map8 of size 2 and count 0: one byte more than it holds, which
        // serde_amqp would read as the next value.
        let padded: &[u8] = &[0xc0, 0x05, 0x01, 0xc1, 0x02, 0x00, 0x70];
        assert!(decode_checked::<serde_amqp::Value>(padded).is_err());
        let exact: &[u8] = &[0xc0, 0x04, 0x01, 0xc1, 0x01, 0x00];
        assert!(decode_checked::<serde_amqp::Value>(exact).is_ok());
    }

    #[test]
    fn a_map_with_an_odd_item_count_is_refused_not_decoded() {
        // serde_amqp 0.18 overflows on these (found by fuzzing).
        assert!(decode_checked::<serde_amqp::Value>(&[0xc1, 0x02, 0x01, 0x41]).is_err());
        assert!(decode_checked::<serde_amqp::Value>(&[0xc1, 0x03, 0x02, 0x41, 0x41]).is_ok());
        assert!(decode_checked::<serde_amqp::Value>(&[0x41, 0x41]).is_err());
    }
    use fe2o3_amqp_types::definitions::Handle;
    use fe2o3_amqp_types::performatives::{ChannelMax, MaxFrameSize};

    fn frames_of(bytes: &[u8], max: u32) -> Result<Vec<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = decode_frame(&mut buf, max)? {
            out.push(f);
        }
        assert!(buf.is_empty(), "leftover bytes");
        Ok(out)
    }

    #[test]
    fn hand_encoded_transfer_decodes_with_serde() {
        let mut out = BytesMut::new();
        let hdr = TransferHeader {
            handle: 3,
            first: Some((70000, b"tag-1")),
            message_format: 0,
            settled: false,
            more: true,
        };
        encode_transfer(&mut out, 5, &hdr, b"payload");
        let f = frames_of(&out, 1 << 20).unwrap();
        match &f[0] {
            Frame::Amqp {
                channel: 5,
                performative: Performative::Transfer(t),
                payload,
            } => {
                assert_eq!(t.handle, Handle(3));
                assert_eq!(t.delivery_id, Some(70000));
                assert_eq!(
                    t.delivery_tag.as_deref().map(Vec::as_slice),
                    Some(&b"tag-1"[..])
                );
                assert_eq!(t.settled, Some(false));
                assert!(t.more);
                assert_eq!(&payload[..], b"payload");
            }
            other => panic!("{other:?}"),
        }
        // Continuation frames carry no id or tag.
        let mut out = BytesMut::new();
        encode_transfer(
            &mut out,
            0,
            &TransferHeader {
                handle: 300,
                first: None,
                message_format: 0,
                settled: true,
                more: false,
            },
            b"x",
        );
        let f = frames_of(&out, 1 << 20).unwrap();
        assert!(
            matches!(&f[0], Frame::Amqp { performative: Performative::Transfer(t), .. } if t.delivery_id.is_none() && !t.more && t.handle == Handle(300))
        );
    }

    #[test]
    fn frames_split_at_every_byte_decode_the_same() {
        let mut out = BytesMut::new();
        encode_performative(
            &mut out,
            1,
            &Performative::Begin(Begin {
                remote_channel: Some(7),
                next_outgoing_id: 1,
                incoming_window: 100,
                outgoing_window: 100,
                handle_max: Handle(u32::MAX),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        );
        encode_empty(&mut out);
        encode_transfer(
            &mut out,
            1,
            &TransferHeader {
                handle: 0,
                first: Some((0, b"t")),
                message_format: 0,
                settled: true,
                more: false,
            },
            b"hello",
        );
        let whole = out.freeze();
        for cut in 0..=whole.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            buf.extend_from_slice(&whole[..cut]);
            while let Some(f) = decode_frame(&mut buf, 1 << 16).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&whole[cut..]);
            while let Some(f) = decode_frame(&mut buf, 1 << 16).unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert!(matches!(&got[2], Frame::Amqp { payload, .. } if &payload[..] == b"hello"));
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            frames_of(&[0, 0, 0, 4, 2, 0, 0, 0], 512),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            frames_of(&[0, 1, 0, 0, 2, 0, 0, 0], 512),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            frames_of(&[0, 0, 0, 12, 2, 0, 0, 0, 1, 2, 3, 4], 512),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            frames_of(&[0, 0, 0, 12, 2, 0, 0, 0, 0, 0x53, 0x10, 0x45], 512),
            Err(FrameError::Decode { .. })
        ));
        assert!(matches!(
            frames_of(&[0, 0, 0, 12, 2, 7, 0, 0, 0, 0x53, 0x10, 0x45], 512),
            Err(FrameError::UnknownType(7))
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = frames_of_lenient(&bytes);
        }
    }

    #[test]
    fn oversized_declared_lengths_are_refused_before_serde() {
        let frame = |body: &[u8]| {
            let mut f = vec![0, 0, 0, 8 + body.len() as u8, 2, 0, 0, 0];
            f.extend_from_slice(body);
            f
        };
        // Found by `cargo fuzz run frame`: an Open whose container-id is a
        // str32 declaring 0xffffffff bytes made serde_amqp allocate 4 GiB.
        let open = frame(&[
            0x00, 0x53, 0x10, 0xc0, 0x06, 0x01, 0xb1, 0xff, 0xff, 0xff, 0xff,
        ]);
        // The same for a binary in the Open's properties map...
        let in_map = frame(&[
            0x00, 0x53, 0x10, 0xc0, 0x17, 0x0a, 0xa1, 0x01, b'c', 0x40, 0x40, 0x40, 0x40, 0x40,
            0x40, 0x40, 0x40, 0xc1, 0x09, 0x02, 0xa3, 0x01, b'k', 0xb0, 0xff, 0xff, 0xff, 0xff,
        ]);
        // ...and for a symbol in its offered-capabilities array.
        let in_array = frame(&[
            0x00, 0x53, 0x10, 0xc0, 0x12, 0x08, 0xa1, 0x01, b'c', 0x40, 0x40, 0x40, 0x40, 0x40,
            0x40, 0xe0, 0x06, 0x01, 0xb3, 0xff, 0xff, 0xff, 0xff,
        ]);
        for bytes in [open, in_map, in_array] {
            match frames_of(&bytes, 512) {
                Err(FrameError::Decode { what: "open", msg }) => {
                    assert_eq!(msg, "value overruns its container")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn size_check_passes_what_serde_writes() {
        // Arrays, maps and described values as serde_amqp encodes them.
        let open = Open {
            container_id: "c".into(),
            hostname: Some("h".into()),
            max_frame_size: MaxFrameSize(4096),
            channel_max: ChannelMax(9),
            idle_time_out: Some(1000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: Some(vec!["a".into(), "b".into()].into()),
            desired_capabilities: None,
            properties: Some([("k".into(), "v".into())].into_iter().collect()),
        };
        let mut out = BytesMut::new();
        encode_performative(&mut out, 0, &Performative::Open(Box::new(open)));
        let mechs = SaslMechanisms {
            sasl_server_mechanisms: vec!["PLAIN".into(), "ANONYMOUS".into()].into(),
        };
        encode_sasl(&mut out, &SaslFrame::Mechanisms(mechs));
        let f = frames_of(&out, 4096).unwrap();
        assert!(
            matches!(&f[0], Frame::Amqp { performative: Performative::Open(o), .. } if o.properties.as_ref().is_some_and(|p| p.len() == 1))
        );
        assert!(
            matches!(&f[1], Frame::Sasl(SaslFrame::Mechanisms(m)) if m.sasl_server_mechanisms.0.len() == 2)
        );
    }

    fn frames_of_lenient(bytes: &[u8]) -> Result<(), FrameError> {
        let mut buf = BytesMut::from(bytes);
        while decode_frame(&mut buf, 4096)?.is_some() {}
        Ok(())
    }
}
