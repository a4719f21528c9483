//! The frame decoder on arbitrary bytes: never panics, and every frame it
//! returns came from a whole frame's bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = flotilla_amqp::frame::decode_frame(&mut buf, 1 << 16) {}
});
