//! Reading and writing just enough of a message (AMQP 1.0 §3.2) without
//! decoding it: a router forwards the encoded bytes as they came and only
//! needs to find the `to` property (anonymous relay) or a body for people.

use bytes::{BufMut, Bytes, BytesMut};

/// Section descriptor codes (AMQP 1.0 §3.2).
pub mod section {
    pub const HEADER: u64 = 0x70;
    pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    pub const PROPERTIES: u64 = 0x73;
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    pub const DATA: u64 = 0x75;
    pub const AMQP_SEQUENCE: u64 = 0x76;
    pub const AMQP_VALUE: u64 = 0x77;
    pub const FOOTER: u64 = 0x78;
}

/// The message bytes do not form valid sections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct MessageError(pub &'static str);

fn need(b: &[u8], n: usize) -> Result<&[u8], MessageError> {
    b.get(..n).ok_or(MessageError("value overruns message"))
}

fn be_u32(b: &[u8]) -> Result<usize, MessageError> {
    let s = need(b, 4)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// The length of the encoded value at the front of `b`, constructor included.
pub fn value_len(b: &[u8]) -> Result<usize, MessageError> {
    value_len_depth(b, 0)
}

fn value_len_depth(b: &[u8], depth: u32) -> Result<usize, MessageError> {
    if depth > 32 {
        return Err(MessageError("descriptors nested too deep"));
    }
    let code = *b.first().ok_or(MessageError("missing value"))?;
    let rest = &b[1..];
    let body = match code {
        0x00 => {
            let d = value_len_depth(rest, depth + 1)?;
            let v = value_len_depth(
                rest.get(d..)
                    .ok_or(MessageError("value overruns message"))?,
                depth + 1,
            )?;
            d + v
        }
        0x40..=0x45 => 0,
        0x50..=0x56 => 1,
        0x60 | 0x61 => 2,
        0x70..=0x74 => 4,
        0x80..=0x84 => 8,
        0x94 | 0x98 => 16,
        0xa0 | 0xa1 | 0xa3 | 0xc0 | 0xc1 | 0xe0 => {
            1 + usize::from(*need(rest, 1)?.first().unwrap_or(&0))
        }
        0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0 => 4 + be_u32(rest)?,
        _ => return Err(MessageError("unknown type constructor")),
    };
    need(rest, body)?;
    Ok(1 + body)
}

/// A section: its descriptor code and its value's bytes (constructor included).
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    pub code: u64,
    pub value: &'a [u8],
}

/// Splits message bytes into sections.
pub fn sections(mut b: &[u8]) -> impl Iterator<Item = Result<Section<'_>, MessageError>> {
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        let r = next_section(b).map(|(s, len)| {
            b = &b[len..];
            s
        });
        if r.is_err() {
            b = &[];
        }
        Some(r)
    })
}

/// Splits message bytes into sections, each as its descriptor code and
/// its whole span (descriptor included: what a section decoder takes).
pub fn section_spans(b: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8]), MessageError>> {
    let mut rest = b;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let r = next_section(rest).map(|(s, len)| {
            let whole = &rest[..len];
            rest = &rest[len..];
            (s.code, whole)
        });
        if r.is_err() {
            rest = &[];
        }
        Some(r)
    })
}

fn next_section(b: &[u8]) -> Result<(Section<'_>, usize), MessageError> {
    if b[0] != 0x00 {
        return Err(MessageError("section is not a described type"));
    }
    let code = match b.get(1) {
        Some(0x53) => u64::from(*need(&b[2..], 1)?.first().unwrap_or(&0)),
        Some(0x80) => {
            let s = need(&b[2..], 8)?;
            u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
        }
        _ => return Err(MessageError("section descriptor is not a ulong")),
    };
    let dlen = value_len(&b[1..])?;
    let vstart = 1 + dlen;
    let vlen = value_len(
        b.get(vstart..)
            .ok_or(MessageError("section has no value"))?,
    )?;
    Ok((
        Section {
            code,
            value: &b[vstart..vstart + vlen],
        },
        vstart + vlen,
    ))
}

/// The list elements of an encoded list value.
fn list_items(v: &[u8]) -> Result<(usize, &[u8]), MessageError> {
    match v.first() {
        Some(0x45) => Ok((0, &[])),
        Some(0xc0) => {
            let s = need(&v[1..], 2)?;
            let end = 2 + usize::from(s[0]);
            Ok((
                usize::from(s[1]),
                v.get(3..end).ok_or(MessageError("list overruns"))?,
            ))
        }
        Some(0xd0) => {
            let size = be_u32(&v[1..])?;
            let count = be_u32(&v[5..])?;
            Ok((
                count,
                v.get(9..5 + size).ok_or(MessageError("list overruns"))?,
            ))
        }
        _ => Err(MessageError("properties is not a list")),
    }
}

fn string_value(v: &[u8]) -> Option<&str> {
    let s = match v.first()? {
        0xa1 | 0xa3 => v.get(2..)?,
        0xb1 | 0xb3 => v.get(5..)?,
        _ => return None,
    };
    std::str::from_utf8(s).ok()
}

/// The `properties.to` field of a message, if it has one (AMQP 1.0 §3.2.4).
pub fn to_address(message: &[u8]) -> Result<Option<&str>, MessageError> {
    property_string(message, 2)
}

/// The `properties.message-id` field when it is a string (AMQP 1.0
/// §3.2.4; the usual correlation key of request/response).
pub fn message_id(message: &[u8]) -> Result<Option<&str>, MessageError> {
    property_string(message, 0)
}

/// The `properties.reply-to` field, if set.
pub fn reply_to(message: &[u8]) -> Result<Option<&str>, MessageError> {
    property_string(message, 4)
}

fn property_string(message: &[u8], index: usize) -> Result<Option<&str>, MessageError> {
    for s in sections(message) {
        let s = s?;
        if s.code == section::PROPERTIES {
            let (count, mut items) = list_items(s.value)?;
            for i in 0..count.min(index + 1) {
                let len = value_len(items)?;
                if i == index {
                    return Ok(string_value(&items[..len]));
                }
                items = &items[len..];
            }
            return Ok(None);
        }
        if s.code >= section::APPLICATION_PROPERTIES {
            break;
        }
    }
    Ok(None)
}

/// The body as bytes: an amqp-value string or binary, or the data sections
/// joined; `None` for other bodies.
pub fn body_bytes(message: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for s in sections(message) {
        let s = s.ok()?;
        match s.code {
            section::AMQP_VALUE => {
                let v = s.value;
                return match v.first()? {
                    0xa0 | 0xa1 | 0xa3 => v.get(2..).map(<[u8]>::to_vec),
                    0xb0 | 0xb1 | 0xb3 => v.get(5..).map(<[u8]>::to_vec),
                    _ => None,
                };
            }
            section::DATA => {
                let v = s.value;
                let d = match v.first()? {
                    0xa0 => v.get(2..)?,
                    0xb0 => v.get(5..)?,
                    _ => return None,
                };
                out.get_or_insert_with(Vec::new).extend_from_slice(d);
            }
            _ => {}
        }
    }
    out
}

/// True when a message has no body, or its body holds nothing: empty
/// data sections, or an amqp-value that is null or an empty string or
/// binary (what clears an MQTT retained message).
pub fn body_is_empty(message: &[u8]) -> bool {
    for s in sections(message) {
        let Ok(s) = s else {
            return false;
        };
        match s.code {
            section::DATA => {
                if !matches!(s.value, [0xa0, 0] | [0xb0, 0, 0, 0, 0]) {
                    return false;
                }
            }
            section::AMQP_VALUE => {
                if !matches!(
                    s.value,
                    [0x40] | [0xa0 | 0xa1 | 0xa3, 0] | [0xb0 | 0xb1 | 0xb3, 0, 0, 0, 0]
                ) {
                    return false;
                }
            }
            section::AMQP_SEQUENCE => return false,
            _ => {}
        }
    }
    true
}

/// Writes a variable-width value (string, symbol, binary) with its
/// one-byte-length code `small` or four-byte-length code `large`.
pub fn put_str(out: &mut BytesMut, s: &[u8], small: u8, large: u8) {
    if s.len() < 256 {
        out.put_u8(small);
        out.put_u8(s.len() as u8);
    } else {
        out.put_u8(large);
        out.put_u32(s.len() as u32);
    }
    out.put_slice(s);
}

/// Where a section is in a message: (offset, length).
type Span = Option<(usize, usize)>;

/// The header and properties sections of a message.
fn header_and_properties(message: &[u8]) -> (Span, Span) {
    let (mut header, mut props) = (None, None);
    let mut at = 0;
    while at < message.len() {
        let Ok((sec, len)) = next_section(&message[at..]) else {
            break;
        };
        match sec.code {
            0x70 => header = Some((at, len)),
            0x71 | 0x72 => {}
            0x73 => props = Some((at, len)),
            _ => break,
        }
        at += len;
    }
    (header, props)
}

/// The message as delivered again after `delivery_count` failed attempts:
/// its header's `delivery-count` set (AMQP 1.0 §3.2.1) and
/// `first-acquirer` cleared; a header is added if it had none. A message
/// whose header does not decode is returned as it is.
pub fn redelivered(message: &Bytes, delivery_count: u32) -> Bytes {
    use fe2o3_amqp_types::messaging::Header;
    let (h, _) = header_and_properties(message);
    let (mut header, rest) = match h {
        Some((at, len)) => match crate::frame::decode_checked::<Header>(&message[at..at + len]) {
            Ok(h) if at == 0 => (h, &message[len..]),
            _ => return message.clone(),
        },
        // A header that does not parse stays as it is.
        None if message.starts_with(&[0x00, 0x53, 0x70]) => return message.clone(),
        None => (Header::default(), &message[..]),
    };
    header.delivery_count = delivery_count;
    header.first_acquirer = false;
    let Ok(enc) = serde_amqp::to_vec(&header) else {
        return message.clone();
    };
    let mut out = BytesMut::with_capacity(enc.len() + rest.len());
    out.put_slice(&enc);
    out.put_slice(rest);
    out.freeze()
}

/// The message with message annotation `key` set to string `value` (a
/// message-annotations section is added if it had none): how a broker
/// marks a dead-lettered message with where it came from. A message whose
/// sections do not decode is returned as it is.
pub fn with_annotation(message: &Bytes, key: &str, value: &str) -> Bytes {
    use fe2o3_amqp_types::messaging::MessageAnnotations;
    use fe2o3_amqp_types::primitives::{Symbol, Value};
    let mut out = BytesMut::with_capacity(message.len() + key.len() + value.len() + 16);
    let mut placed = false;
    let encode = |mut a: MessageAnnotations| {
        a.0.insert(Symbol::from(key).into(), Value::String(value.to_string()));
        serde_amqp::to_vec(&a).ok()
    };
    for s in section_spans(message) {
        let Ok((code, span)) = s else {
            return message.clone();
        };
        if !placed && code >= section::MESSAGE_ANNOTATIONS {
            let a = if code == section::MESSAGE_ANNOTATIONS {
                match crate::frame::decode_checked::<MessageAnnotations>(span) {
                    Ok(a) => a,
                    Err(_) => return message.clone(),
                }
            } else {
                MessageAnnotations::default()
            };
            let Some(enc) = encode(a) else {
                return message.clone();
            };
            out.put_slice(&enc);
            placed = true;
            if code == section::MESSAGE_ANNOTATIONS {
                continue;
            }
        }
        out.put_slice(span);
    }
    if !placed {
        let Some(enc) = encode(MessageAnnotations::default()) else {
            return message.clone();
        };
        out.put_slice(&enc);
    }
    out.freeze()
}

/// The message with `properties.to` set to `to` (a properties section is
/// added if it had none): how a message sent on a link to a topic learns
/// its topic for the subscribers that need it (MQTT sessions). A message
/// whose sections do not decode is returned as it is.
pub fn with_to(message: &Bytes, to: &str) -> Bytes {
    use fe2o3_amqp_types::messaging::Properties;
    let mut out = BytesMut::with_capacity(message.len() + to.len() + 16);
    let mut placed = false;
    for s in section_spans(message) {
        let Ok((code, span)) = s else {
            return message.clone();
        };
        if !placed && code >= section::PROPERTIES {
            let mut props = if code == section::PROPERTIES {
                match crate::frame::decode_checked::<Properties>(span) {
                    Ok(p) => p,
                    Err(_) => return message.clone(),
                }
            } else {
                Properties::default()
            };
            props.to = Some(to.to_string());
            let Ok(enc) = serde_amqp::to_vec(&props) else {
                return message.clone();
            };
            out.put_slice(&enc);
            placed = true;
            if code == section::PROPERTIES {
                continue;
            }
        }
        out.put_slice(span);
    }
    if !placed {
        let props = Properties {
            to: Some(to.to_string()),
            ..Default::default()
        };
        let Ok(enc) = serde_amqp::to_vec(&props) else {
            return message.clone();
        };
        out.put_slice(&enc);
    }
    out.freeze()
}

/// Field `index` of the list section at `span` (its encoded value).
fn list_field(message: &[u8], span: Span, index: usize) -> Option<&[u8]> {
    let (o, l) = span?;
    let (sec, _) = next_section(&message[o..o + l]).ok()?;
    let (count, mut items) = list_items(sec.value).ok()?;
    for i in 0..count.min(index + 1) {
        let len = value_len(items).ok()?;
        if i == index {
            return items.get(..len);
        }
        items = items.get(len..)?;
    }
    None
}

/// The message's `group-id` (properties, AMQP 1.0 §3.2.4), read in place.
pub fn group_id(message: &[u8]) -> Option<&str> {
    let (_, p) = header_and_properties(message);
    let s = match list_field(message, p, 10)? {
        [0xa1, _, s @ ..] => s,
        [0xb1, _, _, _, _, s @ ..] => s,
        _ => return None,
    };
    std::str::from_utf8(s).ok().filter(|g| !g.is_empty())
}

/// When a message expires, in ms since the Unix epoch (0: never): its
/// `properties.absolute-expiry-time`, or `header.ttl` after `now_ms`,
/// whichever comes first (AMQP 1.0 §3.2.1, §3.2.4).
pub fn expiry(message: &[u8], now_ms: u64) -> u64 {
    // Read in place: this is every stored message's path.
    let (h, p) = header_and_properties(message);
    let field = |span: Span, index: usize| list_field(message, span, index);
    let mut at = u64::MAX;
    // header.ttl: uint milliseconds.
    let ttl = match field(h, 2) {
        Some([0x43]) => Some(0),
        Some([0x52, n]) => Some(u64::from(*n)),
        Some([0x70, b @ ..]) => be_u32(b).ok().map(|n| n as u64),
        _ => None,
    };
    if let Some(ttl) = ttl {
        at = at.min(now_ms.saturating_add(ttl));
    }
    // properties.absolute-expiry-time: a timestamp.
    if let Some([0x83, b @ ..]) = field(p, 8) {
        if let Ok(ms) = <[u8; 8]>::try_from(b) {
            let ms = i64::from_be_bytes(ms);
            if ms > 0 {
                at = at.min(ms as u64);
            }
        }
    }
    if at == u64::MAX {
        0
    } else {
        at.max(1)
    }
}

/// What to put in a message built by [`encode_message`].
#[derive(Debug, Default, Clone)]
pub struct MessageParts<'a> {
    pub durable: bool,
    pub message_id: Option<&'a str>,
    pub to: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    /// The body; sent as an amqp-value string when `text`, else one data section.
    pub body: &'a [u8],
    pub text: bool,
}

/// Encodes a message (used by the tools and tests, not by the router).
pub fn encode_message(p: &MessageParts<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(p.body.len() + 64);
    if p.durable {
        out.put_slice(&[0x00, 0x53, 0x70, 0xc0, 0x02, 0x01, 0x41]);
    }
    if p.message_id.is_some()
        || p.to.is_some()
        || p.reply_to.is_some()
        || p.correlation_id.is_some()
    {
        let mut list = BytesMut::new();
        let fields = [p.message_id, None, p.to, None, p.reply_to, p.correlation_id];
        let count = fields
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        for f in &fields[..count] {
            match f {
                Some(s) => put_str(&mut list, s.as_bytes(), 0xa1, 0xb1),
                None => list.put_u8(0x40),
            }
        }
        out.put_slice(&[0x00, 0x53, 0x73, 0xd0]);
        out.put_u32(list.len() as u32 + 4);
        out.put_u32(count as u32);
        out.put_slice(&list);
    }
    if p.text {
        out.put_slice(&[0x00, 0x53, 0x77]);
        put_str(&mut out, p.body, 0xa1, 0xb1);
    } else {
        out.put_slice(&[0x00, 0x53, 0x75]);
        put_str(&mut out, p.body, 0xa0, 0xb0);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_properties_and_body() {
        let m = encode_message(&MessageParts {
            durable: true,
            message_id: Some("id-1"),
            to: Some("orders/eu"),
            reply_to: Some("reply"),
            body: b"hello",
            text: true,
            ..Default::default()
        });
        assert_eq!(to_address(&m).unwrap(), Some("orders/eu"));
        assert_eq!(reply_to(&m).unwrap(), Some("reply"));
        assert_eq!(body_bytes(&m).unwrap(), b"hello");
        let m = encode_message(&MessageParts {
            body: &[7u8; 300],
            ..Default::default()
        });
        assert_eq!(to_address(&m).unwrap(), None);
        assert_eq!(expiry(&m, 1000), 0);
        assert_eq!(body_bytes(&m).unwrap(), vec![7u8; 300]);
    }

    #[test]
    fn a_message_learns_its_topic() {
        // Without properties: a section is added before the body.
        let m = encode_message(&MessageParts {
            durable: true,
            body: b"x",
            ..Default::default()
        });
        let t = with_to(&m, "a/b");
        assert_eq!(to_address(&t).unwrap(), Some("a/b"));
        assert_eq!(body_bytes(&t).unwrap(), b"x");
        // With properties: `to` is set and the rest kept.
        let m = encode_message(&MessageParts {
            reply_to: Some("r"),
            to: Some("old"),
            body: b"y",
            ..Default::default()
        });
        let t = with_to(&m, "c");
        assert_eq!(to_address(&t).unwrap(), Some("c"));
        assert_eq!(reply_to(&t).unwrap(), Some("r"));
        assert_eq!(body_bytes(&t).unwrap(), b"y");
        let junk = Bytes::from_static(&[0x00, 0x53, 0x73, 0x99]);
        assert_eq!(with_to(&junk, "x"), junk);
    }

    proptest::proptest! {
        #[test]
        fn scanning_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = to_address(&bytes);
            let _ = body_bytes(&bytes);
        }
    }

    #[test]
    fn redelivery_sets_the_header_delivery_count() {
        use fe2o3_amqp_types::messaging::Header;
        let plain = encode_message(&MessageParts {
            body: b"x",
            ..Default::default()
        });
        let durable = encode_message(&MessageParts {
            durable: true,
            body: b"x",
            ..Default::default()
        });
        for m in [plain, durable] {
            let r = redelivered(&m, 3);
            let (h, _) = header_and_properties(&r);
            let (o, l) = h.expect("a header");
            let hdr: Header = serde_amqp::from_slice(&r[o..o + l]).expect("decodes");
            assert_eq!(hdr.delivery_count, 3);
            assert!(!hdr.first_acquirer);
            assert_eq!(body_bytes(&r).expect("body"), b"x");
            let again = redelivered(&r, 4);
            assert_eq!(again.len(), r.len());
        }
        let junk = Bytes::from_static(&[0x00, 0x53, 0x70, 0x99]);
        assert_eq!(redelivered(&junk, 1), junk);
    }

    #[test]
    fn expiry_from_ttl_or_absolute_time() {
        use fe2o3_amqp_types::messaging::{Header, Properties};
        use fe2o3_amqp_types::primitives::Timestamp;
        let mut m = serde_amqp::to_vec(&Header {
            ttl: Some(500),
            ..Default::default()
        })
        .expect("encodes");
        assert_eq!(expiry(&m, 1000), 1500);
        // Each encoding of a uint: smalluint, uint0.
        for (ttl, at) in [(7, 1007), (0, 1000)] {
            let h = serde_amqp::to_vec(&Header {
                ttl: Some(ttl),
                ..Default::default()
            })
            .expect("encodes");
            assert_eq!(expiry(&h, 1000), at);
        }
        m.extend(
            serde_amqp::to_vec(&Properties {
                absolute_expiry_time: Some(Timestamp::from_milliseconds(1200)),
                ..Default::default()
            })
            .expect("encodes"),
        );
        m.extend_from_slice(&[0x00, 0x53, 0x77, 0x40]);
        assert_eq!(expiry(&m, 1000), 1200);
        assert_eq!(expiry(&m, 100), 600);
    }
}
