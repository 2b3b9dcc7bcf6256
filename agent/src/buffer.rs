//! The durable buffer: the only place in the agent that knows sled.
//!
//! Owns: making accepted events durable before they are acknowledged (group commit), cutting
//! them into sealed batches (compressed once, resent byte-identical), the batch sequence, the
//! disk cap and its policy, the dead-letter store, and recovery after a crash or a corrupt
//! database. Does not own: HTTP (ingest), the network to the collector or retry timing (ship).
//!
//! # On-disk layout
//!
//! One sled tree (the default one), so that every structural change is a single atomic
//! `apply_batch`. Keys are a one-byte prefix and, where numbered, a big-endian `u64` so
//! `scan_prefix` walks them oldest first:
//!
//! | key                | value |
//! |--------------------|-------|
//! | `m.agent_id`       | the agent id, persisted at creation, reused when the config sets none |
//! | `m.next_seq`       | `u64 BE`: the next batch sequence; written with every seal |
//! | `m.format`         | `u32 BE`: layout version (1) |
//! | `p` ‖ chunk `u64`  | pending chunk: `1 ‖ crc32 ‖ count u32 ‖ arrived i64 ‖ records`, or compressed: `2 ‖ crc32 ‖ count u32 ‖ arrived i64 ‖ records_len u32 ‖ zstd frame of the records` |
//! | `s` ‖ seq `u64`    | sealed batch record: `1 ‖ crc32 ‖ count u32 ‖ first_arrived i64 ‖ file_len u64` |
//! | `d` ‖ seq `u64`    | dead letter: `1 ‖ crc32 ‖ count u32 ‖ dead_at i64 ‖ reason_len u16 ‖ reason ‖ frame` |
//! | `q` ‖ n `u64`      | quarantine: raw bytes of a record whose checksum failed |
//!
//! Beside sled, `sealed/<seq, 20 digits>.batch` holds each sealed batch:
//! `1 ‖ crc32 ‖ count u32 ‖ sealed i64 ‖ first_arrived i64 ‖ frame`. Sealed frames live in
//! files, not in sled's tree, because sled 0.34 keeps the tree nodes that hold large values in
//! memory regardless of `cache_capacity`: with frames in the tree the agent's RSS grew by about
//! one frame per buffered batch (docs/benchmarks.md). With only small records in the tree,
//! memory stays flat however long the collector is away.
//!
//! All integers big-endian; `crc32` (IEEE) covers every byte after it. A chunk holds many
//! events — a group commit's requests, i.e. those that arrived during the previous flush, cut
//! into chunks of at most a quarter batch (`ship.batch_max_events` / `_bytes`) and 96 KiB,
//! between requests and, for a request larger than that, between its records — as wire-v1
//! event records (`common::wire::append_event`). This is a deliberate reuse of the
//! wire *event* encoding for storage: sealing is then a concatenation, with no
//! decode/re-encode, and the chunk's version byte names the encoding so a future wire
//! version can still read old chunks. Storing many events per key matters: sled costs about
//! 10 µs per key written and 15 µs per key drained here.
//!
//! A chunk of at least [`COMPRESS_MIN_BYTES`] of records is compressed as it is written
//! (version 2), with the ship settings' zstd level, and sealing passes its zstd frame on
//! unchanged: a wire payload may be several frames back to back (`docs/wire-protocol.md`).
//! Smaller chunks, which arrive when traffic is light, stay raw and are compressed together
//! when sealed, so they compress as well as a whole batch does. Compressing at write time
//! costs no more CPU than compressing at seal time did, and sled then writes a sixth of the
//! bytes: it rewrites a leaf's values whole whenever it consolidates the leaf, and writes a
//! leaf over about 128 KiB to a blob file of its own (created, synced, deleted), so raw
//! chunks cost about 550 bytes of disk writes per 128-byte event (docs/benchmarks.md).
//!
//! An appender may build its chunks itself, cut and compressed the same way ([`Chunker`]), and
//! hand them over whole ([`Appender::append_chunks`]); the writer stores them as they are. The
//! proxy's recorder does, on its background thread, so the writer (which every ingest request
//! waits for) does not compress them.
//!
//! # Rules
//!
//! * **Acknowledge after flush.** A writer thread takes every waiting append, writes them as
//!   one chunk, calls `Db::flush` and `fdatasync` on sled's log file, and only then answers
//!   every waiter. One thread flushes, so sled's `flush_async` hang with many concurrent
//!   awaiters (spacejam/sled#1308) cannot happen, and a flush is shared by everyone who
//!   arrived while the previous one ran (leader-style group commit: no fixed N or T window,
//!   the batch is whatever queued up during one flush).
//! * **Backpressure.** sled keeps the pages of large values in memory, so unsealed chunks cost
//!   RAM until sealed. When more than `PENDING_HIGH_WATER` (4 MiB) of chunk records, as
//!   stored (compressed or not), are unsealed and a sealer runs, the writer waits for it (at
//!   most `PENDING_WAIT`, 2 s, per group) before taking more appends: ingest that outruns
//!   sealing gets slower acknowledgements, not a growing heap. The disk cap (`max_bytes`)
//!   counts stored bytes too; an append is charged its uncompressed size when it asks for
//!   room, which errs on the safe side.
//! * **Versions.** Compressed chunks (version 2) came with 8b7d672; an agent from before it
//!   would quarantine them as damaged, so drain the buffer before going back to one.
//! * **Seal once.** Sealing takes the oldest pending chunks whole, while they fit the batch
//!   limits (a chunk that does not fit starts the next batch; only one larger than a batch,
//!   written under larger limits before a restart, is split and its rest rewritten: sled
//!   rewrites the values a tree node holds whenever it consolidates the node, so every
//!   rewrite of pending data costs its size again), makes a frame with sequence
//!   `m.next_seq` of their zstd frames (raw chunks compressed on the way), writes the
//!   batch file durably (temporary file, fsync, rename, fsync of the folder), then in one
//!   `apply_batch` inserts `s‖seq`, removes or shortens the chunks and advances `m.next_seq`;
//!   then flushes. Only sequences below [`Buffer::durable_seq`] — sealed *and* flushed — are
//!   handed to the shipper, so a sequence number is never sent and then reused for other
//!   content after a crash.
//! * **Sequence numbers survive a lost database.** A fresh database starts `m.next_seq` at the
//!   current unix time in microseconds, so a database moved aside after corruption cannot
//!   restart at 0 and collide with sequences the collector has already seen.
//! * **Delete after ack.** When the collector answered 200, `s‖seq` is removed and flushed,
//!   then the file is deleted: a record never outlives its file, so recovery can treat a
//!   record without a file as corruption and a file without a record as garbage.
//! * **Permanent rejects** (400/413) replace `s‖seq` with `d‖seq` (which holds the frame and
//!   the reason) in one `apply_batch`, flushed, then delete the file.
//!   Dead letters are kept for inspection up to a tenth of `max_bytes`; beyond that the oldest
//!   are deleted and counted (`dead_letter_overflow`).
//! * **Disk cap.** `max_bytes` bounds the bytes of all records (pending + sealed + dead).
//!   When an append would cross it: `reject` refuses the append (the API answers 503); or
//!   `drop_oldest` deletes the oldest sealed batches, then the oldest chunks, never the batch
//!   in flight, counting every event dropped (`drop_oldest`). sled's own files add overhead
//!   on top of the record bytes (log-structured segments, reclaimed in the background).
//!
//! # What a crash leaves behind
//!
//! | crash during                 | after restart |
//! |------------------------------|---------------|
//! | append, before the flush     | the chunk is there or not (sled recovers a prefix of its log); the client got no 202 and retries; events with their own `id` are deduplicated by the collector |
//! | append, after the flush      | the chunk is there; the client may or may not have seen the 202 |
//! | seal, before its record is flushed | either the chunks and old `m.next_seq` (re-sealed later, same or new content, never sent before; a file left from the attempt is deleted by recovery) or the sealed batch — never both, never half |
//! | send, before the answer      | the batch is resent byte-identical with the same sequence |
//! | ack, before the record's removal is durable | the batch is resent; the collector answers 200 as a duplicate |
//! | ack, after the removal, before the file is deleted | recovery deletes the file |
//! | dead-lettering               | the batch is in `s` or in `d`, never both |
//!
//! Process kill: nothing acknowledged is lost. Power loss: the same, to the extent that
//! `fdatasync` on sled's log reaches the device (sled's own flush only uses
//! `sync_file_range`, spacejam/sled#1452, which is why the extra `fdatasync` is there).
//!
//! A database that cannot be opened (corrupt, unreadable) is renamed to
//! `<dir>.corrupt-<unix seconds>` with an ERROR log and a fresh one is created; the agent
//! never crash-loops on its own data. A record whose checksum fails, or a sealed batch whose
//! file is missing or damaged, is moved to `q` (the file renamed to `.corrupt`) and its
//! events are counted as dropped (`corrupt`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keytrail_common::time::{now_ns, UnixNanos};
use keytrail_common::wire::{self, BatchSeq};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::WhenFull;
use crate::telemetry::AgentMetrics;

const META_AGENT_ID: &[u8] = b"m.agent_id";
const META_NEXT_SEQ: &[u8] = b"m.next_seq";
const META_FORMAT: &[u8] = b"m.format";
const FORMAT: u32 = 1;
const P: u8 = b'p';
const S: u8 = b's';
const D: u8 = b'd';
const Q: u8 = b'q';
const RECORD_VERSION: u8 = 1;
/// Folder of sealed batch files, inside the buffer directory.
const SEALED_DIR: &str = "sealed";
/// How often a buffer whose storage failed tries to reopen it.
const HEAL_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The most bytes the writer takes into one group commit.
const MAX_GROUP_BYTES: usize = 1 << 20;
/// Largest chunk the writer cuts (see [`chunk_limits`]): under sled's blob threshold (a quarter
/// of its 512 KiB log segment), above which sled writes an update to a file of its own.
const MAX_CHUNK_BYTES: usize = 96 << 10;
/// Chunks with at least this many bytes of records are written compressed (see the module
/// doc). zstd level 3 over 16 KiB of typical records (about 200 events) comes within a tenth
/// of what it achieves over a whole 5,000-event batch.
const COMPRESS_MIN_BYTES: usize = 16 << 10;
/// Chunk record versions: the records as they are (the first layout), or one zstd frame of
/// them.
const CHUNK_RAW: u8 = RECORD_VERSION;
const CHUNK_ZSTD: u8 = 2;
/// The largest uncompressed size a compressed chunk may declare, checked before decompressing:
/// the largest request body (`ingest.max_body_bytes` is at most 256 MiB), whose records are
/// smaller than its JSON.
const MAX_CHUNK_RECORDS_LEN: usize = 256 << 20;

/// Events and bytes of one pending chunk: at most a quarter of a batch, so the sealer packs
/// whole chunks into batches at least three quarters full (usually full) and never has to
/// split one and rewrite its rest. Measured at 32 x 500 (docs/benchmarks.md, session 15): peak
/// RSS 75-76 MiB with chunks of up to 4 MiB split by the sealer, 45-47 MiB with these.
fn chunk_limits(limits: &BufferLimits) -> (u32, usize) {
    let events = (limits.batch_max_events / 4).max(1);
    let bytes = (limits.batch_max_bytes as usize / 4).clamp(1, MAX_CHUNK_BYTES);
    (events, bytes)
}
/// Most appends waiting for the writer; beyond this, callers wait for a slot (backpressure).
const WRITER_QUEUE: usize = 1024;
/// Unsealed records beyond which the writer waits for the sealer before taking more appends.
/// sled keeps the pages of large values in memory, so pending chunks cost RAM until sealed:
/// when ingest outruns sealing (the CPU is shared with everything else on the host), this
/// bound keeps the agent's memory flat and turns the excess into slower acknowledgements.
const PENDING_HIGH_WATER: u64 = 4 << 20;
/// The longest the writer waits for the sealer per group (a sealer that cannot seal must not
/// stop ingest; the disk cap still applies).
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Limits and policies the buffer enforces.
#[derive(Clone, Debug)]
pub struct BufferLimits {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub cache_bytes: u64,
    pub batch_max_events: u32,
    pub batch_max_bytes: u64,
    pub zstd_level: i32,
}

/// Why an append was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("buffer full: {buffered} of {max} bytes used")]
    Full { buffered: u64, max: u64 },
    #[error("the disk holding the buffer is nearly full: {free} bytes free, {reserve} kept in reserve")]
    DiskLow { free: u64, reserve: u64 },
    #[error("buffer write failed: {0}")]
    Storage(String),
    #[error("buffer is shutting down")]
    Closed,
}

/// Buffer failures outside the append path.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("buffer storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("sealed batch file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A sealed batch ready to send.
#[derive(Clone, Debug)]
pub struct SealedBatch {
    pub seq: BatchSeq,
    pub events: u32,
    pub frame: Vec<u8>,
}

/// One dead letter, as `/v1/status` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeadLetterInfo {
    pub seq: u64,
    pub events: u32,
    pub bytes: usize,
    pub dead_at: String,
    pub reason: String,
}

/// What [`Buffer::seal_due`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealDue {
    /// Nothing is pending, or the database cannot be read (a storage error, being healed).
    Nothing,
    /// A batch should be sealed now.
    Now,
    /// The oldest pending event is due after this long (unless a batch fills first, which
    /// wakes the sealer through [`Buffer::pending_grew`]).
    In(std::time::Duration),
}

/// Sizes and counts of what is buffered.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub pending_events: u64,
    pub pending_bytes: u64,
    /// The pending records' size uncompressed (what a batch's byte limit counts).
    pub pending_records_len: u64,
    pub sealed_events: u64,
    pub sealed_bytes: u64,
    pub sealed_batches: u64,
    pub dead_batches: u64,
    pub dead_bytes: u64,
}

impl Counts {
    fn total_bytes(&self) -> u64 {
        self.pending_bytes + self.sealed_bytes + self.dead_bytes
    }

    /// Takes the pending chunk record `v` out of the counts (as far as it parses); returns
    /// its events.
    fn remove_chunk(&mut self, v: &[u8]) -> u64 {
        let (events, len) = parse_chunk(v).map_or((0, 0), |c| (c.count as u64, c.records_len as u64));
        self.pending_events = self.pending_events.saturating_sub(events);
        self.pending_bytes = self.pending_bytes.saturating_sub(v.len() as u64);
        self.pending_records_len = self.pending_records_len.saturating_sub(len);
        events
    }
}

struct Mutable {
    counts: Counts,
    next_chunk: u64,
    next_seq: u64,
    next_quarantine: u64,
}

/// The buffer. Shared by the ingest side (through [`Appender`]), the sealer and the shipper.
pub struct Buffer {
    /// The database; `None` only while [`Buffer::heal`] reopens it (under the write lock) or
    /// when reopening failed.
    db: std::sync::RwLock<Option<sled::Db>>,
    /// sled's log file, kept open to `fdatasync` after each flush.
    log_file: Mutex<Option<std::fs::File>>,
    /// The buffer directory, to reopen the database.
    dir: PathBuf,
    /// `<dir>/sealed`: one file per sealed batch (see the module doc).
    sealed_dir: PathBuf,
    agent_id: String,
    limits: BufferLimits,
    state: Mutex<Mutable>,
    /// Serialises every change that removes or rewrites existing records (seal, drop, ack,
    /// dead-letter), so two of them never work from the same stale read.
    layout: Mutex<()>,
    /// Sequences below this are sealed and flushed: safe to send.
    durable_seq: AtomicU64,
    /// Sequences being sent right now (the shipper sends a few at once): `next_sealed` hands
    /// out the oldest batch not among them, and `drop_oldest` leaves them alone.
    in_flight: Mutex<std::collections::BTreeSet<u64>>,
    /// Set when the database had to be moved aside at start.
    pub recovered_from: Option<PathBuf>,
    metrics: Arc<AgentMetrics>,
    /// Woken when the sealer has something new to do: pending data was empty and is not, a
    /// full batch is waiting ([`Buffer::seal_due`]), or storage failed or was reopened (the
    /// sealer heals it). Not on every commit: the sealer
    /// otherwise sleeps until the oldest pending event is due, and each wake-up of a thread
    /// is a few microseconds the proxy's calls may wait behind.
    pub pending_grew: Notify,
    /// Woken when a sealed batch becomes sendable (the shipper waits on it).
    pub sealed_ready: Notify,
    writable: AtomicBool,
    /// Size of the last append refused for want of disk space (0 once one fits again):
    /// readiness asks for room for it, not only for the reserve, so `/readyz` agrees with
    /// the 503 the client just got.
    refused_for_space: AtomicU64,
    /// Set while a sealer runs ([`Buffer::sealer_running`]): only then is waiting for it useful.
    sealer_active: AtomicBool,
    /// Set by a storage error: sled refuses every later operation until it is reopened.
    broken: AtomicBool,
    /// When [`Buffer::heal`] last tried.
    last_heal: Mutex<Option<std::time::Instant>>,
    /// Failed reopens in a row.
    heal_failures: std::sync::atomic::AtomicU32,
    /// Group commits hold it for reading, [`Buffer::heal`] for writing.
    heal_lock: std::sync::RwLock<()>,
    /// What sealing reuses from batch to batch, while batches keep coming
    /// ([`Buffer::release_seal_work`]).
    seal_work: Mutex<Option<SealWork>>,
}

/// The compression context and payload buffer a seal reuses. Made afresh per batch, they cost
/// about two thirds of the compression itself ([`wire::FrameSealer`]): a megabyte of zstd
/// tables set up and cleared, and the payload's pages mapped and faulted in again (the agent
/// maps buffers of 256 KiB and more on their own, see `tune_malloc`).
struct SealWork {
    sealer: wire::FrameSealer,
    payload: Vec<u8>,
    compressed: Vec<u8>,
}

fn key(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn key_num(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[1..9].try_into().expect("9-byte key"))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Prepends version and checksum to `body`.
fn record(body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(5 + body.len());
    r.push(RECORD_VERSION);
    r.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// The body of a record whose version and checksum are right.
fn open_record(r: &[u8], min_body: usize) -> Option<&[u8]> {
    if r.len() < 5 + min_body || r[0] != RECORD_VERSION {
        return None;
    }
    let body = &r[5..];
    (crc32fast::hash(body) == be_u32(r, 1)).then_some(body)
}

fn chunk_record(count: u32, arrived: UnixNanos, records: &[u8]) -> Vec<u8> {
    chunk_record_of(count, arrived, [records], records.len())
}

/// [`chunk_record`] of the concatenation of `parts` (`len` bytes in all), built in one buffer
/// of the exact size.
fn chunk_record_of<'a>(
    count: u32,
    arrived: UnixNanos,
    parts: impl IntoIterator<Item = &'a [u8]>,
    len: usize,
) -> Vec<u8> {
    let mut r = Vec::with_capacity(5 + 12 + len);
    r.push(RECORD_VERSION);
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&count.to_be_bytes());
    r.extend_from_slice(&arrived.to_be_bytes());
    for part in parts {
        r.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&r[5..]);
    r[1..5].copy_from_slice(&crc.to_be_bytes());
    r
}

struct Chunk<'a> {
    count: u32,
    arrived: UnixNanos,
    /// Bytes of the records, uncompressed.
    records_len: usize,
    body: ChunkBody<'a>,
}

enum ChunkBody<'a> {
    /// The records as they are (version 1).
    Raw(&'a [u8]),
    /// One zstd frame of the records (version 2).
    Zstd(&'a [u8]),
}

impl Chunk<'_> {
    /// The records, decompressed when the chunk is compressed; `None` when they do not
    /// decompress to the length the chunk declares.
    fn records(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        match self.body {
            ChunkBody::Raw(r) => Some(std::borrow::Cow::Borrowed(r)),
            ChunkBody::Zstd(z) => wire::decompress_payload(z, self.records_len)
                .ok()
                .map(std::borrow::Cow::Owned),
        }
    }
}

fn parse_chunk(r: &[u8]) -> Option<Chunk<'_>> {
    if r.len() < 5 + 12 || !(r[0] == CHUNK_RAW || r[0] == CHUNK_ZSTD) {
        return None;
    }
    let b = &r[5..];
    if crc32fast::hash(b) != be_u32(r, 1) {
        return None;
    }
    let (count, arrived) = (be_u32(b, 0), be_i64(b, 4));
    if r[0] == CHUNK_RAW {
        let records = &b[12..];
        return Some(Chunk {
            count,
            arrived,
            records_len: records.len(),
            body: ChunkBody::Raw(records),
        });
    }
    let records_len = (b.len() >= 16).then(|| be_u32(b, 12) as usize)?;
    (records_len <= MAX_CHUNK_RECORDS_LEN).then_some(Chunk {
        count,
        arrived,
        records_len,
        body: ChunkBody::Zstd(&b[16..]),
    })
}

/// The writer's compression context, and room to join a chunk's parts before compressing
/// them (only chunks of several appends, so at most [`MAX_CHUNK_BYTES`]).
struct ChunkCompressor {
    zstd: wire::FrameSealer,
    joined: Vec<u8>,
}

impl ChunkCompressor {
    fn new(zstd_level: i32) -> ChunkCompressor {
        ChunkCompressor {
            zstd: wire::FrameSealer::new(zstd_level),
            joined: Vec::new(),
        }
    }

    /// The chunk record of the concatenation of `parts` (`len` bytes in all): compressed
    /// when it holds at least [`COMPRESS_MIN_BYTES`], else as [`chunk_record_of`] builds it.
    fn record(&mut self, count: u32, arrived: UnixNanos, parts: &[&[u8]], len: usize) -> Vec<u8> {
        if !(COMPRESS_MIN_BYTES..=MAX_CHUNK_RECORDS_LEN).contains(&len) {
            return chunk_record_of(count, arrived, parts.iter().copied(), len);
        }
        let records = match parts {
            [one] => one,
            _ => {
                self.joined.clear();
                for part in parts {
                    self.joined.extend_from_slice(part);
                }
                &self.joined[..]
            }
        };
        compressed_chunk_record(&mut self.zstd, count, arrived, records)
    }
}

/// What chunks are made of: each append whole, or, when it is over `max_events` or
/// `max_bytes`, cut at record boundaries into pieces within them (at least one record each),
/// so that no chunk is larger than a batch and sealing never rewrites the rest of one. All
/// the chunks of a group are written in one `apply_batch`, so an append stays all-or-nothing.
fn chunk_units(appends: &[Append], max_events: u32, max_bytes: usize) -> Vec<(&[u8], u32)> {
    let mut units = Vec::with_capacity(appends.len());
    for a in appends {
        if let Payload::Records { records, count } = &a.payload {
            units_of(records, *count, max_events, max_bytes, &mut units);
        }
    }
    units
}

/// [`chunk_units`] of one append's records.
fn units_of<'a>(records: &'a [u8], count: u32, max_events: u32, max_bytes: usize, units: &mut Vec<(&'a [u8], u32)>) {
    if count <= max_events && records.len() <= max_bytes {
        units.push((records, count));
        return;
    }
    let spans = match wire::record_spans(records) {
        Ok(spans) if spans.len() == count as usize => spans,
        // Not cut when its records do not parse (ingest built them, so this does not
        // happen; the sealer would find out).
        _ => {
            units.push((records, count));
            return;
        }
    };
    let (mut start, mut end, mut n) = (0, 0, 0u32);
    for (at, len) in spans {
        if n > 0 && (n >= max_events || at + len - start > max_bytes) {
            units.push((&records[start..end], n));
            (start, n) = (at, 0);
        }
        end = at + len;
        n += 1;
    }
    if n > 0 {
        units.push((&records[start..end], n));
    }
}

/// Chunk records of `units` in order: each chunk the next unit and those after it while they
/// fit `max_events` and `max_bytes` (a unit is never larger, see [`chunk_units`]). Returns
/// each chunk's record, events and bytes of records.
fn build_chunks(
    units: &[(&[u8], u32)],
    max_events: u32,
    max_bytes: usize,
    arrived: UnixNanos,
    compressor: &mut ChunkCompressor,
) -> Vec<PreparedChunk> {
    let mut chunks = Vec::new();
    let mut rest = units;
    while !rest.is_empty() {
        // One chunk: the next unit, and those after it while they fit.
        let (mut len, mut count) = (rest[0].0.len(), rest[0].1);
        let mut n = 1;
        while n < rest.len() && len + rest[n].0.len() <= max_bytes && count.saturating_add(rest[n].1) <= max_events {
            len += rest[n].0.len();
            count += rest[n].1;
            n += 1;
        }
        let (parts, later) = rest.split_at(n);
        rest = later;
        if count == 0 {
            continue;
        }
        let parts: Vec<&[u8]> = parts.iter().map(|u| u.0).collect();
        chunks.push(PreparedChunk {
            record: compressor.record(count, arrived, &parts, len),
            count,
            len,
        });
    }
    chunks
}

/// One chunk record, built and compressed, with its events and bytes of records.
pub struct PreparedChunk {
    record: Vec<u8>,
    count: u32,
    len: usize,
}

#[cfg(test)]
impl PreparedChunk {
    /// The chunk's records, decompressed.
    pub fn records_for_tests(&self) -> Vec<u8> {
        parse_chunk(&self.record).unwrap().records().unwrap().into_owned()
    }
}

/// Builds chunk records the way the writer does — cut to the chunk limits, compressed from
/// [`COMPRESS_MIN_BYTES`] — on the caller's thread, for [`Appender::append_chunks`]: the
/// proxy's recorder compresses its batches on a background thread ([`crate::proxy`]) instead
/// of on the writer, which every request waits for.
pub struct Chunker {
    max_events: u32,
    max_bytes: usize,
    compressor: ChunkCompressor,
}

impl Chunker {
    #[cfg(test)]
    pub fn for_tests(max_events: u32, max_bytes: usize, zstd_level: i32) -> Chunker {
        Chunker {
            max_events,
            max_bytes,
            compressor: ChunkCompressor::new(zstd_level),
        }
    }

    /// The chunks of `count` wire records, stamped as arriving now.
    pub fn chunks(&mut self, records: &[u8], count: u32) -> Vec<PreparedChunk> {
        let mut units = Vec::new();
        units_of(records, count, self.max_events, self.max_bytes, &mut units);
        build_chunks(&units, self.max_events, self.max_bytes, now_ns(), &mut self.compressor)
    }
}

/// A compressed (version 2) chunk record of `records`.
fn compressed_chunk_record(zstd: &mut wire::FrameSealer, count: u32, arrived: UnixNanos, records: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(5 + 16);
    r.push(CHUNK_ZSTD);
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&count.to_be_bytes());
    r.extend_from_slice(&arrived.to_be_bytes());
    r.extend_from_slice(&(records.len() as u32).to_be_bytes());
    zstd.compress_append(records, &mut r);
    let crc = crc32fast::hash(&r[5..]);
    r[1..5].copy_from_slice(&crc.to_be_bytes());
    r
}

/// A sealed batch file's content (its `first_arrived` lives in the sled record too).
struct Sealed<'a> {
    count: u32,
    frame: &'a [u8],
}

/// The content of a sealed batch file, sealed now.
fn sealed_file(count: u32, first_arrived: UnixNanos, frame: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(20 + frame.len());
    body.extend_from_slice(&count.to_be_bytes());
    body.extend_from_slice(&now_ns().to_be_bytes());
    body.extend_from_slice(&first_arrived.to_be_bytes());
    body.extend_from_slice(frame);
    record(&body)
}

fn parse_sealed(r: &[u8]) -> Option<Sealed<'_>> {
    let b = open_record(r, 20)?;
    Some(Sealed {
        count: be_u32(b, 0),
        frame: &b[20..],
    })
}

/// What recovery does with a batch file that has no readable record ([`Buffer::orphan_verdict`]).
enum Orphan {
    Adopt(SealedMeta),
    Delete,
    Unreadable { events: u64 },
}

/// What sled keeps of a sealed batch; the frame itself lives in `sealed/<seq>.batch`.
#[derive(Clone, Copy, Debug)]
struct SealedMeta {
    count: u32,
    first_arrived: UnixNanos,
    file_len: u64,
}

fn sealed_meta_record(m: SealedMeta) -> Vec<u8> {
    let mut body = Vec::with_capacity(20);
    body.extend_from_slice(&m.count.to_be_bytes());
    body.extend_from_slice(&m.first_arrived.to_be_bytes());
    body.extend_from_slice(&m.file_len.to_be_bytes());
    record(&body)
}

fn parse_sealed_meta(r: &[u8]) -> Option<SealedMeta> {
    let b = open_record(r, 20)?;
    Some(SealedMeta {
        count: be_u32(b, 0),
        first_arrived: be_i64(b, 4),
        file_len: u64::from_be_bytes(b[12..20].try_into().ok()?),
    })
}

/// Writes `bytes` to `path` durably: a temporary file, `fsync`, rename, `fsync` of the folder.
fn write_file_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct Dead<'a> {
    count: u32,
    dead_at: UnixNanos,
    reason: &'a str,
    frame: &'a [u8],
}

fn parse_dead(r: &[u8]) -> Option<Dead<'_>> {
    let b = open_record(r, 14)?;
    let len = u16::from_be_bytes(b[12..14].try_into().ok()?) as usize;
    let reason = std::str::from_utf8(b.get(14..14 + len)?).ok()?;
    Some(Dead {
        count: be_u32(b, 0),
        dead_at: be_i64(b, 4),
        reason,
        frame: &b[14 + len..],
    })
}

fn dead_record(count: u32, reason: &str, frame: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(1024)];
    let mut body = Vec::with_capacity(14 + reason.len() + frame.len());
    body.extend_from_slice(&count.to_be_bytes());
    body.extend_from_slice(&now_ns().to_be_bytes());
    body.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    body.extend_from_slice(reason);
    body.extend_from_slice(frame);
    record(&body)
}

/// `m.next_seq`, created for a new database (see the module doc for why it starts at the
/// current time).
fn read_next_seq(db: &sled::Db) -> Result<u64, sled::Error> {
    Ok(match db.get(META_NEXT_SEQ)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")),
        _ => {
            let start = (now_ns() / 1000) as u64;
            db.insert(META_NEXT_SEQ, &start.to_be_bytes())?;
            start
        }
    })
}

/// Renames a database that cannot be opened to `<dir>.corrupt-<unix seconds>` and creates an
/// empty `dir` with the old sealed batch files in it (see [`rescue_sealed_files`]).
fn move_aside(dir: &Path, error: &str) -> Result<PathBuf, String> {
    let aside = PathBuf::from(format!("{}.corrupt-{}", dir.display(), now_ns() / 1_000_000_000));
    tracing::error!(
        dir = %dir.display(), moved_to = %aside.display(), error = %error,
        "buffer database cannot be opened: moved aside, starting a fresh one; its sealed batches are kept, its unsealed events are not shipped"
    );
    std::fs::rename(dir, &aside).map_err(|re| format!("{error}; moving it aside failed: {re}"))?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    rescue_sealed_files(&aside.join(SEALED_DIR), &dir.join(SEALED_DIR));
    Ok(aside)
}

/// Moves the sealed batch files of a database that was moved aside into the fresh one's
/// folder, where recovery adopts the readable ones: each is a self-contained, checksummed frame,
/// so they are not lost with the database that indexed them.
fn rescue_sealed_files(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else { return };
    let _ = std::fs::create_dir_all(to);
    let mut moved = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "batch") {
            if let Some(name) = path.file_name() {
                if std::fs::rename(&path, to.join(name)).is_ok() {
                    moved += 1;
                }
            }
        }
    }
    if moved > 0 {
        tracing::warn!(
            files = moved,
            "sealed batch files taken from the damaged database; they will be sent"
        );
    }
}

/// How long opening waits for sled's file lock: a database just closed in this process
/// releases it when sled's background thread has stopped, a moment later.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// [`open_db`], waiting up to [`LOCK_WAIT`] while the file lock is held.
fn open_db_waiting(dir: &Path, cache_bytes: u64) -> Result<sled::Db, String> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_db(dir, cache_bytes) {
            Err(e) if e.contains("lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Opens sled; a panic inside sled (it panics on some corruptions) becomes an error.
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, String> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .flush_every_ms(Some(1000));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("sled panicked while opening the database".into()),
    }
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`. A database that cannot be opened is moved aside
    /// and replaced by a fresh one; another process holding the lock is an error.
    pub fn open(
        dir: &Path,
        configured_agent_id: Option<&str>,
        limits: BufferLimits,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Arc<Buffer>, BufferError> {
        let open_err = |message: String| BufferError::Open {
            path: dir.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let mut recovered_from = None;
        let db = match open_db_waiting(dir, limits.cache_bytes) {
            Ok(db) => db,
            Err(e) if e.contains("lock") => {
                return Err(open_err(format!(
                    "{e} (is another keytrail-agent using this directory?)"
                )))
            }
            Err(e) => {
                let aside = move_aside(dir, &e).map_err(open_err)?;
                recovered_from = Some(aside);
                open_db(dir, limits.cache_bytes).map_err(open_err)?
            }
        };
        let log_file = std::fs::OpenOptions::new().write(true).open(dir.join("db")).ok();
        let sealed_dir = dir.join(SEALED_DIR);
        std::fs::create_dir_all(&sealed_dir).map_err(|e| open_err(format!("{}: {e}", sealed_dir.display())))?;

        // Identity and sequence, persisted before first use.
        let stored_id = db.get(META_AGENT_ID)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        let agent_id = match (configured_agent_id, stored_id) {
            (Some(c), stored) => {
                if stored.as_deref().is_some_and(|s| s != c) {
                    tracing::warn!(previous = ?stored, now = c, "agent_id changed; buffered events ship under the new id");
                }
                c.to_string()
            }
            (None, Some(s)) => s,
            (None, None) => keytrail_common::config::hostname().unwrap_or_else(|| "keytrail-agent".into()),
        };
        db.insert(META_AGENT_ID, agent_id.as_bytes())?;
        if db.get(META_FORMAT)?.is_none() {
            db.insert(META_FORMAT, &FORMAT.to_be_bytes())?;
        }
        let next_seq = read_next_seq(&db)?;
        db.flush()?;

        let buffer = Buffer {
            db: std::sync::RwLock::new(Some(db)),
            log_file: Mutex::new(log_file),
            dir: dir.to_path_buf(),
            sealed_dir,
            agent_id,
            limits,
            state: Mutex::new(Mutable {
                counts: Counts::default(),
                next_chunk: 0,
                next_seq,
                next_quarantine: 0,
            }),
            layout: Mutex::new(()),
            durable_seq: AtomicU64::new(next_seq),
            in_flight: Mutex::default(),
            recovered_from,
            metrics,
            pending_grew: Notify::new(),
            sealed_ready: Notify::new(),
            writable: AtomicBool::new(true),
            refused_for_space: AtomicU64::new(0),
            sealer_active: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            last_heal: Mutex::new(None),
            heal_failures: std::sync::atomic::AtomicU32::new(0),
            heal_lock: std::sync::RwLock::new(()),
            seal_work: Mutex::new(None),
        };
        buffer.recover()?;
        Ok(Arc::new(buffer))
    }

    /// Rebuilds the counters from disk and quarantines records whose checksum fails.
    fn recover(&self) -> Result<(), BufferError> {
        let mut counts = Counts::default();
        let mut next_chunk = 0;
        let mut bad = Vec::new();
        for item in self.db()?.scan_prefix([P]) {
            let (k, v) = item?;
            next_chunk = key_num(&k) + 1;
            match parse_chunk(&v) {
                Some(c) => {
                    counts.pending_events += c.count as u64;
                    counts.pending_bytes += v.len() as u64;
                    counts.pending_records_len += c.records_len as u64;
                }
                None => bad.push((k, v)),
            }
        }
        let mut known = std::collections::HashSet::new();
        // `s` records that are damaged while their file is there: the file is judged like an
        // orphan (it is self-contained and checksummed), and its verdict replaces the record.
        let mut damaged_records = std::collections::HashMap::new();
        for item in self.db()?.scan_prefix([S]) {
            let (k, v) = item?;
            let exists = self.sealed_path(key_num(&k)).exists();
            match parse_sealed_meta(&v) {
                Some(m) if exists => {
                    known.insert(key_num(&k));
                    counts.sealed_events += m.count as u64;
                    counts.sealed_bytes += m.file_len;
                    counts.sealed_batches += 1;
                }
                None if exists => {
                    damaged_records.insert(key_num(&k), (k, v));
                }
                _ => bad.push((k, v)),
            }
        }
        let mut dead = std::collections::HashSet::new();
        for item in self.db()?.scan_prefix([D]) {
            let (k, v) = item?;
            dead.insert(key_num(&k));
            counts.dead_batches += 1;
            counts.dead_bytes += v.len() as u64;
        }
        // Half-written temporary files are deleted; batch files without a record are judged
        // one by one (`orphan_verdict`).
        let mut orphans = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.sealed_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let seq = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok());
                match (path.extension().and_then(|e| e.to_str()), seq) {
                    (Some("tmp"), _) | (Some("batch"), None) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    (Some("batch"), Some(n)) if !known.contains(&n) => orphans.push((n, path)),
                    _ => {}
                }
            }
        }
        orphans.sort();
        let mut adopted = sled::Batch::default();
        let mut next_seq = self.state.lock().expect("buffer state").next_seq;
        let mut pending_ids: Option<std::collections::HashSet<String>> = None;
        let mut unreadable_events = 0u64;
        for (seq, path) in orphans {
            let bytes = std::fs::read(&path).unwrap_or_default();
            let record = damaged_records.remove(&seq);
            let pending = pending_ids.get_or_insert_with(|| self.pending_ids());
            match self.orphan_verdict(seq, &path, &bytes, &dead, pending) {
                Orphan::Adopt(meta) => {
                    tracing::warn!(
                        seq, events = meta.count,
                        "a sealed batch file had no readable record in the database (lost to damage, or its acknowledgement was cut short): adopted, it will be sent; the collector drops it if it already has it"
                    );
                    adopted.insert(&key(S, seq), sealed_meta_record(meta));
                    counts.sealed_events += meta.count as u64;
                    counts.sealed_bytes += meta.file_len;
                    counts.sealed_batches += 1;
                    next_seq = next_seq.max(seq + 1);
                }
                Orphan::Delete => {
                    let _ = std::fs::remove_file(&path);
                    if let Some((k, _)) = record {
                        adopted.remove(k);
                    }
                }
                Orphan::Unreadable { events } => {
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                    tracing::error!(seq, events, file = %path.with_extension("corrupt").display(),
                        "a sealed batch file cannot be read: moved aside, its events are counted as dropped");
                    unreadable_events += events;
                    // The file is kept for inspection; its damaged record goes.
                    if let Some((k, _)) = record {
                        adopted.remove(k);
                    }
                }
            }
        }
        if unreadable_events > 0 {
            self.metrics.discarded.add(&["corrupt"], unreadable_events);
        }
        adopted.insert(META_NEXT_SEQ, &next_seq.to_be_bytes());
        self.db()?.apply_batch(adopted)?;
        self.flush()?;
        self.state.lock().expect("buffer state").next_seq = next_seq;
        self.durable_seq.store(next_seq, Ordering::Release);
        let next_quarantine = self
            .db()?
            .scan_prefix([Q])
            .keys()
            .next_back()
            .transpose()?
            .map_or(0, |k| key_num(&k) + 1);
        {
            let mut st = self.state.lock().expect("buffer state");
            st.counts = counts;
            st.next_chunk = next_chunk;
            st.next_quarantine = next_quarantine;
        }
        for (k, v) in bad {
            self.quarantine(&k, &v)?;
        }
        self.publish_gauges();
        Ok(())
    }

    /// The ids of every pending event, as far as the chunks decode (recovery only, and only
    /// when a batch file may overlap them).
    fn pending_ids(&self) -> std::collections::HashSet<String> {
        let mut ids = std::collections::HashSet::new();
        let Ok(db) = self.db() else { return ids };
        for (_, v) in db.scan_prefix([P]).flatten() {
            let Some(chunk) = parse_chunk(&v) else { continue };
            let Some(records) = chunk.records() else { continue };
            if let Ok(events) = wire::decode_payload(&records, &self.agent_id, chunk.count) {
                ids.extend(events.into_iter().map(|e| e.id));
            }
        }
        ids
    }

    /// What to do with a sealed batch file that has no readable `s` record. Crashes and
    /// damage leave such files in three ways:
    /// - a seal cut off between writing the file and committing its record: its sequence was
    ///   never sent, and its events are still pending (all of them, or the durable part when
    ///   the chunks it took were not flushed yet);
    /// - an acknowledgement or dead-lettering cut off between removing the record and deleting
    ///   the file: the collector has the batch (or `d` holds it);
    /// - sled lost the record (its log damaged and recovered to an earlier state): the file
    ///   may be the only copy of its events.
    ///
    /// So: a dead letter's file, or a file whose events are all still pending, is deleted. A
    /// file that overlaps the pending events is rewritten with only the events that are not
    /// pending (never twice in the buffer), then adopted. Any other
    /// readable file is adopted and sent; at worst the collector gets a batch it already has
    /// and acknowledges it as a duplicate. A file that cannot be read is moved aside and its
    /// events (when its header can be read) counted as dropped.
    fn orphan_verdict(
        &self,
        seq: u64,
        path: &Path,
        bytes: &[u8],
        dead: &std::collections::HashSet<u64>,
        pending: &std::collections::HashSet<String>,
    ) -> Orphan {
        if dead.contains(&seq) {
            return Orphan::Delete;
        }
        let (Some(sealed), Some(body)) = (parse_sealed(bytes), open_record(bytes, 20)) else {
            return Orphan::Unreadable { events: 0 };
        };
        let limits = wire::DecodeLimits {
            max_frame_bytes: sealed.frame.len(),
            max_uncompressed_bytes: wire::DecodeLimits::default()
                .max_uncompressed_bytes
                .max((self.limits.batch_max_bytes as usize).saturating_mul(2)),
            max_events: sealed.count,
        };
        let batch = match wire::decode_frame(sealed.frame, &limits) {
            Ok(b) if b.header.seq.0 == seq && b.events.len() == sealed.count as usize => b,
            _ => {
                return Orphan::Unreadable {
                    events: sealed.count as u64,
                }
            }
        };
        let first_arrived = be_i64(body, 12);
        let still = batch.events.iter().filter(|e| pending.contains(&e.id)).count();
        if still == batch.events.len() {
            return Orphan::Delete;
        }
        if still > 0 {
            let mut payload = Vec::new();
            let mut n = 0u32;
            for e in batch.events.iter().filter(|e| !pending.contains(&e.id)) {
                wire::append_event(e, &mut payload);
                n += 1;
            }
            let frame = wire::seal_frame(&self.agent_id, BatchSeq(seq), n, &payload, self.limits.zstd_level);
            let rewritten = sealed_file(n, first_arrived, &frame);
            if write_file_durably(path, &rewritten).is_err() {
                return Orphan::Unreadable { events: n as u64 };
            }
            return Orphan::Adopt(SealedMeta {
                count: n,
                first_arrived,
                file_len: rewritten.len() as u64,
            });
        }
        Orphan::Adopt(SealedMeta {
            count: sealed.count,
            first_arrived,
            file_len: bytes.len() as u64,
        })
    }

    /// Moves an unreadable record to `q`, counting what it held as dropped.
    fn quarantine(&self, k: &[u8], v: &[u8]) -> Result<(), BufferError> {
        // The count field may itself be damaged; believe it only when plausible.
        let count = if v.len() >= 9 {
            be_u32(v, 5).min(1_000_000) as u64
        } else {
            0
        };
        let n = {
            let mut st = self.state.lock().expect("buffer state");
            st.next_quarantine += 1;
            st.next_quarantine - 1
        };
        let mut b = sled::Batch::default();
        b.remove(k);
        b.insert(&key(Q, n), v);
        self.watch(self.db().and_then(|db| db.apply_batch(b)))?;
        self.flush()?;
        if k[0] == S {
            let path = self.sealed_path(key_num(k));
            let _ = std::fs::rename(&path, path.with_extension("corrupt"));
        }
        tracing::error!(record = %String::from_utf8_lossy(&k[..1]), seq = key_num(k), events = count,
            "buffer record failed its checksum: moved to quarantine, its events are counted as dropped");
        self.metrics.discarded.add(&["corrupt"], count);
        Ok(())
    }

    fn sealed_path(&self, seq: u64) -> PathBuf {
        self.sealed_dir.join(format!("{seq:020}.batch"))
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().expect("buffer state").counts.clone()
    }

    /// Whether appends can succeed (readiness): the last write worked, no storage error waits
    /// for a reopen, and the disk has room beyond its reserve (and for the last append that was
    /// refused for want of it).
    pub fn is_writable(&self) -> bool {
        let wanted = self.refused_for_space.load(Ordering::Relaxed);
        self.writable.load(Ordering::Relaxed)
            && !self.broken.load(Ordering::Acquire)
            && keytrail_common::disk::low(&self.dir, wanted).is_none()
    }

    /// Arrival time of the oldest buffered (unsent) event.
    pub fn oldest_arrival(&self) -> Option<UnixNanos> {
        let db = self.db().ok()?;
        let sealed = db.scan_prefix([S]).values().next().and_then(Result::ok);
        let sealed = sealed.as_deref().and_then(parse_sealed_meta).map(|s| s.first_arrived);
        let pending = db.scan_prefix([P]).values().next().and_then(Result::ok);
        let pending = pending.as_deref().and_then(parse_chunk).map(|c| c.arrived);
        match (sealed, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn publish_gauges(&self) {
        let c = self.counts();
        self.metrics
            .buffer_events
            .set((c.pending_events + c.sealed_events) as i64);
        self.metrics.buffer_bytes.set(c.total_bytes() as i64);
    }

    /// Flush sled, then `fdatasync` its log so the data is on the device, not only handed to
    /// the kernel.
    fn flush(&self) -> Result<(), sled::Error> {
        let flushed = self.db().and_then(|db| db.flush()).and_then(|_| {
            if let Some(f) = &*self.log_file.lock().expect("log file") {
                f.sync_data()?;
            }
            Ok(())
        });
        if let Err(e) = &flushed {
            self.storage_failed(e);
        }
        flushed
    }

    /// Passes a sled result through, recording an error as a storage failure (so the
    /// database gets reopened).
    fn watch<T>(&self, r: Result<T, sled::Error>) -> Result<T, sled::Error> {
        if let Err(e) = &r {
            self.storage_failed(e);
        }
        r
    }

    /// The same for buffer results: a sled error among them is a storage failure.
    fn watch_buffer<T>(&self, r: Result<T, BufferError>) -> Result<T, BufferError> {
        if let Err(BufferError::Storage(e)) = &r {
            self.storage_failed(e);
        }
        r
    }

    /// Records a storage error: sled 0.34 keeps the first I/O error of its log writer and
    /// returns it from every later operation until the database is opened again, so a full
    /// disk would otherwise stop the buffer for good. [`Buffer::heal`] reopens it.
    fn storage_failed(&self, e: &sled::Error) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, "buffer storage failed; it is reopened once there is room again (every {}s)", HEAL_EVERY.as_secs());
            // The sealer reopens it, also while no events arrive: wake it from its sleep.
            self.pending_grew.notify_one();
        }
        self.writable.store(false, Ordering::Relaxed);
    }

    /// After a storage error: reopens the database (at most once per [`HEAL_EVERY`]), recovers
    /// from what is on disk as after a restart, and checks that a write sticks. Returns whether
    /// the buffer works. Acknowledged events were flushed before their acknowledgement, so
    /// they are in what sled reopens; what was being written when the error struck was not
    /// acknowledged.
    pub fn heal(&self) -> bool {
        if !self.broken.load(Ordering::Acquire) {
            return true;
        }
        {
            let mut last = self.last_heal.lock().expect("last heal");
            if last.is_some_and(|t| t.elapsed() < HEAL_EVERY) {
                return false;
            }
            *last = Some(std::time::Instant::now());
        }
        // While the disk is still nearly full a reopen would only fail again (and sled may
        // leave its log unreadable when it runs out of space mid-write).
        if keytrail_common::disk::low(&self.dir, 0).is_some() {
            return false;
        }
        // Exclusive: no group commit runs meanwhile, nor a second heal.
        let _writers = self.heal_lock.write().expect("heal lock");
        let _layout = self.layout.lock().expect("buffer layout");
        if !self.broken.load(Ordering::Acquire) {
            return true;
        }
        // Closing a sled database whose log writer failed can take long (it tries to flush):
        // take it out (readers get an error meanwhile, not a hang), close it on a thread of
        // its own and wait a little. Other threads may still hold a clone for an operation in
        // progress; sled's file lock is released when the last one is dropped.
        let old = self.db.write().expect("buffer database").take();
        *self.log_file.lock().expect("log file") = None;
        if let Some(old) = old {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let _ = std::thread::Builder::new()
                .name("keytrail-buffer-close".into())
                .spawn(move || {
                    drop(old);
                    let _ = done_tx.send(());
                });
            if done_rx.recv_timeout(std::time::Duration::from_secs(5)).is_err() {
                tracing::warn!("the failed buffer database is still closing; reopening it later");
                return false;
            }
        }
        let mut moved_aside = false;
        let reopened = loop {
            match open_db_waiting(&self.dir, self.limits.cache_bytes) {
                Ok(db) => break Ok(db),
                // sled can leave its log unreadable when the disk ran full under it: as at
                // start, the database is moved aside (its sealed batches kept). Other errors
                // (a panic inside sled) get the same after a few tries with room on the disk.
                Err(e)
                    if !moved_aside
                        && (e.to_ascii_lowercase().contains("corrupt")
                            || self.heal_failures.fetch_add(1, Ordering::Relaxed) >= 3) =>
                {
                    moved_aside = true;
                    if let Err(e) = move_aside(&self.dir, &e) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        }
        .and_then(|db| {
            let next_seq = read_next_seq(&db).map_err(|e| e.to_string())?;
            // A fresh database (moved aside) starts with the identity it had.
            db.insert(META_AGENT_ID, self.agent_id.as_bytes())
                .map_err(|e| e.to_string())?;
            if db.get(META_FORMAT).map_err(|e| e.to_string())?.is_none() {
                db.insert(META_FORMAT, &FORMAT.to_be_bytes())
                    .map_err(|e| e.to_string())?;
            }
            *self.log_file.lock().expect("log file") =
                std::fs::OpenOptions::new().write(true).open(self.dir.join("db")).ok();
            *self.db.write().expect("buffer database") = Some(db);
            Ok(next_seq)
        });
        let next_seq = match reopened {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reopening the buffer database failed; trying again later");
                return false;
            }
        };
        // Never below a sequence that may have been sent (a fresh database starts at the
        // clock, which may have stepped back).
        let next_seq = next_seq.max(self.durable_seq.load(Ordering::Acquire));
        self.state.lock().expect("buffer state").next_seq = next_seq;
        self.durable_seq.store(next_seq, Ordering::Release);
        match self.recover() {
            Ok(()) => {
                self.heal_failures.store(0, Ordering::Relaxed);
                self.broken.store(false, Ordering::Release);
                self.writable.store(true, Ordering::Relaxed);
                tracing::info!("buffer database reopened after a storage error; taking events again");
                // Recovery recounted what is pending: let the sealer look again.
                self.pending_grew.notify_one();
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the reopened buffer database cannot be written yet; trying again later");
                false
            }
        }
    }

    /// Whether a storage error is waiting for [`Buffer::heal`].
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The open database, or the error that closed it.
    fn db(&self) -> Result<sled::Db, sled::Error> {
        self.db.read().expect("buffer database").clone().ok_or_else(|| {
            sled::Error::Io(std::io::Error::other(
                "the buffer database is closed after a storage error and could not be reopened yet",
            ))
        })
    }

    /// Starts the writer thread; the returned [`Appender`] is how events get in.
    pub fn start_writer(self: &Arc<Self>) -> Appender {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let buffer = Arc::clone(self);
        std::thread::Builder::new()
            .name("keytrail-buffer-writer".into())
            .spawn(move || buffer.writer_loop(rx))
            .expect("spawning the buffer writer thread");
        Appender {
            tx,
            chunk_limits: chunk_limits(&self.limits),
            zstd_level: self.limits.zstd_level,
        }
    }

    fn writer_loop(&self, mut rx: mpsc::Receiver<Append>) {
        let mut group: Vec<Append> = Vec::new();
        let mut compressor = ChunkCompressor::new(self.limits.zstd_level);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.payload.len();
            group.push(first);
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.payload.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            self.wait_for_sealer();
            self.commit_group(&mut group, &mut compressor);
        }
        tracing::debug!("buffer writer stopped");
    }

    /// Backpressure: while more than [`PENDING_HIGH_WATER`] bytes wait to be sealed and a sealer
    /// runs, wait for it (at most [`PENDING_WAIT`]).
    fn wait_for_sealer(&self) {
        let started = std::time::Instant::now();
        while self.sealer_active.load(Ordering::Relaxed)
            && self.state.lock().expect("buffer state").counts.pending_bytes > PENDING_HIGH_WATER
            && started.elapsed() < PENDING_WAIT
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Marks whether a sealer is running (the writer only waits for a running one).
    pub fn sealer_running(&self, running: bool) {
        self.sealer_active.store(running, Ordering::Relaxed);
    }

    /// Writes every accepted append of `group` as chunks, flushes once, answers everyone.
    fn commit_group(&self, group: &mut Vec<Append>, compressor: &mut ChunkCompressor) {
        if !self.heal() {
            let message = "the buffer's storage failed (disk full?); retry later";
            for a in group.drain(..) {
                let _ = a.reply.send(Err(AppendError::Storage(message.into())));
            }
            return;
        }
        let _no_heal = self.heal_lock.read().expect("heal lock");
        let arrived = now_ns();
        let mut accepted: Vec<Append> = Vec::with_capacity(group.len());
        for a in group.drain(..) {
            let size = a.payload.len() as u64 + 17;
            match self.make_room(size) {
                Ok(()) => {
                    self.refused_for_space.store(0, Ordering::Relaxed);
                    accepted.push(a)
                }
                Err(e) => {
                    if matches!(e, AppendError::DiskLow { .. }) {
                        self.refused_for_space.store(size, Ordering::Relaxed);
                    }
                    let _ = a.reply.send(Err(e));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        // Chunks of at most a quarter batch, so the sealer takes them whole (`seal_with`):
        // appends that fit join, one larger than that is cut at record boundaries. Built (and
        // compressed) before the state lock is taken.
        let (max_events, max_bytes) = chunk_limits(&self.limits);
        let units = chunk_units(&accepted, max_events, max_bytes);
        let mut chunks = build_chunks(&units, max_events, max_bytes, arrived, compressor);
        // Chunks built by the appender (`Appender::append_chunks`) go in as they are.
        for a in &mut accepted {
            if let Payload::Chunks(prepared) = &mut a.payload {
                chunks.append(prepared);
            }
        }
        let mut batch = sled::Batch::default();
        let mut added_events = 0u64;
        let mut added_bytes = 0u64;
        let mut added_len = 0u64;
        {
            let mut st = self.state.lock().expect("buffer state");
            for PreparedChunk { record: r, count, len } in chunks {
                added_bytes += r.len() as u64;
                added_len += len as u64;
                added_events += count as u64;
                batch.insert(&key(P, st.next_chunk), r);
                st.next_chunk += 1;
            }
        }
        let applied = self.db().and_then(|db| db.apply_batch(batch));
        let mut wake_sealer = false;
        if applied.is_ok() {
            // In sled's memory now, flushed or not: count it, so the counters match what
            // recovery or the sealer will find.
            let mut st = self.state.lock().expect("buffer state");
            wake_sealer = st.counts.pending_events == 0;
            st.counts.pending_events += added_events;
            st.counts.pending_bytes += added_bytes;
            st.counts.pending_records_len += added_len;
            wake_sealer |= self.batch_full(&st.counts);
        }
        match applied.and_then(|()| self.flush()) {
            Ok(()) => {
                self.writable.store(true, Ordering::Relaxed);
                self.publish_gauges();
                for a in accepted {
                    let _ = a.reply.send(Ok(()));
                }
                if wake_sealer {
                    self.pending_grew.notify_one();
                }
            }
            Err(e) => {
                // Nothing is acknowledged. What was applied may still reach disk with a later
                // flush and be shipped; clients retry, and events with their own `id` are
                // deduplicated by the collector.
                self.storage_failed(&e);
                tracing::error!(error = %e, "buffer write failed: requests answered with an error");
                self.metrics.errors.add(&["buffer", "write_failed"], 1);
                for a in accepted {
                    let _ = a.reply.send(Err(AppendError::Storage(e.to_string())));
                }
            }
        }
    }

    /// Ensures `size` more bytes fit under the cap, dropping the oldest data if the policy
    /// allows. Runs on the writer thread.
    fn make_room(&self, size: u64) -> Result<(), AppendError> {
        self.make_room_in_cap(size)?;
        // The file system's own free space: sled does not recover from running out of it
        // (its log is left unreadable), so appends stop while less than a reserve is free and
        // sealing, acknowledgements and sled's own housekeeping keep the reserve.
        let mut dropped = 0;
        while let Some((free, reserve)) = keytrail_common::disk::low(&self.dir, size) {
            // Under drop_oldest, deleting sealed batch files frees space at once (removing
            // sled records does not), so only those go, and only when deleting all of them
            // could make the room: when something else filled the disk, nothing is dropped
            // in vain.
            let could_help = free.saturating_add(self.counts().sealed_bytes) >= reserve.saturating_add(size);
            let freed = self.limits.when_full == WhenFull::DropOldest
                && could_help
                && dropped < 16
                && self
                    .drop_oldest_sealed()
                    .map_err(|e| AppendError::Storage(e.to_string()))?;
            if !freed {
                return Err(AppendError::DiskLow { free, reserve });
            }
            dropped += 1;
        }
        Ok(())
    }

    /// The `max_bytes` cap and its policy.
    fn make_room_in_cap(&self, size: u64) -> Result<(), AppendError> {
        loop {
            let used = self.counts().total_bytes();
            if used + size <= self.limits.max_bytes {
                return Ok(());
            }
            if self.limits.when_full == WhenFull::Reject {
                return Err(AppendError::Full {
                    buffered: used,
                    max: self.limits.max_bytes,
                });
            }
            match self.drop_oldest() {
                Ok(true) => continue,
                Ok(false) => {
                    return Err(AppendError::Full {
                        buffered: used,
                        max: self.limits.max_bytes,
                    })
                }
                Err(e) => return Err(AppendError::Storage(e.to_string())),
            }
        }
    }

    /// Deletes the oldest sealed batch not in flight, else the oldest chunk. `false` when
    /// nothing could be dropped.
    fn drop_oldest(&self) -> Result<bool, sled::Error> {
        if self.drop_oldest_sealed()? {
            return Ok(true);
        }
        let _layout = self.layout.lock().expect("buffer layout");
        self.watch(self.drop_oldest_pending())
    }

    /// Drops the oldest sealed batch that is not in flight; false when there is none.
    fn drop_oldest_sealed(&self) -> Result<bool, sled::Error> {
        let _layout = self.layout.lock().expect("buffer layout");
        let dropped = self.drop_oldest_sealed_locked();
        self.watch(dropped)
    }

    fn drop_oldest_sealed_locked(&self) -> Result<bool, sled::Error> {
        for item in self.db()?.scan_prefix([S]) {
            let (k, v) = item?;
            if self.in_flight.lock().expect("in flight").contains(&key_num(&k)) {
                continue;
            }
            let count = parse_sealed_meta(&v).map_or(0, |m| m.count);
            // The record goes first and durably, so a crash never leaves a record whose file
            // is gone (which recovery would report as corruption).
            self.db()?.remove(&k)?;
            self.forget_sealed(count as u64, &v);
            self.metrics.discarded.add(&["drop_oldest"], count as u64);
            self.flush()?;
            let _ = std::fs::remove_file(self.sealed_path(key_num(&k)));
            tracing::warn!(
                seq = key_num(&k),
                events = count,
                "buffer full: dropped the oldest sealed batch"
            );
            self.publish_gauges();
            return Ok(true);
        }
        Ok(false)
    }

    /// Drops the oldest pending chunk (the caller holds the layout lock).
    fn drop_oldest_pending(&self) -> Result<bool, sled::Error> {
        if let Some(item) = self.db()?.scan_prefix([P]).next() {
            let (k, v) = item?;
            self.db()?.remove(&k)?;
            let count = self.state.lock().expect("buffer state").counts.remove_chunk(&v);
            self.metrics.discarded.add(&["drop_oldest"], count);
            tracing::warn!(events = count, "buffer full: dropped the oldest unsealed events");
            self.publish_gauges();
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether pending data makes a full batch.
    fn batch_full(&self, c: &Counts) -> bool {
        c.pending_events >= self.limits.batch_max_events as u64 || c.pending_records_len >= self.limits.batch_max_bytes
    }

    /// When pending data should be sealed: now if a full batch is waiting or the oldest pending
    /// event has waited `timeout`, else when it will have.
    pub fn seal_due(&self, timeout: std::time::Duration) -> SealDue {
        let c = self.counts();
        if c.pending_events == 0 {
            return SealDue::Nothing;
        }
        if self.batch_full(&c) {
            return SealDue::Now;
        }
        let Ok(db) = self.db() else {
            return SealDue::Nothing;
        };
        let oldest = db.scan_prefix([P]).values().next().and_then(Result::ok);
        match oldest.as_deref().and_then(parse_chunk) {
            Some(c) => {
                let waited = now_ns().saturating_sub(c.arrived).max(0) as u128;
                match timeout.as_nanos().checked_sub(waited) {
                    Some(left) if left > 0 => {
                        SealDue::In(std::time::Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX)))
                    }
                    _ => SealDue::Now,
                }
            }
            None => SealDue::Now,
        }
    }

    /// Seals one batch from the oldest pending records. Returns its sequence, or `None` when
    /// nothing is pending. Blocking (sled I/O and compression).
    pub fn seal_one(&self) -> Result<Option<BatchSeq>, BufferError> {
        self.watch_buffer(self.seal_one_inner())
    }

    fn seal_one_inner(&self) -> Result<Option<BatchSeq>, BufferError> {
        let _layout = self.layout.lock().expect("buffer layout");
        let mut work = self
            .seal_work
            .lock()
            .expect("seal workspace")
            .take()
            .unwrap_or_else(|| SealWork {
                sealer: wire::FrameSealer::new(self.limits.zstd_level),
                payload: Vec::new(),
                compressed: Vec::new(),
            });
        let sealed = self.seal_with(&mut work);
        *self.seal_work.lock().expect("seal workspace") = Some(work);
        sealed
    }

    /// Frees what sealing keeps between batches (a few MiB under load); called by the sealer
    /// once no batch has been sealed for a while.
    pub fn release_seal_work(&self) {
        self.seal_work.lock().expect("seal workspace").take();
    }

    /// Seals one batch (the layout lock held) with `work`'s context and buffer.
    fn seal_with(&self, work: &mut SealWork) -> Result<Option<BatchSeq>, BufferError> {
        let max_events = self.limits.batch_max_events;
        let max_bytes = self.limits.batch_max_bytes as usize;
        // The batch's payload as zstd frames, and the raw records not yet compressed (raw
        // chunks are compressed together, in order, before the next compressed chunk's
        // frame and at the end).
        let SealWork {
            sealer,
            payload: raw,
            compressed,
        } = work;
        raw.clear();
        compressed.clear();
        let mut payload_len = 0usize;
        let mut events = 0u32;
        let mut first_arrived = i64::MAX;
        let mut batch = sled::Batch::default();
        let mut removed_events = 0u64;
        let mut removed_bytes = 0u64;
        let mut rewritten_bytes = 0u64;
        let mut corrupt = Vec::new();
        for item in self.db()?.scan_prefix([P]) {
            let (k, v) = item?;
            let Some(chunk) = parse_chunk(&v) else {
                corrupt.push((k, v));
                continue;
            };
            // A chunk that does not fit whole starts the next batch: splitting it would rewrite
            // its rest, and sled rewrites what it holds again when it consolidates a node.
            // Only a chunk larger than a batch (written under larger limits, or by an earlier
            // version that did not cut large requests) is split.
            let fits_whole =
                events as u64 + chunk.count as u64 <= max_events as u64 && payload_len + chunk.records_len <= max_bytes;
            if events > 0 && !fits_whole {
                break;
            }
            first_arrived = first_arrived.min(chunk.arrived);
            if let (ChunkBody::Zstd(frame), true) = (&chunk.body, fits_whole) {
                // Its frame goes into the payload as it is, not decoded: its checksum held,
                // and the writer made it from records ingest built. (Were it inconsistent, the
                // collector would refuse the batch and it would be dead-lettered whole.)
                if !raw.is_empty() {
                    sealer.compress_append(raw, compressed);
                    raw.clear();
                }
                compressed.extend_from_slice(frame);
                payload_len += chunk.records_len;
                events += chunk.count;
                removed_bytes += v.len() as u64;
                removed_events += chunk.count as u64;
                batch.remove(&k);
                if events >= max_events || payload_len >= max_bytes {
                    break;
                }
                continue;
            }
            let Some(records) = chunk.records() else {
                corrupt.push((k, v));
                continue;
            };
            let spans = match wire::record_spans(&records) {
                Ok(s) if s.len() == chunk.count as usize => s,
                _ => {
                    corrupt.push((k, v));
                    continue;
                }
            };
            // Take as many records as fit (always at least one per batch).
            let mut take = 0;
            let mut take_bytes = 0;
            for (_, len) in &spans {
                let fits_bytes = payload_len + take_bytes + len <= max_bytes || (events == 0 && take == 0);
                if events + take as u32 >= max_events || !fits_bytes {
                    break;
                }
                take += 1;
                take_bytes += len;
            }
            if take == 0 {
                break;
            }
            raw.extend_from_slice(&records[..take_bytes]);
            payload_len += take_bytes;
            events += take as u32;
            removed_bytes += v.len() as u64;
            removed_events += take as u64;
            if take == spans.len() {
                batch.remove(&k);
            } else {
                let (rest_count, rest) = (chunk.count - take as u32, &records[take_bytes..]);
                let rest = if rest.len() >= COMPRESS_MIN_BYTES {
                    compressed_chunk_record(sealer, rest_count, chunk.arrived, rest)
                } else {
                    chunk_record(rest_count, chunk.arrived, rest)
                };
                rewritten_bytes += rest.len() as u64;
                batch.insert(&k, rest);
                break;
            }
            if events >= max_events || payload_len >= max_bytes {
                break;
            }
        }
        for (k, v) in corrupt {
            // Not in this batch; counted and moved aside.
            self.quarantine(&k, &v)?;
            self.state.lock().expect("buffer state").counts.remove_chunk(&v);
        }
        if events == 0 {
            return Ok(None);
        }
        if !raw.is_empty() {
            sealer.compress_append(raw, compressed);
        }
        let seq = self.state.lock().expect("buffer state").next_seq;
        let frame = wire::frame_of_compressed(&self.agent_id, BatchSeq(seq), events, payload_len, compressed);
        let sealed = sealed_file(events, first_arrived, &frame);
        let sealed_len = sealed.len() as u64;
        // The file first (durable), then the record that makes it part of the buffer. A crash
        // in between leaves a file without a record, deleted by recovery; its events are still
        // pending and its sequence was never sent.
        let path = self.sealed_path(seq);
        write_file_durably(&path, &sealed).map_err(|e| BufferError::File {
            path,
            message: e.to_string(),
        })?;
        let meta = SealedMeta {
            count: events,
            first_arrived,
            file_len: sealed_len,
        };
        batch.insert(&key(S, seq), sealed_meta_record(meta));
        batch.insert(META_NEXT_SEQ, &(seq + 1).to_be_bytes());
        self.db()?.apply_batch(batch)?;
        // sled now holds the new state in memory: account for it before flushing, so a failed
        // flush cannot make the next seal reuse this sequence (and overwrite this file). Only
        // `durable_seq`, which gates sending, waits for the flush.
        {
            let mut st = self.state.lock().expect("buffer state");
            st.next_seq = seq + 1;
            st.counts.pending_events = st.counts.pending_events.saturating_sub(removed_events);
            st.counts.pending_bytes = st.counts.pending_bytes.saturating_sub(removed_bytes) + rewritten_bytes;
            st.counts.pending_records_len = st.counts.pending_records_len.saturating_sub(payload_len as u64);
            st.counts.sealed_events += events as u64;
            st.counts.sealed_bytes += sealed_len;
            st.counts.sealed_batches += 1;
        }
        self.flush()?;
        self.durable_seq.store(seq + 1, Ordering::Release);
        self.publish_gauges();
        self.sealed_ready.notify_one();
        Ok(Some(BatchSeq(seq)))
    }

    /// The oldest durably sealed batch, marked in flight. Records that fail their checksum
    /// are quarantined on the way.
    pub fn next_sealed(&self) -> Result<Option<SealedBatch>, BufferError> {
        self.watch_buffer(self.next_sealed_inner())
    }

    fn next_sealed_inner(&self) -> Result<Option<SealedBatch>, BufferError> {
        let limit = self.durable_seq.load(Ordering::Acquire);
        // Read and mark in flight under the layout lock, so drop_oldest cannot delete the
        // batch between the two (its events would count as both dropped and delivered).
        let _layout = self.layout.lock().expect("buffer layout");
        loop {
            // The oldest batch not being sent already (those are few: the scan skips them).
            let mut next = None;
            for item in self.db()?.scan_prefix([S]) {
                let (k, v) = item?;
                if !self.in_flight.lock().expect("in flight").contains(&key_num(&k)) {
                    next = Some((k, v));
                    break;
                }
            }
            let Some((k, v)) = next else {
                return Ok(None);
            };
            let seq = key_num(&k);
            if seq >= limit {
                return Ok(None);
            }
            let file = parse_sealed_meta(&v).and_then(|_| std::fs::read(self.sealed_path(seq)).ok());
            match file.as_deref().and_then(parse_sealed) {
                Some(sealed) => {
                    self.in_flight.lock().expect("in flight").insert(seq);
                    return Ok(Some(SealedBatch {
                        seq: BatchSeq(seq),
                        events: sealed.count,
                        frame: sealed.frame.to_vec(),
                    }));
                }
                None => {
                    // Missing or damaged file: moved aside, its events counted as dropped.
                    let events = parse_sealed_meta(&v).map_or(0, |m| m.count as u64);
                    self.quarantine(&k, &v)?;
                    self.forget_sealed(events, &v);
                }
            }
        }
    }

    /// Takes a sealed batch out of the counters; called as soon as its record is gone from
    /// sled (before the flush), so the counters always match sled's state.
    fn forget_sealed(&self, events: u64, record: &[u8]) {
        let file_len = parse_sealed_meta(record).map_or(0, |m| m.file_len);
        let mut st = self.state.lock().expect("buffer state");
        st.counts.sealed_events = st.counts.sealed_events.saturating_sub(events);
        st.counts.sealed_bytes = st.counts.sealed_bytes.saturating_sub(file_len);
        st.counts.sealed_batches = st.counts.sealed_batches.saturating_sub(1);
    }

    /// The collector stored the batch: delete it. The record is removed durably before the
    /// file, so a record never outlives its file (recovery would call that corruption).
    pub fn ack(&self, batch: &SealedBatch) -> Result<(), BufferError> {
        self.watch_buffer(self.ack_inner(batch))
    }

    fn ack_inner(&self, batch: &SealedBatch) -> Result<(), BufferError> {
        let _layout = self.layout.lock().expect("buffer layout");
        self.release(batch.seq);
        if let Some(v) = self.db()?.remove(key(S, batch.seq.0))? {
            self.forget_sealed(batch.events as u64, &v);
            self.flush()?;
            let _ = std::fs::remove_file(self.sealed_path(batch.seq.0));
        }
        drop(_layout);
        self.publish_gauges();
        Ok(())
    }

    /// The collector refused the batch for good: move it to the dead-letter store.
    pub fn dead_letter(&self, batch: &SealedBatch, reason: &str) -> Result<(), BufferError> {
        self.watch_buffer(self.dead_letter_inner(batch, reason))
    }

    fn dead_letter_inner(&self, batch: &SealedBatch, reason: &str) -> Result<(), BufferError> {
        let _layout = self.layout.lock().expect("buffer layout");
        self.release(batch.seq);
        let k = key(S, batch.seq.0);
        let Some(v) = self.db()?.get(k)? else {
            return Ok(());
        };
        let dead = dead_record(batch.events, reason, &batch.frame);
        let dead_len = dead.len() as u64;
        let mut b = sled::Batch::default();
        b.remove(&k);
        b.insert(&key(D, batch.seq.0), dead);
        self.db()?.apply_batch(b)?;
        self.forget_sealed(batch.events as u64, &v);
        {
            let mut st = self.state.lock().expect("buffer state");
            st.counts.dead_batches += 1;
            st.counts.dead_bytes += dead_len;
        }
        self.flush()?;
        let _ = std::fs::remove_file(self.sealed_path(batch.seq.0));
        // Dead letters may use a tenth of the cap; the oldest go first.
        while self.counts().dead_bytes > self.limits.max_bytes / 10 {
            let Some(item) = self.db()?.scan_prefix([D]).next() else {
                break;
            };
            let (k, v) = item?;
            let count = parse_dead(&v).map_or(0, |d| d.count);
            self.db()?.remove(&k)?;
            let mut st = self.state.lock().expect("buffer state");
            st.counts.dead_batches = st.counts.dead_batches.saturating_sub(1);
            st.counts.dead_bytes = st.counts.dead_bytes.saturating_sub(v.len() as u64);
            drop(st);
            self.metrics.discarded.add(&["dead_letter_overflow"], count as u64);
            tracing::error!(
                seq = key_num(&k),
                events = count,
                "dead-letter store over its share of the cap: oldest dead letter deleted"
            );
        }
        drop(_layout);
        self.publish_gauges();
        Ok(())
    }

    /// How many batches are being sent.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().expect("in flight").len()
    }

    /// The batch was not sent (retryable failure): it is the oldest again for `next_sealed`.
    pub fn release(&self, seq: BatchSeq) {
        self.in_flight.lock().expect("in flight").remove(&seq.0);
    }

    /// The most recent dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Vec<DeadLetterInfo> {
        let Ok(db) = self.db() else { return Vec::new() };
        db.scan_prefix([D])
            .rev()
            .filter_map(Result::ok)
            .take(limit)
            .filter_map(|(k, v)| {
                parse_dead(&v).map(|d| DeadLetterInfo {
                    seq: key_num(&k),
                    events: d.count,
                    bytes: d.frame.len(),
                    dead_at: keytrail_common::time::format_rfc3339(d.dead_at),
                    reason: d.reason.to_string(),
                })
            })
            .collect()
    }

    /// Flushes everything (shutdown).
    pub fn close(&self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "final buffer flush failed");
        }
    }
}

struct Append {
    payload: Payload,
    reply: oneshot::Sender<Result<(), AppendError>>,
}

/// What an append holds.
enum Payload {
    /// Wire records, cut and compressed by the writer.
    Records { records: Vec<u8>, count: u32 },
    /// Chunk records built by a [`Chunker`].
    Chunks(Vec<PreparedChunk>),
}

impl Payload {
    /// Bytes of records (uncompressed), what the cap and the group size count.
    fn len(&self) -> usize {
        match self {
            Payload::Records { records, .. } => records.len(),
            Payload::Chunks(chunks) => chunks.iter().map(|c| c.len).sum(),
        }
    }
}

/// Cheap handle for adding events; cloned into every request handler.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Append>,
    /// Events and bytes per chunk ([`chunk_limits`]), and the zstd level, for [`Chunker`]s.
    chunk_limits: (u32, usize),
    zstd_level: i32,
}

impl Appender {
    /// Makes `count` wire records durable; resolves after the group commit's flush.
    pub async fn append(&self, records: Vec<u8>, count: u32) -> Result<(), AppendError> {
        self.send(Payload::Records { records, count }).await
    }

    /// Makes chunks built by a [`Chunker`] durable, as [`Appender::append`] does.
    pub async fn append_chunks(&self, chunks: Vec<PreparedChunk>) -> Result<(), AppendError> {
        self.send(Payload::Chunks(chunks)).await
    }

    /// A chunk builder with this buffer's limits and compression level.
    pub fn chunker(&self) -> Chunker {
        Chunker {
            max_events: self.chunk_limits.0,
            max_bytes: self.chunk_limits.1,
            compressor: ChunkCompressor::new(self.zstd_level),
        }
    }

    async fn send(&self, payload: Payload) -> Result<(), AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Append { payload, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keytrail_common::event::{Event, EventType};

    fn event(i: u64) -> Event {
        let mut e = Event::new(format!("e{i:05}"), EventType::Validated, 1_000 + i as i64, "a");
        e.license = Some(format!("l{}", i % 7));
        e
    }

    fn records(range: std::ops::Range<u64>) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        for i in range.clone() {
            wire::append_event(&event(i), &mut out);
        }
        (out, (range.end - range.start) as u32)
    }

    #[test]
    fn a_chunk_built_from_parts_is_the_chunk_of_their_concatenation() {
        let (a, na) = records(0..3);
        let (b, nb) = records(3..10);
        let whole = [a.clone(), b.clone()].concat();
        // The layout written by earlier versions: version, CRC of the body, then the body.
        let mut body = Vec::new();
        body.extend_from_slice(&(na + nb).to_be_bytes());
        body.extend_from_slice(&77i64.to_be_bytes());
        body.extend_from_slice(&whole);
        let built = chunk_record_of(na + nb, 77, [&a[..], &b[..]], whole.len());
        assert_eq!(built, record(&body));
        assert_eq!(built.len(), built.capacity());
        let c = parse_chunk(&built).expect("parses");
        assert_eq!((c.count, c.arrived, c.records_len), (na + nb, 77, whole.len()));
        assert_eq!(c.records().unwrap(), &whole[..]);
        let mut corrupt = built.clone();
        corrupt[40] ^= 1;
        assert!(parse_chunk(&corrupt).is_none());
        // Under the compression threshold, the writer builds the same raw chunk.
        let mut z = ChunkCompressor::new(3);
        assert_eq!(z.record(na + nb, 77, &[&a[..], &b[..]], whole.len()), built);
    }

    #[test]
    fn a_large_chunk_is_written_compressed_and_reads_back_as_its_records() {
        let (a, na) = records(0..700);
        let (b, nb) = records(700..1400);
        let whole = [a.clone(), b.clone()].concat();
        assert!(whole.len() >= COMPRESS_MIN_BYTES, "{} bytes", whole.len());
        let mut z = ChunkCompressor::new(3);
        for parts in [&[&a[..], &b[..]][..], &[&whole[..]][..]] {
            let r = z.record(na + nb, 77, parts, whole.len());
            assert_eq!(r[0], CHUNK_ZSTD);
            assert!(r.len() < whole.len() / 4, "{} of {} bytes", r.len(), whole.len());
            let c = parse_chunk(&r).expect("parses");
            assert_eq!((c.count, c.arrived, c.records_len), (na + nb, 77, whole.len()));
            assert!(matches!(c.body, ChunkBody::Zstd(_)));
            assert_eq!(c.records().unwrap(), &whole[..]);
            let mut corrupt = r.clone();
            corrupt[30] ^= 1;
            assert!(parse_chunk(&corrupt).is_none(), "checksum");
        }
        // A declared length that the frame does not come to: parsed, but its records are
        // refused rather than cut or padded.
        let mut r = z.record(na + nb, 77, &[&whole[..]], whole.len());
        r[17..21].copy_from_slice(&(whole.len() as u32 + 1).to_be_bytes());
        let crc = crc32fast::hash(&r[5..]);
        r[1..5].copy_from_slice(&crc.to_be_bytes());
        assert!(parse_chunk(&r).unwrap().records().is_none());
    }

    fn limits(max_bytes: u64, when_full: WhenFull, batch: u32) -> BufferLimits {
        BufferLimits {
            max_bytes,
            when_full,
            cache_bytes: 1 << 20,
            batch_max_events: batch,
            batch_max_bytes: 1 << 20,
            zstd_level: 1,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kt-buf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Closes the writer and waits until its thread has let go of the buffer, so the
    /// database can be reopened (sled holds a file lock while open).
    fn shut(b: Arc<Buffer>, app: Appender) {
        drop(app);
        while Arc::strong_count(&b) > 1 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn drain_ids(b: &Buffer) -> Vec<String> {
        while b.seal_one().unwrap().is_some() {}
        ship_all(b).1
    }

    /// Ships (decodes and acks) every sealed batch, oldest first: the size of each batch and
    /// the ids of all events, in order.
    fn ship_all(b: &Buffer) -> (Vec<usize>, Vec<String>) {
        let mut sizes = Vec::new();
        let mut ids = Vec::new();
        while let Some(s) = b.next_sealed().unwrap() {
            let batch = wire::decode_frame(&s.frame, &wire::DecodeLimits::default()).unwrap();
            sizes.push(batch.events.len());
            ids.extend(batch.events.into_iter().map(|e| e.id));
            b.ack(&s).unwrap();
        }
        (sizes, ids)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_seal_ship_survive_reopen_in_order() {
        let dir = tmp("order");
        let metrics = Arc::new(AgentMetrics::default());
        let sealed;
        {
            let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 30), metrics.clone()).unwrap();
            let app = b.start_writer();
            let mut tasks = Vec::new();
            for r in 0..10u64 {
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let (recs, n) = records(r * 10..r * 10 + 10);
                    app.append(recs, n).await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(b.counts().pending_events, 100);
            // Seal one batch (whole chunks, up to 30 events; how the appends were grouped
            // decides how many) and leave the rest pending.
            b.seal_one().unwrap().unwrap();
            sealed = b.counts().sealed_events;
            assert!((10..=30).contains(&sealed), "{sealed}");
            assert_eq!(b.counts().pending_events, 100 - sealed);
            shut(b, app);
        }
        let b = Buffer::open(&dir, None, limits(64 << 20, WhenFull::Reject, 30), metrics).unwrap();
        assert_eq!(b.agent_id(), "a", "agent id persisted");
        assert_eq!(
            (b.counts().pending_events, b.counts().sealed_events),
            (100 - sealed, sealed)
        );
        let mut ids = drain_ids(&b);
        assert_eq!(ids.len(), 100);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 100, "each event exactly once");
        assert_eq!(b.counts().sealed_batches, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_group_is_cut_into_chunks_of_a_quarter_batch_and_sealed_whole() {
        let dir = tmp("chunks");
        // Batches of eight events: chunks of at most two.
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 8), Arc::default()).unwrap();
        assert_eq!(chunk_limits(&b.limits), (2, 96 << 10));
        // One group commit of six appends; chunks are cut between appends only.
        let mut group = Vec::new();
        let mut replies = Vec::new();
        let mut next = 0;
        for n in [1u64, 1, 2, 1, 2, 2] {
            let (records, count) = records(next..next + n);
            next += n;
            let (reply, rx) = oneshot::channel();
            group.push(Append {
                payload: Payload::Records { records, count },
                reply,
            });
            replies.push(rx);
        }
        b.commit_group(&mut group, &mut ChunkCompressor::new(1));
        for mut rx in replies {
            assert!(matches!(rx.try_recv(), Ok(Ok(()))));
        }
        let pending = |b: &Buffer| -> Vec<u32> {
            let db = b.db().unwrap();
            let chunks = db.scan_prefix([P]).values();
            chunks.map(|v| parse_chunk(&v.unwrap()).unwrap().count).collect()
        };
        assert_eq!(pending(&b), [2, 2, 1, 2, 2]);
        // Taken whole: the chunk that would overfill the first batch starts the second, and
        // none is shortened (rewritten).
        b.seal_one().unwrap().unwrap();
        assert_eq!(pending(&b), [2]);
        b.seal_one().unwrap().unwrap();
        assert!(pending(&b).is_empty());
        let (sizes, ids) = ship_all(&b);
        assert_eq!(sizes, [7, 2]);
        let want: Vec<String> = (0..9).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Commits one group of appends of `sizes` events each, numbered on from `next`.
    fn commit(b: &Buffer, z: &mut ChunkCompressor, next: &mut u64, sizes: &[u64]) {
        let mut group = Vec::new();
        let mut replies = Vec::new();
        for &n in sizes {
            let (records, count) = records(*next..*next + n);
            *next += n;
            let (reply, rx) = oneshot::channel();
            group.push(Append {
                payload: Payload::Records { records, count },
                reply,
            });
            replies.push(rx);
        }
        b.commit_group(&mut group, z);
        for mut rx in replies {
            assert!(matches!(rx.try_recv(), Ok(Ok(()))));
        }
    }

    fn chunk_versions(b: &Buffer) -> Vec<(u8, u32)> {
        let db = b.db().unwrap();
        let chunks = db.scan_prefix([P]).values();
        chunks
            .map(|v| {
                let v = v.unwrap();
                (v[0], parse_chunk(&v).unwrap().count)
            })
            .collect()
    }

    #[test]
    fn compressed_chunks_are_sealed_as_they_are_between_raw_ones_in_order() {
        let dir = tmp("zchunks");
        // Batches of up to 10,000 events: chunks of up to 2,500 (or 96 KiB).
        let open = || {
            Buffer::open(
                &dir,
                Some("a"),
                limits(64 << 20, WhenFull::Reject, 10_000),
                Arc::default(),
            )
            .unwrap()
        };
        let b = open();
        let mut z = ChunkCompressor::new(1);
        let mut next = 0;
        // Small appends on their own (raw), large ones (compressed), then small ones that
        // join into one chunk large enough to compress.
        commit(&b, &mut z, &mut next, &[10]);
        commit(&b, &mut z, &mut next, &[1_000]);
        commit(&b, &mut z, &mut next, &[5]);
        commit(&b, &mut z, &mut next, &[1_200]);
        commit(&b, &mut z, &mut next, &[300, 300, 300, 300]);
        assert_eq!(
            chunk_versions(&b),
            [
                (CHUNK_RAW, 10),
                (CHUNK_ZSTD, 1_000),
                (CHUNK_RAW, 5),
                (CHUNK_ZSTD, 1_200),
                (CHUNK_ZSTD, 1_200)
            ]
        );
        let frames: Vec<Vec<u8>> = {
            let db = b.db().unwrap();
            let chunks = db.scan_prefix([P]).values();
            chunks
                .filter_map(|v| match parse_chunk(&v.unwrap()).unwrap().body {
                    ChunkBody::Zstd(f) => Some(f.to_vec()),
                    ChunkBody::Raw(_) => None,
                })
                .collect()
        };
        // Counted the same after a restart.
        drop(b);
        let b = open();
        assert_eq!(b.counts().pending_events, 3_415);
        let raw_len = records(0..3_415).0.len() as u64;
        assert_eq!(
            b.counts().pending_records_len,
            raw_len,
            "uncompressed, for the batch limit"
        );
        assert!(b.counts().pending_bytes < raw_len / 2, "compressed on disk");
        b.seal_one().unwrap().unwrap();
        assert!(chunk_versions(&b).is_empty());
        assert_eq!((b.counts().pending_bytes, b.counts().pending_records_len), (0, 0));
        let sealed = b.next_sealed().unwrap().unwrap();
        for f in &frames {
            let passed_on = sealed.frame.windows(f.len()).any(|w| w == &f[..]);
            assert!(passed_on, "a compressed chunk's frame is in the batch unchanged");
        }
        let batch = wire::decode_frame(&sealed.frame, &wire::DecodeLimits::default()).unwrap();
        let ids: Vec<String> = batch.events.into_iter().map(|e| e.id).collect();
        let want: Vec<String> = (0..3_415).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_large_append_is_cut_into_chunks_within_the_limits() {
        let dir = tmp("cut");
        // Batches of 300: chunks of at most 75 events.
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 300), Arc::default()).unwrap();
        let mut z = ChunkCompressor::new(1);
        let mut next = 0;
        commit(&b, &mut z, &mut next, &[10, 1_000, 20]);
        let counts: Vec<u32> = chunk_versions(&b).into_iter().map(|(_, n)| n).collect();
        // The last piece of the large append joins the next append.
        let mut want = vec![10];
        want.extend([75; 13]);
        want.push(25 + 20);
        assert_eq!(counts, want);
        while b.seal_one().unwrap().is_some() {}
        let (sizes, ids) = ship_all(&b);
        assert_eq!(sizes, [235, 300, 300, 195], "whole chunks per batch");
        let want: Vec<String> = (0..1_030).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn chunks_built_off_the_writer_are_stored_as_the_writer_builds_them() {
        // Batches of 4,000 (chunks of at most 1,000 events); one buffer gets chunks built by a
        // Chunker, the other the same records through `append`.
        let mut stored = Vec::new();
        for prepared in [true, false] {
            let dir = tmp(if prepared { "prepared" } else { "unprepared" });
            let b = Buffer::open(
                &dir,
                Some("a"),
                limits(64 << 20, WhenFull::Reject, 4_000),
                Arc::default(),
            )
            .unwrap();
            let app = b.start_writer();
            let mut chunker = app.chunker();
            for range in [0..10, 10..2_510, 2_510..2_530] {
                let (recs, n) = records(range);
                if prepared {
                    app.append_chunks(chunker.chunks(&recs, n)).await.unwrap();
                } else {
                    app.append(recs, n).await.unwrap();
                }
            }
            let versions = chunk_versions(&b);
            assert_eq!(b.counts().pending_events, 2_530);
            while b.seal_one().unwrap().is_some() {}
            let (sizes, ids) = ship_all(&b);
            let want: Vec<String> = (0..2_530).map(|i| event(i).id).collect();
            assert_eq!(ids, want);
            stored.push((versions, sizes));
            shut(b, app);
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let (versions, _) = &stored[0];
        let want = [
            (CHUNK_RAW, 10),
            (CHUNK_ZSTD, 1_000),
            (CHUNK_ZSTD, 1_000),
            (CHUNK_ZSTD, 500),
            (CHUNK_RAW, 20),
        ];
        assert_eq!(versions, &want, "cut at 1,000 events, compressed from 16 KiB");
        assert_eq!(stored[0], stored[1]);
    }

    #[test]
    fn a_compressed_chunk_larger_than_a_batch_is_split_and_its_rest_kept() {
        let dir = tmp("zsplit");
        let open = |batch| {
            Buffer::open(
                &dir,
                Some("a"),
                limits(64 << 20, WhenFull::Reject, batch),
                Arc::default(),
            )
            .unwrap()
        };
        // Written under larger batch limits, then read under smaller ones.
        let b = open(10_000);
        let mut next = 0;
        commit(&b, &mut ChunkCompressor::new(1), &mut next, &[2_000]);
        assert_eq!(chunk_versions(&b), [(CHUNK_ZSTD, 2_000)]);
        drop(b);
        let b = open(300);
        b.seal_one().unwrap().unwrap();
        assert_eq!(b.counts().pending_events, 1_700);
        assert_eq!(chunk_versions(&b), [(CHUNK_ZSTD, 1_700)], "the rest, rewritten");
        let on_disk: u64 = {
            let db = b.db().unwrap();
            let chunks = db.scan_prefix([P]).values();
            chunks.map(|v| v.unwrap().len() as u64).sum()
        };
        assert_eq!(b.counts().pending_bytes, on_disk);
        assert_eq!(b.counts().pending_records_len, records(300..2_000).0.len() as u64);
        while b.seal_one().unwrap().is_some() {}
        let (sizes, ids) = ship_all(&b);
        assert_eq!(sizes, [300, 300, 300, 300, 300, 300, 200]);
        let want: Vec<String> = (0..2_000).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        assert_eq!((b.counts().pending_bytes, b.counts().pending_records_len), (0, 0));
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sealer_is_woken_by_a_first_event_and_a_full_batch_not_by_each_commit() {
        let dir = tmp("sealdue");
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 10), Arc::default()).unwrap();
        let app = b.start_writer();
        let minute = std::time::Duration::from_secs(60);
        let woken = |b: &Arc<Buffer>| {
            let b = Arc::clone(b);
            async move {
                // A stored permit answers at once; none answers never.
                tokio::time::timeout(std::time::Duration::from_millis(50), b.pending_grew.notified())
                    .await
                    .is_ok()
            }
        };
        assert_eq!(b.seal_due(minute), SealDue::Nothing);
        assert!(!woken(&b).await);
        let (recs, n) = records(0..3);
        app.append(recs, n).await.unwrap();
        assert!(woken(&b).await, "a first pending event wakes the sealer");
        match b.seal_due(minute) {
            SealDue::In(left) => assert!(left > minute / 2 && left <= minute, "{left:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.seal_due(std::time::Duration::ZERO), SealDue::Now, "the oldest is due");
        let (recs, n) = records(3..6);
        app.append(recs, n).await.unwrap();
        assert!(
            !woken(&b).await,
            "more of a batch not yet full changes nothing for the sealer"
        );
        let (recs, n) = records(6..11);
        app.append(recs, n).await.unwrap();
        assert!(woken(&b).await, "a full batch wakes the sealer");
        assert_eq!(b.seal_due(minute), SealDue::Now);
        b.seal_one().unwrap().unwrap();
        assert!(matches!(b.seal_due(minute), SealDue::In(_)), "one event left");
        b.seal_one().unwrap().unwrap();
        assert_eq!(b.seal_due(minute), SealDue::Nothing);
        shut(b, app);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_sealed_with_a_kept_or_a_released_workspace_hold_their_events() {
        let dir = tmp("sealwork");
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 10), Arc::default()).unwrap();
        let app = b.start_writer();
        let (recs, n) = records(0..35);
        app.append(recs, n).await.unwrap();
        // Kept from the first seal to the second, released before the third, kept again for
        // the last (a smaller batch into a buffer that held a larger one).
        b.seal_one().unwrap().unwrap();
        assert!(b.seal_work.lock().unwrap().is_some(), "kept after a seal");
        b.seal_one().unwrap().unwrap();
        b.release_seal_work();
        assert!(b.seal_work.lock().unwrap().is_none());
        b.seal_one().unwrap().unwrap();
        b.seal_one().unwrap().unwrap();
        assert_eq!(b.counts().sealed_batches, 4);
        let (sizes, ids) = ship_all(&b);
        assert_eq!(sizes, [10, 10, 10, 5]);
        let want: Vec<String> = (0..35).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        shut(b, app);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_wait_for_a_running_sealer_past_the_pending_high_water() {
        let dir = tmp("highwater");
        let metrics = Arc::new(AgentMetrics::default());
        let b = Buffer::open(&dir, Some("a"), limits(1 << 30, WhenFull::Reject, 5000), metrics).unwrap();
        let app = b.start_writer();
        b.sealer_running(true);
        let mut next = 0u64;
        while b.counts().pending_bytes <= PENDING_HIGH_WATER {
            let (recs, n) = records(next..next + 5000);
            app.append(recs, n).await.unwrap();
            next += 5000;
        }
        // The sealer is "running" but behind: the next append waits for it.
        let done = Arc::new(AtomicBool::new(false));
        let waiting = {
            let (app, done) = (app.clone(), Arc::clone(&done));
            let (recs, n) = records(next..next + 10);
            tokio::spawn(async move {
                app.append(recs, n).await.unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!done.load(Ordering::SeqCst), "acknowledged while the sealer was behind");
        // It catches up: the append goes through, nothing lost.
        let sealer = Arc::clone(&b);
        tokio::task::spawn_blocking(move || {
            while sealer.counts().pending_bytes > PENDING_HIGH_WATER / 2 {
                sealer.seal_one().unwrap();
            }
        })
        .await
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("the append completes once the sealer caught up")
            .unwrap();
        assert!(done.load(Ordering::SeqCst));
        let c = b.counts();
        assert_eq!(c.pending_events + c.sealed_events, next + 10);
        b.sealer_running(false);
        shut(b, app);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_batch_is_resent_byte_identical_and_seq_never_reused() {
        let dir = tmp("reseal");
        let metrics = Arc::new(AgentMetrics::default());
        let (first_frame, first_seq) = {
            let b = Buffer::open(
                &dir,
                Some("a"),
                limits(64 << 20, WhenFull::Reject, 1000),
                metrics.clone(),
            )
            .unwrap();
            let (recs, n) = records(0..5);
            let app = b.start_writer();
            app.append(recs, n).await.unwrap();
            b.seal_one().unwrap();
            let s = b.next_sealed().unwrap().unwrap();
            b.release(s.seq);
            shut(b, app);
            (s.frame, s.seq)
        };
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 1000), metrics).unwrap();
        let s = b.next_sealed().unwrap().unwrap();
        assert_eq!((s.seq, &s.frame), (first_seq, &first_frame));
        b.ack(&s).unwrap();
        let (recs, n) = records(5..6);
        b.start_writer().append(recs, n).await.unwrap();
        assert!(b.seal_one().unwrap().unwrap() > first_seq);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cap_rejects_or_drops_oldest_and_counts() {
        let dir = tmp("cap");
        let metrics = Arc::new(AgentMetrics::default());
        let (recs, n) = records(0..100);
        let cap = (recs.len() as u64 + 17) * 3 + 10;
        let b = Buffer::open(&dir, Some("a"), limits(cap, WhenFull::Reject, 1000), metrics.clone()).unwrap();
        let app = b.start_writer();
        for _ in 0..3 {
            app.append(recs.clone(), n).await.unwrap();
        }
        assert!(matches!(
            app.append(recs.clone(), n).await,
            Err(AppendError::Full { .. })
        ));
        assert_eq!(b.counts().pending_events, 300);
        shut(b, app);
        std::fs::remove_dir_all(&dir).unwrap();

        let b = Buffer::open(
            &dir,
            Some("a"),
            limits(cap, WhenFull::DropOldest, 1000),
            metrics.clone(),
        )
        .unwrap();
        let app = b.start_writer();
        for r in 0..5u64 {
            let (recs, n) = records(r * 100..r * 100 + 100);
            app.append(recs, n).await.unwrap();
        }
        assert_eq!(metrics.discarded.get(&["drop_oldest"]), 200);
        let ids = drain_ids(&b);
        assert_eq!(ids.len(), 300);
        assert!(
            ids.contains(&"e00499".to_string()) && !ids.contains(&"e00000".to_string()),
            "oldest went first"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn batches_in_flight_are_handed_out_once_and_kept_from_drop_oldest() {
        let dir = tmp("inflight");
        let b = Buffer::open(
            &dir,
            Some("a"),
            limits(64 << 20, WhenFull::DropOldest, 10),
            Arc::default(),
        )
        .unwrap();
        let mut next = 0;
        for _ in 0..3 {
            commit(&b, &mut ChunkCompressor::new(1), &mut next, &[10]);
            b.seal_one().unwrap().unwrap();
        }
        // Two lanes take the two oldest; a retryable failure puts the first back in line.
        let first = b.next_sealed().unwrap().unwrap();
        let second = b.next_sealed().unwrap().unwrap();
        assert!(first.seq < second.seq);
        b.release(first.seq);
        let again = b.next_sealed().unwrap().unwrap();
        assert_eq!((again.seq, &again.frame), (first.seq, &first.frame));
        // Both are being sent: the oldest that may be dropped is the third.
        assert!(b.drop_oldest_sealed().unwrap());
        assert!(!b.drop_oldest_sealed().unwrap(), "only batches in flight are left");
        assert!(b.next_sealed().unwrap().is_none());
        b.ack(&second).unwrap();
        b.ack(&again).unwrap();
        assert_eq!((b.counts().sealed_batches, b.counts().sealed_events), (0, 0));
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letters_are_kept_and_listed() {
        let dir = tmp("dead");
        let b = Buffer::open(
            &dir,
            Some("a"),
            limits(64 << 20, WhenFull::Reject, 1000),
            Arc::default(),
        )
        .unwrap();
        let (recs, n) = records(0..3);
        b.start_writer().append(recs, n).await.unwrap();
        b.seal_one().unwrap();
        let s = b.next_sealed().unwrap().unwrap();
        b.dead_letter(&s, "400 invalid frame").unwrap();
        assert!(b.next_sealed().unwrap().is_none());
        let dl = b.dead_letters(10);
        assert_eq!(
            (dl.len(), dl[0].events, dl[0].reason.as_str()),
            (1, 3, "400 invalid frame")
        );
        assert_eq!(b.counts().dead_batches, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_record_is_quarantined_and_counted() {
        let dir = tmp("corrupt");
        let metrics = Arc::new(AgentMetrics::default());
        {
            let b = Buffer::open(
                &dir,
                Some("a"),
                limits(64 << 20, WhenFull::Reject, 1000),
                metrics.clone(),
            )
            .unwrap();
            let (recs, n) = records(0..4);
            let mut r = chunk_record(n, 1, &recs);
            let last = r.len() - 1;
            r[last] ^= 0xff;
            b.db().unwrap().insert(key(P, 0), r).unwrap();
            b.db().unwrap().flush().unwrap();
        }
        let b = Buffer::open(&dir, None, limits(64 << 20, WhenFull::Reject, 1000), metrics.clone()).unwrap();
        assert_eq!(b.counts().pending_events, 0);
        assert_eq!(metrics.discarded.get(&["corrupt"]), 4);
        assert_eq!(b.db().unwrap().scan_prefix([Q]).count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_files_missing_or_orphaned_are_handled_at_recovery() {
        let dir = tmp("files");
        let metrics = Arc::new(AgentMetrics::default());
        {
            let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 10), metrics.clone()).unwrap();
            let app = b.start_writer();
            let (recs, n) = records(0..30);
            app.append(recs, n).await.unwrap();
            for _ in 0..3 {
                b.seal_one().unwrap().unwrap();
            }
            shut(b, app);
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.join(SEALED_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 3);
        // One batch file lost; one stray file left by an interrupted seal.
        std::fs::remove_file(&files[0]).unwrap();
        let stray = dir.join(SEALED_DIR).join(format!("{:020}.batch", u64::MAX - 1));
        std::fs::write(&stray, b"left over").unwrap();
        let b = Buffer::open(&dir, None, limits(64 << 20, WhenFull::Reject, 10), metrics.clone()).unwrap();
        assert!(
            !stray.exists() && stray.with_extension("corrupt").exists(),
            "an unreadable file without a record is moved aside"
        );
        assert_eq!((b.counts().sealed_batches, b.counts().sealed_events), (2, 20));
        assert_eq!(metrics.discarded.get(&["corrupt"]), 10);
        assert_eq!(drain_ids(&b).len(), 20);
        let batches = std::fs::read_dir(dir.join(SEALED_DIR))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "batch"))
            .count();
        assert_eq!(batches, 0, "acked files are deleted");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_files_without_records_are_adopted_unless_their_seal_never_committed() {
        let dir = tmp("orphans");
        let lim = || limits(64 << 20, WhenFull::Reject, 10);
        let metrics = Arc::new(AgentMetrics::default());
        let next_seq = {
            let b = Buffer::open(&dir, Some("a"), lim(), metrics.clone()).unwrap();
            let app = b.start_writer();
            let (recs, n) = records(0..30);
            app.append(recs, n).await.unwrap();
            for _ in 0..2 {
                b.seal_one().unwrap().unwrap();
            }
            let next = b.state.lock().unwrap().next_seq;
            shut(b, app);
            next
        };
        // sled loses the record of the first sealed batch (damage recovered to a shorter log):
        // the file is the only copy of its events. The second one's record is damaged.
        {
            let db = sled::open(&dir).unwrap();
            db.remove(key(S, next_seq - 2)).unwrap();
            let mut v = db.get(key(S, next_seq - 1)).unwrap().unwrap().to_vec();
            let last = v.len() - 1;
            v[last] ^= 0xff;
            db.insert(key(S, next_seq - 1), v).unwrap();
            db.flush().unwrap();
        }
        let write_batch = |seq: u64, range: std::ops::Range<u64>| {
            let (payload, n) = records(range);
            let frame = wire::seal_frame("a", BatchSeq(seq), n, &payload, 3);
            let path = dir.join(SEALED_DIR).join(format!("{seq:020}.batch"));
            std::fs::write(&path, sealed_file(n, 0, &frame)).unwrap();
            path
        };
        // A seal that never committed: a file for the next sequence holding exactly the oldest
        // pending events (20..30), which are still pending.
        let uncommitted = write_batch(next_seq, 20..30);
        // One whose chunks were only partly durable: 25..30 are still pending, 30..35 exist
        // only in the file.
        let partial = write_batch(next_seq + 1, 25..35);

        let b = Buffer::open(&dir, None, lim(), metrics.clone()).unwrap();
        assert!(!uncommitted.exists(), "a seal that never committed is deleted");
        assert!(partial.exists());
        let c = b.counts();
        assert_eq!((c.sealed_batches, c.sealed_events, c.pending_events), (3, 25, 10));
        assert_eq!(
            metrics.discarded.get(&["corrupt"]),
            0,
            "the damaged record's file was adopted"
        );
        // Nothing lost, nothing twice, and the next seal does not reuse a sequence.
        let seq = b.seal_one().unwrap().unwrap();
        assert_eq!(seq.0, next_seq + 2);
        let mut ids = drain_ids(&b);
        ids.sort();
        let want: Vec<String> = (0..35).map(|i| event(i).id).collect();
        assert_eq!(ids, want);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_storage_error_the_database_is_reopened_with_everything_in_it() {
        let dir = tmp("heal");
        let b = Buffer::open(&dir, Some("a"), limits(64 << 20, WhenFull::Reject, 10), Arc::default()).unwrap();
        let app = b.start_writer();
        let (recs, n) = records(0..25);
        app.append(recs, n).await.unwrap();
        b.seal_one().unwrap().unwrap();
        // What a full disk does to sled: an I/O error, after which it refuses everything.
        b.storage_failed(&sled::Error::Io(std::io::Error::other("No space left on device")));
        assert!(b.is_broken() && !b.is_writable());
        // Right after the error, appends are refused at once (a reopen is tried at most once
        // per HEAL_EVERY; the first one happens with this append).
        *b.last_heal.lock().unwrap() = Some(std::time::Instant::now());
        let (recs, n) = records(25..30);
        assert!(matches!(app.append(recs, n).await, Err(AppendError::Storage(_))));
        *b.last_heal.lock().unwrap() = None;
        assert!(b.heal(), "reopened");
        assert!(!b.is_broken() && b.is_writable());
        let c = b.counts();
        assert_eq!((c.sealed_events, c.pending_events), (10, 15));
        let (recs, n) = records(25..30);
        app.append(recs, n).await.unwrap();
        let mut ids = drain_ids(&b);
        ids.sort();
        assert_eq!(ids, (0..30).map(|i| event(i).id).collect::<Vec<_>>());
        shut(b, app);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sealed_files_of_a_database_moved_aside_are_rescued() {
        let dir = tmp("rescue");
        let lim = || limits(64 << 20, WhenFull::Reject, 10);
        {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let b = Buffer::open(&dir, Some("a"), lim(), Arc::default()).unwrap();
            let app = rt.block_on(async {
                let app = b.start_writer();
                let (recs, n) = records(0..20);
                app.append(recs, n).await.unwrap();
                app
            });
            b.seal_one().unwrap().unwrap();
            b.seal_one().unwrap().unwrap();
            shut(b, app);
        }
        std::fs::write(dir.join("conf"), b"\xff not a sled config").unwrap();
        let b = Buffer::open(&dir, Some("a"), lim(), Arc::default()).unwrap();
        let aside = b.recovered_from.clone().expect("moved aside");
        assert_eq!(b.counts().sealed_events, 20);
        assert_eq!(drain_ids(&b).len(), 20);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&aside).unwrap();
    }

    #[test]
    fn unopenable_database_is_moved_aside_not_crash_looped() {
        let dir = tmp("garbage");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("conf"), b"\xff\xfe garbage that is not a sled config").unwrap();
        std::fs::write(dir.join("db"), vec![0xAB; 4096]).unwrap();
        let b = Buffer::open(
            &dir,
            Some("a"),
            limits(64 << 20, WhenFull::Reject, 1000),
            Arc::default(),
        )
        .unwrap();
        let aside = b.recovered_from.clone().expect("moved aside");
        assert!(aside.exists());
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&aside).unwrap();
    }
}
