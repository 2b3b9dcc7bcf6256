//! `event_log_seed OUT`: writes a seed for the `event_log` fuzz target (`scripts/fuzz.sh`):
//! the commit point (8 bytes, LE) and a segment file of the collector's event log holding two
//! blocks of realistic events, made by the log's own encoder.

use keytrail_collector::store::events::EventLog;
use keytrail_common::event::{Event, EventType};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: event_log_seed OUT"));
    let dir = std::env::temp_dir().join(format!("kt-event-log-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = EventLog::open(&dir, (7, 11), 0, 1).expect("opening a fresh log");
    let mut first = 0u64;
    for block in 0..2u64 {
        let events: Vec<Event> = (0..6u64)
            .map(|i| {
                let mut e = Event::new(
                    format!("seed-{block}-{i}"),
                    EventType::Validated,
                    1_795_000_000_000_000_000 + (i * 1_000_000_000) as i64,
                    "seed-agent",
                );
                e.license = Some(format!("lk_seed{}", i % 3));
                e.plan = Some("pro".into());
                e
            })
            .collect();
        let hashed: Vec<(&Event, u128)> = events.iter().map(|e| (e, log.hash_id(&e.id))).collect();
        let appended = log.append(first, 1_795_000_000_000_000_000, &hashed).expect("append");
        log.publish(appended);
        first += events.len() as u64;
    }
    drop(log);
    let segment = std::fs::read_dir(&dir)
        .expect("the log's folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment file");
    let mut seed = first.to_le_bytes().to_vec();
    seed.extend(std::fs::read(&segment).expect("reading the segment"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("creating the seed folder");
    }
    std::fs::write(&out, seed).expect("writing the seed");
    let _ = std::fs::remove_dir_all(&dir);
}
