//! A batch frame as the collector receives it: any bytes must give a batch or an error, never a
//! panic, and never more than the limits allow.
#![no_main]

use keytrail_common::wire::{decode_frame, DecodeLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits {
        max_frame_bytes: 1 << 20,
        max_uncompressed_bytes: 4 << 20,
        max_events: 10_000,
    };
    if let Ok(batch) = decode_frame(data, &limits) {
        assert!(batch.events.len() <= limits.max_events as usize);
    }
});
