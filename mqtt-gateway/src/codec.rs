//! MQTT packets on the wire, 3.1.1 and 5.0 on one port.
//!
//! Framing is ours: the fixed header and remaining length are read here,
//! so a packet over the maximum size is refused before its body is
//! buffered; the bodies are decoded by `mqtt5-protocol` (which takes
//! mosquitto's zero-length v5 DISCONNECT), with the checks it leaves to
//! the server added: the first packet is CONNECT with a protocol we speak,
//! and 3.1.1 acknowledgements carry nothing but their packet identifier.
//! Outgoing PUBLISH packets are written here directly (one copy of the
//! payload into the write buffer); everything else through the crate.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqtt5_protocol::packet::{FixedHeader, MqttPacket, Packet, PacketType};
use mqtt5_protocol::protocol::v5::properties::Properties;

/// MQTT 3.1.1's protocol level.
pub const V311: u8 = 4;
/// MQTT 5.0's protocol level.
pub const V5: u8 = 5;

/// Why a packet could not be read: what the connection answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a well-formed packet (v5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Well-formed, but not allowed here (v5 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Larger than the maximum packet size (v5 reason 0x95).
    #[error("packet of {0} bytes is larger than the maximum packet size")]
    TooLarge(usize),
    /// CONNECT with protocol name `MQTT` (or 3.1's `MQIsdp`) at a level
    /// we do not speak: CONNACK 0x01 (3.1.1) or 0x84 (5.0), then close.
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
    /// CONNECT with a protocol name that is not MQTT: close at once.
    #[error("not an MQTT connection")]
    NotMqtt,
}

impl DecodeError {
    /// The MQTT 5 reason code of a DISCONNECT for this error.
    pub fn reason(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => 0x81,
            DecodeError::Protocol(_) => 0x82,
            DecodeError::TooLarge(_) => 0x95,
            DecodeError::UnsupportedLevel(_) => 0x84,
            DecodeError::NotMqtt => 0x81,
        }
    }
}

fn crate_error(e: mqtt5_protocol::error::MqttError) -> DecodeError {
    use mqtt5_protocol::error::MqttError;
    match e {
        MqttError::ProtocolError(s) => DecodeError::Protocol(s),
        other => DecodeError::Malformed(other.to_string()),
    }
}

/// The fixed header at the front of `buf`: (first byte, remaining length,
/// header length), or `None` while incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first, len, 2 + i)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than four bytes".into(),
    ))
}

/// The protocol name and level at the front of a CONNECT body.
fn connect_level(body: &[u8]) -> Result<u8, DecodeError> {
    let short = || DecodeError::Malformed("CONNECT too short".into());
    let n = usize::from(u16::from_be_bytes([
        *body.first().ok_or_else(short)?,
        *body.get(1).ok_or_else(short)?,
    ]));
    let name = body.get(2..2 + n).ok_or_else(short)?;
    let level = *body.get(2 + n).ok_or_else(short)?;
    match (name, level) {
        (b"MQTT", V311 | V5) => Ok(level),
        (b"MQTT", l) | (b"MQIsdp", l) => Err(DecodeError::UnsupportedLevel(l)),
        _ => Err(DecodeError::NotMqtt),
    }
}

/// Takes one whole packet off the front of `buf`, if there is one.
/// `version` is the connection's protocol level (`None` before CONNECT).
///
/// # Errors
/// The bytes are not a packet we accept here; the connection closes.
pub fn read_packet(
    buf: &mut BytesMut,
    version: Option<u8>,
    max: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, remaining, hlen)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let total = hlen + remaining;
    if total > max {
        return Err(DecodeError::TooLarge(total));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    decode(first, frame.slice(hlen..), version).map(Some)
}

/// Decodes a packet's body (`first`: the fixed header's first byte).
fn decode(first: u8, mut body: Bytes, version: Option<u8>) -> Result<Packet, DecodeError> {
    let ptype = PacketType::from_u8(first >> 4)
        .ok_or_else(|| DecodeError::Malformed(format!("packet type {}", first >> 4)))?;
    let version = match (version, ptype) {
        (None, PacketType::Connect) => connect_level(&body)?,
        (None, _) => {
            return Err(DecodeError::Protocol(
                "the first packet must be CONNECT".into(),
            ))
        }
        (Some(_), PacketType::Connect) => {
            return Err(DecodeError::Protocol("a second CONNECT".into()))
        }
        (Some(v), _) => v,
    };
    let fh = FixedHeader::new(ptype, first & 0x0f, body.len() as u32);
    let len = body.len();
    if version == V311 {
        let ok = match ptype {
            PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
                len == 2
            }
            PacketType::PingReq | PacketType::Disconnect => len == 0,
            _ => true,
        };
        if !ok {
            return Err(DecodeError::Malformed(format!(
                "{ptype:?} of {len} bytes in MQTT 3.1.1"
            )));
        }
    }
    if ptype == PacketType::Subscribe {
        subscription_options(&body, version)?;
    }
    let p = Packet::decode_from_body_with_version(ptype, &fh, &mut body, version)
        .map_err(crate_error)?;
    // Packet identifiers are never 0 (MQTT-2.3.1-1 in 3.1.1, §2.2.1 in 5.0).
    let zero_id = match &p {
        Packet::Publish(x) => x.qos as u8 > 0 && x.packet_id == Some(0),
        Packet::Subscribe(x) => x.packet_id == 0,
        Packet::Unsubscribe(x) => x.packet_id == 0,
        Packet::PubAck(x) => x.packet_id == 0,
        Packet::PubRec(x) => x.packet_id == 0,
        Packet::PubRel(x) => x.packet_id == 0,
        Packet::PubComp(x) => x.packet_id == 0,
        _ => false,
    };
    if zero_id {
        return Err(DecodeError::Malformed(format!(
            "{} with packet identifier 0",
            p.packet_type_name()
        )));
    }
    if body.has_remaining() && !matches!(p, Packet::Publish(_)) {
        return Err(DecodeError::Malformed(format!(
            "{} has {} bytes past its end",
            p.packet_type_name(),
            body.remaining()
        )));
    }
    Ok(p)
}

/// Checks a SUBSCRIBE's options bytes as the codec crate does not: QoS 3
/// and reserved bits are malformed (3.1.1 MQTT-3.8.3-4, 5.0 §3.8.3.1),
/// and so is retain handling 3 in 5.0.
fn subscription_options(body: &[u8], version: u8) -> Result<(), DecodeError> {
    let malformed = |why: &str| DecodeError::Malformed(format!("SUBSCRIBE: {why}"));
    let mut at = 2usize;
    if version == V5 {
        // The properties' length (a variable byte integer) and the properties.
        let (mut n, mut shift) = (0usize, 0);
        loop {
            let b = *body
                .get(at)
                .ok_or_else(|| malformed("truncated properties"))?;
            at += 1;
            n |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
            if shift > 21 {
                return Err(malformed("bad properties length"));
            }
        }
        at += n;
    }
    while at < body.len() {
        let len = body
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| malformed("truncated topic filter"))?;
        at += 2 + len;
        let o = *body
            .get(at)
            .ok_or_else(|| malformed("no subscription options"))?;
        at += 1;
        if o & 0x03 == 3 {
            return Err(malformed("QoS 3"));
        }
        let reserved = if version == V5 { 0xc0 } else { 0xfc };
        if o & reserved != 0 {
            return Err(malformed("reserved option bits set"));
        }
        if version == V5 && (o >> 4) & 0x03 == 3 {
            return Err(malformed("retain handling 3"));
        }
    }
    Ok(())
}

/// Appends a packet through the codec crate (clients' packets, in tests
/// and the load tool; the server writes its own with the functions below).
pub fn write_packet<P: MqttPacket>(out: &mut BytesMut, p: &P) {
    // Encoding fails only on values nobody makes.
    if let Err(e) = p.encode(out) {
        tracing::error!(error = %e, "cannot encode an MQTT packet");
    }
}

/// Appends a PINGRESP.
pub fn write_pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0x00]);
}

/// Appends a packet of type byte `first` whose body is `body`.
fn write_raw(out: &mut BytesMut, first: u8, body: &[u8]) {
    out.put_u8(first);
    put_varint(out, body.len());
    out.put_slice(body);
}

/// Appends `n` as a variable byte integer (a remaining length).
fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_properties(body: &mut Vec<u8>, props: Option<&Properties>) {
    match props {
        Some(p) if !p.is_empty() => {
            if p.encode_direct(body).is_err() {
                body.push(0);
            }
        }
        _ => body.push(0),
    }
}

/// Appends a CONNACK: `code` is the 3.1.1 return code or the 5.0 reason code.
pub fn write_connack(
    out: &mut BytesMut,
    version: u8,
    session_present: bool,
    code: u8,
    props: Option<&Properties>,
) {
    let mut body = vec![u8::from(session_present), code];
    if version == V5 {
        put_properties(&mut body, props);
    }
    write_raw(out, 0x20, &body);
}

/// Appends a PUBACK (`kind` 4), PUBREC (5), PUBREL (6) or PUBCOMP (7);
/// in 5.0 with `reason` (and a reason string), in 3.1.1 without.
pub fn write_ack(
    out: &mut BytesMut,
    version: u8,
    kind: u8,
    packet_id: u16,
    reason: u8,
    why: Option<&str>,
) {
    let first = (kind << 4) | if kind == 6 { 0x02 } else { 0 };
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == V5 && (reason != 0 || why.is_some()) {
        body.push(reason);
        match why {
            Some(w) => {
                let mut p = Properties::default();
                p.set_reason_string(w.to_string());
                put_properties(&mut body, Some(&p));
            }
            None => {}
        }
    }
    write_raw(out, first, &body);
}

/// Appends a SUBACK: one code per filter (3.1.1: 0, 1, 2 or 0x80).
pub fn write_suback(out: &mut BytesMut, version: u8, packet_id: u16, codes: &[u8]) {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
        body.extend_from_slice(codes);
    } else {
        body.extend(codes.iter().map(|c| if *c >= 0x80 { 0x80 } else { *c }));
    }
    write_raw(out, 0x90, &body);
}

/// Appends an UNSUBACK (5.0: one reason code per filter).
pub fn write_unsuback(out: &mut BytesMut, version: u8, packet_id: u16, codes: &[u8]) {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
        body.extend_from_slice(codes);
    }
    write_raw(out, 0xb0, &body);
}

/// Appends a 5.0 DISCONNECT with `reason` (3.1.1 servers send none).
pub fn write_disconnect(out: &mut BytesMut, reason: u8, why: Option<&str>) {
    let mut body = vec![reason];
    match why {
        Some(w) => {
            let mut p = Properties::default();
            p.set_reason_string(w.to_string());
            put_properties(&mut body, Some(&p));
        }
        None => body.push(0),
    }
    write_raw(out, 0xe0, &body);
}

/// What a PUBLISH to a client carries.
pub struct Publish<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub packet_id: u16,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 properties (`None` in 3.1.1).
    pub properties: Option<&'a Properties>,
    pub payload: &'a [u8],
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

impl Publish<'_> {
    fn remaining(&self) -> usize {
        let props = self.properties.map_or(0, |p| {
            let n = p.encoded_len();
            // `encoded_len` counts the properties' own length prefix.
            n.max(1)
        });
        2 + self.topic.len() + if self.qos > 0 { 2 } else { 0 } + props + self.payload.len()
    }

    /// The whole packet's size on the wire.
    pub fn size(&self) -> usize {
        let r = self.remaining();
        1 + varint_len(r) + r
    }
}

/// Appends a PUBLISH.
pub fn write_publish(out: &mut BytesMut, p: &Publish<'_>) {
    let remaining = p.remaining();
    out.reserve(5 + remaining);
    out.put_u8(0x30 | (u8::from(p.dup) << 3) | ((p.qos & 3) << 1) | u8::from(p.retain));
    put_varint(out, remaining);
    out.put_u16(p.topic.len() as u16);
    out.put_slice(p.topic.as_bytes());
    if p.qos > 0 {
        out.put_u16(p.packet_id);
    }
    if let Some(props) = p.properties {
        if props.encode_direct(out).is_err() {
            out.put_u8(0);
        }
    }
    out.put_slice(p.payload);
}

/// True when `topic` may name a PUBLISH's topic: not empty, no
/// wildcards (MQTT 3.1.1 §4.7.3, 5.0 §4.7.3; UTF-8 and U+0000 are checked
/// by the decoder).
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#']) && topic.len() <= 65_535
}

/// True when `filter` is a well-formed topic filter: `#` only as the
/// last level, `+` and `#` only as whole levels (§4.7.1).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// A shared subscription's group and filter (`$share/GROUP/FILTER`);
/// `Err` when it starts with `$share/` but is not well-formed.
pub fn shared_subscription(filter: &str) -> Result<Option<(&str, &str)>, ()> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let (group, f) = rest.split_once('/').ok_or(())?;
    if group.is_empty() || group.contains(['+', '#']) || !valid_topic_filter(f) {
        return Err(());
    }
    Ok(Some((group, f)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt5_protocol::packet::connect::ConnectPacket;
    use mqtt5_protocol::types::ConnectOptions;

    #[test]
    fn subscribe_options_with_qos_3_or_reserved_bits_are_malformed() {
        let sub = |version: u8, options: u8| {
            let mut body = vec![0, 1];
            if version == V5 {
                body.push(0);
            }
            body.extend_from_slice(&[0, 1, b'a', options]);
            let mut b = BytesMut::new();
            b.put_u8(0x82);
            b.put_u8(body.len() as u8);
            b.put_slice(&body);
            read_packet(&mut b, Some(version), 1024)
        };
        assert!(matches!(sub(V311, 0x01), Ok(Some(Packet::Subscribe(_)))));
        assert!(matches!(sub(V311, 0x03), Err(DecodeError::Malformed(_))));
        assert!(matches!(sub(V311, 0x05), Err(DecodeError::Malformed(_))));
        assert!(matches!(sub(V5, 0x2d), Ok(Some(Packet::Subscribe(_)))));
        assert!(matches!(sub(V5, 0x31), Err(DecodeError::Malformed(_))));
        assert!(matches!(sub(V5, 0x41), Err(DecodeError::Malformed(_))));
    }

    fn bytes(b: &[u8]) -> BytesMut {
        BytesMut::from(b)
    }

    #[test]
    fn a_packet_in_pieces_is_read_once_whole() {
        let mut out = BytesMut::new();
        let c = ConnectPacket::new_v311(ConnectOptions::new("c1"));
        write_packet(&mut out, &c);
        let whole = out.clone();
        let mut buf = BytesMut::new();
        for b in &whole[..whole.len() - 1] {
            buf.put_u8(*b);
            assert!(read_packet(&mut buf, None, 1024).unwrap().is_none());
        }
        buf.put_u8(whole[whole.len() - 1]);
        match read_packet(&mut buf, None, 1024).unwrap() {
            Some(Packet::Connect(c)) => {
                assert_eq!(c.client_id, "c1");
                assert_eq!(c.protocol_version, V311);
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_input_gets_the_right_answer() {
        // PUBLISH before CONNECT.
        let mut b = bytes(&[0x30, 0x03, 0x00, 0x01, b'a']);
        assert!(matches!(
            read_packet(&mut b, None, 1024),
            Err(DecodeError::Protocol(_))
        ));
        // QoS 3.
        let mut b = bytes(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]);
        assert!(matches!(
            read_packet(&mut b, Some(V311), 1024),
            Err(DecodeError::Malformed(_))
        ));
        // Over the maximum size: refused from the header alone.
        let mut b = bytes(&[0x30, 0xff, 0x7f]);
        assert_eq!(
            read_packet(&mut b, Some(V5), 1024).err(),
            Some(DecodeError::TooLarge(16386))
        );
        // A five-byte remaining length.
        let mut b = bytes(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(
            read_packet(&mut b, Some(V5), usize::MAX),
            Err(DecodeError::Malformed(_))
        ));
        // Invalid UTF-8 in a topic.
        let mut b = bytes(&[0x30, 0x04, 0x00, 0x02, 0xc3, 0x28]);
        assert!(matches!(
            read_packet(&mut b, Some(V311), 1024),
            Err(DecodeError::Malformed(_))
        ));
        // Protocol level 3 (MQTT 3.1) and 6.
        let mut b = bytes(&[
            0x10, 0x0c, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0, 0, 0,
        ]);
        assert_eq!(
            read_packet(&mut b, None, 1024).err(),
            Some(DecodeError::UnsupportedLevel(3))
        );
        let mut b = bytes(&[0x10, 0x0a, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 60]);
        assert_eq!(
            read_packet(&mut b, None, 1024).err(),
            Some(DecodeError::UnsupportedLevel(6))
        );
        let mut b = bytes(&[0x10, 0x0a, 0, 4, b'H', b'T', b'T', b'P', 4, 2, 0, 60]);
        assert_eq!(
            read_packet(&mut b, None, 1024).err(),
            Some(DecodeError::NotMqtt)
        );
        // A second CONNECT.
        let mut b = bytes(&[0x10, 0x0a, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]);
        assert!(matches!(
            read_packet(&mut b, Some(V311), 1024),
            Err(DecodeError::Protocol(_))
        ));
        // A 3.1.1 PUBACK with a reason code.
        let mut b = bytes(&[0x40, 0x03, 0, 1, 0x10]);
        assert!(matches!(
            read_packet(&mut b, Some(V311), 1024),
            Err(DecodeError::Malformed(_))
        ));
        // Mosquitto's zero-length v5 DISCONNECT is fine.
        let mut b = bytes(&[0xe0, 0x00]);
        assert!(matches!(
            read_packet(&mut b, Some(V5), 1024),
            Ok(Some(Packet::Disconnect(_)))
        ));
    }

    #[test]
    fn publish_written_here_reads_back() {
        for v in [V311, V5] {
            let mut props = Properties::default();
            props.set_content_type("text/plain".into());
            let mut out = BytesMut::new();
            let p = Publish {
                topic: "a/b",
                qos: 1,
                packet_id: 7,
                retain: true,
                dup: false,
                properties: (v == V5).then_some(&props),
                payload: &[9u8; 300],
            };
            write_publish(&mut out, &p);
            assert_eq!(out.len(), p.size());
            match read_packet(&mut out, Some(v), 4096).unwrap() {
                Some(Packet::Publish(got)) => {
                    assert_eq!(got.topic_name, "a/b");
                    assert_eq!(got.packet_id, Some(7));
                    assert!(got.retain);
                    assert_eq!(got.payload.len(), 300);
                    if v == V5 {
                        assert_eq!(
                            got.properties.get_content_type().as_deref(),
                            Some("text/plain")
                        );
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn topic_names_and_filters() {
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name(""));
        assert!(valid_topic_filter("a/+/#"));
        assert!(valid_topic_filter("#"));
        assert!(!valid_topic_filter("a/#/b"));
        assert!(!valid_topic_filter("a/b#"));
        assert!(!valid_topic_filter("a+/b"));
        assert_eq!(shared_subscription("$share/g/a/+"), Ok(Some(("g", "a/+"))));
        assert_eq!(shared_subscription("a/b"), Ok(None));
        assert!(shared_subscription("$share/g").is_err());
        assert!(shared_subscription("$share//a").is_err());
    }

    proptest::proptest! {
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            for v in [None, Some(V311), Some(V5)] {
                let mut b = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = read_packet(&mut b, v, 1 << 20) {}
            }
        }
    }
}
