//! The broker's message selectors on arbitrary input: the text before the
//! first 0x00 byte is parsed as a selector, and the bytes from that 0x00
//! on (every message starts with a section's 0x00) are the message it is
//! evaluated against. Parse errors are fine; panics, stack overflows and
//! large allocations are not.
#![no_main]

use flotilla_broker::selector::{MessageFields, Selector};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (text, message) = data.split_at(split);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let fields = MessageFields::from_message(message);
    if let Ok(selector) = Selector::parse(text) {
        let _ = selector.matches(&fields);
    }
});
