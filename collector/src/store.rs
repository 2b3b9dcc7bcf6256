//! The collector's storage: the only place in the collector that knows sled.
//!
//! Owns: durably storing received batches (group commit: one flush for every batch that
//! arrived during the previous one), the dedup indexes, the raw event store and its
//! retention, and the receive counters of `/v1/stats`. Everything else reaches storage through
//! [`Store`]'s methods and [`StoreWriter`], never through sled.
//!
//! # On-disk layout
//!
//! One sled tree so that each group commit is one atomic `apply_batch` (data, indexes and
//! counters move together, so a crash never leaves a counter out of step with the data).
//! Instants are i64 unix nanoseconds stored as `u64 BE` with the sign bit flipped, so keys
//! sort by time.
//!
//! | key | value |
//! |-----|-------|
//! | `b` ‖ len u16 ‖ agent ‖ seq u64 | stored_at ‖ frame crc32 ‖ events u32: batch dedup |
//! | `i` ‖ event id | stored_at ‖ time ‖ store_seq: event dedup (the first copy wins) |
//! | `e` ‖ time ‖ store_seq u64 | `1 ‖ crc32 ‖ bincode(StoredEventV1)`: the raw event |
//! | `l` ‖ len u16 ‖ license ‖ time ‖ store_seq | empty: license index of `e` |
//! | `a` ‖ agent | last_seen ‖ events u64: per-agent stats |
//! | `c.<name>` | u64: counters of `/v1/stats` |
//! | `m.next_store_seq` | u64 |
//! | `x…` | analytics records: per-license state, per-day cells, variants ([`crate::analytics`]) |
//!
//! # Rules
//!
//! * A batch is answered 200 only after its group's `flush` and an `fdatasync` of sled's log.
//! * A batch whose (agent, sequence) was stored before *with the same frame checksum* is a
//!   retry: acknowledged, its events counted as received and as duplicates, nothing stored.
//!   The same key with a different checksum means an agent lost its database and reused a
//!   sequence: its events go through the per-event check instead (logged).
//! * An event whose id is in `i` is a duplicate: counted, not stored.
//! * Analytics are applied for exactly the events stored (never a duplicate), and their
//!   changed records join the group's atomic batch: rollups never disagree with the events.
//!   If the batch cannot be applied, the in-memory analytics are reloaded from sled.
//! * Retention: `e`/`l` entries older than `retention.raw_events` (by event time) and
//!   `i`/`b` entries stored longer ago than `retention.dedup_window` are deleted by a
//!   background purge. Counters are never decremented by retention.
//!
//! # Crash at each step
//!
//! Before the apply: nothing of the group is stored, the agents got no 200 and resend. After
//! the apply, before the flush: sled recovers the group entirely or not at all (one atomic
//! batch). After the flush, before the answer: the agent resends and gets a 200 as a
//! duplicate. A database that cannot be opened stops the collector with the reason (unlike the
//! agent's buffer, this is the system of record: moving it aside would hide data from the
//! operator).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bincode::{Decode, Encode};
use keytrail_common::event::{Deployment, Event, EventType, ResultCode, Usage};
use keytrail_common::time::{now_ns, UnixNanos};
use keytrail_common::wire::BatchSeq;
use tokio::sync::{mpsc, oneshot};

use crate::analytics::{self, Analytics, MetricQuery, QueryError, Row};
use crate::config::Plan;
use crate::dedup;

const RECORD_VERSION: u8 = 1;
const MAX_GROUP_EVENTS: usize = 500_000;
const WRITER_QUEUE: usize = 256;

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
    #[error(transparent)]
    Analytics(#[from] analytics::RecordError),
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

impl From<&Event> for StoredEventV1 {
    fn from(e: &Event) -> Self {
        let u = &e.usage;
        StoredEventV1 {
            id: e.id.clone(),
            event_type: e.event_type.tag(),
            time: e.time,
            agent_id: e.agent_id.clone(),
            license: e.license.clone(),
            customer: e.customer.clone(),
            product: e.product.clone(),
            plan: e.plan.clone(),
            previous_plan: e.previous_plan.clone(),
            region: e.region.clone(),
            user: e.user.clone(),
            domain: e.domain.clone(),
            version: e.version.clone(),
            feature: e.feature.clone(),
            machine: e.machine.clone(),
            country: e.country.clone(),
            deployment: e.deployment.map(Deployment::tag),
            result: e.result.tag(),
            expires_at: e.expires_at,
            usage: [
                u.seats_used,
                u.seats_limit,
                u.domains_used,
                u.domains_limit,
                u.machines_used,
                u.machines_limit,
            ],
            attrs: e.attrs.clone(),
        }
    }
}

impl StoredEventV1 {
    fn into_event(self) -> Option<Event> {
        let u = self.usage;
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
            usage: Usage {
                seats_used: u[0],
                seats_limit: u[1],
                domains_used: u[2],
                domains_limit: u[3],
                machines_used: u[4],
                machines_limit: u[5],
            },
            attrs: self.attrs,
        })
    }
}

const BINCODE: bincode::config::Configuration = bincode::config::standard();

fn encode_event(e: &Event) -> Vec<u8> {
    let body = bincode::encode_to_vec(StoredEventV1::from(e), BINCODE).expect("encoding into memory");
    let mut r = Vec::with_capacity(5 + body.len());
    r.push(RECORD_VERSION);
    r.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    r.extend_from_slice(&body);
    r
}

fn decode_event(r: &[u8]) -> Option<Event> {
    if r.len() < 5 || r[0] != RECORD_VERSION {
        return None;
    }
    let body = &r[5..];
    if crc32fast::hash(body) != u32::from_be_bytes(r[1..5].try_into().ok()?) {
        return None;
    }
    let (stored, _): (StoredEventV1, usize) = bincode::decode_from_slice(body, BINCODE).ok()?;
    stored.into_event()
}

fn time_key(t: UnixNanos) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from_key(b: &[u8]) -> UnixNanos {
    (u64::from_be_bytes(b.try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

fn event_key(t: UnixNanos, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(b'e');
    k.extend_from_slice(&time_key(t));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn len_prefixed(prefix: u8, s: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + s.len() + 16);
    k.push(prefix);
    k.extend_from_slice(&(s.len() as u16).to_be_bytes());
    k.extend_from_slice(s.as_bytes());
    k
}

fn license_key(license: &str, t: UnixNanos, seq: u64) -> Vec<u8> {
    let mut k = len_prefixed(b'l', license);
    k.extend_from_slice(&time_key(t));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn batch_key(agent: &str, seq: BatchSeq) -> Vec<u8> {
    let mut k = len_prefixed(b'b', agent);
    k.extend_from_slice(&seq.0.to_be_bytes());
    k
}

fn id_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'i');
    k.extend_from_slice(id.as_bytes());
    k
}

fn counter_key(name: &str) -> Vec<u8> {
    format!("c.{name}").into_bytes()
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// In-memory mirror of the persisted counters and agent stats.
#[derive(Default)]
struct Totals {
    counters: [u64; 5],
    agents: BTreeMap<String, (UnixNanos, u64)>,
}

/// The store. Reads go straight to sled; writes go through the single [`StoreWriter`] thread.
pub struct Store {
    db: sled::Db,
    log_file: Option<std::fs::File>,
    totals: Mutex<Totals>,
    next_store_seq: AtomicU64,
    writable: AtomicBool,
    dedup_window: Duration,
    raw_events: Duration,
    analytics: RwLock<Analytics>,
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
}

fn load_analytics(db: &sled::Db, plans: BTreeMap<String, Plan>) -> Result<Analytics, StoreError> {
    let mut records = Vec::new();
    for item in db.scan_prefix(analytics::KEY_PREFIX) {
        let (k, v) = item?;
        records.push((k.to_vec(), v.to_vec()));
    }
    Ok(Analytics::load(plans, records.into_iter())?)
}

impl Store {
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let StoreOptions {
            cache_bytes,
            dedup_window,
            raw_events,
            plans,
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
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
            .map_err(|_| err("sled panicked while opening the database".into()))?
            .map_err(|e| err(e.to_string()))?;
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
        let next = db.get(b"m.next_store_seq")?.map_or(0, |v| be_u64(&v));
        let analytics = load_analytics(&db, plans).map_err(|e| err(e.to_string()))?;
        Ok(Arc::new(Store {
            db,
            log_file,
            totals: Mutex::new(totals),
            next_store_seq: AtomicU64::new(next),
            writable: AtomicBool::new(true),
            dedup_window,
            raw_events,
            analytics: RwLock::new(analytics),
        }))
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

    /// `(name, value)` for every counter of `/v1/stats`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let t = self.totals.lock().expect("totals");
        COUNTERS.iter().copied().zip(t.counters.iter().copied()).collect()
    }

    pub fn agents(&self) -> Vec<AgentStat> {
        let t = self.totals.lock().expect("totals");
        t.agents
            .iter()
            .map(|(a, (seen, events))| AgentStat {
                agent_id: a.clone(),
                last_seen: keytrail_common::time::format_rfc3339(*seen),
                events: *events,
            })
            .collect()
    }

    /// Starts the single writer thread.
    pub fn start_writer(self: &Arc<Self>) -> StoreWriter {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let store = Arc::clone(self);
        std::thread::Builder::new()
            .name("keytrail-store-writer".into())
            .spawn(move || store.writer_loop(rx))
            .expect("spawning the store writer");
        StoreWriter { tx }
    }

    fn writer_loop(&self, mut rx: mpsc::Receiver<Job>) {
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
            match self.commit(&jobs) {
                Ok(outcomes) => {
                    self.writable.store(true, Ordering::Relaxed);
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        let _ = job.reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    self.writable.store(false, Ordering::Relaxed);
                    tracing::error!(error = %e, "storing a group of batches failed; agents will retry");
                    for job in jobs {
                        let _ = job.reply.send(Err(StoreError::Write(e.to_string())));
                    }
                }
            }
        }
    }

    /// Dedups and stores a group of batches in one atomic batch and one flush.
    fn commit(&self, jobs: &[Job]) -> Result<Vec<IngestOutcome>, sled::Error> {
        let now = now_ns();
        let mut w = sled::Batch::default();
        let mut seen_ids: HashSet<String> = HashSet::new();
        let mut seen_batches: HashSet<Vec<u8>> = HashSet::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut delta = [0u64; 5];
        let mut agent_delta: BTreeMap<&str, u64> = BTreeMap::new();
        let mut seq = self.next_store_seq.load(Ordering::Relaxed);
        let mut stored: Vec<(&Event, u64)> = Vec::new();
        for job in jobs {
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
            let plan = dedup::plan(
                &b.events,
                |id| self.db.contains_key(id_key(id)).unwrap_or(false),
                &mut seen_ids,
            );
            for &i in &plan.new {
                let e = &b.events[i];
                w.insert(event_key(e.time, seq), encode_event(e));
                if let Some(l) = &e.license {
                    w.insert(license_key(l, e.time, seq), &[] as &[u8]);
                }
                let mut iv = Vec::with_capacity(24);
                iv.extend_from_slice(&now.to_be_bytes());
                iv.extend_from_slice(&e.time.to_be_bytes());
                iv.extend_from_slice(&seq.to_be_bytes());
                w.insert(id_key(&e.id), iv);
                stored.push((e, seq));
                seq += 1;
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
        // Counters and agent stats move in the same atomic batch as the data.
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
        w.insert(b"m.next_store_seq" as &[u8], &seq.to_be_bytes());
        {
            let mut a = self.analytics.write().expect("analytics lock");
            for (i, (e, seq)) in stored.iter().enumerate() {
                let history = StoredHistory {
                    store: self,
                    pending: &stored[..i],
                };
                a.apply(e, *seq, &history);
            }
            for (k, v) in a.take_dirty() {
                w.insert(k, v);
            }
        }
        if let Err(e) = self.db.apply_batch(w) {
            // The in-memory analytics already hold this group: go back to what sled holds.
            let plans = self.analytics.read().expect("analytics lock").catalog().clone();
            match load_analytics(&self.db, plans) {
                Ok(a) => *self.analytics.write().expect("analytics lock") = a,
                Err(le) => tracing::error!(error = %le, "reloading analytics after a failed write failed"),
            }
            return Err(e);
        }
        // sled holds the group in memory now: advance the in-memory mirror before flushing, so
        // a failed flush cannot make the next group reuse store sequences or write counters
        // that go backwards. The agents only get their 200 after the flush.
        self.next_store_seq.store(seq, Ordering::Relaxed);
        {
            let mut t = self.totals.lock().expect("totals");
            t.counters = counters;
            for (a, events) in agents {
                t.agents.insert(a, (now, events));
            }
        }
        self.db.flush()?;
        if let Some(f) = &self.log_file {
            f.sync_data()?;
        }
        Ok(outcomes)
    }

    /// `GET /v1/events`: newest first, filtered, paginated.
    pub fn events(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let limit = q.limit.clamp(1, 1000);
        let lo_t = q.from.unwrap_or(i64::MIN);
        let mut hi: (UnixNanos, u64) = (q.to.unwrap_or(i64::MAX), 0);
        if let Some(c) = q.cursor {
            hi = hi.min(c);
        }
        let mut out = Vec::new();
        let mut last = None;
        let mut push = |t: UnixNanos, seq: u64, e: Event, out: &mut Vec<Event>| -> bool {
            if q.event_type.is_some_and(|ty| ty != e.event_type) {
                return false;
            }
            out.push(e);
            last = Some((t, seq));
            out.len() >= limit
        };
        match &q.license {
            Some(lic) => {
                let prefix = len_prefixed(b'l', lic);
                let mut lo = prefix.clone();
                lo.extend_from_slice(&time_key(lo_t));
                let mut hi_key = prefix.clone();
                hi_key.extend_from_slice(&time_key(hi.0));
                hi_key.extend_from_slice(&hi.1.to_be_bytes());
                for item in self.db.range(lo..hi_key).rev() {
                    let (k, _) = item?;
                    let rest = &k[prefix.len()..];
                    let t = time_from_key(&rest[..8]);
                    let seq = be_u64(&rest[8..16]);
                    if let Some(v) = self.db.get(event_key(t, seq))? {
                        if let Some(e) = decode_event(&v) {
                            if push(t, seq, e, &mut out) {
                                break;
                            }
                        }
                    }
                }
            }
            None => {
                let lo = event_key(lo_t, 0);
                let hi_key = event_key(hi.0, hi.1);
                for item in self.db.range(lo..hi_key).rev() {
                    let (k, v) = item?;
                    let t = time_from_key(&k[1..9]);
                    let seq = be_u64(&k[9..17]);
                    match decode_event(&v) {
                        Some(e) => {
                            if push(t, seq, e, &mut out) {
                                break;
                            }
                        }
                        None => tracing::error!(time = t, seq, "stored event failed its checksum; skipped"),
                    }
                }
            }
        }
        let next_cursor = if out.len() >= limit { last } else { None };
        Ok(EventPage {
            events: out,
            next_cursor,
        })
    }

    /// Deletes what retention allows. Returns (raw events deleted, dedup keys deleted).
    pub fn purge(&self, now: UnixNanos) -> Result<(u64, u64), StoreError> {
        let raw_cutoff = now.saturating_sub(self.raw_events.as_nanos() as i64);
        let dedup_cutoff = now.saturating_sub(self.dedup_window.as_nanos() as i64);
        let mut raw = 0u64;
        loop {
            let mut w = sled::Batch::default();
            let mut n = 0;
            for item in self
                .db
                .range(event_key(i64::MIN, 0)..event_key(raw_cutoff, 0))
                .take(10_000)
            {
                let (k, v) = item?;
                let t = time_from_key(&k[1..9]);
                let seq = be_u64(&k[9..17]);
                if let Some(l) = decode_event(&v).and_then(|e| e.license) {
                    w.remove(license_key(&l, t, seq));
                }
                w.remove(k);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.db.apply_batch(w)?;
            raw += n;
        }
        let mut dedup = 0u64;
        for prefix in [b"i", b"b"] {
            let mut w = sled::Batch::default();
            let mut pending = 0;
            for item in self.db.scan_prefix(prefix) {
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
        }
        self.db.flush()?;
        Ok((raw, dedup))
    }

    pub fn close(&self) {
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }
}

/// A late event's successor, from the raw events and the group being applied
/// ([`analytics::History`]).
struct StoredHistory<'a> {
    store: &'a Store,
    /// The group's events applied so far (not yet in sled).
    pending: &'a [(&'a Event, u64)],
}

impl analytics::History for StoredHistory<'_> {
    fn next_after(&self, license: &str, after: UnixNanos, carries: &dyn Fn(&Event) -> bool) -> Option<(u64, Event)> {
        let mut best: Option<(u64, Event)> = self
            .pending
            .iter()
            .filter(|(e, _)| e.license.as_deref() == Some(license) && e.time > after && carries(e))
            .min_by_key(|(e, s)| (e.time, *s))
            .map(|(e, s)| (*s, (*e).clone()));
        if after == i64::MAX {
            return best;
        }
        let start = license_key(license, after + 1, 0);
        let end = license_key(license, best.as_ref().map_or(i64::MAX, |b| b.1.time), u64::MAX);
        for item in self.store.db.range(start..=end) {
            let Ok((k, _)) = item else { break };
            let rest = &k[k.len() - 16..];
            let (t, seq) = (time_from_key(&rest[..8]), be_u64(&rest[8..16]));
            let Ok(Some(v)) = self.store.db.get(event_key(t, seq)) else {
                continue;
            };
            if let Some(e) = decode_event(&v).filter(|e| carries(e)) {
                if best.as_ref().is_none_or(|b| (t, seq) < (b.1.time, b.0)) {
                    best = Some((seq, e));
                }
                break;
            }
        }
        best
    }
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

    fn opts() -> StoreOptions {
        StoreOptions {
            cache_bytes: 1 << 20,
            dedup_window: DAY,
            raw_events: DAY,
            plans: BTreeMap::new(),
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
}
