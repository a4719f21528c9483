//! What the broker decodes besides frames and selectors, on arbitrary
//! input: journal records as recovery reads them (the input cut into
//! records at each 0xff byte), a transaction coordinator's message
//! (`declare`/`discharge`), and a stored message as the console's queue
//! browser shows it. Errors and skipped records are fine; panics and
//! large allocations are not.
#![no_main]

use bytes::Bytes;
use flotilla_broker::journal::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let records: Vec<Record> = data
        .split(|&b| b == 0xff)
        .enumerate()
        .map(|(i, p)| Record {
            seq: i as u64 + 1,
            payload: Bytes::copy_from_slice(p),
        })
        .collect();
    let _ = flotilla_broker::store::recover_records(records);
    let _ = flotilla_broker::txn::decode(data);
    let _ = flotilla_broker::inspect::describe(data);
});
