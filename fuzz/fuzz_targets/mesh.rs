//! What a neighbour router sends: the routing header in front of each
//! meshed message, and the JSON control messages (HELLO, link state,
//! addresses). Decoders never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((h, len)) = flotilla_router::mesh::peer::Header::decode(data) {
        assert!(len <= data.len());
        let again = h.encode();
        assert_eq!(flotilla_router::mesh::peer::Header::decode(&again).map(|(x, _)| x), Some(h));
    }
    let _ = serde_json::from_slice::<flotilla_router::mesh::Control>(data);
});
