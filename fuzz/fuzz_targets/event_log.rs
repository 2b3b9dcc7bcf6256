//! A segment file of the collector's event log with arbitrary content, opened with the commit
//! point the first 8 bytes give: opening either fails with a message or gives a log whose
//! reads (every event, a page, a license page, single events) all work without a panic.
#![no_main]

use keytrail_collector::store::events::EventLog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let committed = u64::from_le_bytes(data[..8].try_into().unwrap()) % 100_000;
    let dir = std::env::temp_dir().join(format!("kt-fuzz-event-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("00000000000000000000.seg"), &data[8..]).unwrap();
    match EventLog::open(&dir, (7, 11), committed, 1) {
        Ok(log) => {
            let mut n = 0u64;
            log.for_each(|_, _| n += 1);
            assert!(n <= committed);
            let _ = log.page(None, i64::MIN, (i64::MAX, u64::MAX), 50, &|_| true);
            let _ = log.page(Some("lk_seed0"), i64::MIN, (i64::MAX, u64::MAX), 50, &|_| true);
            for seq in 0..committed.min(64) {
                let _ = log.event(seq);
            }
            let _ = log.next_after("lk_seed1", i64::MIN, u64::MAX, &|_| true);
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
