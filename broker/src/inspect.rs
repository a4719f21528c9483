//! A stored message as a person reads it (the console's queue browser):
//! its header, annotations, properties and application properties as
//! JSON, and the start of its body.

use base64::Engine as _;
use flotilla_amqp::message::{section, sections};
use serde_amqp::Value;
use serde_json::{json, Map, Value as Json};

/// How much of a body is shown.
const PREVIEW: usize = 256;

/// The message's sections as JSON (sections that do not decode are left
/// out; the body is cut to its first bytes).
pub fn describe(message: &[u8]) -> Json {
    let mut out = Map::new();
    for s in sections(message) {
        let Ok(s) = s else { break };
        // Checked first: serde_amqp panics on a map with an odd count and
        // allocates declared sizes before reading (a stored message is a
        // client's bytes).
        let value = || flotilla_amqp::frame::decode_checked::<Value>(s.value).ok();
        match s.code {
            section::HEADER => {
                if let Some(Value::List(items)) = value() {
                    let field = |i: usize| items.get(i).map(to_json).unwrap_or(Json::Null);
                    out.insert(
                        "header".into(),
                        json!({
                            "durable": field(0),
                            "priority": field(1),
                            "ttl": field(2),
                            "deliveryCount": field(4),
                        }),
                    );
                }
            }
            section::DELIVERY_ANNOTATIONS | section::MESSAGE_ANNOTATIONS => {
                if let Some(v) = value() {
                    let key = if s.code == section::MESSAGE_ANNOTATIONS {
                        "annotations"
                    } else {
                        "deliveryAnnotations"
                    };
                    out.insert(key.into(), to_json(&v));
                }
            }
            section::PROPERTIES => {
                if let Some(Value::List(items)) = value() {
                    const NAMES: [&str; 13] = [
                        "messageId",
                        "userId",
                        "to",
                        "subject",
                        "replyTo",
                        "correlationId",
                        "contentType",
                        "contentEncoding",
                        "absoluteExpiryTime",
                        "creationTime",
                        "groupId",
                        "groupSequence",
                        "replyToGroupId",
                    ];
                    let props: Map<String, Json> = items
                        .iter()
                        .zip(NAMES)
                        .filter(|(v, _)| !matches!(v, Value::Null))
                        .map(|(v, n)| (n.to_string(), to_json(v)))
                        .collect();
                    out.insert("properties".into(), Json::Object(props));
                }
            }
            section::APPLICATION_PROPERTIES => {
                if let Some(v) = value() {
                    out.insert("applicationProperties".into(), to_json(&v));
                }
            }
            section::DATA => {
                // One data section's bytes: 0xa0 len8 or 0xb0 len32.
                let bytes = match s.value {
                    [0xa0, _, b @ ..] => b,
                    [0xb0, _, _, _, _, b @ ..] => b,
                    _ => &[][..],
                };
                out.entry("body").or_insert_with(|| preview_bytes(bytes));
            }
            section::AMQP_VALUE | section::AMQP_SEQUENCE => {
                if let Some(v) = value() {
                    let body = match v {
                        Value::String(t) => json!({"text": cut(&t)}),
                        other => {
                            let text = to_json(&other).to_string();
                            json!({"value": cut(&text)})
                        }
                    };
                    out.entry("body").or_insert(body);
                }
            }
            _ => {}
        }
    }
    Json::Object(out)
}

fn cut(t: &str) -> String {
    if t.len() <= PREVIEW {
        return t.to_string();
    }
    let mut end = PREVIEW;
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &t[..end])
}

fn preview_bytes(b: &[u8]) -> Json {
    let head = &b[..b.len().min(PREVIEW)];
    match std::str::from_utf8(head) {
        Ok(t) => json!({"text": cut(t), "size": b.len()}),
        Err(_) => json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(head),
            "size": b.len(),
        }),
    }
}

/// An AMQP value as JSON: maps become objects (keys as text), binary as
/// base64, described values their value.
fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Ubyte(n) => json!(n),
        Value::Ushort(n) => json!(n),
        Value::Uint(n) => json!(n),
        Value::Ulong(n) => json!(n),
        Value::Byte(n) => json!(n),
        Value::Short(n) => json!(n),
        Value::Int(n) => json!(n),
        Value::Long(n) => json!(n),
        Value::Float(f) => json!(f.into_inner()),
        Value::Double(f) => json!(f.into_inner()),
        Value::Char(c) => json!(c.to_string()),
        Value::Timestamp(t) => json!(t.milliseconds()),
        Value::Uuid(u) => json!(format!("{u:?}")),
        Value::Binary(b) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::String(s) => json!(s),
        Value::Symbol(s) => json!(s.0),
        Value::List(l) => Json::Array(l.iter().map(to_json).collect()),
        Value::Array(a) => Json::Array(a.0.iter().map(to_json).collect()),
        Value::Map(m) => {
            let o: Map<String, Json> = m
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        Value::Symbol(s) => s.0.clone(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect();
            Json::Object(o)
        }
        Value::Described(d) => to_json(&d.value),
        other => json!(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_amqp::message::{encode_message, MessageParts};

    #[test]
    fn a_malformed_stored_value_is_left_out_not_a_panic() {
        // amqp-value: a map8 that says 1 item (a key without its value),
        // and one declaring a 4 GiB string.
        for bytes in [
            &[0x00, 0x53, 0x77, 0xc1, 0x01, 0x01][..],
            &[0x00, 0x53, 0x77, 0xb1, 0xff, 0xff, 0xff, 0xff, b'x'][..],
        ] {
            assert!(describe(bytes).get("body").is_none());
        }
    }

    #[test]
    fn a_message_reads_as_json_with_its_body_cut() {
        let long = "x".repeat(1000);
        let m = encode_message(&MessageParts {
            durable: true,
            message_id: Some("m1"),
            to: Some("orders"),
            body: long.as_bytes(),
            text: true,
            ..Default::default()
        });
        let d = describe(&m);
        assert_eq!(d["header"]["durable"], true);
        assert_eq!(d["properties"]["messageId"], "m1");
        assert_eq!(d["properties"]["to"], "orders");
        assert!(d["body"]["text"].as_str().unwrap().len() < 300);
        let bin = encode_message(&MessageParts {
            body: &[0xff, 0xfe, 0x00],
            ..Default::default()
        });
        assert_eq!(describe(&bin)["body"]["base64"], "//4A");
        assert_eq!(describe(b"\x00\x53"), json!({}));
    }
}
