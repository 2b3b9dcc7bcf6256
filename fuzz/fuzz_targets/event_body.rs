//! An ingest body as the agent's `POST /v1/events` receives it, as JSON and as NDJSON: events
//! or an error naming what was wrong, never a panic; accepted events are within the limits.
#![no_main]

use keytrail_common::event::{parse_body, BodyFormat, Context, FixedDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fp = Fingerprinter::new(b"fuzz-secret".to_vec());
    let d = FixedDefaults {
        agent_id: "fuzz-agent".into(),
        context: Context::default(),
        now: 1_795_000_000_000_000_000,
    };
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        match parse_body(data, format, &fp, &d, 100) {
            Ok(events) => {
                assert!(events.len() <= 100);
                for e in &events {
                    assert!(e.check_limits().is_ok(), "accepted an event over the limits: {e:?}");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
