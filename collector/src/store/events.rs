//! The raw event log: events in compressed blocks, appended to segment files beside sled, and
//! the in-memory indexes built from the blocks (event ids for dedup, events by license).
//!
//! # Layout
//!
//! `<data_dir>/events/<first store sequence, 20 digits>.seg` files, each a run of blocks. A
//! group commit appends one block per [`MAX_BLOCK_EVENTS`] stored events; store sequences are
//! contiguous from block to block and from segment to segment (retention deletes whole
//! segments from the front only). A block, integers big-endian:
//!
//! | field | |
//! |---|---|
//! | version u8 | 1 |
//! | head_crc u32 | CRC-32 of every header byte after `data_crc`, and of the index section |
//! | data_crc u32 | CRC-32 of the data section |
//! | first_seq u64, count u32 | the store sequences `first_seq..first_seq+count` |
//! | stored_at i64 | when the group was stored (the dedup window runs from it) |
//! | min_time i64, max_time i64 | the range of the events' times |
//! | index_len u32, data_len u32, raw_len u32 | section lengths; `raw_len` = data decompressed |
//! | index section | licenses: `n u32`, then `len u16 ‖ bytes` each; then per event `id hash u128 ‖ license ordinal u32 (u32::MAX: none) ‖ time i64` |
//! | data section | zstd of, per event, `len u32 ‖ bincode(StoredEventV1)` |
//!
//! The index section is what opening reads (28 bytes per event): the id hashes fill the dedup
//! set and the (license, time, sequence) triples the license index, with no decompression.
//! Event ids are hashed with SipHash-1-3 (128-bit) under a random key kept in sled, so ids
//! cannot be crafted to collide; two different ids collide with probability ~2⁻¹²⁸ per pair.
//!
//! # Commit point
//!
//! sled's `m.next_store_seq` is the commit point. The writer appends a group's blocks and
//! `fdatasync`s the segment *before* the sled batch that advances `m.next_store_seq`, so every
//! committed sequence has its block on disk. On open, blocks at or past `m.next_store_seq` (a
//! crash between the two steps) are cut off; a damaged block *before* it is committed data and
//! the store refuses to open, naming the file and offset.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};

use crate::dedup::IdHasher;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bincode::{Decode, Encode};
use keytrail_common::event::{Deployment, Event, EventType, ResultCode, Usage};
use keytrail_common::time::UnixNanos;
use siphasher::sip128::{Hasher128, SipHasher13};

use super::license_keys::LicenseKeys;

const BLOCK_VERSION: u8 = 1;
const HEADER: usize = 57;
/// Events per block at most: a block is what one lookup decompresses.
pub const MAX_BLOCK_EVENTS: usize = 4096;
/// A new segment file is started once the current one is this big.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Decompressed blocks kept for lookups (late events' successors, queries, replay).
const CACHE_BYTES: usize = 64 << 20;
/// The most one stored event may take, encoded (wire events are capped well below).
const MAX_EVENT_BYTES: usize = 1 << 20;
const NO_LICENSE: u32 = u32::MAX;
const BINCODE: bincode::config::Configuration = bincode::config::standard();

/// The storage encoding of an event; separate from the wire's on purpose.
#[derive(Encode, Decode)]
struct StoredEventV1 {
    id: String,
    event_type: u8,
    time: i64,
    agent_id: String,
    license: Option<String>,
    customer: Option<String>,
    product: Option<String>,
    plan: Option<String>,
    previous_plan: Option<String>,
    region: Option<String>,
    user: Option<String>,
    domain: Option<String>,
    version: Option<String>,
    feature: Option<String>,
    machine: Option<String>,
    country: Option<String>,
    deployment: Option<u8>,
    result: u8,
    expires_at: Option<i64>,
    usage: [Option<u64>; 6],
    attrs: Vec<(String, String)>,
}

/// [`StoredEventV1`]'s encoding, borrowed from an event: the same bytes without copying its
/// strings (a slice encodes as a `Vec` does, a `&str` as a `String`).
#[derive(Encode)]
struct StoredEventV1Ref<'a> {
    id: &'a str,
    event_type: u8,
    time: i64,
    agent_id: &'a str,
    license: Option<&'a str>,
    customer: Option<&'a str>,
    product: Option<&'a str>,
    plan: Option<&'a str>,
    previous_plan: Option<&'a str>,
    region: Option<&'a str>,
    user: Option<&'a str>,
    domain: Option<&'a str>,
    version: Option<&'a str>,
    feature: Option<&'a str>,
    machine: Option<&'a str>,
    country: Option<&'a str>,
    deployment: Option<u8>,
    result: u8,
    expires_at: Option<i64>,
    usage: [Option<u64>; 6],
    attrs: &'a [(String, String)],
}

impl<'a> From<&'a Event> for StoredEventV1Ref<'a> {
    fn from(e: &'a Event) -> Self {
        StoredEventV1Ref {
            id: &e.id,
            event_type: e.event_type.tag(),
            time: e.time,
            agent_id: &e.agent_id,
            license: e.license.as_deref(),
            customer: e.customer.as_deref(),
            product: e.product.as_deref(),
            plan: e.plan.as_deref(),
            previous_plan: e.previous_plan.as_deref(),
            region: e.region.as_deref(),
            user: e.user.as_deref(),
            domain: e.domain.as_deref(),
            version: e.version.as_deref(),
            feature: e.feature.as_deref(),
            machine: e.machine.as_deref(),
            country: e.country.as_deref(),
            deployment: e.deployment.map(Deployment::tag),
            result: e.result.tag(),
            expires_at: e.expires_at,
            usage: e.usage.to_array(),
            attrs: &e.attrs,
        }
    }
}

impl StoredEventV1 {
    fn into_event(self) -> Option<Event> {
        Some(Event {
            id: self.id,
            event_type: EventType::from_tag(self.event_type)?,
            time: self.time,
            agent_id: self.agent_id,
            license: self.license,
            customer: self.customer,
            product: self.product,
            plan: self.plan,
            previous_plan: self.previous_plan,
            region: self.region,
            user: self.user,
            domain: self.domain,
            version: self.version,
            feature: self.feature,
            machine: self.machine,
            country: self.country,
            deployment: match self.deployment {
                None => None,
                Some(t) => Some(Deployment::from_tag(t)?),
            },
            result: ResultCode::from_tag(self.result)?,
            expires_at: self.expires_at,
            usage: Usage::from_array(self.usage),
            attrs: self.attrs,
        })
    }
}

/// Decodes one record of a data section (the event format of stores before blocks, too).
pub(super) fn decode_record(body: &[u8]) -> Option<Event> {
    let (stored, _): (StoredEventV1, usize) = bincode::decode_from_slice(body, BINCODE).ok()?;
    stored.into_event()
}

/// Encodes one record (the body of a data-section record, and of a first-format event value).
#[cfg(test)]
pub(super) fn encode_record(e: &Event) -> Vec<u8> {
    bincode::encode_to_vec(StoredEventV1Ref::from(e), BINCODE).expect("encoding into memory")
}

type IdSet = HashSet<u128, BuildHasherDefault<IdHasher>>;

/// Where a block is and what it covers; the in-memory list of these is the log's table.
#[derive(Clone, Debug)]
struct BlockMeta {
    segment: u64,
    offset: u64,
    first_seq: u64,
    count: u32,
    stored_at: i64,
    min_time: i64,
    max_time: i64,
    index_len: u32,
    data_len: u32,
    raw_len: u32,
    data_crc: u32,
}

impl BlockMeta {
    fn len(&self) -> u64 {
        HEADER as u64 + self.index_len as u64 + self.data_len as u64
    }
    fn end_seq(&self) -> u64 {
        self.first_seq + self.count as u64
    }
    /// No event of the block has a `(time, seq)` key above this one.
    fn max_key(&self) -> (i64, u64) {
        (self.max_time, self.end_seq().saturating_sub(1))
    }
    /// No event of the block has a `(time, seq)` key below this one.
    fn min_key(&self) -> (i64, u64) {
        (self.min_time, self.first_seq)
    }
}

/// A block decompressed, with where each record starts.
struct Decoded {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl Decoded {
    fn event(&self, i: usize) -> Option<Event> {
        let start = *self.offsets.get(i)? as usize + 4;
        let end = *self.offsets.get(i + 1)? as usize;
        decode_record(self.bytes.get(start..end)?)
    }
}

/// Decompressed blocks by first sequence, least recently used evicted past [`CACHE_BYTES`].
#[derive(Default)]
struct Cache {
    map: HashMap<u64, (Arc<Decoded>, u64)>,
    bytes: usize,
    tick: u64,
}

impl Cache {
    fn get(&mut self, first_seq: u64) -> Option<Arc<Decoded>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&first_seq).map(|(d, t)| {
            *t = tick;
            Arc::clone(d)
        })
    }

    fn put(&mut self, first_seq: u64, d: Arc<Decoded>) {
        self.tick += 1;
        self.bytes += d.bytes.len();
        if let Some((old, _)) = self.map.insert(first_seq, (d, self.tick)) {
            self.bytes -= old.bytes.len();
        }
        while self.bytes > CACHE_BYTES && self.map.len() > 1 {
            let oldest = *self.map.iter().min_by_key(|(_, (_, t))| *t).expect("not empty").0;
            if let Some((d, _)) = self.map.remove(&oldest) {
                self.bytes -= d.bytes.len();
            }
        }
    }

    fn forget_below(&mut self, seq: u64) {
        let gone: Vec<u64> = self.map.keys().copied().filter(|s| *s < seq).collect();
        for s in gone {
            if let Some((d, _)) = self.map.remove(&s) {
                self.bytes -= d.bytes.len();
            }
        }
    }
}

/// The indexes kept in memory, rebuilt from the blocks' index sections on open.
#[derive(Default)]
struct Tables {
    /// Every block on disk, by first sequence.
    blocks: Vec<BlockMeta>,
    /// Per license, `(time, store sequence)` of its events not purged by retention.
    by_license: HashMap<Arc<str>, LicenseKeys>,
    /// Hashes of the ids of the blocks from `ids_from` on (those inside the dedup window).
    ids: IdSet,
    ids_from: usize,
}

/// The file being appended to.
struct Tail {
    segment: u64,
    file: Option<File>,
    len: u64,
}

/// A group's blocks, written and synced but not yet visible ([`EventLog::publish`]) or cut
/// off again ([`EventLog::rollback`]).
pub struct Appended {
    segment: u64,
    len_before: u64,
    metas: Vec<BlockMeta>,
    /// The index section of each block in `metas`.
    indexes: Vec<ParsedIndex>,
    /// Each block's records as written, for the cache: a late event's successor is usually
    /// among the newest events, and this spares reading and decompressing their block again.
    decoded: Vec<Arc<Decoded>>,
}

/// What a retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Events past `raw_events`, no longer served.
    pub raw_events: u64,
    /// Event ids forgotten (past `dedup_window`).
    pub ids: u64,
    /// Segment files deleted.
    pub segments: u64,
}

/// The raw event log. Appends come from the store's single writer; reads from anywhere.
pub struct EventLog {
    dir: PathBuf,
    key: (u64, u64),
    /// One compression context for every block (used under the tail's lock): setting one up
    /// allocates and clears about a megabyte of tables.
    compressor: Mutex<zstd::bulk::Compressor<'static>>,
    /// A new segment is started once the current one is this big ([`SEGMENT_BYTES`]).
    segment_bytes: u64,
    tables: RwLock<Tables>,
    tail: Mutex<Tail>,
    cache: Mutex<Cache>,
    /// Events older than this are past `raw_events`: never served, even if still on disk.
    raw_floor: AtomicI64,
    /// Block indexes read by [`EventLog::page`] (how much of the log a page touches).
    index_reads: std::sync::atomic::AtomicU64,
}

fn segment_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a block header; `None` if it is not one.
fn parse_header(h: &[u8], segment: u64, offset: u64) -> Option<(BlockMeta, u32)> {
    if h.len() < HEADER || h[0] != BLOCK_VERSION {
        return None;
    }
    let meta = BlockMeta {
        segment,
        offset,
        first_seq: be64(h, 9),
        count: be32(h, 17),
        stored_at: be64(h, 21) as i64,
        min_time: be64(h, 29) as i64,
        max_time: be64(h, 37) as i64,
        index_len: be32(h, 45),
        data_len: be32(h, 49),
        raw_len: be32(h, 53),
        data_crc: be32(h, 5),
    };
    let sane = meta.count > 0
        && meta.count as usize <= MAX_BLOCK_EVENTS
        && (meta.index_len as usize) < 64 << 20
        && (meta.raw_len as usize) <= MAX_BLOCK_EVENTS * MAX_EVENT_BYTES;
    sane.then_some((meta, be32(h, 1)))
}

/// A block's index section: its license names, and per event `(id hash, license ordinal or
/// [`NO_LICENSE`], time)`.
struct ParsedIndex {
    licenses: Vec<Arc<str>>,
    lines: Vec<(u128, u32, i64)>,
}

/// Parses an index section of `count` events.
fn parse_index(b: &[u8], count: u32) -> Option<ParsedIndex> {
    let mut at = 0usize;
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    at += 4;
    let mut licenses: Vec<Arc<str>> = Vec::with_capacity(n.min(count as usize));
    for _ in 0..n {
        let len = u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize;
        at += 2;
        licenses.push(Arc::from(std::str::from_utf8(b.get(at..at + len)?).ok()?));
        at += len;
    }
    if b.len() != at + 28 * count as usize {
        return None;
    }
    let mut lines = Vec::with_capacity(count as usize);
    for c in b[at..].chunks_exact(28) {
        let ord = be32(c, 16);
        if ord != NO_LICENSE && ord as usize >= licenses.len() {
            return None;
        }
        lines.push((
            u128::from_be_bytes(c[..16].try_into().expect("16 bytes")),
            ord,
            be64(c, 20) as i64,
        ));
    }
    Some(ParsedIndex { licenses, lines })
}

impl EventLog {
    /// Opens `dir` (created if missing), cutting off blocks at or past `committed` (the store
    /// sequence sled says comes next), and loads the indexes.
    pub fn open(dir: &Path, key: (u64, u64), committed: u64, zstd_level: i32) -> Result<EventLog, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut segments: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        segments.sort_unstable();
        let log = EventLog {
            dir: dir.to_path_buf(),
            key,
            compressor: Mutex::new(
                zstd::bulk::Compressor::new(zstd_level)
                    .map_err(|e| format!("a zstd context at level {zstd_level}: {e}"))?,
            ),
            segment_bytes: SEGMENT_BYTES,
            tables: RwLock::new(Tables::default()),
            tail: Mutex::new(Tail {
                segment: committed,
                file: None,
                len: 0,
            }),
            cache: Mutex::new(Cache::default()),
            raw_floor: AtomicI64::new(i64::MIN),
            index_reads: Default::default(),
        };
        let mut t = Tables::default();
        // Per license, its (time, seq) list in store order; sorted into the index at the end.
        let mut slot_of: HashMap<Arc<str>, usize> = HashMap::new();
        let mut lists: Vec<Vec<(i64, u64)>> = Vec::new();
        let mut expected: Option<u64> = None;
        let mut cut = false;
        let mut tail = None;
        for &segment in &segments {
            let path = dir.join(segment_name(segment));
            if cut {
                tracing::warn!(file = %path.display(), "deleting an event segment past the store's commit point");
                std::fs::remove_file(&path).map_err(|e| format!("deleting {}: {e}", path.display()))?;
                continue;
            }
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let size = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
            let mut offset = 0u64;
            while offset < size {
                let next = expected.unwrap_or(segment);
                if next >= committed {
                    cut = true;
                    break;
                }
                let bad = |what: &str| {
                    format!(
                        "event segment {} is damaged at byte {offset} ({what}); it holds committed events (store sequence {next} onwards). Restore the data directory from a backup, or move the file aside to start without those events",
                        path.display()
                    )
                };
                let mut h = [0u8; HEADER];
                if offset + HEADER as u64 > size {
                    return Err(bad("truncated block header"));
                }
                file.read_exact_at(&mut h, offset).map_err(|e| bad(&e.to_string()))?;
                let (meta, head_crc) = parse_header(&h, segment, offset).ok_or_else(|| bad("not a block header"))?;
                if offset + meta.len() > size {
                    return Err(bad("truncated block"));
                }
                let mut index = vec![0u8; meta.index_len as usize];
                file.read_exact_at(&mut index, offset + HEADER as u64)
                    .map_err(|e| bad(&e.to_string()))?;
                let mut crc = crc32fast::Hasher::new();
                crc.update(&h[9..]);
                crc.update(&index);
                if crc.finalize() != head_crc {
                    return Err(bad("block checksum mismatch"));
                }
                if meta.first_seq != next && expected.is_some() {
                    return Err(bad(&format!(
                        "block starts at store sequence {}, expected {next}",
                        meta.first_seq
                    )));
                }
                if meta.first_seq >= committed {
                    cut = true;
                    break;
                }
                let parsed = parse_index(&index, meta.count).ok_or_else(|| bad("malformed index section"))?;
                if t.ids.capacity() == 0 {
                    t.ids.reserve(committed.saturating_sub(meta.first_seq) as usize);
                }
                let slots: Vec<usize> = parsed
                    .licenses
                    .into_iter()
                    .map(|l| {
                        let next = lists.len();
                        *slot_of.entry(l).or_insert_with(|| {
                            lists.push(Vec::new());
                            next
                        })
                    })
                    .collect();
                for (i, (hash, ord, time)) in parsed.lines.into_iter().enumerate() {
                    t.ids.insert(hash);
                    if ord != NO_LICENSE {
                        lists[slots[ord as usize]].push((time, meta.first_seq + i as u64));
                    }
                }
                expected = Some(meta.end_seq());
                offset += meta.len();
                t.blocks.push(meta);
            }
            if offset < size {
                tracing::warn!(file = %path.display(), offset, bytes = size - offset,
                    "cutting off event blocks past the store's commit point (a crash before their commit)");
                file.set_len(offset)
                    .map_err(|e| format!("truncating {}: {e}", path.display()))?;
                file.sync_all()
                    .map_err(|e| format!("syncing {}: {e}", path.display()))?;
            }
            if offset == 0 {
                std::fs::remove_file(&path).map_err(|e| format!("deleting {}: {e}", path.display()))?;
            } else {
                tail = Some((segment, file, offset));
            }
        }
        if let Some(end) = expected {
            if end != committed {
                return Err(format!(
                    "the event segments in {} end at store sequence {end}, but the store committed up to {committed}: segment files are missing",
                    dir.display()
                ));
            }
        }
        if let Some((segment, file, len)) = tail {
            *log.tail.lock().expect("tail") = Tail {
                segment,
                file: Some(file),
                len,
            };
        }
        t.by_license = slot_of
            .into_iter()
            .map(|(l, slot)| (l, std::mem::take(&mut lists[slot]).into_iter().collect()))
            .collect();
        *log.tables.write().expect("tables") = t;
        Ok(log)
    }

    /// The 128-bit keyed hash the dedup set holds for an event id.
    pub fn hash_id(&self, id: &str) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(id.as_bytes());
        h.finish128().as_u128()
    }

    /// Whether an event id was stored inside the dedup window.
    pub fn seen(&self, hash: u128) -> bool {
        self.tables.read().expect("tables").ids.contains(&hash)
    }

    /// Writes `events` (store sequences `first_seq..`) as blocks at the end of the log and
    /// syncs them. Nothing is visible until [`EventLog::publish`].
    pub fn append(&self, first_seq: u64, stored_at: i64, events: &[(&Event, u128)]) -> std::io::Result<Appended> {
        let mut tail = self.tail.lock().expect("tail");
        if tail.file.is_none() || tail.len >= self.segment_bytes {
            let path = self.dir.join(segment_name(first_seq));
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            File::open(&self.dir)?.sync_all()?;
            *tail = Tail {
                segment: first_seq,
                file: Some(file),
                len: 0,
            };
        }
        let len_before = tail.len;
        let mut out = Appended {
            segment: tail.segment,
            len_before,
            metas: Vec::new(),
            indexes: Vec::new(),
            decoded: Vec::new(),
        };
        let mut buf = Vec::new();
        let mut seq = first_seq;
        for chunk in events.chunks(MAX_BLOCK_EVENTS) {
            let offset = tail.len + buf.len() as u64;
            let (meta, index, decoded) = self.encode_block(&mut buf, seq, stored_at, chunk, tail.segment, offset)?;
            seq += chunk.len() as u64;
            out.metas.push(meta);
            out.indexes.push(index);
            out.decoded.push(Arc::new(decoded));
        }
        let file = tail.file.as_ref().expect("open segment");
        let written = file.write_all_at(&buf, len_before).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(len_before);
            return Err(e);
        }
        tail.len += buf.len() as u64;
        Ok(out)
    }

    fn encode_block(
        &self,
        buf: &mut Vec<u8>,
        first_seq: u64,
        stored_at: i64,
        events: &[(&Event, u128)],
        segment: u64,
        offset: u64,
    ) -> std::io::Result<(BlockMeta, ParsedIndex, Decoded)> {
        let mut licenses: HashMap<&str, u32> = HashMap::new();
        let mut parsed = ParsedIndex {
            licenses: Vec::new(),
            lines: Vec::with_capacity(events.len()),
        };
        let mut names: Vec<u8> = Vec::new();
        let mut lines = Vec::with_capacity(28 * events.len());
        let mut raw = Vec::with_capacity(160 * events.len());
        let mut offsets = Vec::with_capacity(events.len() + 1);
        let (mut min_time, mut max_time) = (i64::MAX, i64::MIN);
        for (e, hash) in events {
            let ord = match e.license.as_deref() {
                None => NO_LICENSE,
                Some(l) => {
                    let next = licenses.len() as u32;
                    *licenses.entry(l).or_insert_with(|| {
                        names.extend_from_slice(&(l.len() as u16).to_be_bytes());
                        names.extend_from_slice(l.as_bytes());
                        parsed.licenses.push(Arc::from(l));
                        next
                    })
                }
            };
            lines.extend_from_slice(&hash.to_be_bytes());
            lines.extend_from_slice(&ord.to_be_bytes());
            lines.extend_from_slice(&e.time.to_be_bytes());
            parsed.lines.push((*hash, ord, e.time));
            min_time = min_time.min(e.time);
            max_time = max_time.max(e.time);
            let at = raw.len();
            offsets.push(at as u32);
            raw.extend_from_slice(&[0; 4]);
            bincode::encode_into_std_write(StoredEventV1Ref::from(*e), &mut raw, BINCODE)
                .map_err(|e| std::io::Error::other(format!("encoding an event: {e}")))?;
            let len = (raw.len() - at - 4) as u32;
            raw[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        let mut index = Vec::with_capacity(4 + names.len() + lines.len());
        index.extend_from_slice(&(licenses.len() as u32).to_be_bytes());
        index.extend_from_slice(&names);
        index.extend_from_slice(&lines);
        let data = self.compressor.lock().expect("compressor").compress(&raw)?;
        let meta = BlockMeta {
            segment,
            offset,
            first_seq,
            count: events.len() as u32,
            stored_at,
            min_time,
            max_time,
            index_len: index.len() as u32,
            data_len: data.len() as u32,
            raw_len: raw.len() as u32,
            data_crc: crc32fast::hash(&data),
        };
        let mut h = [0u8; HEADER];
        h[0] = BLOCK_VERSION;
        h[5..9].copy_from_slice(&meta.data_crc.to_be_bytes());
        h[9..17].copy_from_slice(&first_seq.to_be_bytes());
        h[17..21].copy_from_slice(&meta.count.to_be_bytes());
        h[21..29].copy_from_slice(&stored_at.to_be_bytes());
        h[29..37].copy_from_slice(&min_time.to_be_bytes());
        h[37..45].copy_from_slice(&max_time.to_be_bytes());
        h[45..49].copy_from_slice(&meta.index_len.to_be_bytes());
        h[49..53].copy_from_slice(&meta.data_len.to_be_bytes());
        h[53..57].copy_from_slice(&meta.raw_len.to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[9..]);
        crc.update(&index);
        let head_crc = crc.finalize();
        h[1..5].copy_from_slice(&head_crc.to_be_bytes());
        buf.extend_from_slice(&h);
        buf.extend_from_slice(&index);
        buf.extend_from_slice(&data);
        offsets.push(raw.len() as u32);
        raw.shrink_to_fit();
        Ok((meta, parsed, Decoded { bytes: raw, offsets }))
    }

    /// Makes appended blocks visible: their ids to dedup, their events to lookups.
    pub fn publish(&self, a: Appended) {
        // Cached first (nothing finds a block before the tables know it), without holding
        // the tables' lock meanwhile.
        let mut cache = self.cache.lock().expect("cache");
        for (meta, decoded) in a.metas.iter().zip(a.decoded) {
            cache.put(meta.first_seq, decoded);
        }
        drop(cache);
        let mut t = self.tables.write().expect("tables");
        for (meta, index) in a.metas.iter().zip(a.indexes) {
            // One license lookup per license and block, not per event.
            let mut sets: Vec<LicenseKeys> = index
                .licenses
                .iter()
                .map(|l| t.by_license.remove(l).unwrap_or_default())
                .collect();
            for (i, (hash, ord, time)) in index.lines.into_iter().enumerate() {
                t.ids.insert(hash);
                if ord != NO_LICENSE {
                    sets[ord as usize].insert((time, meta.first_seq + i as u64));
                }
            }
            for (l, set) in index.licenses.into_iter().zip(sets) {
                t.by_license.insert(l, set);
            }
        }
        t.blocks.extend(a.metas);
    }

    /// Cuts appended blocks off again (their commit failed).
    pub fn rollback(&self, a: Appended) {
        let mut tail = self.tail.lock().expect("tail");
        if tail.segment == a.segment {
            if let Some(f) = &tail.file {
                if let Err(e) = f.set_len(a.len_before).and_then(|()| f.sync_data()) {
                    tracing::error!(error = %e, "cutting off uncommitted event blocks failed; the next open cuts them");
                }
            }
            tail.len = a.len_before;
        }
    }

    fn decoded(&self, meta: &BlockMeta) -> Result<Arc<Decoded>, String> {
        if let Some(d) = self.cache.lock().expect("cache").get(meta.first_seq) {
            return Ok(d);
        }
        let path = self.dir.join(segment_name(meta.segment));
        let what = |m: String| format!("event block at {}:{}: {m}", path.display(), meta.offset);
        let file = File::open(&path).map_err(|e| what(e.to_string()))?;
        let mut data = vec![0u8; meta.data_len as usize];
        file.read_exact_at(&mut data, meta.offset + HEADER as u64 + meta.index_len as u64)
            .map_err(|e| what(e.to_string()))?;
        if crc32fast::hash(&data) != meta.data_crc {
            return Err(what("data checksum mismatch".into()));
        }
        let bytes = zstd::bulk::decompress(&data, meta.raw_len as usize).map_err(|e| what(e.to_string()))?;
        // starts[i]: where record i's length prefix is; the last entry is the end.
        let mut starts = Vec::with_capacity(meta.count as usize + 1);
        let mut at = 0usize;
        while at + 4 <= bytes.len() {
            starts.push(at as u32);
            at += 4 + be32(&bytes, at) as usize;
        }
        if starts.len() != meta.count as usize || at != bytes.len() {
            return Err(what("records do not match the block's count".into()));
        }
        starts.push(at as u32);
        let d = Arc::new(Decoded { bytes, offsets: starts });
        self.cache.lock().expect("cache").put(meta.first_seq, Arc::clone(&d));
        Ok(d)
    }

    fn block_of(t: &Tables, seq: u64) -> Option<&BlockMeta> {
        let i = t.blocks.partition_point(|b| b.end_seq() <= seq);
        t.blocks.get(i).filter(|b| b.first_seq <= seq)
    }

    /// The event stored under `seq`, if it is still on disk and readable.
    pub fn event(&self, seq: u64) -> Option<Event> {
        let meta = Self::block_of(&self.tables.read().expect("tables"), seq)?.clone();
        self.read(&meta, seq)
    }

    fn read(&self, meta: &BlockMeta, seq: u64) -> Option<Event> {
        match self.decoded(meta) {
            Ok(d) => d.event((seq - meta.first_seq) as usize),
            Err(e) => {
                tracing::error!(error = %e, "a stored event could not be read");
                None
            }
        }
    }

    /// Every event on disk in store-sequence order, block by block.
    pub fn for_each(&self, mut f: impl FnMut(u64, Event)) {
        let blocks = self.tables.read().expect("tables").blocks.clone();
        for meta in &blocks {
            match self.decoded(meta) {
                Ok(d) => {
                    for i in 0..meta.count as usize {
                        if let Some(e) = d.event(i) {
                            f(meta.first_seq + i as u64, e);
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "skipping an unreadable event block"),
            }
        }
    }

    /// The earliest event of `license` after `after`, stored before `before`, for which
    /// `carries` holds.
    pub fn next_after(
        &self,
        license: &str,
        after: UnixNanos,
        before: u64,
        carries: &dyn Fn(&Event) -> bool,
    ) -> Option<(u64, Event)> {
        if after == i64::MAX {
            return None;
        }
        // Walked a few entries at a time (the first one usually carries the field), without
        // holding the lock while blocks are read.
        let mut from = (after + 1, 0u64);
        let mut take = 4;
        loop {
            let chunk: Vec<(i64, u64)> = {
                let t = self.tables.read().expect("tables");
                t.by_license.get(license)?.range_from(from).take(take).collect()
            };
            let &(time, seq) = chunk.last()?;
            for &(_, s) in &chunk {
                if s < before {
                    if let Some(e) = self.event(s).filter(|e| carries(e)) {
                        return Some((s, e));
                    }
                }
            }
            from = (time, seq + 1);
            take = (take * 2).min(256);
        }
    }

    /// Events newest first: `(time, seq)` strictly below `hi`, time at least `lo`, of `license`
    /// if given, accepted by `keep`, at most `limit`.
    pub fn page(
        &self,
        license: Option<&str>,
        lo: UnixNanos,
        hi: (UnixNanos, u64),
        limit: usize,
        keep: &dyn Fn(&Event) -> bool,
    ) -> Vec<(UnixNanos, u64, Event)> {
        let lo = lo.max(self.raw_floor.load(Ordering::Relaxed));
        let mut out = Vec::new();
        if let Some(l) = license {
            if (lo, 0) >= hi {
                return out;
            }
            // Newest first, a page's worth of keys at a time (a busy license has hundreds of
            // thousands), without holding the lock while blocks are read.
            let mut upper = hi;
            loop {
                let keys: Vec<(i64, u64)> = {
                    let t = self.tables.read().expect("tables");
                    match t.by_license.get(l) {
                        None => return out,
                        Some(set) => set.range_rev((lo, 0), upper).take(limit).collect(),
                    }
                };
                let Some(&last) = keys.last() else { return out };
                for (time, seq) in keys {
                    if let Some(e) = self.event(seq).filter(|e| keep(e)) {
                        out.push((time, seq, e));
                        if out.len() >= limit {
                            return out;
                        }
                    }
                }
                if (lo, 0) >= last {
                    return out;
                }
                upper = last;
            }
        }
        // Blocks by their largest possible `(time, seq)` key first; a block's entries join the
        // heap once that key could be next, so only the blocks a page reaches are read. Keys,
        // not times: when many events share a time, a page deep into them reads the blocks
        // around its cursor, not every block of that time.
        let mut blocks: Vec<BlockMeta> = self
            .tables
            .read()
            .expect("tables")
            .blocks
            .iter()
            .filter(|b| b.count > 0 && b.max_time >= lo && b.min_key() < hi)
            .cloned()
            .collect();
        blocks.sort_by_key(|b| std::cmp::Reverse(b.max_key()));
        let mut heap: BinaryHeap<(i64, u64)> = BinaryHeap::new();
        let mut next_block = 0;
        loop {
            while next_block < blocks.len() && heap.peek().is_none_or(|top| blocks[next_block].max_key() >= *top) {
                let b = &blocks[next_block];
                next_block += 1;
                self.index_reads.fetch_add(1, Ordering::Relaxed);
                match self.index_of(b) {
                    Ok(index) => {
                        for (i, &(_, _, time)) in index.lines.iter().enumerate() {
                            let key = (time, b.first_seq + i as u64);
                            if time >= lo && key < hi {
                                heap.push(key);
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "skipping an unreadable event block"),
                }
            }
            let Some((time, seq)) = heap.pop() else { break };
            if let Some(e) = self.event(seq).filter(|e| keep(e)) {
                out.push((time, seq, e));
                if out.len() >= limit {
                    break;
                }
            }
        }
        out
    }

    fn index_of(&self, meta: &BlockMeta) -> Result<ParsedIndex, String> {
        let path = self.dir.join(segment_name(meta.segment));
        let what = |m: String| format!("event block at {}:{}: {m}", path.display(), meta.offset);
        let file = File::open(&path).map_err(|e| what(e.to_string()))?;
        let mut index = vec![0u8; meta.index_len as usize];
        file.read_exact_at(&mut index, meta.offset + HEADER as u64)
            .map_err(|e| what(e.to_string()))?;
        parse_index(&index, meta.count).ok_or_else(|| what("malformed index section".into()))
    }

    /// Retention: forgets ids stored before `dedup_cutoff`, stops serving events older than
    /// `raw_cutoff`, and deletes the segments of which nothing is needed any more.
    pub fn purge(&self, raw_cutoff: UnixNanos, dedup_cutoff: UnixNanos) -> Result<Purged, String> {
        let mut p = Purged::default();
        self.raw_floor.fetch_max(raw_cutoff, Ordering::Relaxed);
        // Ids of blocks that left the dedup window, read back from their index sections.
        loop {
            let meta = {
                let t = self.tables.read().expect("tables");
                match t.blocks.get(t.ids_from) {
                    Some(b) if b.stored_at < dedup_cutoff => b.clone(),
                    _ => break,
                }
            };
            let index = self.index_of(&meta)?;
            let mut t = self.tables.write().expect("tables");
            for (hash, _, _) in &index.lines {
                if t.ids.remove(hash) {
                    p.ids += 1;
                }
            }
            t.ids_from += 1;
        }
        {
            let mut t = self.tables.write().expect("tables");
            let mut empty = Vec::new();
            for (l, set) in t.by_license.iter_mut() {
                p.raw_events += set.remove_below((raw_cutoff, 0)) as u64;
                if set.is_empty() {
                    empty.push(Arc::clone(l));
                }
            }
            for l in empty {
                t.by_license.remove(&l);
            }
        }
        // Whole segments with nothing left to serve or to dedup against, oldest first; never
        // the one being appended to.
        let tail = self.tail.lock().expect("tail").segment;
        loop {
            let (segment, end) = {
                let t = self.tables.read().expect("tables");
                let Some(first) = t.blocks.first() else { break };
                let segment = first.segment;
                if segment == tail {
                    break;
                }
                let n = t.blocks.iter().take_while(|b| b.segment == segment).count();
                let done = t.blocks[..n].iter().all(|b| b.max_time < raw_cutoff) && t.ids_from >= n;
                if !done {
                    break;
                }
                (segment, n)
            };
            let path = self.dir.join(segment_name(segment));
            std::fs::remove_file(&path).map_err(|e| format!("deleting {}: {e}", path.display()))?;
            let mut t = self.tables.write().expect("tables");
            let first_kept = t.blocks[end].first_seq;
            t.blocks.drain(..end);
            t.ids_from -= end;
            self.cache.lock().expect("cache").forget_below(first_kept);
            p.segments += 1;
        }
        Ok(p)
    }

    /// (blocks, licenses indexed, ids held), for logs and tests.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let t = self.tables.read().expect("tables");
        (t.blocks.len(), t.by_license.len(), t.ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: (u64, u64) = (1, 2);

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kt-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn ev(i: u64, license: &str, time: i64) -> Event {
        let mut e = Event::new(format!("id-{i}"), EventType::Validated, time, "agent");
        e.license = (!license.is_empty()).then(|| license.to_string());
        e.plan = Some(["free", "pro"][i as usize % 2].into());
        e.attrs = vec![("n".into(), i.to_string())];
        e
    }

    /// Appends and publishes `events` as one group; returns the next store sequence.
    fn commit(log: &EventLog, first: u64, stored_at: i64, events: &[Event]) -> u64 {
        let hashed: Vec<(&Event, u128)> = events.iter().map(|e| (e, log.hash_id(&e.id))).collect();
        let a = log.append(first, stored_at, &hashed).unwrap();
        log.publish(a);
        first + events.len() as u64
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    }

    #[test]
    fn blocks_round_trip_and_reopen_with_the_same_indexes() {
        let dir = tmp("roundtrip");
        let events: Vec<Event> = (0..10_000u64)
            .map(|i| ev(i, ["a", "b", ""][i as usize % 3], (i as i64 * 7919) % 5000))
            .collect();
        let next = {
            let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
            let mut next = commit(&log, 0, 1, &events[..100]);
            next = commit(&log, next, 2, &events[100..]);
            assert_eq!(log.sizes().0, 1 + 10_000usize.div_ceil(MAX_BLOCK_EVENTS) - 1 + 1);
            next
        };
        let log = EventLog::open(&dir, KEY, next, 1).unwrap();
        let (blocks, licenses, ids) = log.sizes();
        assert_eq!((licenses, ids), (2, 10_000));
        assert!(blocks >= 3);
        for i in [0u64, 99, 100, 4195, 9999] {
            let e = log.event(i).unwrap();
            assert_eq!(e, events[i as usize], "seq {i}");
        }
        assert!(log.event(10_000).is_none());
        assert!(log.seen(log.hash_id("id-5")));
        assert!(!log.seen(log.hash_id("id-10000")));
        // Every event in store order.
        let mut n = 0;
        log.for_each(|seq, e| {
            assert_eq!(e, events[seq as usize]);
            n += 1;
        });
        assert_eq!(n, 10_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pages_and_successors_match_a_plain_sort() {
        let dir = tmp("page");
        let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let events: Vec<Event> = (0..3000u64)
            .map(|i| {
                ev(
                    i,
                    ["a", "b"][rng.usize(..2)],
                    i as i64 / 3 - rng.i64(0..200) * (rng.u8(..10) == 0) as i64,
                )
            })
            .collect();
        let mut next = 0;
        for chunk in events.chunks(500) {
            next = commit(&log, next, 0, chunk);
        }
        let key = |i: usize| (events[i].time, i as u64);
        // Pages newest first, with a filter, against a plain sort.
        for (license, keep_pro) in [(None, false), (Some("a"), false), (None, true), (Some("b"), true)] {
            let mut want: Vec<usize> = (0..events.len())
                .filter(|&i| license.is_none_or(|l| events[i].license.as_deref() == Some(l)))
                .filter(|&i| !keep_pro || events[i].plan.as_deref() == Some("pro"))
                .filter(|&i| events[i].time >= 100 && events[i].time < 900)
                .collect();
            want.sort_by_key(|&i| std::cmp::Reverse(key(i)));
            let mut got = Vec::new();
            let mut hi = (900, 0);
            loop {
                let page = log.page(license, 100, hi, 37, &|e| !keep_pro || e.plan.as_deref() == Some("pro"));
                got.extend(page.iter().map(|r| r.1 as usize));
                match page.last() {
                    Some(r) if page.len() == 37 => hi = (r.0, r.1),
                    _ => break,
                }
            }
            assert_eq!(got, want, "license {license:?} pro {keep_pro}");
        }
        // Successors: the first event of the license after t, stored before `before`.
        for _ in 0..300 {
            let l = ["a", "b"][rng.usize(..2)];
            let t = rng.i64(-100..1100);
            let before = rng.u64(0..3000);
            let carries = |e: &Event| e.plan.as_deref() == Some("free");
            let want = (0..before as usize)
                .filter(|&i| events[i].license.as_deref() == Some(l) && events[i].time > t && carries(&events[i]))
                .min_by_key(|&i| key(i));
            let got = log.next_after(l, t, before, &carries).map(|(s, _)| s as usize);
            assert_eq!(got, want, "license {l} after {t} before {before}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pages_through_events_of_one_time_read_only_the_blocks_near_the_cursor() {
        let dir = tmp("same-time");
        let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
        // 40 blocks of 100 events, all at one time.
        let events: Vec<Event> = (0..4000u64).map(|i| ev(i, ["a", "b"][i as usize % 2], 500)).collect();
        let mut next = 0;
        for chunk in events.chunks(100) {
            next = commit(&log, next, 0, chunk);
        }
        let mut got = Vec::new();
        let mut hi = (501, 0);
        let mut pages = 0u64;
        loop {
            let page = log.page(None, 0, hi, 50, &|_| true);
            pages += 1;
            got.extend(page.iter().map(|r| r.1));
            match page.last() {
                Some(r) if page.len() == 50 => hi = (r.0, r.1),
                _ => break,
            }
        }
        let want: Vec<u64> = (0..4000u64).rev().collect();
        assert_eq!(got, want);
        // Each page reads the block its cursor is in and at most the next one or two; a page
        // that compared times only read all 40 blocks every time.
        let reads = log.index_reads.load(Ordering::Relaxed);
        assert!(reads <= 3 * pages, "{reads} index reads for {pages} pages");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_past_the_commit_point_is_cut_and_committed_damage_refuses_to_open() {
        let dir = tmp("torn");
        let events: Vec<Event> = (0..50u64).map(|i| ev(i, "a", i as i64)).collect();
        {
            let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
            commit(&log, 0, 0, &events[..30]);
            // Written and synced, but the sled batch that commits it never happened.
            let hashed: Vec<(&Event, u128)> = events[30..].iter().map(|e| (e, log.hash_id(&e.id))).collect();
            log.append(30, 0, &hashed).unwrap();
        }
        let file = segment_files(&dir).remove(0);
        let full = std::fs::metadata(&file).unwrap().len();
        {
            let log = EventLog::open(&dir, KEY, 30, 1).unwrap();
            assert_eq!(log.sizes().2, 30, "the uncommitted ids are not in the dedup set");
            assert!(log.event(30).is_none());
            // Appending goes on where the commit point is.
            commit(&log, 30, 0, &events[30..40]);
        }
        assert!(std::fs::metadata(&file).unwrap().len() < full);
        let log = EventLog::open(&dir, KEY, 40, 1).unwrap();
        assert_eq!(log.event(35).unwrap(), events[35]);
        drop(log);
        // Half a header at the end, past the commit point: cut.
        let mut f = File::options().append(true).open(&file).unwrap();
        std::io::Write::write_all(&mut f, &[BLOCK_VERSION, 9, 9]).unwrap();
        drop(f);
        EventLog::open(&dir, KEY, 40, 1).unwrap();
        // A flipped byte inside a committed block's index: refused, naming the file and offset.
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[HEADER + 10] ^= 0x20;
        std::fs::write(&file, &bytes).unwrap();
        let err = EventLog::open(&dir, KEY, 40, 1).err().unwrap();
        assert!(
            err.contains(&file.display().to_string()) && err.contains("byte 0") && err.contains("checksum"),
            "{err}"
        );
        // Committed events whose segment is missing: refused too.
        std::fs::remove_file(&file).unwrap();
        commit(&EventLog::open(&dir, KEY, 0, 1).unwrap(), 0, 0, &events[..5]);
        let err = EventLog::open(&dir, KEY, 40, 1).err().unwrap();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_borrowed_record_encodes_as_the_stored_format() {
        let mut e = ev(7, "lic", 1_700_000_000_000_000_000);
        e.customer = Some("c".into());
        e.product = Some("p".into());
        e.previous_plan = Some("free".into());
        e.region = Some("eu".into());
        e.user = Some("u".into());
        e.domain = Some("d.example".into());
        e.version = Some("1.2".into());
        e.feature = Some("sso".into());
        e.machine = Some("mf_x".into());
        e.country = Some("DE".into());
        e.deployment = Some(Deployment::Hybrid);
        e.result = ResultCode::LimitExceeded;
        e.expires_at = Some(1_800_000_000_000_000_000);
        e.usage = Usage::from_array([Some(1), Some(2), None, Some(4), Some(5), Some(6)]);
        let bytes = encode_record(&e);
        let (owned, _): (StoredEventV1, usize) = bincode::decode_from_slice(&bytes, BINCODE).unwrap();
        assert_eq!(
            bincode::encode_to_vec(owned, BINCODE).unwrap(),
            bytes,
            "the owned layout"
        );
        assert_eq!(decode_record(&bytes).unwrap(), e);
    }

    #[test]
    fn published_blocks_are_cached_as_reading_them_back_would_decode_them() {
        let dir = tmp("cached");
        let events: Vec<Event> = (0..5000u64)
            .map(|i| ev(i, ["a", "b"][i as usize % 2], i as i64))
            .collect();
        let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
        commit(&log, 0, 0, &events);
        let metas = log.tables.read().unwrap().blocks.clone();
        assert_eq!(metas.len(), 2, "{MAX_BLOCK_EVENTS} and the rest");
        let cached: Vec<Arc<Decoded>> = metas
            .iter()
            .map(|m| log.cache.lock().unwrap().get(m.first_seq).expect("cached on publish"))
            .collect();
        *log.cache.lock().unwrap() = Cache::default();
        for (m, c) in metas.iter().zip(cached) {
            let read = log.decoded(m).unwrap();
            assert_eq!((&c.bytes, &c.offsets), (&read.bytes, &read.offsets));
            assert_eq!(c.bytes.len(), m.raw_len as usize);
        }
        assert_eq!(log.event(4321).unwrap(), events[4321]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_data_section_loses_that_block_only() {
        let dir = tmp("data");
        let events: Vec<Event> = (0..20u64).map(|i| ev(i, "a", i as i64)).collect();
        let log = EventLog::open(&dir, KEY, 0, 1).unwrap();
        commit(&log, 0, 0, &events[..10]);
        commit(&log, 10, 0, &events[10..]);
        let file = segment_files(&dir).remove(0);
        let mut bytes = std::fs::read(&file).unwrap();
        let first_len = {
            let (m, _) = parse_header(&bytes, 0, 0).unwrap();
            m.len() as usize
        };
        bytes[first_len - 3] ^= 0xff; // inside the first block's compressed data
        std::fs::write(&file, &bytes).unwrap();
        let log = EventLog::open(&dir, KEY, 20, 1).unwrap();
        assert!(log.event(3).is_none(), "checksum caught");
        assert_eq!(log.event(13).unwrap(), events[13]);
        let page = log.page(Some("a"), i64::MIN, (i64::MAX, 0), 100, &|_| true);
        assert_eq!(page.len(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retention_forgets_ids_hides_old_events_and_deletes_whole_segments() {
        let dir = tmp("purge");
        let mut log = EventLog::open(&dir, KEY, 0, 1).unwrap();
        log.segment_bytes = 1; // a segment per group
        let mut next = 0;
        // Group g: stored at g, events at times 10g..10g+9.
        for g in 0..5u64 {
            let events: Vec<Event> = (0..10).map(|i| ev(g * 10 + i, "a", (g * 10 + i) as i64)).collect();
            next = commit(&log, next, g as i64, &events);
        }
        assert_eq!(segment_files(&dir).len(), 5);
        // Raw events before 25, ids stored before 2.
        let p = log.purge(25, 2).unwrap();
        assert_eq!(
            p,
            Purged {
                raw_events: 25,
                ids: 20,
                segments: 2
            }
        );
        assert_eq!(segment_files(&dir).len(), 3);
        assert!(!log.seen(log.hash_id("id-15")));
        assert!(log.seen(log.hash_id("id-25")));
        let page = log.page(None, i64::MIN, (i64::MAX, 0), 100, &|_| true);
        assert_eq!(page.len(), 25, "events before 25 are no longer served");
        assert_eq!(log.page(Some("a"), i64::MIN, (i64::MAX, 0), 100, &|_| true).len(), 25);
        // Segment 2 (times 20..29) is still needed for 25..29; the segment being appended to
        // is never deleted.
        let p = log.purge(1000, 1000).unwrap();
        assert_eq!((p.raw_events, p.segments), (25, 2));
        assert_eq!(segment_files(&dir).len(), 1);
        // Reopen: the store starts where the kept blocks start.
        drop(log);
        let log = EventLog::open(&dir, KEY, next, 1).unwrap();
        assert_eq!(log.event(45).unwrap().id, "id-45");
        assert!(log.event(39).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
