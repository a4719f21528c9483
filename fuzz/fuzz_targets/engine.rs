//! The connection engine fed arbitrary frames after a valid Open: errors
//! are fine, panics are not.
#![no_main]

use bytes::BytesMut;
use flotilla_amqp::connection::{Connection, ConnectionConfig, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut conn = Connection::new(ConnectionConfig::default());
    let mut buf = BytesMut::from(data);
    let mut events = Vec::new();
    while let Ok(Some(frame)) = flotilla_amqp::frame::decode_frame(&mut buf, 1 << 16) {
        if conn.handle_frame(frame, &mut events).is_err() {
            break;
        }
        for e in events.drain(..) {
            match e {
                Event::Open(_) => conn.open(),
                Event::Attach { link, reply: false, .. } => {
                    conn.accept_attach(link, Default::default());
                    conn.flow(link, 10, false);
                }
                _ => {}
            }
        }
        let _ = conn.take_output();
    }
});
