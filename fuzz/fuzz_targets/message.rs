//! The message section scanner (anonymous relay's `to`, bodies) on
//! arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flotilla_amqp::message::to_address(data);
    let _ = flotilla_amqp::message::reply_to(data);
    let _ = flotilla_amqp::message::body_bytes(data);
});
