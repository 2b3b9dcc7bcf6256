//! The collector's storage: the only place in the collector that knows sled and the event
//! files.
//!
//! Owns: durably storing received batches (group commit: one flush for every batch that
//! arrived during the previous one), deduplication state, the raw event log and its retention,
//! the analytics' persistence, and the receive counters of `/v1/stats`. Everything else
//! reaches storage through [`Store`]'s methods and [`StoreWriter`], never through sled.
//!
//! # On-disk layout
//!
//! Raw events live in the event log ([`events`]): compressed blocks of up to 4,096 events
//! appended to segment files under `<data_dir>/events/`, numbered by a store sequence that
//! increases by one per stored event. Its module doc has the block format. sled holds only
//! small records, a handful per group commit whatever its size (a sled key costs ~10 µs to
//! write here; a key per event capped the store at ~22 k events/s, docs/benchmarks.md):
//!
//! | key | value |
//! |-----|-------|
//! | `b` ‖ len u16 ‖ agent ‖ seq u64 | stored_at ‖ frame crc32 ‖ events u32: batch dedup |
//! | `a` ‖ agent | last_seen ‖ events u64: per-agent stats |
//! | `c.<name>` | u64: counters of `/v1/stats` |
//! | `m.next_store_seq` | u64: **the commit point** — every store sequence below it is stored |
//! | `m.id_key` | 16 random bytes: the key of the event-id hashes |
//!
//! Beside sled, `analytics.snap` holds the analytics snapshot: `KTASNAP1` ‖ zstd(the bytes of
//! [`Analytics::snapshot`], which name the store sequence they cover).
//!
//! In memory, rebuilt from the blocks' index sections on open (28 bytes per event, no
//! decompression): the hashes of the event ids stored inside the dedup window, and per
//! license the `(time, store sequence)` of its events, for `/v1/events?license=` and the
//! successor lookups of late events. About 16 + 40 bytes of memory per event.
//!
//! # Rules
//!
//! * A group commit first appends its blocks to the event log and `fdatasync`s them, then
//!   writes the batch keys, counters and `m.next_store_seq` in one atomic `apply_batch`; the
//!   group is then visible (dedup, lookups), and sled is flushed and its log `fdatasync`ed.
//!   Batches are answered 200 only after that. The writer then hands the group to the
//!   analytics thread and goes on with the next one (at most 4 groups queue up; then the
//!   writer waits). The counters of `/v1/stats` move when the analytics have applied a group,
//!   so a stat that shows an event stored means every metric counts it. A group whose flush
//!   fails is answered with an error but still goes to the analytics: it is in sled and
//!   published, so the agents' resends are counted as duplicates of it.
//! * A batch whose (agent, sequence) was stored before *with the same frame checksum* is a
//!   retry: acknowledged, its events counted as received and as duplicates, nothing stored.
//!   The same key with a different checksum means an agent lost its database and reused a
//!   sequence: its events go through the per-event check instead (logged).
//! * An event whose id hash is in the dedup set (stored inside `retention.dedup_window`, or
//!   earlier in the same group) is a duplicate: counted, not stored. The hash is SipHash-1-3,
//!   128 bits, under the store's random key: ids cannot be chosen to collide.
//! * Analytics are applied for exactly the events stored (never a duplicate), in store order.
//!   The analytics thread snapshots them every `snapshot_every` stored events, and at least
//!   one per `snapshot_bytes_per_event` bytes of the last snapshot (or after 10 minutes),
//!   after applying a group the writer had flushed, so a snapshot never covers an
//!   event that is not durable; a background thread compresses it and writes it beside sled
//!   (temporary file, fsync, rename, fsync of the directory). On open: the snapshot, then
//!   every event stored after it, read back from the event log.
//!   Without a usable snapshot (damaged, from the future of this store, a store of an earlier
//!   format) the analytics are rebuilt from the raw events — which no longer include what
//!   retention deleted — and snapshotted at once.
//! * Retention (a background pass): events older than `retention.raw_events` (by event time)
//!   are no longer served at once; ids and batch keys stored longer ago than
//!   `retention.dedup_window` are forgotten; a segment file is deleted when none of its blocks
//!   is needed for either (so with `raw_events` shorter than `dedup_window`, expired events
//!   stay on disk, unserved, until their ids expire). Counters are never decremented.
//! * Stores of the first format (an `e` key per event, with `i`/`l` index keys and a `j`
//!   journal) are migrated into the event log on open, in steps that each commit (a crash
//!   midway resumes), and the analytics are rebuilt (the events get new store sequences).
//!
//! # Crash at each step
//!
//! | crash during | after restart |
//! |---|---|
//! | the block append, before the sled batch | blocks past `m.next_store_seq` are cut off the segment; the agents got no 200 and resend |
//! | the sled batch, before its flush | sled recovers the batch entirely or not at all; without it, as above |
//! | after the flush, before the answer | the agent resends and gets a 200 as a duplicate |
//! | a snapshot write | the old snapshot stays until the rename; the events after whichever snapshot is found are replayed |
//! | a migration step | the step committed or not; the next open goes on from there |
//!
//! Damage to committed data (a block before the commit point fails its header checksum, a
//! segment is missing) stops the collector with the file and offset: this is the system of
//! record, and moving data aside silently would hide it from the operator (the agents keep
//! buffering meanwhile). A damaged data section found later loses that block's events for
//! reads (logged), nothing else.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keytrail_common::event::{Event, EventType};
use keytrail_common::time::{now_ns, UnixNanos};
use keytrail_common::wire::BatchSeq;
use tokio::sync::{mpsc, oneshot};

use crate::analytics::{self, Analytics, MetricQuery, QueryError, Row};
use crate::config::Plan;
use crate::dedup;
use std::io::{Read, Write};

const RECORD_VERSION: u8 = 1;
const MAX_GROUP_EVENTS: usize = 500_000;
const WRITER_QUEUE: usize = 256;
/// Committed groups waiting for the analytics thread; beyond this the writer waits.
const APPLY_QUEUE: usize = 4;
/// The analytics snapshot, in the data directory beside sled's `store/`.
const SNAPSHOT_FILE: &str = "analytics.snap";
const SNAPSHOT_MAGIC: &[u8; 8] = b"KTASNAP1";
/// How long opening waits for sled's file lock to be released.
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// The event log's segment files, in the data directory beside sled's `store/`.
const EVENTS_DIR: &str = "events";
/// zstd level of event blocks: level 1 compresses about twice as fast as 3 for a few percent
/// more bytes, and the writer thread compresses inside the group commit.
const EVENTS_ZSTD_LEVEL: i32 = 1;
/// A snapshot is also taken when this long has passed with new events since the last one.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(600);
/// Stored events between snapshots, unless configured otherwise.
pub const DEFAULT_SNAPSHOT_EVENTS: u64 = 1_000_000;
/// A snapshot costs about 10 ns per byte of state (serializing, compressing, writing), and a
/// large state makes every snapshot costly: a state of 10 M events is over 120 MB, about a
/// second and a quarter of CPU, which `DEFAULT_SNAPSHOT_EVENTS` alone would spend again every
/// million events — close to half of what applying them costs. So by default snapshots are
/// also at least one stored event per this many bytes of the last one apart: after 120 MB,
/// 3.9 M events, about 10 % of the apply work; the replay after a crash is that many events at
/// most.
pub const DEFAULT_SNAPSHOT_BYTES_PER_EVENT: u64 = 32;
/// The most a snapshot may decompress to (a damaged or hostile file cannot exhaust memory).
const MAX_SNAPSHOT_BYTES: u64 = 32 << 30;

/// Counter names, persisted as `c.<name>` and served by `/v1/stats`.
pub const COUNTERS: [&str; 5] = [
    "events_received",
    "events_stored",
    "duplicates_dropped",
    "batches_received",
    "batches_duplicate",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database {path}: {message}")]
    Open { path: String, message: String },
    #[error("storage failed: {0}")]
    Storage(#[from] sled::Error),
    #[error("storage write failed: {0}")]
    Write(String),
    #[error("the store is shutting down")]
    Closed,
}

/// A decoded batch, with who sent it.
#[derive(Debug)]
pub struct IncomingBatch {
    pub agent_id: String,
    pub seq: BatchSeq,
    pub frame_crc: u32,
    pub events: Vec<Event>,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IngestOutcome {
    pub stored: u32,
    pub duplicates: u32,
    pub duplicate_batch: bool,
}

/// Per-agent line of `/v1/stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentStat {
    pub agent_id: String,
    pub last_seen: String,
    pub events: u64,
}

/// Filters of `GET /v1/events`.
#[derive(Debug, Default, Clone)]
pub struct EventQuery {
    pub license: Option<String>,
    pub event_type: Option<EventType>,
    /// Inclusive lower bound on event time.
    pub from: Option<UnixNanos>,
    /// Exclusive upper bound on event time.
    pub to: Option<UnixNanos>,
    pub limit: usize,
    /// Continue strictly before this position (from a previous page).
    pub cursor: Option<(UnixNanos, u64)>,
}

/// One page of events, newest first.
#[derive(Debug)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next_cursor: Option<(UnixNanos, u64)>,
}

/// Public for the fuzz target and its seed example only; the rest of the collector goes
/// through [`Store`].
#[doc(hidden)]
pub mod events;
mod license_keys;

use crate::dedup::IdHasher;
use events::EventLog;
pub use events::Purged;

/// Decodes an event record of the first store format (`1 ‖ crc32 ‖ bincode`), for migration.
fn decode_v1_value(r: &[u8]) -> Option<Event> {
    if r.len() < 5 || r[0] != RECORD_VERSION {
        return None;
    }
    let body = &r[5..];
    if crc32fast::hash(body) != u32::from_be_bytes(r[1..5].try_into().ok()?) {
        return None;
    }
    events::decode_record(body)
}

fn len_prefixed(prefix: u8, s: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + s.len() + 16);
    k.push(prefix);
    k.extend_from_slice(&(s.len() as u16).to_be_bytes());
    k.extend_from_slice(s.as_bytes());
    k
}

fn batch_key(agent: &str, seq: BatchSeq) -> Vec<u8> {
    let mut k = len_prefixed(b'b', agent);
    k.extend_from_slice(&seq.0.to_be_bytes());
    k
}

fn counter_key(name: &str) -> Vec<u8> {
    format!("c.{name}").into_bytes()
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// In-memory mirror of the persisted counters and agent stats.
#[derive(Default, Clone)]
struct Totals {
    counters: [u64; 5],
    agents: BTreeMap<String, (UnixNanos, u64)>,
}

/// The store. Reads go straight to sled; writes go through the single [`StoreWriter`] thread.
pub struct Store {
    db: sled::Db,
    log: EventLog,
    log_file: Option<std::fs::File>,
    /// The counters as the writer has committed them (what the next group adds to).
    totals: Mutex<Totals>,
    /// The counters of `/v1/stats`: moved forward only once the analytics have applied the
    /// group, so stats that show an event stored mean the metrics count it.
    visible: Mutex<Totals>,
    next_store_seq: AtomicU64,
    writable: AtomicBool,
    /// Bytes the last batch refused for want of disk space needed (0 once one fits):
    /// readiness asks for room for it too, so `/readyz` agrees with the 503 agents get.
    refused_for_space: AtomicU64,
    dedup_window: Duration,
    raw_events: Duration,
    analytics: RwLock<Analytics>,
    dir: PathBuf,
    snapshot_every: u64,
    snapshot_bytes_per_event: u64,
    origin: AnalyticsOrigin,
    snapshots: SnapshotState,
}

/// How [`Store::open`] got the analytics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalyticsOrigin {
    /// From `analytics.snap` (covering store sequences below `covers`, 0 without a snapshot),
    /// then `replayed` events of the journal.
    Snapshot { covers: u64, replayed: u64 },
    /// Rebuilt from `events` raw events, for `reason`.
    Rebuilt { events: u64, reason: String },
}

/// Bookkeeping of the analytics snapshots.
struct SnapshotState {
    /// Events stored (and applied) since the last snapshot was taken.
    since: AtomicU64,
    /// When the last snapshot was taken.
    taken_at: Mutex<Instant>,
    /// Its size, uncompressed (0 before the first one this process took).
    last_bytes: AtomicU64,
    /// The store sequence the newest written snapshot covers; held while one is written.
    written: Mutex<u64>,
    /// A snapshot is being compressed and written in the background.
    busy: AtomicBool,
}

/// Size of the analytics state, for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct AnalyticsStats {
    pub licenses: usize,
    pub cells: usize,
    pub inexact_events: u64,
}

/// What [`Store::open`] needs besides the directory.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub cache_bytes: u64,
    pub dedup_window: Duration,
    pub raw_events: Duration,
    /// The plan catalog, for MRR and utilization limits.
    pub plans: BTreeMap<String, Plan>,
    /// Stored events between analytics snapshots ([`DEFAULT_SNAPSHOT_EVENTS`]).
    pub snapshot_every: u64,
    /// And at least the last snapshot's bytes divided by this ([`DEFAULT_SNAPSHOT_BYTES_PER_EVENT`];
    /// 0: no such bound).
    pub snapshot_bytes_per_event: u64,
}

/// Whether a snapshot is due `since` events and `elapsed` after the last one, of `last_bytes`
/// (see [`DEFAULT_SNAPSHOT_BYTES_PER_EVENT`]).
fn snapshot_due(since: u64, every: u64, bytes_per_event: u64, last_bytes: u64, elapsed: Duration) -> bool {
    let every = match bytes_per_event {
        0 => every,
        b => every.max(last_bytes / b),
    };
    since >= every || (since > 0 && elapsed >= SNAPSHOT_INTERVAL)
}

/// Reads `analytics.snap`: `Ok(None)` when there is none.
fn read_snapshot(path: &Path, plans: &BTreeMap<String, Plan>) -> Result<Option<Analytics>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut file = std::io::BufReader::new(file);
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic).map_err(|e| format!("header: {e}"))?;
    if &magic != SNAPSHOT_MAGIC {
        return Err("not a keytrail analytics snapshot (bad magic)".into());
    }
    let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    decoder
        .take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("decompressing: {e}"))?;
    if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(format!("decompresses to more than {MAX_SNAPSHOT_BYTES} bytes"));
    }
    Analytics::from_snapshot(plans.clone(), &bytes)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The analytics as of everything stored: the snapshot plus the events stored after it (read
/// back from the event log), or a rebuild from the raw events.
fn open_analytics(
    db: &sled::Db,
    log: &EventLog,
    dir: &Path,
    plans: &BTreeMap<String, Plan>,
    next_seq: u64,
    migrated: bool,
) -> Result<(Analytics, AnalyticsOrigin), StoreError> {
    // Stores of an earlier format kept per-record analytics under `x` and a journal under `j`:
    // drop them (the event log replaces the journal).
    let legacy = remove_prefix(db, b"x")? > 0;
    remove_prefix(db, b"j")?;
    let _ = std::fs::remove_file(dir.join(format!("{SNAPSHOT_FILE}.tmp")));
    let mut why_rebuild = if migrated {
        Some("the store was migrated to the block event log (new store sequences)".to_string())
    } else {
        legacy.then(|| "the store holds analytics records of an earlier format".to_string())
    };
    let mut a = Analytics::new(plans.clone());
    if why_rebuild.is_none() {
        let started = Instant::now();
        match read_snapshot(&dir.join(SNAPSHOT_FILE), plans) {
            Ok(Some(snap)) => {
                a = snap;
                tracing::info!(
                    covers = a.applied_through(),
                    licenses = a.license_count(),
                    cells = a.cell_count(),
                    seconds = started.elapsed().as_secs_f64(),
                    "analytics snapshot loaded"
                );
            }
            Ok(None) => {}
            Err(e) => why_rebuild = Some(format!("{SNAPSHOT_FILE} is unusable: {e}")),
        }
    }
    let start = a.applied_through();
    if why_rebuild.is_none() && start > next_seq {
        why_rebuild = Some(format!(
            "{SNAPSHOT_FILE} covers store sequence {start}, past what the store holds ({next_seq})"
        ));
    }
    if let Some(reason) = why_rebuild {
        if next_seq > 0 || legacy {
            tracing::warn!(%reason, "rebuilding the analytics from the stored raw events (events purged by retention are no longer counted)");
        }
        let started = Instant::now();
        let mut a = Analytics::new(plans.clone());
        let mut n = 0u64;
        // In store order, as the events were first applied: late ones look their successors up.
        log.for_each(|seq, e| {
            a.apply(&e, seq, &StoredHistory { log, before: seq });
            n += 1;
        });
        a.set_applied_through(next_seq);
        if next_seq > 0 {
            tracing::info!(
                events = n,
                seconds = started.elapsed().as_secs_f64(),
                "analytics rebuilt"
            );
        }
        return Ok((a, AnalyticsOrigin::Rebuilt { events: n, reason }));
    }
    let started = Instant::now();
    for seq in start..next_seq {
        match log.event(seq) {
            Some(e) => a.apply(&e, seq, &StoredHistory { log, before: seq }),
            None => a.count_inexact(), // purged by retention before the replay
        }
    }
    let replayed = next_seq - start;
    a.set_applied_through(next_seq);
    if replayed > 0 {
        tracing::info!(
            snapshot_covers = start,
            replayed,
            seconds = started.elapsed().as_secs_f64(),
            "analytics loaded: snapshot plus the events stored after it"
        );
    }
    Ok((
        a,
        AnalyticsOrigin::Snapshot {
            covers: start,
            replayed,
        },
    ))
}

/// Deletes every key under `prefix`, 10,000 per batch; returns how many there were.
fn remove_prefix(db: &sled::Db, prefix: &[u8]) -> Result<u64, sled::Error> {
    let mut removed = 0;
    loop {
        let mut w = sled::Batch::default();
        let mut n = 0;
        for item in db.scan_prefix(prefix).take(10_000) {
            w.remove(item?.0);
            n += 1;
        }
        if n == 0 {
            return Ok(removed);
        }
        db.apply_batch(w)?;
        removed += n;
    }
}

/// The key of the id hashes ([`EventLog::hash_id`]): random, made once per store.
fn id_hash_key(db: &sled::Db) -> Result<(u64, u64), StoreError> {
    if let Some(v) = db.get(b"m.id_key")? {
        if v.len() == 16 {
            return Ok((be_u64(&v[..8]), be_u64(&v[8..])));
        }
        return Err(StoreError::Write("m.id_key is damaged".into()));
    }
    let mut k = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
        .map_err(|_| StoreError::Write("no randomness for the id hash key".into()))?;
    db.insert(b"m.id_key", &k)?;
    db.flush()?;
    Ok((be_u64(&k[..8]), be_u64(&k[8..])))
}

/// Moves the events of a first-format store (one sled key per event, plus id and license
/// index keys) into the event log, in steps that each commit on their own: a crash midway
/// resumes on the next open. Returns whether anything was migrated.
fn migrate_v1(db: &sled::Db, log: &EventLog, next: &mut u64) -> Result<bool, StoreError> {
    if db.scan_prefix(b"e").next().is_none() {
        return Ok(false);
    }
    tracing::warn!("migrating the store's raw events into the block event log");
    let started = Instant::now();
    let now = now_ns();
    let mut moved = 0u64;
    loop {
        let mut keys = Vec::new();
        let mut evs = Vec::new();
        for item in db.scan_prefix(b"e").take(events::MAX_BLOCK_EVENTS) {
            let (k, v) = item?;
            match decode_v1_value(&v) {
                Some(e) => evs.push(e),
                None => tracing::error!(key = %hex::encode(&k), "a stored event failed its checksum; not migrated"),
            }
            keys.push(k);
        }
        if keys.is_empty() {
            break;
        }
        let hashed: Vec<(&Event, u128)> = evs.iter().map(|e| (e, log.hash_id(&e.id))).collect();
        let mut w = sled::Batch::default();
        for k in keys {
            w.remove(k);
        }
        let appended = if hashed.is_empty() {
            None
        } else {
            Some(
                log.append(*next, now, &hashed)
                    .map_err(|e| StoreError::Write(format!("migrating events: {e}")))?,
            )
        };
        *next += hashed.len() as u64;
        w.insert(b"m.next_store_seq" as &[u8], &next.to_be_bytes());
        db.apply_batch(w)?;
        db.flush()?;
        if let Some(a) = appended {
            log.publish(a);
        }
        moved += hashed.len() as u64;
    }
    // The per-event id and license index keys are replaced by the log's own indexes.
    remove_prefix(db, b"i")?;
    remove_prefix(db, b"l")?;
    db.flush()?;
    tracing::warn!(
        events = moved,
        seconds = started.elapsed().as_secs_f64(),
        "store migrated"
    );
    Ok(true)
}

impl Store {
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let StoreOptions {
            cache_bytes,
            dedup_window,
            raw_events,
            plans,
            snapshot_every,
            snapshot_bytes_per_event,
        } = options;
        let err = |message: String| StoreError::Open {
            path: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let config = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000));
        let started = Instant::now();
        // sled locks its files; a store just closed by this process (or a collector that is
        // still exiting) can hold the lock for a moment after it let go of the database.
        let db = loop {
            let config = config.clone();
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
                .map_err(|_| err("sled panicked while opening the database".into()))?;
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if started.elapsed() > LOCK_WAIT {
                        return Err(err(format!(
                            "the store is locked by another process (is another keytrail-collector using this data directory?): {e}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(e.to_string())),
            }
        };
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "store database opened");
        let log_file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("store").join("db"))
            .ok();
        let mut totals = Totals::default();
        for (i, name) in COUNTERS.iter().enumerate() {
            if let Some(v) = db.get(counter_key(name))? {
                totals.counters[i] = be_u64(&v);
            }
        }
        for item in db.scan_prefix(b"a") {
            let (k, v) = item?;
            if v.len() == 16 {
                let agent = String::from_utf8_lossy(&k[1..]).into_owned();
                totals.agents.insert(agent, (be_u64(&v[..8]) as i64, be_u64(&v[8..])));
            }
        }
        let mut next = db.get(b"m.next_store_seq")?.map_or(0, |v| be_u64(&v));
        let started = Instant::now();
        let key = id_hash_key(&db).map_err(|e| err(e.to_string()))?;
        let log = EventLog::open(&dir.join(EVENTS_DIR), key, next, EVENTS_ZSTD_LEVEL).map_err(err)?;
        let migrated = migrate_v1(&db, &log, &mut next).map_err(|e| err(e.to_string()))?;
        let (blocks, licenses, ids) = log.sizes();
        tracing::info!(
            blocks,
            licenses,
            ids,
            seconds = started.elapsed().as_secs_f64(),
            "event log opened"
        );
        let (analytics, origin) =
            open_analytics(&db, &log, dir, &plans, next, migrated).map_err(|e| err(e.to_string()))?;
        let snapshot = match &origin {
            AnalyticsOrigin::Snapshot { covers, .. } => Some(*covers),
            AnalyticsOrigin::Rebuilt { .. } => None,
        };
        let store = Arc::new(Store {
            db,
            log,
            log_file,
            visible: Mutex::new(totals.clone()),
            totals: Mutex::new(totals),
            next_store_seq: AtomicU64::new(next),
            writable: AtomicBool::new(true),
            refused_for_space: AtomicU64::new(0),
            dedup_window,
            raw_events,
            analytics: RwLock::new(analytics),
            dir: dir.to_path_buf(),
            snapshot_every: snapshot_every.max(1),
            snapshot_bytes_per_event,
            origin,
            snapshots: SnapshotState {
                since: AtomicU64::new(next - snapshot.unwrap_or(next)),
                taken_at: Mutex::new(Instant::now()),
                last_bytes: AtomicU64::new(0),
                written: Mutex::new(snapshot.unwrap_or(0)),
                busy: AtomicBool::new(false),
            },
        });
        if snapshot.is_none() && next > 0 {
            // A rebuild is slow: keep its result.
            store
                .snapshot_now()
                .map_err(|e| err(format!("writing the rebuilt analytics snapshot: {e}")))?;
        }
        Ok(store)
    }

    /// How the analytics were loaded when the store was opened.
    pub fn analytics_origin(&self) -> &AnalyticsOrigin {
        &self.origin
    }

    /// Answers a metric from the rollups.
    pub fn metric(&self, q: &MetricQuery) -> Result<Vec<Row>, QueryError> {
        self.analytics.read().expect("analytics lock").query(q)
    }

    /// `GET /v1/licenses/<license>`; `None` for a license never seen.
    pub fn license(&self, name: &str, at: i64) -> Option<serde_json::Value> {
        self.analytics.read().expect("analytics lock").license_detail(name, at)
    }

    /// (licenses, cells) held by the analytics.
    pub fn analytics_size(&self) -> (usize, usize) {
        let s = self.analytics_stats();
        (s.licenses, s.cells)
    }

    pub fn analytics_stats(&self) -> AnalyticsStats {
        let a = self.analytics.read().expect("analytics lock");
        AnalyticsStats {
            licenses: a.license_count(),
            cells: a.cell_count(),
            inexact_events: a.inexact_events(),
        }
    }

    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// `Some((free, reserve))` while storing `size` more bytes would eat into the free space
    /// kept on the data directory's file system (`common::disk`).
    pub fn disk_low(&self, size: u64) -> Option<(u64, u64)> {
        keytrail_common::disk::low(&self.dir, size)
    }

    /// [`Store::disk_low`] for a batch about to be stored, remembering a refusal for
    /// [`Store::ready_room`].
    pub fn room_for(&self, size: u64) -> Option<(u64, u64)> {
        let low = self.disk_low(size);
        self.refused_for_space
            .store(if low.is_some() { size } else { 0 }, Ordering::Relaxed);
        low
    }

    /// [`Store::disk_low`] for readiness: room for the reserve and for the last batch refused
    /// for want of it.
    pub fn ready_room(&self) -> Option<(u64, u64)> {
        self.disk_low(self.refused_for_space.load(Ordering::Relaxed))
    }

    /// `(name, value)` for every counter of `/v1/stats`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let t = self.visible.lock().expect("totals");
        COUNTERS.iter().copied().zip(t.counters.iter().copied()).collect()
    }

    pub fn agents(&self) -> Vec<AgentStat> {
        let t = self.visible.lock().expect("totals");
        t.agents
            .iter()
            .map(|(a, (seen, events))| AgentStat {
                agent_id: a.clone(),
                last_seen: keytrail_common::time::format_rfc3339(*seen),
                events: *events,
            })
            .collect()
    }

    /// Starts the single writer thread, and the thread that writes its analytics snapshots.
    pub fn start_writer(self: &Arc<Self>) -> StoreWriter {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let (snap_tx, snap_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(1);
        let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel::<Committed>(APPLY_QUEUE);
        let store = Arc::clone(self);
        std::thread::Builder::new()
            .name("keytrail-store-writer".into())
            .spawn(move || store.writer_loop(rx, apply_tx))
            .expect("spawning the store writer");
        let store = Arc::clone(self);
        std::thread::Builder::new()
            .name("keytrail-analytics".into())
            .spawn(move || store.analytics_loop(apply_rx, snap_tx))
            .expect("spawning the analytics thread");
        let store = Arc::clone(self);
        std::thread::Builder::new()
            .name("keytrail-snapshot".into())
            .spawn(move || {
                for (seq, bytes) in snap_rx {
                    if let Err(e) = store.write_snapshot(seq, &bytes) {
                        tracing::error!(error = %e, "writing the analytics snapshot failed; the journal keeps the events");
                    }
                    store.snapshots.busy.store(false, Ordering::Relaxed);
                }
            })
            .expect("spawning the snapshot writer");
        StoreWriter { tx }
    }

    fn writer_loop(&self, mut rx: mpsc::Receiver<Job>, to_analytics: std::sync::mpsc::SyncSender<Committed>) {
        let mut group = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut events = first.batch.events.len();
            group.push(first);
            while events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(j) => {
                        events += j.batch.events.len();
                        group.push(j);
                    }
                    Err(_) => break,
                }
            }
            let jobs: Vec<Job> = std::mem::take(&mut group);
            let mut committed = None;
            let result = self.commit(&jobs, &mut committed);
            self.writable.store(result.is_ok(), Ordering::Relaxed);
            let mut batches = Vec::with_capacity(jobs.len());
            match result {
                Ok(outcomes) => {
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        let _ = job.reply.send(Ok(outcome));
                        batches.push(job.batch);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "storing a group of batches failed; agents will retry");
                    for job in jobs {
                        let _ = job.reply.send(Err(StoreError::Write(e.to_string())));
                        batches.push(job.batch);
                    }
                }
            }
            if let Some(mut c) = committed {
                c.batches = batches;
                // Blocks while the analytics are APPLY_QUEUE groups behind: backpressure.
                if to_analytics.send(c).is_err() {
                    tracing::error!("the analytics thread is gone; stopping the writer");
                    return;
                }
            }
        }
    }

    /// Applies committed (durable) groups to the analytics, in commit order, beside the
    /// writer: the writer goes on with the next group meanwhile.
    fn analytics_loop(
        &self,
        rx: std::sync::mpsc::Receiver<Committed>,
        snapshots: std::sync::mpsc::SyncSender<(u64, Vec<u8>)>,
    ) {
        for c in rx {
            {
                let mut a = self.analytics.write().expect("analytics lock");
                for (k, &(b, i)) in c.stored.iter().enumerate() {
                    let seq = c.first + k as u64;
                    a.apply(
                        &c.batches[b as usize].events[i as usize],
                        seq,
                        &StoredHistory {
                            log: &self.log,
                            before: seq,
                        },
                    );
                }
                a.set_applied_through(c.first + c.stored.len() as u64);
            }
            self.snapshots.since.fetch_add(c.stored.len() as u64, Ordering::Relaxed);
            *self.visible.lock().expect("totals") = c.totals;
            self.maybe_snapshot(&snapshots);
        }
    }

    /// Waits until the analytics have applied everything committed so far (at most `within`);
    /// returns whether they have.
    pub fn wait_applied(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let committed = self.next_store_seq.load(Ordering::Relaxed);
            if self.analytics.read().expect("analytics lock").applied_through() >= committed {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Called by the analytics thread after applying a group, which the writer had flushed
    /// before handing it over, so the state it serializes is durable: takes a snapshot when enough events (or time) have gone by, and hands it to the
    /// snapshot thread. The analytics thread pauses only for the serialization, not the disk.
    fn maybe_snapshot(&self, to: &std::sync::mpsc::SyncSender<(u64, Vec<u8>)>) {
        let sn = &self.snapshots;
        let due = snapshot_due(
            sn.since.load(Ordering::Relaxed),
            self.snapshot_every,
            self.snapshot_bytes_per_event,
            sn.last_bytes.load(Ordering::Relaxed),
            sn.taken_at.lock().expect("snapshot time").elapsed(),
        );
        if !due || sn.busy.swap(true, Ordering::Relaxed) {
            return;
        }
        let (seq, bytes) = {
            let a = self.analytics.read().expect("analytics lock");
            (a.applied_through(), a.snapshot())
        };
        sn.since.store(0, Ordering::Relaxed);
        sn.last_bytes.store(bytes.len() as u64, Ordering::Relaxed);
        *sn.taken_at.lock().expect("snapshot time") = Instant::now();
        if to.try_send((seq, bytes)).is_err() {
            sn.busy.store(false, Ordering::Relaxed);
        }
    }

    /// Flushes, then snapshots the analytics synchronously (open after a rebuild, close).
    fn snapshot_now(&self) -> Result<(), StoreError> {
        let (seq, bytes) = {
            // Holding the read lock keeps the writer from applying a group the flush below
            // might not cover.
            let a = self.analytics.read().expect("analytics lock");
            self.db.flush()?;
            if a.applied_through() == *self.snapshots.written.lock().expect("snapshot") {
                return Ok(());
            }
            (a.applied_through(), a.snapshot())
        };
        self.snapshots.since.store(0, Ordering::Relaxed);
        self.write_snapshot(seq, &bytes)
    }

    /// Writes a snapshot covering store sequences below `seq` (unless a newer one is on disk).
    fn write_snapshot(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut written = self.snapshots.written.lock().expect("snapshot");
        if seq <= *written && seq != 0 {
            return Ok(());
        }
        let started = Instant::now();
        let path = self.dir.join(SNAPSHOT_FILE);
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let io = |what: &str, e: std::io::Error| StoreError::Write(format!("{what} {}: {e}", tmp.display()));
        let compressed = {
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
            f.write_all(SNAPSHOT_MAGIC).map_err(|e| io("writing", e))?;
            let mut z = zstd::stream::write::Encoder::new(std::io::BufWriter::new(&mut f), 1)
                .map_err(|e| io("compressing", e))?;
            z.write_all(bytes).map_err(|e| io("writing", e))?;
            z.finish().and_then(|mut w| w.flush()).map_err(|e| io("writing", e))?;
            f.sync_all().map_err(|e| io("syncing", e))?;
            f.metadata().map(|m| m.len()).unwrap_or(0)
        };
        std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            d.sync_all().map_err(|e| io("syncing the directory of", e))?;
        }
        *written = seq;
        drop(written);
        tracing::info!(
            covers = seq,
            bytes = bytes.len(),
            compressed,
            seconds = started.elapsed().as_secs_f64(),
            "analytics snapshot written"
        );
        Ok(())
    }

    /// Dedups and stores a group of batches: its events as blocks of the event log (synced),
    /// then dedup keys, counters and the commit point in one atomic sled batch and one flush.
    /// `committed` is set once the group is in sled and published, even if the flush after it
    /// fails: such a group is stored (and dedups its resends), so the analytics must count it.
    fn commit(&self, jobs: &[Job], committed: &mut Option<Committed>) -> Result<Vec<IngestOutcome>, StoreError> {
        let now = now_ns();
        let mut w = sled::Batch::default();
        let mut seen_ids: HashSet<u128, BuildHasherDefault<IdHasher>> = HashSet::default();
        let mut seen_batches: HashSet<Vec<u8>> = HashSet::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut delta = [0u64; 5];
        let mut agent_delta: BTreeMap<&str, u64> = BTreeMap::new();
        let first = self.next_store_seq.load(Ordering::Relaxed);
        let mut stored: Vec<(&Event, u128)> = Vec::new();
        let mut positions: Vec<(u32, u32)> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let b = &job.batch;
            let n = b.events.len() as u64;
            delta[0] += n;
            delta[3] += 1;
            let bkey = batch_key(&b.agent_id, b.seq);
            let previous = self.db.get(&bkey)?;
            let same_batch = match &previous {
                Some(v) if v.len() >= 12 => u32::from_be_bytes(v[8..12].try_into().expect("4 bytes")) == b.frame_crc,
                _ => false,
            };
            if same_batch || seen_batches.contains(&bkey) {
                delta[2] += n;
                delta[4] += 1;
                *agent_delta.entry(&b.agent_id).or_default() += 0;
                outcomes.push(IngestOutcome {
                    stored: 0,
                    duplicates: n as u32,
                    duplicate_batch: true,
                });
                continue;
            }
            if previous.is_some() {
                tracing::warn!(agent = %b.agent_id, seq = b.seq.0,
                    "batch sequence reused with different content (agent lost its buffer?): deduplicating by event id");
            }
            seen_batches.insert(bkey.clone());
            let hashes: Vec<u128> = b.events.iter().map(|e| self.log.hash_id(&e.id)).collect();
            let plan = dedup::plan(&hashes, |h| self.log.seen(*h), &mut seen_ids);
            for &i in &plan.new {
                stored.push((&b.events[i], hashes[i]));
                positions.push((j as u32, i as u32));
            }
            let mut bv = Vec::with_capacity(16);
            bv.extend_from_slice(&now.to_be_bytes());
            bv.extend_from_slice(&b.frame_crc.to_be_bytes());
            bv.extend_from_slice(&(n as u32).to_be_bytes());
            w.insert(bkey, bv);
            delta[1] += plan.new.len() as u64;
            delta[2] += plan.duplicates as u64;
            *agent_delta.entry(&b.agent_id).or_default() += plan.new.len() as u64;
            outcomes.push(IngestOutcome {
                stored: plan.new.len() as u32,
                duplicates: plan.duplicates,
                duplicate_batch: false,
            });
        }
        let next = first + stored.len() as u64;
        // Counters and agent stats move in the same atomic batch as the commit point.
        let (counters, agents) = {
            let t = self.totals.lock().expect("totals");
            let mut c = t.counters;
            for i in 0..5 {
                c[i] += delta[i];
            }
            let mut agents = Vec::new();
            for (a, d) in &agent_delta {
                let events = t.agents.get(*a).map_or(0, |x| x.1) + d;
                agents.push((a.to_string(), events));
            }
            (c, agents)
        };
        for (i, name) in COUNTERS.iter().enumerate() {
            w.insert(counter_key(name), &counters[i].to_be_bytes());
        }
        for (a, events) in &agents {
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&now.to_be_bytes());
            v.extend_from_slice(&events.to_be_bytes());
            let mut k = vec![b'a'];
            k.extend_from_slice(a.as_bytes());
            w.insert(k, v);
        }
        w.insert(b"m.next_store_seq" as &[u8], &next.to_be_bytes());
        // The blocks are on disk before the batch that commits them.
        let appended = if stored.is_empty() {
            None
        } else {
            Some(
                self.log
                    .append(first, now, &stored)
                    .map_err(|e| StoreError::Write(format!("appending to the event log: {e}")))?,
            )
        };
        if let Err(e) = self.db.apply_batch(w) {
            if let Some(a) = appended {
                self.log.rollback(a);
            }
            return Err(e.into());
        }
        if let Some(a) = appended {
            self.log.publish(a);
        }
        // sled holds the group in memory now: advance the in-memory mirror before flushing, so
        // a failed flush cannot make the next group reuse store sequences or write counters
        // that go backwards. The agents only get their 200 after the flush.
        self.next_store_seq.store(next, Ordering::Relaxed);
        let totals = {
            let mut t = self.totals.lock().expect("totals");
            t.counters = counters;
            for (a, events) in agents {
                t.agents.insert(a, (now, events));
            }
            t.clone()
        };
        *committed = Some(Committed {
            first,
            stored: positions,
            batches: Vec::new(),
            totals,
        });
        self.db.flush()?;
        if let Some(f) = &self.log_file {
            f.sync_data()
                .map_err(|e| StoreError::Write(format!("syncing the store: {e}")))?;
        }
        Ok(outcomes)
    }

    /// `GET /v1/events`: newest first, filtered, paginated.
    pub fn events(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let limit = q.limit.clamp(1, 1000);
        let lo = q.from.unwrap_or(i64::MIN);
        let mut hi: (UnixNanos, u64) = (q.to.unwrap_or(i64::MAX), 0);
        if let Some(c) = q.cursor {
            hi = hi.min(c);
        }
        let rows = self.log.page(q.license.as_deref(), lo, hi, limit, &|e| {
            q.event_type.is_none_or(|ty| ty == e.event_type)
        });
        let next_cursor = if rows.len() >= limit {
            rows.last().map(|r| (r.0, r.1))
        } else {
            None
        };
        Ok(EventPage {
            events: rows.into_iter().map(|r| r.2).collect(),
            next_cursor,
        })
    }

    /// Deletes what retention allows. Returns (raw events no longer served, dedup entries
    /// forgotten: event ids and batch keys).
    pub fn purge(&self, now: UnixNanos) -> Result<(u64, u64), StoreError> {
        let raw_cutoff = now.saturating_sub(self.raw_events.as_nanos() as i64);
        let dedup_cutoff = now.saturating_sub(self.dedup_window.as_nanos() as i64);
        let p = self.log.purge(raw_cutoff, dedup_cutoff).map_err(StoreError::Write)?;
        if p.segments > 0 {
            tracing::info!(segments = p.segments, "retention deleted event segments");
        }
        let mut dedup = p.ids;
        let mut w = sled::Batch::default();
        let mut pending = 0;
        for item in self.db.scan_prefix(b"b") {
            let (k, v) = item?;
            if v.len() >= 8 && (be_u64(&v[..8]) as i64) < dedup_cutoff {
                w.remove(k);
                pending += 1;
                dedup += 1;
                if pending == 10_000 {
                    self.db.apply_batch(std::mem::take(&mut w))?;
                    pending = 0;
                }
            }
        }
        self.db.apply_batch(w)?;
        self.db.flush()?;
        Ok((p.raw_events, dedup))
    }

    /// Final flush, and a snapshot so the next open needs no replay.
    pub fn close(&self) {
        if !self.wait_applied(Duration::from_secs(60)) {
            tracing::warn!("the analytics had not caught up after 60 s; the next start replays the rest");
        }
        if let Err(e) = self.snapshot_now() {
            tracing::error!(error = %e, "final store flush or analytics snapshot failed");
        }
    }
}

/// A late event's successor, from the raw events ([`analytics::History`]): the first event of
/// the license after the given time that was stored before the event being applied.
struct StoredHistory<'a> {
    log: &'a EventLog,
    /// The store sequence of the event being applied.
    before: u64,
}

impl analytics::History for StoredHistory<'_> {
    fn next_after(&self, license: &str, after: UnixNanos, carries: &dyn Fn(&Event) -> bool) -> Option<(u64, Event)> {
        self.log.next_after(license, after, self.before, carries)
    }
}

/// A committed, durable group on its way to the analytics thread.
struct Committed {
    /// The store sequence of the first stored event.
    first: u64,
    /// (batch, event) positions of the stored events, in store-sequence order.
    stored: Vec<(u32, u32)>,
    batches: Vec<IncomingBatch>,
    /// The counters after this group.
    totals: Totals,
}

struct Job {
    batch: IncomingBatch,
    reply: oneshot::Sender<Result<IngestOutcome, StoreError>>,
}

/// Handle to the writer thread; cloned into every receive handler.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::Sender<Job>,
}

impl StoreWriter {
    /// Stores a batch; resolves after it is durable (or known to be a duplicate).
    pub async fn ingest(&self, batch: IncomingBatch) -> Result<IngestOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { batch, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keytrail_common::event::EventType;

    fn ev(id: &str, license: &str, t: i64) -> Event {
        let mut e = Event::new(id, EventType::Validated, t, "a");
        e.license = Some(license.into());
        e.plan = Some("pro".into());
        e.country = Some("DE".into());
        e
    }

    fn batch(seq: u64, crc: u32, events: Vec<Event>) -> IncomingBatch {
        IncomingBatch {
            agent_id: "a".into(),
            seq: BatchSeq(seq),
            frame_crc: crc,
            events,
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kt-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn readiness_asks_for_room_for_the_last_batch_refused_for_space() {
        let dir = tmp("room");
        let store = Store::open(&dir, opts()).unwrap();
        assert!(store.ready_room().is_none(), "room on the test machine's disk");
        // A batch no disk has room for: refused, and readiness says so until one fits.
        assert!(store.room_for(u64::MAX / 2).is_some());
        assert!(store.ready_room().is_some());
        assert!(store.room_for(1024).is_none());
        assert!(store.ready_room().is_none());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn opts() -> StoreOptions {
        StoreOptions {
            cache_bytes: 1 << 20,
            dedup_window: DAY,
            raw_events: DAY,
            plans: BTreeMap::new(),
            snapshot_every: DEFAULT_SNAPSHOT_EVENTS,
            snapshot_bytes_per_event: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dedups_batches_and_ids_and_counts_survive_reopen() {
        let dir = tmp("dedup");
        {
            let s = Store::open(&dir, opts()).unwrap();
            let w = s.start_writer();
            let o = w
                .ingest(batch(1, 7, vec![ev("x", "l1", 10), ev("y", "l1", 20)]))
                .await
                .unwrap();
            assert_eq!((o.stored, o.duplicates), (2, 0));
            let o = w
                .ingest(batch(1, 7, vec![ev("x", "l1", 10), ev("y", "l1", 20)]))
                .await
                .unwrap();
            assert!(o.duplicate_batch);
            let o = w
                .ingest(batch(2, 8, vec![ev("y", "l1", 20), ev("z", "l2", 30)]))
                .await
                .unwrap();
            assert_eq!((o.stored, o.duplicates), (1, 1));
            // Same sequence, other content: per-event dedup, nothing lost.
            let o = w
                .ingest(batch(2, 9, vec![ev("z", "l2", 30), ev("w", "l2", 40)]))
                .await
                .unwrap();
            assert_eq!((o.stored, o.duplicates, o.duplicate_batch), (1, 1, false));
            drop(w);
            while Arc::strong_count(&s) > 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let s = Store::open(&dir, opts()).unwrap();
        let c: BTreeMap<_, _> = s.counters().into_iter().collect();
        assert_eq!(c["events_received"], 8);
        assert_eq!(c["events_stored"], 4);
        assert_eq!(c["duplicates_dropped"], 4);
        assert_eq!(c["batches_received"], 4);
        assert_eq!(c["batches_duplicate"], 1);
        assert_eq!(s.agents()[0].events, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_query_filters_and_pages_newest_first() {
        let dir = tmp("query");
        let s = Store::open(&dir, opts()).unwrap();
        let w = s.start_writer();
        let events: Vec<Event> = (0..25)
            .map(|i| ev(&format!("e{i}"), if i % 2 == 0 { "even" } else { "odd" }, -5 + i))
            .collect();
        w.ingest(batch(1, 1, events)).await.unwrap();
        let mut q = EventQuery {
            limit: 10,
            ..EventQuery::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = s.events(&q).unwrap();
            seen.extend(page.events.iter().map(|e| e.time));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(
            seen,
            (-5..20).rev().collect::<Vec<_>>(),
            "all, newest first, negative times included"
        );
        let odd = s
            .events(&EventQuery {
                license: Some("odd".into()),
                from: Some(0),
                to: Some(10),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            odd.events.iter().map(|e| e.time).collect::<Vec<_>>(),
            vec![8, 6, 4, 2, 0],
            "license \"odd\" holds the odd i, whose times are even"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_purges_old_events_and_dedup_keys() {
        let dir = tmp("purge");
        let s = Store::open(&dir, opts()).unwrap();
        let w = s.start_writer();
        let now = now_ns();
        w.ingest(batch(
            1,
            1,
            vec![ev("old", "l", now - 3 * 86_400_000_000_000), ev("new", "l", now)],
        ))
        .await
        .unwrap();
        let (raw, _) = s.purge(now).unwrap();
        assert_eq!(raw, 1);
        let left = s
            .events(&EventQuery {
                license: Some("l".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(left.events.len(), 1);
        // Ids are kept for the dedup window after they were stored, then forgotten.
        let (_, dedup) = s.purge(now + 2 * 86_400_000_000_000).unwrap();
        assert_eq!(dedup, 3, "two ids and one batch key");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_format_store_is_migrated_into_the_event_log() {
        let dir = tmp("migrate");
        let events: Vec<Event> = (0..6000)
            .map(|i| ev(&format!("m{i}"), ["p", "q"][i % 2], i as i64))
            .collect();
        {
            // The first format: an `e` key per event, `l` and `i` index keys, a journal.
            let db = sled::open(dir.join("store")).unwrap();
            for (seq, e) in events.iter().enumerate() {
                let body = events::encode_record(e);
                let mut v = vec![RECORD_VERSION];
                v.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
                v.extend_from_slice(&body);
                let mut k = vec![b'e'];
                k.extend_from_slice(&((e.time as u64) ^ (1 << 63)).to_be_bytes());
                k.extend_from_slice(&(seq as u64).to_be_bytes());
                db.insert(k, v).unwrap();
                db.insert(format!("i{}", e.id), vec![0u8; 24]).unwrap();
                db.insert(format!("l\0\x01{}", e.license.as_deref().unwrap()), vec![])
                    .unwrap();
            }
            db.insert(b"j\0\0\0\0\0\0\0\0", vec![0u8; 4]).unwrap();
            db.insert(b"m.next_store_seq", &6000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(&dir, opts()).unwrap();
        match s.analytics_origin() {
            AnalyticsOrigin::Rebuilt { events: 6000, reason } => assert!(reason.contains("migrated"), "{reason}"),
            other => panic!("{other:?}"),
        }
        for prefix in [b"e", b"i", b"l", b"j"] {
            assert!(
                s.db.scan_prefix(prefix).next().is_none(),
                "{:?} keys left",
                prefix[0] as char
            );
        }
        let p = s
            .events(&EventQuery {
                license: Some("q".into()),
                limit: 3,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            p.events.iter().map(|e| e.time).collect::<Vec<_>>(),
            vec![5999, 5997, 5995]
        );
        // Migrated ids still deduplicate.
        let w = s.start_writer();
        let o = w
            .ingest(batch(1, 1, vec![ev("m17", "q", 17), ev("new", "q", 9000)]))
            .await
            .unwrap();
        assert_eq!((o.stored, o.duplicates), (1, 1));
        stop(&s, w).await;
        drop(s);
        let s = Store::open(&dir, opts()).unwrap();
        assert_eq!(
            s.analytics_origin(),
            &AnalyticsOrigin::Snapshot {
                covers: 12_000,
                replayed: 1
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Varied events for the analytics: plans, statuses, features, late arrivals.
    fn analytics_events(n: usize, seed: u64) -> Vec<Event> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base = 20_000 * 86_400_000_000_000i64;
        (0..n)
            .map(|i| {
                let ty = [
                    EventType::Validated,
                    EventType::Validated,
                    EventType::Issued,
                    EventType::Activated,
                    EventType::Upgraded,
                    EventType::FeatureChecked,
                    EventType::Suspended,
                ][rng.usize(..7)];
                let mut e = Event::new(
                    format!("e{seed}-{i}"),
                    ty,
                    base + rng.i64(0..20 * 86_400_000_000_000),
                    "a",
                );
                e.license = Some(format!("l{}", rng.usize(..12)));
                e.plan = [None, Some("basic".into()), Some("pro".into())][rng.usize(..3)].clone();
                e.country = [None, Some("DE".into()), Some("SE".into())][rng.usize(..3)].clone();
                e.user = Some(format!("u{}", rng.usize(..5)));
                e
            })
            .collect()
    }

    /// Every metric (with and without one `by`) and every license's detail, as JSON text.
    fn answers(s: &Store) -> Vec<String> {
        let day = |d| 20_000 + d;
        let mut out = Vec::new();
        for metric in analytics::Metric::ALL {
            for by in [None, Some(analytics::Dim::Plan)] {
                if by.is_some() && !metric.takes_by() {
                    continue;
                }
                let q = MetricQuery {
                    metric,
                    from_day: day(0),
                    to_day: day(25),
                    at: day(15) as i64 * 86_400_000_000_000,
                    by,
                    below: 90.0,
                };
                out.push(format!("{} {:?}", metric.name(), s.metric(&q).unwrap()));
            }
        }
        for l in 0..12 {
            out.push(format!("{:?}", s.license(&format!("l{l}"), i64::MAX)));
        }
        out
    }

    async fn stop(s: &Arc<Store>, w: StoreWriter) {
        drop(w);
        while Arc::strong_count(s) > 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[test]
    fn snapshots_of_a_large_state_are_further_apart() {
        let (m, now) = (1_000_000, Duration::ZERO);
        assert!(snapshot_due(m, m, 32, 0, now), "the first one after the count");
        assert!(!snapshot_due(m - 1, m, 32, 0, now));
        // A 128 MB state: 4 M events apart.
        assert!(!snapshot_due(m, m, 32, 128 << 20, now));
        assert!(snapshot_due(4 * (1 << 20), m, 32, 128 << 20, now));
        // A small one: the count rules.
        assert!(snapshot_due(m, m, 32, 1 << 20, now));
        // No bound by size.
        assert!(snapshot_due(m, m, 0, 128 << 20, now));
        // Time: any new event after the interval; none, no snapshot.
        assert!(snapshot_due(1, m, 32, 128 << 20, SNAPSHOT_INTERVAL));
        assert!(!snapshot_due(0, m, 32, 128 << 20, SNAPSHOT_INTERVAL));
    }

    fn opts_every(snapshot_every: u64) -> StoreOptions {
        StoreOptions {
            dedup_window: 3650 * DAY,
            raw_events: 3650 * DAY,
            snapshot_every,
            ..opts()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn analytics_reopen_from_snapshot_replay_or_rebuild_gives_the_same_answers() {
        let dir = tmp("snap");
        let events = analytics_events(400, 1);
        // No snapshot yet, no close: everything is replayed from the event log.
        let live = {
            let s = Store::open(&dir, opts_every(u64::MAX)).unwrap();
            let w = s.start_writer();
            for (i, chunk) in events.chunks(40).enumerate() {
                w.ingest(batch(i as u64, i as u32, chunk.to_vec())).await.unwrap();
            }
            stop(&s, w).await;
            answers(&s)
        };
        assert!(
            live.iter().any(|a| a.contains("\"validations\"")),
            "non-trivial answers"
        );
        {
            let s = Store::open(&dir, opts_every(u64::MAX)).unwrap();
            assert_eq!(
                s.analytics_origin(),
                &AnalyticsOrigin::Snapshot {
                    covers: 0,
                    replayed: 400
                }
            );
            assert_eq!(answers(&s), live);
            s.close(); // writes the snapshot
        }
        assert!(dir.join(SNAPSHOT_FILE).exists());
        let old_snapshot = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
        // Snapshot plus a tail; background snapshots every 100 events on the way.
        let live = {
            let s = Store::open(&dir, opts_every(100)).unwrap();
            assert_eq!(
                s.analytics_origin(),
                &AnalyticsOrigin::Snapshot {
                    covers: 400,
                    replayed: 0
                }
            );
            let w = s.start_writer();
            for (i, chunk) in analytics_events(330, 2).chunks(30).enumerate() {
                w.ingest(batch(100 + i as u64, i as u32, chunk.to_vec())).await.unwrap();
            }
            stop(&s, w).await;
            answers(&s)
        };
        let s = Store::open(&dir, opts_every(100)).unwrap();
        match s.analytics_origin() {
            AnalyticsOrigin::Snapshot { covers, replayed } => {
                assert!(*covers > 400 && covers + replayed == 730, "{covers} + {replayed}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(answers(&s), live);
        drop(s);
        // An older snapshot: the events after it are replayed from the event log.
        std::fs::write(dir.join(SNAPSHOT_FILE), &old_snapshot).unwrap();
        let s = Store::open(&dir, opts_every(100)).unwrap();
        assert_eq!(
            s.analytics_origin(),
            &AnalyticsOrigin::Snapshot {
                covers: 400,
                replayed: 330
            }
        );
        assert_eq!(answers(&s), live);
        drop(s);
        // A snapshot from the future of this store (the data directory was restored from an
        // older backup): a rebuild.
        {
            let mut a = Analytics::new(BTreeMap::new());
            a.set_applied_through(10_000);
            let s = Store::open(&dir, opts_every(100)).unwrap();
            s.write_snapshot(10_000, &a.snapshot()).unwrap();
        }
        let s = Store::open(&dir, opts_every(100)).unwrap();
        match s.analytics_origin() {
            AnalyticsOrigin::Rebuilt { events: 730, reason } => assert!(reason.contains("past what"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(answers(&s), live);
        drop(s);
        // The rebuild was snapshotted at once.
        let s = Store::open(&dir, opts_every(100)).unwrap();
        assert_eq!(
            s.analytics_origin(),
            &AnalyticsOrigin::Snapshot {
                covers: 730,
                replayed: 0
            }
        );
        drop(s);
        // A damaged snapshot (a flipped byte, garbage, a truncation): a rebuild naming why.
        let good = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        for (bad, why) in [
            (flipped, ""),
            (b"garbage!garbage".to_vec(), "bad magic"),
            (good[..good.len() / 3].to_vec(), ""),
        ] {
            std::fs::write(dir.join(SNAPSHOT_FILE), &bad).unwrap();
            let s = Store::open(&dir, opts_every(100)).unwrap();
            match s.analytics_origin() {
                AnalyticsOrigin::Rebuilt { events: 730, reason } => {
                    assert!(reason.contains("unusable") && reason.contains(why), "{reason}")
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(answers(&s), live);
        }
        // Records of the earlier per-record format are dropped and the state rebuilt.
        {
            let s = Store::open(&dir, opts_every(100)).unwrap();
            s.db.insert(b"xl\0\0\0\0", b"old".to_vec()).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(&dir, opts_every(100)).unwrap();
        match s.analytics_origin() {
            AnalyticsOrigin::Rebuilt { reason, .. } => assert!(reason.contains("earlier format"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(s.db.scan_prefix(b"x").next().is_none());
        assert_eq!(answers(&s), live);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
