//! Damage to the agent's buffer on disk (issue 5): with events buffered (the collector away),
//! the agent is SIGKILLed, one of its files is damaged, and it is started again. Each time it
//! must come up (no crash loop), say what it moved aside or counted, take new events and
//! deliver them. Offsets and lengths are drawn from a printed seed (`KT_FAULT_SEED` replays
//! it).
//!
//! Every event acknowledged before the damage must be delivered or counted as dropped for
//! `corrupt` (a damaged or missing sealed batch, exactly its events). Damage to sled's own
//! files (the log cut short or overwritten, so sled recovers an earlier state without an
//! error; the config unreadable, so the database is moved aside) loses nothing here: the
//! events were sealed, and sealed batch files without a record are adopted and sent.

use std::time::Duration;

use keytrail_tests::faultnet::Rng;
use keytrail_tests::*;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Damage {
    SealedByteFlipped,
    SealedTruncated,
    SealedDeleted,
    SledLogGarbage,
    SledLogTruncated,
    SledConfGarbage,
}

const ALL: [Damage; 6] = [
    Damage::SealedByteFlipped,
    Damage::SealedTruncated,
    Damage::SealedDeleted,
    Damage::SledLogGarbage,
    Damage::SledLogTruncated,
    Damage::SledConfGarbage,
];

fn sealed_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("sealed"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "batch"));
    v.sort();
    v
}

/// Cuts a file to a random shorter length; returns the new and the old length.
fn truncate_somewhere(f: &std::path::Path, rng: &mut Rng) -> (u64, u64) {
    let len = std::fs::metadata(f).unwrap().len();
    let to = rng.range(0, len);
    std::fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .set_len(to)
        .unwrap();
    (to, len)
}

/// Damages the buffer; returns what was done, for the message.
fn damage(dir: &std::path::Path, what: Damage, rng: &mut Rng) -> String {
    let pick_sealed = |rng: &mut Rng| {
        let files = sealed_files(dir);
        assert!(!files.is_empty(), "no sealed batch to damage in {}", dir.display());
        files[rng.range(0, files.len() as u64) as usize].clone()
    };
    match what {
        Damage::SealedByteFlipped => {
            let f = pick_sealed(rng);
            let mut bytes = std::fs::read(&f).unwrap();
            let at = rng.range(0, bytes.len() as u64) as usize;
            bytes[at] ^= 1 << rng.range(0, 8);
            std::fs::write(&f, bytes).unwrap();
            format!("flipped a bit at {at} of {}", f.display())
        }
        Damage::SealedTruncated => {
            let f = pick_sealed(rng);
            let (to, len) = truncate_somewhere(&f, rng);
            format!("truncated {} to {to} of {len} bytes", f.display())
        }
        Damage::SealedDeleted => {
            let f = pick_sealed(rng);
            std::fs::remove_file(&f).unwrap();
            format!("deleted {}", f.display())
        }
        Damage::SledLogGarbage => {
            let f = dir.join("db");
            let mut bytes = std::fs::read(&f).unwrap();
            let at = rng.range(0, bytes.len() as u64) as usize;
            let n = (rng.range(1, 4096) as usize).min(bytes.len() - at);
            for b in &mut bytes[at..at + n] {
                *b = rng.next_u64() as u8;
            }
            std::fs::write(&f, bytes).unwrap();
            format!("wrote {n} random bytes at {at} of sled's log")
        }
        Damage::SledLogTruncated => {
            let (to, len) = truncate_somewhere(&dir.join("db"), rng);
            format!("truncated sled's log to {to} of {len} bytes")
        }
        Damage::SledConfGarbage => {
            std::fs::write(dir.join("conf"), b"\x00\xffnot a sled config").unwrap();
            "overwrote sled's conf".to_string()
        }
    }
}

#[test]
fn a_damaged_buffer_is_moved_aside_or_counted_and_the_agent_keeps_working() {
    let seed = std::env::var("KT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("buffer damage: KT_FAULT_SEED={seed}");
    let mut rng = Rng::new(seed);
    for (round, what) in ALL.into_iter().enumerate() {
        let sb = Sandbox::new(&format!("damage-{round}"));
        let mut collector = Collector::start(&sb, CollectorOpts::default());
        let mut opts = AgentOpts::new(&sb, "agent-a");
        opts.batch_max_events = 100;
        opts.batch_timeout = "20ms".into();
        let mut agent = Agent::start(&sb, &collector.url(), opts);
        collector.proc.kill9();
        let before = validations(&format!("before-{round}"), 1000);
        for chunk in before.chunks(50) {
            agent.post_until_accepted(chunk, WAIT);
        }
        // Wait until everything is sealed (files exist to damage), then kill.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (_, st) = agent.get_json("/v1/status");
            if st["sealed_batches"].as_u64() == Some(10) {
                // The counters move when a seal is applied, its flush follows: give the last
                // one time to be durable, or the kill can leave its file an orphan whose events
                // are still pending (handled, but then damage to that file is not counted).
                std::thread::sleep(Duration::from_millis(300));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not sealed: {st}");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.proc.kill9();
        let done = damage(&agent.data_dir, what, &mut rng);

        agent.restart();
        assert_eq!(agent.get_json("/healthz").0, 200, "{what:?}: {done}");
        // New events are taken and delivered.
        let after = validations(&format!("after-{round}"), 300);
        agent.post_until_accepted(&after, WAIT);
        collector.restart();
        // Everything the agent could read leaves its buffer (a damaged batch is found when it
        // is read for sending, or at recovery).
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            let (_, st) = agent.get_json("/v1/status");
            if st["buffered_events"] == 0 {
                break st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what:?}: {done}: still buffered: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let corrupt = status["dropped_events_by_reason"]["corrupt"].as_u64().unwrap_or(0);
        let moved_aside = status["buffer_recovered_from"].is_string();
        // The agent restarts cleanly on what it left, too (no crash loop on its own recovery).
        agent.restart();
        agent.wait_ready(200, WAIT);
        // The collector's stats move a moment after its 200s: wait for what must be there
        // (everything not counted as corrupt), then settle.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while collector.stored() < 1300 - corrupt && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let stored = collector.stored();
        assert!((300..=1300).contains(&stored), "{what:?}: {done}: stored {stored}");
        let delivered_before = stored - 300;
        // Every new event arrived (ids are distinct from the earlier ones).
        let (_, page) = http(collector.api, "GET", "/v1/events?limit=1000", &[], b"").unwrap();
        let newest: serde_json::Value = serde_json::from_str(&page).unwrap();
        let after_ids = newest["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["id"].as_str().unwrap().starts_with(&format!("after-{round}-")))
            .count();
        assert_eq!(after_ids, 300, "{what:?}: {done}: events posted after the damage");
        let (delivered_before, corrupt) = (delivered_before as i64, corrupt as i64);
        let lost = 1000 - delivered_before - corrupt;
        eprintln!(
            "  {what:?} ({done}): acknowledged 1000, delivered {delivered_before}, counted corrupt {corrupt}, \
             database moved aside: {moved_aside}, lost uncounted {lost}"
        );
        // Every event is delivered or counted; the sealed batches (checksummed frames in their
        // own files) survive any damage to sled's files.
        assert_eq!(lost, 0, "{what:?}: {done}");
        match what {
            Damage::SealedByteFlipped | Damage::SealedTruncated | Damage::SealedDeleted => {
                assert_eq!(corrupt, 100, "{what:?}: {done}: {status}");
                assert!(!moved_aside, "{what:?}: {done}: {status}");
            }
            Damage::SledConfGarbage => {
                assert!(moved_aside, "{what:?}: {done}: {status}");
                assert_eq!(corrupt, 0, "{what:?}: {done}: {status}");
            }
            Damage::SledLogGarbage | Damage::SledLogTruncated => {
                assert_eq!(corrupt, 0, "{what:?}: {done}: {status}");
            }
        }
    }
}
