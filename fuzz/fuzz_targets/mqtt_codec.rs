//! The MQTT packet decoder on arbitrary bytes: as a first packet (CONNECT,
//! either protocol level) and as later packets of 3.1.1 and 5.0.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(4u8), Some(5u8)] {
        let mut buf = BytesMut::from(data);
        // Every packet the bytes hold, until one is refused or more are needed.
        for _ in 0..64 {
            match flotilla_mqtt_gateway::codec::read_packet(&mut buf, version, 1 << 16) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
