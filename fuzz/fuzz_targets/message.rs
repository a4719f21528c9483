//! The message section scanner (anonymous relay's `to`, bodies) on
//! arbitrary bytes, and the gateway's reading of an AMQP message for an
//! MQTT subscriber (any AMQP client can send one).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flotilla_amqp::message::to_address(data);
    let _ = flotilla_amqp::message::reply_to(data);
    let _ = flotilla_amqp::message::body_bytes(data);
    let _ = flotilla_mqtt_gateway::convert::from_amqp(&bytes::Bytes::copy_from_slice(data), 0);
});
