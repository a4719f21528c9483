//! MQTT application messages as AMQP messages, and back (the mapping is
//! in this crate's ARCHITECTURE.md):
//!
//! | MQTT | AMQP |
//! |---|---|
//! | topic | `properties.to` |
//! | payload | one data section (an amqp-value string or binary, or data sections, back) |
//! | QoS > 0 | `header.durable`, annotation `x-opt-mqtt-qos` |
//! | retain flag | annotation `x-opt-retain` |
//! | message expiry interval | `header.ttl` (ms; or what is left of `absolute-expiry-time`) |
//! | content type | `properties.content-type` |
//! | response topic | `properties.reply-to` |
//! | correlation data | `properties.correlation-id` (binary) |
//! | user properties | application properties (string values; the last of a repeated key) |
//! | CloudEvents attributes (binary mode: user properties with `specversion`) | `cloudEvents:` application properties |
//! | payload format indicator 1 | annotation `x-opt-mqtt-pfi` (an amqp-value string body, back) |
//! | the publishing session | annotation `x-opt-mqtt-client` (for no-local) |

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use flotilla_amqp::message::{put_str, section, section_spans};
use flotilla_amqp::types::messaging::{
    ApplicationProperties, Header, MessageAnnotations, MessageId, Properties,
};
use flotilla_amqp::types::primitives::{SimpleValue, Symbol, Timestamp, Value};
use mqtt5_protocol::protocol::v5::properties::{
    Properties as MqttProps, PropertyId, PropertyValue,
};

pub const ANN_QOS: &str = "x-opt-mqtt-qos";
pub const ANN_RETAIN: &str = "x-opt-retain";
pub const ANN_PFI: &str = "x-opt-mqtt-pfi";
pub const ANN_CLIENT: &str = "x-opt-mqtt-client";
/// CloudEvents attributes in AMQP application properties (the AMQP
/// binding; `cloudEvents_` is its JMS-compatible form).
const CE_PREFIX: &str = "cloudEvents:";
const CE_PREFIX_JMS: &str = "cloudEvents_";

/// An application message from an MQTT client, as the gateway sends it on.
pub struct Inbound<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub retain: bool,
    /// The publishing session (for no-local).
    pub client: &'a str,
    /// MQTT 5 properties (empty for 3.1.1).
    pub properties: Option<&'a MqttProps>,
    pub payload: &'a [u8],
}

fn put_section<T: serde::Serialize>(out: &mut BytesMut, v: &T) {
    match serde_amqp::to_vec(v) {
        Ok(b) => out.put_slice(&b),
        Err(e) => tracing::error!(error = %e, "cannot encode a message section"),
    }
}

/// Writes a described list section (list32) of `count` encoded `fields`.
fn put_list(out: &mut BytesMut, descriptor: u64, count: u32, fields: &[u8]) {
    out.put_slice(&[0x00, 0x53, descriptor as u8, 0xd0]);
    out.put_u32(fields.len() as u32 + 4);
    out.put_u32(count);
    out.put_slice(fields);
}

/// Encodes an MQTT publication as an AMQP message.
pub fn to_amqp(m: &Inbound<'_>) -> Bytes {
    let props = m.properties;
    let get = |id: PropertyId| props.and_then(|p| p.get(id));
    let mut out = BytesMut::with_capacity(m.payload.len() + m.topic.len() + 96);
    let expiry = match get(PropertyId::MessageExpiryInterval) {
        Some(PropertyValue::FourByteInteger(s)) => Some(*s),
        _ => None,
    };
    // Header, message annotations and properties are written by hand: this
    // is every publication's path (a serializer allocated ~20 times here).
    if m.qos > 0 || expiry.is_some() {
        // header: [durable, priority, ttl]
        let mut fields = BytesMut::with_capacity(8);
        fields.put_u8(if m.qos > 0 { 0x41 } else { 0x42 });
        if let Some(s) = expiry {
            fields.put_u8(0x40);
            fields.put_u8(0x70);
            fields.put_u32(s.saturating_mul(1000));
        }
        let count = if expiry.is_some() { 3 } else { 1 };
        put_list(&mut out, section::HEADER, count, &fields);
    }
    // Also at QoS 0: a broker hands those to MQTT sessions settled.
    let mut ann = BytesMut::with_capacity(64 + m.client.len());
    let mut entries = 2;
    put_str(&mut ann, ANN_CLIENT.as_bytes(), 0xa3, 0xb3);
    put_str(&mut ann, m.client.as_bytes(), 0xa1, 0xb1);
    put_str(&mut ann, ANN_QOS.as_bytes(), 0xa3, 0xb3);
    ann.put_slice(&[0x50, m.qos]);
    if m.retain {
        put_str(&mut ann, ANN_RETAIN.as_bytes(), 0xa3, 0xb3);
        ann.put_u8(0x41);
        entries += 1;
    }
    if matches!(
        get(PropertyId::PayloadFormatIndicator),
        Some(PropertyValue::Byte(1))
    ) {
        put_str(&mut ann, ANN_PFI.as_bytes(), 0xa3, 0xb3);
        ann.put_slice(&[0x50, 1]);
        entries += 1;
    }
    out.put_slice(&[0x00, 0x53, section::MESSAGE_ANNOTATIONS as u8, 0xd1]);
    out.put_u32(ann.len() as u32 + 4);
    out.put_u32(entries * 2);
    out.put_slice(&ann);
    // properties: [message-id, user-id, to, subject, reply-to,
    // correlation-id, content-type]
    let text = |id| match get(id) {
        Some(PropertyValue::Utf8String(s)) => Some(s.as_str()),
        _ => None,
    };
    let mut fields = BytesMut::with_capacity(m.topic.len() + 16);
    fields.put_slice(&[0x40, 0x40]);
    put_str(&mut fields, m.topic.as_bytes(), 0xa1, 0xb1);
    fields.put_u8(0x40);
    let mut count = 3;
    let reply_to = text(PropertyId::ResponseTopic);
    let correlation = match get(PropertyId::CorrelationData) {
        Some(PropertyValue::BinaryData(b)) => Some(b),
        _ => None,
    };
    let content_type = text(PropertyId::ContentType);
    if reply_to.is_some() || correlation.is_some() || content_type.is_some() {
        match reply_to {
            Some(r) => put_str(&mut fields, r.as_bytes(), 0xa1, 0xb1),
            None => fields.put_u8(0x40),
        }
        match correlation {
            Some(c) => put_str(&mut fields, c, 0xa0, 0xb0),
            None => fields.put_u8(0x40),
        }
        match content_type {
            Some(t) => put_str(&mut fields, t.as_bytes(), 0xa3, 0xb3),
            None => fields.put_u8(0x40),
        }
        count = 7;
    }
    put_list(&mut out, section::PROPERTIES, count, &fields);
    if let Some(all) = props.and_then(|p| p.get_all(PropertyId::UserProperty)) {
        // A CloudEvent in binary mode (MQTT binding: its attributes are
        // user properties, `specversion` among them) keeps them as the AMQP
        // binding's `cloudEvents:` application properties.
        let event = all
            .iter()
            .any(|v| matches!(v, PropertyValue::Utf8StringPair(k, _) if k == "specversion"));
        let mut ap = ApplicationProperties::default();
        for v in all {
            if let PropertyValue::Utf8StringPair(k, v) = v {
                let key = if event {
                    format!("{CE_PREFIX}{k}")
                } else {
                    k.clone()
                };
                ap.insert(key, SimpleValue::String(v.clone()));
            }
        }
        put_section(&mut out, &ap);
    }
    // The body: one data section.
    out.put_slice(&[0x00, 0x53, section::DATA as u8]);
    if m.payload.len() < 256 {
        out.put_u8(0xa0);
        out.put_u8(m.payload.len() as u8);
    } else {
        out.put_u8(0xb0);
        out.put_u32(m.payload.len() as u32);
    }
    out.put_slice(m.payload);
    out.freeze()
}

/// An AMQP message as an MQTT client gets it.
#[derive(Debug, Default)]
pub struct Outbound {
    /// `properties.to`, if the message has one.
    pub topic: Option<String>,
    /// The publication's QoS: what `x-opt-mqtt-qos` says for MQTT
    /// publications (0 without), 1 for other AMQP messages.
    pub qos: u8,
    pub retain: bool,
    /// The MQTT session that published it.
    pub client: Option<String>,
    /// Absolute expiry (ms since the epoch; 0: none).
    pub expires_ms: u64,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    pub utf8: bool,
    /// Delivered before (the header's delivery-count): an MQTT DUP.
    pub redelivered: bool,
    pub payload: Bytes,
}

fn simple_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleValue::Null => String::new(),
        other => format!("{other:?}"),
    }
}

fn message_id_bytes(id: &MessageId) -> Vec<u8> {
    match id {
        MessageId::Binary(b) => b.to_vec(),
        MessageId::String(s) => s.as_bytes().to_vec(),
        MessageId::Ulong(n) => n.to_string().into_bytes(),
        MessageId::Uuid(u) => format!("{u:?}").into_bytes(),
    }
}

/// Reading the common encodings of header, message annotations and
/// properties without decoding them into owned values. Each function
/// returns `None`, having changed nothing, for an encoding it does not
/// take; the caller then decodes the section with fe2o3.
mod fast {
    use super::{Outbound, ANN_CLIENT, ANN_PFI, ANN_QOS, ANN_RETAIN};
    use flotilla_amqp::message::value_len;

    /// The items of the described list or map a section span holds:
    /// (count, their bytes).
    fn compound(span: &[u8]) -> Option<(u32, &[u8])> {
        let v = span.get(3..)?;
        match *v.first()? {
            0x45 => Some((0, &[])),
            0xc0 | 0xc1 => {
                let size = usize::from(*v.get(1)?);
                Some((u32::from(*v.get(2)?), v.get(3..2 + size)?))
            }
            0xd0 | 0xd1 => {
                let size = u32::from_be_bytes(v.get(1..5)?.try_into().ok()?) as usize;
                let count = u32::from_be_bytes(v.get(5..9)?.try_into().ok()?);
                Some((count, v.get(9..5 + size)?))
            }
            _ => None,
        }
    }

    /// Splits the next value off `items`.
    fn next<'a>(items: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = value_len(items).ok()?;
        let (v, rest) = items.split_at_checked(n)?;
        *items = rest;
        Some(v)
    }

    /// The bytes of a string (0xa1/0xb1), symbol (0xa3/0xb3) or binary
    /// (0xa0/0xb0) value whose one-byte-length code is `small`.
    fn bytes(v: &[u8], small: u8) -> Option<&[u8]> {
        match *v.first()? {
            c if c == small => v.get(2..),
            c if c == small + 0x10 => v.get(5..),
            _ => None,
        }
    }

    fn text(v: &[u8], small: u8) -> Option<Option<String>> {
        if v == [0x40] {
            return Some(None);
        }
        Some(Some(
            std::str::from_utf8(bytes(v, small)?).ok()?.to_string(),
        ))
    }

    fn uint(v: &[u8]) -> Option<Option<u32>> {
        match *v.first()? {
            0x40 => Some(None),
            0x43 => Some(Some(0)),
            0x52 => Some(Some(u32::from(*v.get(1)?))),
            0x70 => Some(Some(u32::from_be_bytes(v.get(1..5)?.try_into().ok()?))),
            _ => None,
        }
    }

    /// [durable, priority, ttl, first-acquirer, delivery-count]
    pub fn header(span: &[u8], ttl: &mut Option<u32>, o: &mut Outbound) -> Option<()> {
        let (count, mut items) = compound(span)?;
        let (mut t, mut redelivered) = (None, false);
        for i in 0..count {
            let v = next(&mut items)?;
            match i {
                2 => t = uint(v)?,
                4 => redelivered = uint(v)?.unwrap_or(0) > 0,
                _ => {}
            }
        }
        (*ttl, o.redelivered) = (t, redelivered);
        Some(())
    }

    pub fn annotations(span: &[u8], o: &mut Outbound) -> Option<()> {
        let (count, mut items) = compound(span)?;
        let (mut client, mut qos, mut retain, mut utf8) = (None, None, false, false);
        for _ in 0..count / 2 {
            let (k, v) = (next(&mut items)?, next(&mut items)?);
            let Some(key) = bytes(k, 0xa3) else { continue };
            match key {
                k if k == ANN_CLIENT.as_bytes() => {
                    client = std::str::from_utf8(bytes(v, 0xa1)?)
                        .ok()
                        .map(str::to_string)
                }
                k if k == ANN_QOS.as_bytes() => {
                    qos = match v {
                        [0x50, q] => Some(*q),
                        _ => None,
                    }
                }
                k if k == ANN_RETAIN.as_bytes() => retain = v == [0x41] || v == [0x56, 1],
                k if k == ANN_PFI.as_bytes() => utf8 = v == [0x50, 1],
                _ => {}
            }
        }
        if client.is_some() {
            o.qos = qos.map_or(0, |q| q.min(2));
            o.client = client;
        }
        (o.retain, o.utf8) = (retain, utf8);
        Some(())
    }

    /// [message-id, user-id, to, subject, reply-to, correlation-id,
    /// content-type, content-encoding, absolute-expiry-time, ...]
    pub fn properties(span: &[u8], o: &mut Outbound) -> Option<()> {
        let (count, mut items) = compound(span)?;
        let (mut to, mut reply_to, mut correlation, mut content_type, mut expires) =
            (None, None, None, None, None);
        for i in 0..count {
            let v = next(&mut items)?;
            match i {
                2 => to = text(v, 0xa1)?,
                4 => reply_to = text(v, 0xa1)?,
                // Binary or string ids; other kinds of id are read by fe2o3.
                5 if v != [0x40] => {
                    correlation = Some(bytes(v, 0xa0).or_else(|| bytes(v, 0xa1))?.to_vec())
                }
                6 => content_type = text(v, 0xa3)?,
                8 => match *v.first()? {
                    0x40 => {}
                    0x83 => {
                        let ms = i64::from_be_bytes(v.get(1..9)?.try_into().ok()?);
                        expires = Some(u64::try_from(ms).unwrap_or(0));
                    }
                    _ => return None,
                },
                _ => {}
            }
        }
        o.topic = to;
        o.response_topic = reply_to;
        o.correlation = correlation;
        o.content_type = content_type;
        if let Some(e) = expires {
            o.expires_ms = e;
        }
        Some(())
    }
}

fn annotation<'a>(a: &'a MessageAnnotations, key: &str) -> Option<&'a Value> {
    a.get(&OwnedKey::Symbol(Symbol::from(key)))
}

/// Reads what an MQTT client needs from an AMQP message (`None`: not a
/// message we can read). Only the sections present are decoded; a data
/// body is sliced, not copied.
pub fn from_amqp(message: &Bytes, now_ms: u64) -> Option<Outbound> {
    let mut o = Outbound {
        qos: 1,
        ..Default::default()
    };
    let mut ttl = None;
    let mut data: Option<BytesMut> = None;
    let base = message.as_ptr() as usize;
    for s in section_spans(message) {
        let (code, span) = s.ok()?;
        match code {
            // Header, annotations and properties as an MQTT gateway's or a
            // typical client's encoder writes them are read in place (every
            // message's path); anything else goes through fe2o3's decoder.
            section::HEADER if fast::header(span, &mut ttl, &mut o).is_some() => {}
            section::MESSAGE_ANNOTATIONS if fast::annotations(span, &mut o).is_some() => {}
            section::PROPERTIES if fast::properties(span, &mut o).is_some() => {}
            section::HEADER => {
                let h: Header = flotilla_amqp::frame::decode_checked(span).ok()?;
                ttl = h.ttl;
                o.redelivered = h.delivery_count > 0;
            }
            section::MESSAGE_ANNOTATIONS => {
                let a: MessageAnnotations = flotilla_amqp::frame::decode_checked(span).ok()?;
                if let Some(Value::String(c)) = annotation(&a, ANN_CLIENT) {
                    o.client = Some(c.clone());
                    o.qos = match annotation(&a, ANN_QOS) {
                        Some(Value::Ubyte(q)) => (*q).min(2),
                        _ => 0,
                    };
                }
                o.retain = matches!(annotation(&a, ANN_RETAIN), Some(Value::Bool(true)));
                o.utf8 = matches!(annotation(&a, ANN_PFI), Some(Value::Ubyte(1)));
            }
            section::PROPERTIES => {
                let p: Properties = flotilla_amqp::frame::decode_checked(span).ok()?;
                o.topic = p.to;
                o.response_topic = p.reply_to;
                o.correlation = p.correlation_id.as_ref().map(message_id_bytes);
                o.content_type = p.content_type.map(|s| s.as_str().to_string());
                if let Some(t) = p.absolute_expiry_time {
                    o.expires_ms = u64::try_from(t.milliseconds()).unwrap_or(0);
                }
            }
            section::APPLICATION_PROPERTIES => {
                let ap: ApplicationProperties = flotilla_amqp::frame::decode_checked(span).ok()?;
                // The AMQP binding's `cloudEvents:` (or JMS-style
                // `cloudEvents_`) attributes are the MQTT binding's bare names.
                o.user_properties =
                    ap.0.iter()
                        .map(|(k, v)| {
                            let name = k
                                .strip_prefix(CE_PREFIX)
                                .or_else(|| k.strip_prefix(CE_PREFIX_JMS));
                            let text = match (name, v) {
                                // An AMQP timestamp is an RFC 3339 string in MQTT.
                                (Some(_), SimpleValue::Timestamp(t)) => {
                                    flotilla_core::time::rfc3339(t.milliseconds(), true)
                                }
                                _ => simple_text(v),
                            };
                            (name.unwrap_or(k).to_string(), text)
                        })
                        .collect();
            }
            section::DATA => {
                let v = &span[3..];
                let (at, len) = match v.first()? {
                    0xa0 => (2, usize::from(*v.get(1)?)),
                    0xb0 => (
                        5,
                        u32::from_be_bytes(v.get(1..5)?.try_into().ok()?) as usize,
                    ),
                    _ => return None,
                };
                let body = v.get(at..at + len)?;
                match &mut data {
                    None if o.payload.is_empty() => {
                        let start = body.as_ptr() as usize - base;
                        o.payload = message.slice(start..start + len);
                        data = Some(BytesMut::new());
                    }
                    _ => {
                        // More than one data section: joined.
                        let d = data.get_or_insert_with(BytesMut::new);
                        if !o.payload.is_empty() {
                            d.put_slice(&o.payload);
                            o.payload = Bytes::new();
                        }
                        d.put_slice(body);
                    }
                }
            }
            section::AMQP_VALUE => {
                let v: Value = flotilla_amqp::frame::decode_checked(&span[3..]).ok()?;
                o.payload = match v {
                    Value::String(s) => {
                        o.utf8 = true;
                        Bytes::from(s.into_bytes())
                    }
                    Value::Binary(b) => Bytes::from(b.into_vec()),
                    Value::Symbol(s) => {
                        o.utf8 = true;
                        Bytes::from(s.as_str().as_bytes().to_vec())
                    }
                    Value::Null => Bytes::new(),
                    other => {
                        o.utf8 = true;
                        Bytes::from(value_text(&other).into_bytes())
                    }
                };
            }
            section::AMQP_SEQUENCE => {
                let v: Value = flotilla_amqp::frame::decode_checked(&span[3..]).ok()?;
                o.utf8 = true;
                o.payload = Bytes::from(value_text(&v).into_bytes());
            }
            _ => {}
        }
    }
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        o.payload = d.freeze();
    }
    if o.expires_ms == 0 {
        if let Some(t) = ttl.filter(|t| *t > 0) {
            o.expires_ms = now_ms.saturating_add(u64::from(t));
        }
    }
    Some(o)
}

/// An AMQP value as readable text (JSON-like) for an MQTT payload.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => serde_json::Value::String(s.clone()).to_string(),
        Value::Symbol(s) => serde_json::Value::String(s.as_str().to_string()).to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Ubyte(n) => n.to_string(),
        Value::Ushort(n) => n.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Byte(n) => n.to_string(),
        Value::Short(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Null => "null".into(),
        Value::List(l) => format!(
            "[{}]",
            l.iter().map(value_text).collect::<Vec<_>>().join(",")
        ),
        Value::Map(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        Value::Symbol(s) => s.as_str().to_string(),
                        other => value_text(other),
                    };
                    format!("{}:{}", serde_json::Value::String(key), value_text(v))
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
        Value::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

impl Outbound {
    /// The MQTT 5 properties of this message as sent (without topic alias
    /// or subscription identifiers); `None` if it has none.
    pub fn v5_properties(&self, now_ms: u64) -> Option<MqttProps> {
        let mut p = MqttProps::default();
        let mut any = false;
        if self.utf8 {
            p.set_payload_format_indicator(true);
            any = true;
        }
        if self.expires_ms > 0 {
            let left = self.expires_ms.saturating_sub(now_ms).div_ceil(1000);
            p.set_message_expiry_interval(left.clamp(1, u64::from(u32::MAX)) as u32);
            any = true;
        }
        if let Some(c) = &self.content_type {
            p.set_content_type(c.clone());
            any = true;
        }
        if let Some(r) = &self.response_topic {
            p.set_response_topic(r.clone());
            any = true;
        }
        if let Some(c) = &self.correlation {
            p.set_correlation_data(Bytes::from(c.clone()));
            any = true;
        }
        for (k, v) in &self.user_properties {
            p.add_user_property(k.clone(), v.clone());
            any = true;
        }
        any.then_some(p)
    }

    /// True when it expired before it could be sent.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }
}

pub use flotilla_core::time::now_ms;

/// A timestamp for tests and callers that build AMQP messages.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from_milliseconds(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v5_publication_round_trips_through_amqp() {
        let mut props = MqttProps::default();
        props.set_content_type("application/json".into());
        props.set_response_topic("replies/1".into());
        props.set_correlation_data(Bytes::from_static(b"abc"));
        props.add_user_property("k".into(), "v".into());
        props.set_payload_format_indicator(true);
        props.set_message_expiry_interval(60);
        let m = to_amqp(&Inbound {
            topic: "a/b",
            qos: 2,
            retain: true,
            client: "c1",
            properties: Some(&props),
            payload: b"{}",
        });
        assert_eq!(flotilla_amqp::message::to_address(&m).unwrap(), Some("a/b"));
        let o = from_amqp(&m, 1_000).expect("reads back");
        assert_eq!(o.topic.as_deref(), Some("a/b"));
        assert_eq!((o.qos, o.retain, o.utf8), (2, true, true));
        assert_eq!(o.client.as_deref(), Some("c1"));
        assert_eq!(o.content_type.as_deref(), Some("application/json"));
        assert_eq!(o.response_topic.as_deref(), Some("replies/1"));
        assert_eq!(o.correlation.as_deref(), Some(&b"abc"[..]));
        assert_eq!(o.user_properties, vec![("k".to_string(), "v".to_string())]);
        assert_eq!(o.expires_ms, 61_000);
        assert_eq!(&o.payload[..], b"{}");
        let p = o.v5_properties(1_000).expect("has properties");
        assert_eq!(p.get_message_expiry_interval(), Some(60));
    }

    #[test]
    fn the_hand_written_sections_decode_with_fe2o3() {
        let long = "t/".repeat(200);
        let mut props = MqttProps::default();
        props.set_content_type("text/plain".into());
        props.set_response_topic("r".into());
        props.set_correlation_data(Bytes::from_static(b"\x00\x01"));
        props.set_message_expiry_interval(5);
        for (topic, qos, retain, with) in [
            ("a", 0, false, None),
            (long.as_str(), 1, true, Some(&props)),
        ] {
            let m = to_amqp(&Inbound {
                topic,
                qos,
                retain,
                client: "mqtt:c",
                properties: with,
                payload: b"x",
            });
            let section = |code| {
                section_spans(&m)
                    .filter_map(Result::ok)
                    .find(|(c, _)| *c == code)
                    .map(|(_, span)| span.to_vec())
            };
            let p: Properties =
                serde_amqp::from_slice(&section(section::PROPERTIES).unwrap()).unwrap();
            assert_eq!(p.to.as_deref(), Some(topic));
            let a: MessageAnnotations =
                serde_amqp::from_slice(&section(section::MESSAGE_ANNOTATIONS).unwrap()).unwrap();
            let get = |k: &str| a.0.get(&OwnedKey::Symbol(Symbol::from(k))).cloned();
            assert_eq!(get(ANN_QOS), Some(Value::Ubyte(qos)));
            assert_eq!(get(ANN_CLIENT), Some(Value::String("mqtt:c".into())));
            assert_eq!(get(ANN_RETAIN), retain.then_some(Value::Bool(true)));
            match with {
                None => {
                    assert!(section(section::HEADER).is_none());
                    assert_eq!(
                        (p.reply_to, p.correlation_id, p.content_type),
                        (None, None, None)
                    );
                }
                Some(_) => {
                    let h: Header =
                        serde_amqp::from_slice(&section(section::HEADER).unwrap()).unwrap();
                    assert!(h.durable);
                    assert_eq!(h.ttl, Some(5000));
                    assert_eq!(p.reply_to.as_deref(), Some("r"));
                    assert_eq!(
                        p.correlation_id,
                        Some(MessageId::Binary(
                            flotilla_amqp::types::primitives::Binary::from(vec![0, 1])
                        ))
                    );
                    assert_eq!(p.content_type, Some(Symbol::from("text/plain")));
                }
            }
        }
    }

    #[test]
    fn sections_another_encoder_wrote_read_the_same() {
        // fe2o3's encoder, and ids of kinds the in-place reader leaves to it.
        let mut ann = MessageAnnotations::default();
        ann.insert(
            OwnedKey::Symbol(Symbol::from(ANN_CLIENT)),
            Value::String("mqtt:x".into()),
        );
        ann.insert(OwnedKey::Symbol(Symbol::from(ANN_QOS)), Value::Ubyte(2));
        ann.insert(
            OwnedKey::Symbol(Symbol::from(ANN_RETAIN)),
            Value::Bool(true),
        );
        ann.insert(OwnedKey::Ulong(7), Value::Ulong(7));
        for correlation in [MessageId::Ulong(42), MessageId::String("c-1".into())] {
            let mut m = BytesMut::new();
            put_section(
                &mut m,
                &Header {
                    durable: true,
                    ttl: Some(1500),
                    delivery_count: 2,
                    ..Default::default()
                },
            );
            put_section(&mut m, &ann);
            put_section(
                &mut m,
                &Properties {
                    to: Some("x/y".into()),
                    reply_to: Some("back".into()),
                    correlation_id: Some(correlation.clone()),
                    content_type: Some(Symbol::from("text/plain")),
                    absolute_expiry_time: Some(Timestamp::from_milliseconds(9_000)),
                    ..Default::default()
                },
            );
            m.put_slice(&[0x00, 0x53, 0x75, 0xa0, 0x01, b'z']);
            let o = from_amqp(&m.freeze(), 1_000).unwrap();
            assert_eq!((o.qos, o.retain, o.redelivered), (2, true, true));
            assert_eq!(o.client.as_deref(), Some("mqtt:x"));
            assert_eq!(o.topic.as_deref(), Some("x/y"));
            assert_eq!(o.response_topic.as_deref(), Some("back"));
            assert_eq!(o.correlation, Some(message_id_bytes(&correlation)));
            assert_eq!(o.content_type.as_deref(), Some("text/plain"));
            assert_eq!(o.expires_ms, 9_000);
            assert_eq!(&o.payload[..], b"z");
        }
    }

    #[test]
    fn cloudevents_attributes_cross_both_bindings() {
        let mut props = MqttProps::default();
        for (k, v) in [
            ("specversion", "1.0"),
            ("type", "com.example.t"),
            ("source", "/s"),
            ("id", "1"),
        ] {
            props.add_user_property(k.into(), v.into());
        }
        let m = to_amqp(&Inbound {
            topic: "t",
            qos: 1,
            retain: false,
            client: "c",
            properties: Some(&props),
            payload: b"{}",
        });
        let ap = section_spans(&m)
            .filter_map(Result::ok)
            .find(|(c, _)| *c == section::APPLICATION_PROPERTIES)
            .map(|(_, span)| serde_amqp::from_slice::<ApplicationProperties>(span).unwrap())
            .unwrap();
        assert_eq!(
            ap.0.get("cloudEvents:type"),
            Some(&SimpleValue::String("com.example.t".into()))
        );
        assert_eq!(
            ap.0.get("cloudEvents:specversion"),
            Some(&SimpleValue::String("1.0".into()))
        );
        // And back: the bare names again.
        let o = from_amqp(&m, 0).unwrap();
        assert!(o
            .user_properties
            .contains(&("type".to_string(), "com.example.t".to_string())));
        assert!(o
            .user_properties
            .contains(&("specversion".to_string(), "1.0".to_string())));
    }

    #[test]
    fn amqp_bodies_become_payloads() {
        let text = flotilla_amqp::message::encode_message(&flotilla_amqp::message::MessageParts {
            to: Some("t"),
            body: b"hello",
            text: true,
            ..Default::default()
        });
        let o = from_amqp(&text, 0).unwrap();
        assert_eq!((&o.payload[..], o.utf8, o.qos), (&b"hello"[..], true, 1));
        let data = flotilla_amqp::message::encode_message(&flotilla_amqp::message::MessageParts {
            body: &[1, 2, 3],
            ..Default::default()
        });
        let o = from_amqp(&data, 0).unwrap();
        assert_eq!(
            (&o.payload[..], o.utf8, o.topic),
            (&[1u8, 2, 3][..], false, None)
        );
        // Two data sections are joined.
        let mut two = BytesMut::from(&data[..]);
        two.put_slice(&[0x00, 0x53, 0x75, 0xa0, 0x01, 4]);
        let o = from_amqp(&two.freeze(), 0).unwrap();
        assert_eq!(&o.payload[..], &[1, 2, 3, 4]);
    }

    proptest::proptest! {
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = from_amqp(&Bytes::from(bytes), 0);
        }
    }
}
