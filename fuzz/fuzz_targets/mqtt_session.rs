//! The gateway's MQTT session state machine (sans I/O) driven by arbitrary
//! packets from the client and events from the router, in any order: it
//! must never panic, whatever the two sides do.
#![no_main]

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flotilla_amqp::connection::DeliveryRef;
use flotilla_amqp::message::{encode_message, MessageParts};
use flotilla_amqp::policy::{Policy, Principal};
use flotilla_core::config::Tenancy;
use flotilla_mqtt_gateway::codec::read_packet;
use flotilla_mqtt_gateway::session::{Limits, Session, Setup};
use flotilla_mqtt_gateway::upstream::{Ev, Outcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let version = if head & 1 == 0 { 4 } else { 5 };
    let persistent = head & 2 != 0;
    let policy = Policy::new(Tenancy::zero_config());
    let principal = Principal {
        space: "default".into(),
        user: None,
        rules: flotilla_core::config::allow_all_shared(),
        token: None,
        expires_at: None,
    };
    let mut s = Session::new(
        Setup {
            key: 1,
            version,
            client_id: "fuzz".into(),
            space: Arc::from("default"),
            principal,
            persistent,
            expiry: if persistent { 60 } else { 0 },
            client_receive_max: 4,
            client_max_packet: 4096,
            client_alias_max: 4,
            session_tag: persistent.then_some(1),
        },
        Arc::new(Limits::default()),
        Arc::new(policy),
        Arc::default(),
        None,
    );
    let mut packets = BytesMut::new();
    let mut delivery = 0u32;
    while let Some((&op, r)) = rest.split_first() {
        rest = r;
        let arg = rest.first().copied().unwrap_or(0);
        match op % 8 {
            0 | 1 => {
                // Client bytes: a length, then that many bytes.
                let tail = rest.get(1..).unwrap_or(&[]);
                let n = usize::from(arg).min(tail.len());
                packets.extend_from_slice(&tail[..n]);
                rest = &tail[n..];
                while let Ok(Some(p)) = read_packet(&mut packets, Some(version), 1 << 16) {
                    s.on_packet(p);
                }
            }
            2 => s.on_event(Ev::Attached {
                tag: u32::from(arg % 8),
                resumed: arg & 0x80 != 0,
                meta: None,
            }),
            3 => s.on_event(Ev::Outcome {
                token: u32::from(arg % 16),
                outcome: match arg >> 6 {
                    0 => Outcome::Accepted,
                    1 => Outcome::Released,
                    _ => Outcome::Rejected("amqp:not-allowed".into(), "no".into()),
                },
            }),
            4 => {
                delivery += 1;
                let body = rest.get(1..(1 + usize::from(arg % 32)).min(rest.len())).unwrap_or(&[]);
                let to = ["a/b", "a", "$SYS/x", "a/+", ""][usize::from(arg % 5)];
                let message = encode_message(&MessageParts {
                    to: (!to.is_empty()).then_some(to),
                    durable: arg & 0x40 != 0,
                    body,
                    ..Default::default()
                });
                s.on_event(Ev::Message {
                    tag: u32::from(arg % 8),
                    delivery: DeliveryRef { channel: 0, delivery_id: delivery },
                    settled: arg & 0x20 != 0,
                    payload: if arg & 0x10 != 0 { Bytes::copy_from_slice(body) } else { message },
                });
            }
            5 => s.on_event(Ev::Detached { tag: u32::from(arg % 8), error: None }),
            6 => s.flush_credit(),
            _ => {
                s.wbuf.clear();
                s.cmds.clear();
            }
        }
        // As the connection does between batches of work.
        s.tidy();
        if s.close.is_some() {
            break;
        }
    }
    s.end();
});
