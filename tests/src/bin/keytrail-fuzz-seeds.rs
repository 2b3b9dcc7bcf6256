//! `keytrail-fuzz-seeds DIR`: writes seed inputs for the wire fuzz targets (`scripts/fuzz.sh`):
//! a valid record payload and a valid sealed frame of realistic events, made by the project's
//! own encoder, so the fuzzer starts from inputs that get past the checksum and the header.

use keytrail_common::event::{parse_body, BodyFormat, Context, FixedDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::wire::{self, BatchSeq};
use keytrail_tests::traffic::Traffic;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let fp = Fingerprinter::new(b"seed-secret".to_vec());
    let mut t = Traffic::new(3, 20);
    let body: String = (0..8).map(|_| t.event() + "\n").collect();
    let events = parse_body(
        body.as_bytes(),
        BodyFormat::Ndjson,
        &fp,
        &FixedDefaults {
            agent_id: "seed-agent".into(),
            context: Context::default(),
            now: 1_795_000_000_000_000_000,
        },
        100,
    )
    .unwrap_or_else(|e| panic!("seed events: {e}"));
    let mut payload = Vec::new();
    for e in &events {
        wire::append_event(e, &mut payload);
    }
    let frame = wire::seal_frame("seed-agent", BatchSeq(1), events.len() as u32, &payload, 3);
    for (sub, name, bytes) in [
        ("wire_payload", "valid.bin", &payload),
        ("wire_frame", "valid.bin", &frame),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        std::fs::write(d.join(name), bytes).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
}
