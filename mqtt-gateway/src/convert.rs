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
use flotilla_amqp::message::{section, section_spans};
use flotilla_amqp::types::messaging::{
    ApplicationProperties, Header, MessageAnnotations, MessageId, Properties,
};
use flotilla_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
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

/// Encodes an MQTT publication as an AMQP message.
pub fn to_amqp(m: &Inbound<'_>) -> Bytes {
    let props = m.properties;
    let get = |id: PropertyId| props.and_then(|p| p.get(id));
    let mut out = BytesMut::with_capacity(m.payload.len() + m.topic.len() + 96);
    let expiry = match get(PropertyId::MessageExpiryInterval) {
        Some(PropertyValue::FourByteInteger(s)) => Some(*s),
        _ => None,
    };
    if m.qos > 0 || expiry.is_some() {
        put_section(
            &mut out,
            &Header {
                durable: m.qos > 0,
                ttl: expiry.map(|s| s.saturating_mul(1000)),
                ..Default::default()
            },
        );
    }
    let mut ann = MessageAnnotations::default();
    let sym = |s: &str| OwnedKey::Symbol(Symbol::from(s));
    ann.insert(sym(ANN_CLIENT), Value::String(m.client.to_string()));
    // Also at QoS 0: a broker hands those to MQTT sessions settled.
    ann.insert(sym(ANN_QOS), Value::Ubyte(m.qos));
    if m.retain {
        ann.insert(sym(ANN_RETAIN), Value::Bool(true));
    }
    if matches!(
        get(PropertyId::PayloadFormatIndicator),
        Some(PropertyValue::Byte(1))
    ) {
        ann.insert(sym(ANN_PFI), Value::Ubyte(1));
    }
    put_section(&mut out, &ann);
    let text = |id| match get(id) {
        Some(PropertyValue::Utf8String(s)) => Some(s.clone()),
        _ => None,
    };
    let p = Properties {
        to: Some(m.topic.to_string()),
        reply_to: text(PropertyId::ResponseTopic),
        correlation_id: match get(PropertyId::CorrelationData) {
            Some(PropertyValue::BinaryData(b)) => Some(MessageId::Binary(Binary::from(b.to_vec()))),
            _ => None,
        },
        content_type: text(PropertyId::ContentType).map(Symbol::from),
        ..Default::default()
    };
    put_section(&mut out, &p);
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

/// A simple AMQP value as text.
/// `ms` since the Unix epoch as RFC 3339 (UTC, milliseconds).
fn rfc3339(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
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
            section::HEADER => {
                let h: Header = serde_amqp::from_slice(span).ok()?;
                ttl = h.ttl;
                o.redelivered = h.delivery_count > 0;
            }
            section::MESSAGE_ANNOTATIONS => {
                let a: MessageAnnotations = serde_amqp::from_slice(span).ok()?;
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
                let p: Properties = serde_amqp::from_slice(span).ok()?;
                o.topic = p.to;
                o.response_topic = p.reply_to;
                o.correlation = p.correlation_id.as_ref().map(message_id_bytes);
                o.content_type = p.content_type.map(|s| s.as_str().to_string());
                if let Some(t) = p.absolute_expiry_time {
                    o.expires_ms = u64::try_from(t.milliseconds()).unwrap_or(0);
                }
            }
            section::APPLICATION_PROPERTIES => {
                let ap: ApplicationProperties = serde_amqp::from_slice(span).ok()?;
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
                                (Some(_), SimpleValue::Timestamp(t)) => rfc3339(t.milliseconds()),
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
                let v: Value = serde_amqp::from_slice(&span[3..]).ok()?;
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
                let v: Value = serde_amqp::from_slice(&span[3..]).ok()?;
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
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
