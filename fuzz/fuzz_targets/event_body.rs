//! An ingest body as the agent's `POST /v1/events` receives it, as JSON and as NDJSON: events
//! or an error naming what was wrong, never a panic; accepted events are within the limits and
//! carry no raw license key.
#![no_main]

use keytrail_common::event::{parse_body, BodyFormat, Context, IngestDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::time::UnixNanos;
use libfuzzer_sys::fuzz_target;

struct Defaults(Context);

impl IngestDefaults for Defaults {
    fn agent_id(&self) -> &str {
        "fuzz-agent"
    }
    fn context(&self) -> &Context {
        &self.0
    }
    fn now(&self) -> UnixNanos {
        1_795_000_000_000_000_000
    }
    fn new_event_id(&self) -> String {
        "generated-id".into()
    }
}

fuzz_target!(|data: &[u8]| {
    let fp = Fingerprinter::new(b"fuzz-secret".to_vec());
    let d = Defaults(Context::default());
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
