//! The records inside a frame (past the checksum a random frame rarely gets through): any
//! payload must decode or fail cleanly, within the event cap, and re-encode to what it read.
#![no_main]

use keytrail_common::wire::{append_event, decode_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = decode_payload(data, "fuzz-agent", 1000) {
        assert!(events.len() <= 1000);
        // What decodes is a valid event, and encoding it again decodes to the same.
        let mut again = Vec::new();
        for e in &events {
            assert!(e.check_limits().is_ok(), "decoded an event over the limits: {e:?}");
            append_event(e, &mut again);
        }
        let round = decode_payload(&again, "fuzz-agent", 1000).expect("re-encoded events decode");
        assert_eq!(round, events);
    }
});
