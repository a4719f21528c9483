//! The last-will service's decoders: what a gateway sends on its `$lwt`
//! link, and a will as the store reads it back. Neither may panic; what
//! decodes must encode back to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(op) = flotilla_mqtt_gateway::lwt::decode(&b) {
        let again = flotilla_mqtt_gateway::lwt::encode(&op);
        assert_eq!(flotilla_mqtt_gateway::lwt::decode(&again).ok(), Some(op));
    }
    if let Some(w) = flotilla_lwt_service::store::decode(data) {
        let again = flotilla_lwt_service::store::encode(&w);
        assert_eq!(flotilla_lwt_service::store::decode(&again), Some(w));
    }
});
