//! What a gateway tells the last-will service about its clients' wills
//! (lwt-service/ARCHITECTURE.md has the whole protocol).
//!
//! The gateway sends these on its `$lwt` link in each space, unsettled:
//! the service accepts one once it is on disk. Each is an AMQP message
//! whose application properties say what happened (`op`, `client`,
//! `reg`, …); a registration's body is one data section holding the will
//! as the gateway would have published it.
//!
//! - `register`: the client connected with a will (it replaces any will
//!   the client had, whichever gateway registered it).
//! - `cancel`: the client disconnected gracefully: the will is deleted.
//! - `fire`: the client's connection was lost: the will is published
//!   after its delay, unless the client registers again first.
//! - `connected`: the client connected again without a will: a will of
//!   its earlier connection still waiting out its delay is not published.
//! - `synced`: every live client of this link has been registered (again,
//!   after the link was re-attached): wills the link held before and that
//!   were not registered again belong to clients lost meanwhile.
//!
//! `reg` names one registration, so that a `cancel` or `fire` of a
//! connection that was taken over never touches its successor's will.

use bytes::{BufMut, Bytes, BytesMut};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::SimpleValue;

/// The address wills are registered at, in every space.
pub const ADDRESS: &str = "$lwt";

/// A will, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub client: String,
    pub reg: String,
    /// The client's user (its authorization applies when the will goes).
    pub user: Option<String>,
    /// A token user's claims (JSON): the will is authorized by them.
    pub claims: Option<String>,
    /// Where the will goes (an MQTT topic: an address of the space).
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    /// Seconds to wait after the loss before publishing.
    pub delay: u32,
    /// The will as an AMQP message.
    pub message: Bytes,
}

/// One thing a gateway tells the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Register(Registration),
    Cancel {
        client: String,
        reg: String,
    },
    /// `asked`: the client asked for it (MQTT 5 DISCONNECT 0x04).
    Fire {
        client: String,
        reg: String,
        asked: bool,
    },
    Connected {
        client: String,
    },
    Synced,
}

fn s(v: &str) -> SimpleValue {
    SimpleValue::String(v.to_string())
}

/// Encodes an operation as an AMQP message.
pub fn encode(op: &Op) -> Bytes {
    let mut ap = ApplicationProperties::default();
    let mut body: &[u8] = &[];
    match op {
        Op::Register(r) => {
            ap.insert("op".into(), s("register"));
            ap.insert("client".into(), s(&r.client));
            ap.insert("reg".into(), s(&r.reg));
            if let Some(u) = &r.user {
                ap.insert("user".into(), s(u));
            }
            if let Some(c) = &r.claims {
                ap.insert("claims".into(), s(c));
            }
            ap.insert("topic".into(), s(&r.topic));
            ap.insert("qos".into(), SimpleValue::Ubyte(r.qos));
            ap.insert("retain".into(), SimpleValue::Bool(r.retain));
            ap.insert("delay".into(), SimpleValue::Uint(r.delay));
            body = &r.message;
        }
        Op::Cancel { client, reg } => {
            ap.insert("op".into(), s("cancel"));
            ap.insert("client".into(), s(client));
            ap.insert("reg".into(), s(reg));
        }
        Op::Fire { client, reg, asked } => {
            ap.insert("op".into(), s("fire"));
            ap.insert("client".into(), s(client));
            ap.insert("reg".into(), s(reg));
            if *asked {
                ap.insert("asked".into(), SimpleValue::Bool(true));
            }
        }
        Op::Connected { client } => {
            ap.insert("op".into(), s("connected"));
            ap.insert("client".into(), s(client));
        }
        Op::Synced => {
            ap.insert("op".into(), s("synced"));
        }
    }
    let mut out = BytesMut::with_capacity(body.len() + 128);
    match serde_amqp::to_vec(&ap) {
        Ok(b) => out.put_slice(&b),
        Err(e) => tracing::error!(error = %e, "cannot encode a will operation"),
    }
    out.put_slice(&[0x00, 0x53, 0x75, 0xb0]);
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.freeze()
}

/// Decodes an operation a gateway sent.
///
/// # Errors
/// What is missing or malformed.
pub fn decode(message: &Bytes) -> Result<Op, String> {
    let mut ap: Option<ApplicationProperties> = None;
    let mut body: Option<Bytes> = None;
    for span in flotilla_amqp::message::section_spans(message) {
        let (code, span) = span.map_err(|e| format!("malformed message: {}", e.0))?;
        match code {
            0x74 => {
                ap = Some(
                    flotilla_amqp::frame::decode_checked(span)
                        .map_err(|e| format!("malformed application properties: {e}"))?,
                );
            }
            0x75 => {
                // A data section: descriptor (3 bytes), then binary.
                let (start, len) = match span.get(3) {
                    Some(0xa0) => (5, usize::from(*span.get(4).unwrap_or(&0))),
                    Some(0xb0) if span.len() >= 8 => (
                        8,
                        u32::from_be_bytes([span[4], span[5], span[6], span[7]]) as usize,
                    ),
                    _ => return Err("malformed data section".into()),
                };
                if span.len() < start + len {
                    return Err("malformed data section".into());
                }
                let offset = span.as_ptr() as usize - message.as_ptr() as usize;
                body = Some(message.slice(offset + start..offset + start + len));
            }
            _ => {}
        }
    }
    let ap = ap.ok_or("no application properties")?;
    let text = |k: &str| match ap.0.get(k) {
        Some(SimpleValue::String(v)) => Some(v.clone()),
        _ => None,
    };
    let need = |k: &str| text(k).ok_or_else(|| format!("no {k:?}"));
    match text("op").as_deref() {
        Some("register") => {
            let qos = match ap.0.get("qos") {
                Some(SimpleValue::Ubyte(q)) if *q <= 2 => *q,
                _ => return Err("no valid \"qos\"".into()),
            };
            let retain = matches!(ap.0.get("retain"), Some(SimpleValue::Bool(true)));
            let delay = match ap.0.get("delay") {
                Some(SimpleValue::Uint(d)) => *d,
                _ => 0,
            };
            Ok(Op::Register(Registration {
                client: need("client")?,
                reg: need("reg")?,
                user: text("user"),
                claims: text("claims"),
                topic: need("topic")?,
                qos,
                retain,
                delay,
                message: body.ok_or("a registration needs the will as its body")?,
            }))
        }
        Some("cancel") => Ok(Op::Cancel {
            client: need("client")?,
            reg: need("reg")?,
        }),
        Some("fire") => Ok(Op::Fire {
            client: need("client")?,
            reg: need("reg")?,
            asked: matches!(ap.0.get("asked"), Some(SimpleValue::Bool(true))),
        }),
        Some("connected") => Ok(Op::Connected {
            client: need("client")?,
        }),
        Some("synced") => Ok(Op::Synced),
        Some(other) => Err(format!("unknown op {other:?}")),
        None => Err("no \"op\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_decodes_as_encoded() {
        let big = Bytes::from(vec![7u8; 300]);
        let ops = [
            Op::Register(Registration {
                client: "c1".into(),
                reg: "gw/1/2".into(),
                user: Some("alice@oidc".into()),
                claims: Some(r#"{"roles":["app"],"jti":"t1"}"#.into()),
                topic: "status/c1".into(),
                qos: 1,
                retain: true,
                delay: 5,
                message: big,
            }),
            Op::Register(Registration {
                client: "c2".into(),
                reg: "gw/1/3".into(),
                user: None,
                claims: None,
                topic: "t".into(),
                qos: 0,
                retain: false,
                delay: 0,
                message: Bytes::from_static(b"\x00\x53\x77\xa1\x01x"),
            }),
            Op::Cancel {
                client: "c1".into(),
                reg: "r".into(),
            },
            Op::Fire {
                client: "c1".into(),
                reg: "r".into(),
                asked: false,
            },
            Op::Fire {
                client: "c1".into(),
                reg: "r".into(),
                asked: true,
            },
            Op::Connected {
                client: "c1".into(),
            },
            Op::Synced,
        ];
        for op in ops {
            assert_eq!(decode(&encode(&op)).unwrap(), op);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for b in [
            &b""[..],
            b"\x00\x53\x74",
            b"\x00\x53\x75\xb0\xff\xff\xff\xff",
        ] {
            assert!(decode(&Bytes::copy_from_slice(b)).is_err());
        }
    }
}
