//! Analytics: the metrics of `docs/metrics.md`, kept current as batches are stored.
//!
//! Owns: the per-license state and the per-day rollups every metric is answered from, their
//! update from newly stored events, their persistence records, and the metric queries.
//! Does not own: storage (the store persists the records this module hands it, in the same
//! atomic batch as the events, and feeds it back on open), HTTP, parameter parsing.
//!
//! # State
//!
//! * **Per license** ([`License`]): issued-at, first activation, first valid validation, first
//!   upgrade, first event; and [`Timeline`]s — the value as it changed over time — of status,
//!   `expires_at`, each dimension, each reported usage figure, each activation value (user,
//!   domain, machine), the support and payment state; renewal/expiry events. A timeline
//!   answers "latest value up to t" for any t, so every as-of metric is exact for any `at`.
//! * **Per (day, license, variant)** ([`Cell`]): validations by result, feature checks by
//!   feature and result, distinct users, and the sorted times of the events the as-of windows
//!   count (valid validations, `rate_limited` validations, `feature_denied` checks,
//!   `limit_exceeded` events) — sub-day windows such as `(at − 7d, at]` are exact. The
//!   *variant* is the event's own dimension values, so metrics over events group an event by
//!   its own value where it has one.
//!
//! Applying an event touches one license and at most one cell; a duplicate never reaches this
//! module (the store applies only the events dedup found new). The order of arrival does not
//! matter: every piece of state is order-independent (minimums, counts, sorted lists,
//! timelines keyed by (time, store sequence)), so a late event lands where its time puts it.
//!
//! # Persistence
//!
//! The state is a function of the stored events, so it is never written piece by piece. The
//! store keeps a *journal* of each group's newly stored events (in the group's own atomic
//! batch) and, every so often, writes a *snapshot* of the whole state ([`Analytics::snapshot`]):
//! on open, the snapshot is loaded and the journal's events after it are applied again. Without
//! a usable snapshot and journal, the state is rebuilt from the raw events. See
//! `crate::store` for the files and the crash rules.

pub mod output;
mod parallel;
mod query;
mod timeline;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use bincode::{Decode, Encode};
use keytrail_common::event::{Event, EventType, ResultCode};
use keytrail_common::time::{UnixNanos, NANOS_PER_DAY};

pub use output::{Answer, Row};
pub use parallel::Parallel;
pub use query::{civil_from_days, days_from_civil, Dim, Metric, MetricQuery, QueryError};
pub use timeline::{Inserted, Timeline};

use crate::config::Plan;
use crate::dedup::IdHasher;

/// Names (of licenses, of users) to dense ids, by the names' [`NameHasher`] hash.
type NameIds = HashMap<u128, u32, BuildHasherDefault<IdHasher>>;

/// A 128-bit SipHash with a key drawn for each process. The id tables are keyed by it, so a
/// lookup compares no strings (the name's bytes, far from the table, would miss the cache on
/// every event). Two names count as one only if their hashes are equal: with a random key,
/// about one chance in 2^64 after 2^32 names, as for the event ids the store deduplicates.
#[derive(Clone, Copy)]
struct NameHasher(u64, u64);

impl Default for NameHasher {
    fn default() -> NameHasher {
        let r = std::collections::hash_map::RandomState::new();
        NameHasher(r.hash_one(0u8), r.hash_one(1u8))
    }
}

impl NameHasher {
    fn hash(self, name: &str) -> u128 {
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.0, self.1);
        h.write(name.as_bytes());
        siphasher::sip128::Hasher128::finish128(&h).as_u128()
    }
}

/// Version of the snapshot body; a snapshot of another version is not loaded (rebuilt instead).
const SNAPSHOT_VERSION: u8 = 2;
const BINCODE: bincode::config::Configuration = bincode::config::standard();

/// The UTC day of an instant, as days since 1970-01-01.
pub fn day_of(t: UnixNanos) -> i32 {
    t.div_euclid(NANOS_PER_DAY) as i32
}

/// Status from the status events (metrics.md "Status at t"); `unknown` is the absence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Status {
    Active,
    Suspended,
    Revoked,
    Expired,
}

impl Status {
    pub fn as_str(s: Option<Status>) -> &'static str {
        match s {
            None => "unknown",
            Some(Status::Active) => "active",
            Some(Status::Suspended) => "suspended",
            Some(Status::Revoked) => "revoked",
            Some(Status::Expired) => "expired",
        }
    }
}

/// Usage figures in [`License::usage`]: `[r_used, r_limit]` for r in seats, domains, machines.
pub const RESOURCES: [&str; 3] = ["seats", "domains", "machines"];

/// Everything known about one license except its cells.
#[derive(Clone, Debug, Default, Encode, Decode)]
pub struct License {
    pub name: String,
    pub first_event: i64,
    pub last_event: i64,
    pub issued_at: Option<i64>,
    /// Earliest `license.activated` (valid) or valid validation.
    pub first_activation: Option<i64>,
    pub first_valid_validation: Option<i64>,
    pub first_upgrade: Option<i64>,
    pub status: Timeline<Status>,
    pub expires: Timeline<i64>,
    /// Indexed by [`Dim`] as usize.
    pub dims: [Timeline<String>; 6],
    /// `[seats_used, seats_limit, domains_used, domains_limit, machines_used, machines_limit]`.
    pub usage: [Timeline<u64>; 6],
    /// Per resource (seats: users, domains, machines): value → activated?
    pub activations: [BTreeMap<String, Timeline<bool>>; 3],
    /// `(time, store_seq, renewed?)` of every `license.renewed` (true) / `license.expired`
    /// (false) event, sorted.
    pub renewals: Vec<(i64, u64, bool)>,
    pub support_open: Timeline<bool>,
    pub payment_failed: Timeline<bool>,
    /// Events stored for this license, by event type tag.
    pub event_counts: Vec<u64>,
}

/// One day of one license, for events whose own dimensions are one variant.
#[derive(Clone, Debug, Default, Encode, Decode, PartialEq)]
pub struct Cell {
    /// `license.validated` events by result tag.
    pub results: [u32; 12],
    /// Sorted times of valid validations.
    pub valid: Vec<i64>,
    /// Sorted times of validations with result `rate_limited`.
    pub rate_limited: Vec<i64>,
    /// Sorted times of events of any type with result `limit_exceeded`.
    pub limit_exceeded: Vec<i64>,
    /// Sorted times of `feature.checked` events with result `feature_denied`.
    pub denied: Vec<i64>,
    /// Feature (missing: `unknown`) → `[checks, granted, denied]`, sorted by feature.
    pub features: Vec<(String, [u32; 3])>,
    /// Sorted distinct users (ids into [`Analytics`]' user names) seen on valid validations and
    /// feature checks.
    pub users: Vec<u32>,
}

/// An event's own dimension values, indexed by [`Dim`] as usize.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Encode, Decode)]
pub struct Variant(pub [Option<String>; 6]);

/// Where a late event's successor is found: the events already applied, by license and time.
/// The store answers from its raw events (and the events of the group being applied).
pub trait History {
    /// The earliest applied event of `license` with a time after `after` for which `carries`
    /// holds, with its store sequence.
    fn next_after(&self, license: &str, after: UnixNanos, carries: &dyn Fn(&Event) -> bool) -> Option<(u64, Event)>;
}

/// No history: for state built strictly in time order (and tests that know it is).
pub struct NoHistory;

impl History for NoHistory {
    fn next_after(&self, _: &str, _: UnixNanos, _: &dyn Fn(&Event) -> bool) -> Option<(u64, Event)> {
        None
    }
}

fn own_dim(e: &Event, i: usize) -> Option<&str> {
    match i {
        0 => e.plan.as_deref(),
        1 => e.product.as_deref(),
        2 => e.customer.as_deref(),
        3 => e.region.as_deref(),
        4 => e.country.as_deref(),
        _ => e.deployment.map(|d| d.as_str()),
    }
}

fn usage_of(e: &Event, i: usize) -> Option<u64> {
    e.usage.to_array()[i]
}

fn status_of(e: &Event) -> Option<Status> {
    use EventType as T;
    match e.event_type {
        T::Issued | T::Renewed | T::Reinstated | T::Upgraded | T::Downgraded => Some(Status::Active),
        T::Suspended => Some(Status::Suspended),
        T::Revoked => Some(Status::Revoked),
        T::Expired => Some(Status::Expired),
        _ => None,
    }
}

/// Whether `e` activates (true) or deactivates (false) `value` of resource `r`.
fn activation_of(e: &Event, r: usize, value: &str) -> Option<bool> {
    let on = match e.event_type {
        EventType::Activated => true,
        EventType::Deactivated => false,
        _ => return None,
    };
    if e.result != ResultCode::Valid {
        return None;
    }
    let v = [&e.user, &e.domain, &e.machine][r].as_deref()?;
    (v == value).then_some(on)
}

/// (latest change time, values active after it) over a resource's activation timelines.
fn active_summary(timelines: &BTreeMap<String, Timeline<bool>>) -> (i64, u32) {
    let mut last = i64::MIN;
    let mut active = 0;
    for tl in timelines.values() {
        if let Some((t, on)) = tl.last_point() {
            last = last.max(t);
            active += u32::from(*on);
        }
    }
    (last, active)
}

/// How many values of a resource are active as of `at`.
pub(crate) fn active_at(timelines: &BTreeMap<String, Timeline<bool>>, summary: Option<(i64, u32)>, at: i64) -> u64 {
    match summary {
        Some((last, n)) if last <= at => n as u64,
        _ => timelines.values().filter(|tl| tl.at(at) == Some(&true)).count() as u64,
    }
}

fn support_of(e: &Event) -> Option<bool> {
    match e.event_type {
        EventType::SupportTicketOpened => Some(true),
        EventType::SupportTicketClosed => Some(false),
        _ => None,
    }
}

fn payment_of(e: &Event) -> Option<bool> {
    match e.event_type {
        EventType::PaymentFailed => Some(true),
        EventType::PaymentSucceeded => Some(false),
        _ => None,
    }
}

/// Inserts into a timeline, looking a late event's successor up with `field`.
fn record<V: PartialEq + Clone>(
    tl: &mut Timeline<V>,
    e: &Event,
    seq: u64,
    value: V,
    history: &dyn History,
    field: impl Fn(&Event) -> Option<V>,
) -> Inserted {
    let license = e.license.as_deref().unwrap_or_default();
    tl.insert(e.time, seq, value, || {
        let (s, n) = history.next_after(license, e.time, &|x| field(x).is_some())?;
        Some((n.time, s, field(&n)?))
    })
}

fn insert_sorted(v: &mut Vec<i64>, t: i64) {
    // Events come in time order or a little late: their place is at or near the end.
    let pos = timeline::partition_point_from_end(v, |x| *x <= t);
    v.insert(pos, t);
}

fn min_opt(a: &mut Option<i64>, t: i64) {
    *a = Some(a.map_or(t, |x| x.min(t)));
}

/// A snapshot that cannot be used; the store rebuilds the state instead.
#[derive(Debug, thiserror::Error)]
#[error("analytics snapshot: {0}")]
pub struct SnapshotError(pub String);

/// The snapshot body, borrowed for writing.
#[derive(Encode)]
struct SnapshotRef<'a> {
    applied_through: u64,
    inexact: u64,
    variants: &'a [Variant],
    users: &'a [String],
    licenses: &'a [License],
    cells: &'a [BTreeMap<(i32, u32), Cell>],
}

/// The snapshot body, owned for reading (the same layout as [`SnapshotRef`]).
#[derive(Decode)]
struct SnapshotOwned {
    applied_through: u64,
    inexact: u64,
    variants: Vec<Variant>,
    users: Vec<String>,
    licenses: Vec<License>,
    cells: Vec<BTreeMap<(i32, u32), Cell>>,
}

/// The in-memory analytics state. One writer (the store's writer thread) applies events;
/// queries read it under the store's read lock.
#[derive(Default)]
pub struct Analytics {
    catalog: BTreeMap<String, Plan>,
    licenses: Vec<License>,
    /// Per license: `(day, variant)` → cell.
    cells: Vec<BTreeMap<(i32, u32), Cell>>,
    /// License name → id, in name order (the order of every per-license answer).
    by_name: BTreeMap<String, u32>,
    /// The same, hashed: the lookup of every applied event (not in snapshots).
    name_ids: NameIds,
    hasher: NameHasher,
    /// Per license id, the variant of its latest cell event (`u32::MAX`: none yet): a
    /// license's dimensions rarely change, so this spares building and hashing a variant per
    /// event (not in snapshots).
    last_variant: Vec<u32>,
    /// Per license id and resource (users, domains, machines): the time of the latest change of
    /// any of its activation timelines, and how many are active after it — so "how many are in
    /// use" as of any later time needs no walk over them (not in snapshots).
    active_now: Vec<[(i64, u32); 3]>,
    variants: Vec<Variant>,
    variant_ids: HashMap<Variant, u32>,
    /// User names by id (cells hold ids: compact, and distinct counts need no string compares).
    users: Vec<String>,
    user_ids: NameIds,
    /// Every event with a store sequence below this has been applied (set by the store after
    /// each group; recorded in snapshots).
    applied_through: u64,
    /// Late events whose successor was no longer stored (see [`Inserted::NextUnknown`]).
    inexact: u64,
    /// How a query spreads over threads (not in snapshots).
    parallel: Parallel,
    /// The size to reserve for the next snapshot (the last one's, and some).
    snapshot_size: std::sync::atomic::AtomicUsize,
}

impl Analytics {
    pub fn new(catalog: BTreeMap<String, Plan>) -> Analytics {
        Analytics {
            catalog,
            ..Analytics::default()
        }
    }

    /// How queries spread over threads (default: one per core).
    pub fn set_parallel(&mut self, p: Parallel) {
        self.parallel = p;
    }

    pub fn catalog(&self) -> &BTreeMap<String, Plan> {
        &self.catalog
    }

    pub fn license_count(&self) -> usize {
        self.licenses.len()
    }

    /// Late events placed without their successor (older than raw-event retention); 0 means
    /// every timeline is exact.
    pub fn inexact_events(&self) -> u64 {
        self.inexact
    }

    pub fn cell_count(&self) -> usize {
        self.cells.iter().map(BTreeMap::len).sum()
    }

    fn license_id(&mut self, name: &str, time: i64) -> u32 {
        let h = self.hasher.hash(name);
        if let Some(&id) = self.name_ids.get(&h) {
            return id;
        }
        let id = self.licenses.len() as u32;
        self.licenses.push(License {
            name: name.to_string(),
            first_event: time,
            last_event: time,
            event_counts: vec![0; EventType::ALL.len()],
            ..License::default()
        });
        self.cells.push(BTreeMap::new());
        self.by_name.insert(name.to_string(), id);
        self.name_ids.insert(h, id);
        self.last_variant.push(u32::MAX);
        self.active_now.push([(i64::MIN, 0); 3]);
        id
    }

    fn variant_id(&mut self, license: u32, e: &Event) -> u32 {
        let last = self.last_variant[license as usize];
        if let Some(v) = self.variants.get(last as usize) {
            let same = (0..5).all(|i| v.0[i].as_deref() == own_dim(e, i))
                && v.0[5].as_deref() == e.deployment.map(|d| d.as_str());
            if same {
                return last;
            }
        }
        let id = self.variant_id_of(e);
        self.last_variant[license as usize] = id;
        id
    }

    fn variant_id_of(&mut self, e: &Event) -> u32 {
        let v = Variant([
            e.plan.clone(),
            e.product.clone(),
            e.customer.clone(),
            e.region.clone(),
            e.country.clone(),
            e.deployment.map(|d| d.as_str().to_string()),
        ]);
        if let Some(&id) = self.variant_ids.get(&v) {
            return id;
        }
        let id = self.variants.len() as u32;
        self.variants.push(v.clone());
        self.variant_ids.insert(v, id);
        id
    }

    fn user_id(&mut self, name: &str) -> u32 {
        let h = self.hasher.hash(name);
        if let Some(&id) = self.user_ids.get(&h) {
            return id;
        }
        let id = self.users.len() as u32;
        self.users.push(name.to_string());
        self.user_ids.insert(h, id);
        id
    }

    /// Number of distinct user names (the range of [`Cell::users`] ids).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Applies one newly stored event. `seq` is its store sequence (breaks time ties);
    /// `history` finds a late event's successor.
    pub fn apply(&mut self, e: &Event, seq: u64, history: &dyn History) {
        let Some(name) = e.license.as_deref() else {
            return; // events without a license count for no metric
        };
        let t = e.time;
        let id = self.license_id(name, t);
        let l = &mut self.licenses[id as usize];
        l.first_event = l.first_event.min(t);
        l.last_event = l.last_event.max(t);
        if let Some(c) = l.event_counts.get_mut(e.event_type.tag() as usize) {
            *c += 1;
        }
        let mut outcomes = Vec::new();
        for i in 0..6 {
            if let Some(v) = own_dim(e, i) {
                // The usual case, the same value as the latest, needs no owned copy.
                if !l.dims[i].repeats(t, seq, |x| x == v) {
                    outcomes.push(record(&mut l.dims[i], e, seq, v.to_string(), history, |x| {
                        own_dim(x, i).map(str::to_string)
                    }));
                }
            }
            if let Some(v) = usage_of(e, i) {
                outcomes.push(record(&mut l.usage[i], e, seq, v, history, |x| usage_of(x, i)));
            }
        }
        if let Some(x) = e.expires_at {
            outcomes.push(record(&mut l.expires, e, seq, x, history, |x| x.expires_at));
        }
        if let Some(s) = status_of(e) {
            outcomes.push(record(&mut l.status, e, seq, s, history, status_of));
        }
        let valid = e.result == ResultCode::Valid;
        use EventType as T;
        match e.event_type {
            T::Issued => min_opt(&mut l.issued_at, t),
            T::Renewed | T::Expired => {
                let pos = timeline::partition_point_from_end(&l.renewals, |r| (r.0, r.1) < (t, seq));
                l.renewals.insert(pos, (t, seq, e.event_type == T::Renewed));
            }
            T::Upgraded => min_opt(&mut l.first_upgrade, t),
            T::Activated | T::Deactivated if valid => {
                let on = e.event_type == T::Activated;
                if on {
                    min_opt(&mut l.first_activation, t);
                }
                for (r, v) in [&e.user, &e.domain, &e.machine].into_iter().enumerate() {
                    if let Some(v) = v {
                        let tl = l.activations[r].entry(v.clone()).or_default();
                        outcomes.push(record(tl, e, seq, on, history, |x| activation_of(x, r, v)));
                        self.active_now[id as usize][r] = active_summary(&l.activations[r]);
                    }
                }
            }
            T::Validated if valid => {
                min_opt(&mut l.first_activation, t);
                min_opt(&mut l.first_valid_validation, t);
            }
            T::SupportTicketOpened | T::SupportTicketClosed => {
                outcomes.push(record(
                    &mut l.support_open,
                    e,
                    seq,
                    support_of(e) == Some(true),
                    history,
                    support_of,
                ));
            }
            T::PaymentSucceeded | T::PaymentFailed => {
                outcomes.push(record(
                    &mut l.payment_failed,
                    e,
                    seq,
                    payment_of(e) == Some(true),
                    history,
                    payment_of,
                ));
            }
            _ => {}
        }
        if outcomes.contains(&Inserted::NextUnknown) {
            self.inexact += 1;
            tracing::warn!(license = %name, time = t, "a late event's successor is no longer stored (retention): its timeline may be approximate");
        }
        let in_cell = matches!(e.event_type, T::Validated | T::FeatureChecked) || e.result == ResultCode::LimitExceeded;
        if !in_cell {
            return;
        }
        let variant = self.variant_id(id, e);
        let user = e.user.as_deref().map(|u| self.user_id(u));
        let day = day_of(t);
        let cell = self.cells[id as usize].entry((day, variant)).or_default();
        if e.result == ResultCode::LimitExceeded {
            insert_sorted(&mut cell.limit_exceeded, t);
        }
        let add_user = |cell: &mut Cell| {
            if let Some(u) = user {
                if let Err(pos) = cell.users.binary_search(&u) {
                    cell.users.insert(pos, u);
                }
            }
        };
        match e.event_type {
            T::Validated => {
                cell.results[e.result.tag() as usize] += 1;
                match e.result {
                    ResultCode::Valid => {
                        insert_sorted(&mut cell.valid, t);
                        add_user(cell);
                    }
                    ResultCode::RateLimited => insert_sorted(&mut cell.rate_limited, t),
                    _ => {}
                }
            }
            T::FeatureChecked => {
                let f = e.feature.as_deref().unwrap_or("unknown");
                let pos = match cell.features.binary_search_by(|x| x.0.as_str().cmp(f)) {
                    Ok(p) => p,
                    Err(p) => {
                        cell.features.insert(p, (f.to_string(), [0; 3]));
                        p
                    }
                };
                let c = &mut cell.features[pos].1;
                c[0] += 1;
                match e.result {
                    ResultCode::Valid => c[1] += 1,
                    ResultCode::FeatureDenied => {
                        c[2] += 1;
                        insert_sorted(&mut cell.denied, t);
                    }
                    _ => {}
                }
                add_user(cell);
            }
            _ => {}
        }
    }

    /// Every event with a store sequence below the returned one has been applied.
    pub fn applied_through(&self) -> u64 {
        self.applied_through
    }

    /// Records that every event with a store sequence below `seq` has been applied.
    pub fn set_applied_through(&mut self, seq: u64) {
        self.applied_through = self.applied_through.max(seq);
    }

    /// The whole state as bytes: version ‖ crc32 ‖ bincode. (The catalog is configuration and
    /// not part of it.)
    ///
    /// Encoded in place, into a buffer sized after the previous snapshot: a state of 10 M
    /// events is over 100 MB, and growing a buffer by doubling, then copying the body behind
    /// its header, would copy it three times over.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.snapshot_size.load(std::sync::atomic::Ordering::Relaxed));
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&[0; 4]);
        bincode::encode_into_std_write(
            SnapshotRef {
                applied_through: self.applied_through,
                inexact: self.inexact,
                variants: &self.variants,
                users: &self.users,
                licenses: &self.licenses,
                cells: &self.cells,
            },
            &mut out,
            BINCODE,
        )
        .expect("encoding into memory");
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_be_bytes());
        // Room for the state to grow until the next one.
        self.snapshot_size
            .store(out.len() + out.len() / 8, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// The state a [`Analytics::snapshot`] holds. Anything wrong (version, checksum, body,
    /// inconsistent ids) is an error, never a partial state.
    pub fn from_snapshot(catalog: BTreeMap<String, Plan>, bytes: &[u8]) -> Result<Analytics, SnapshotError> {
        let err = |m: String| SnapshotError(m);
        if bytes.len() < 5 {
            return Err(err(format!("{} bytes is too short", bytes.len())));
        }
        if bytes[0] != SNAPSHOT_VERSION {
            return Err(err(format!(
                "version {} (this build reads {SNAPSHOT_VERSION})",
                bytes[0]
            )));
        }
        let body = &bytes[5..];
        if crc32fast::hash(body).to_be_bytes() != bytes[1..5] {
            return Err(err("checksum mismatch".into()));
        }
        let (s, used): (SnapshotOwned, usize) =
            bincode::decode_from_slice(body, BINCODE).map_err(|e| err(format!("body: {e}")))?;
        if used != body.len() {
            return Err(err(format!("{} trailing bytes", body.len() - used)));
        }
        if s.cells.len() != s.licenses.len() {
            return Err(err(format!(
                "{} cell maps for {} licenses",
                s.cells.len(),
                s.licenses.len()
            )));
        }
        let mut a = Analytics::new(catalog);
        for (id, l) in s.licenses.iter().enumerate() {
            if a.by_name.insert(l.name.clone(), id as u32).is_some() {
                return Err(err(format!("license {:?} twice", l.name)));
            }
            a.name_ids.insert(a.hasher.hash(&l.name), id as u32);
        }
        for (id, v) in s.variants.iter().enumerate() {
            if a.variant_ids.insert(v.clone(), id as u32).is_some() {
                return Err(err(format!("variant {id} twice")));
            }
        }
        for (id, u) in s.users.iter().enumerate() {
            if a.user_ids.insert(a.hasher.hash(u), id as u32).is_some() {
                return Err(err(format!("user {id} twice")));
            }
        }
        for (key, cell) in s.cells.iter().flat_map(|c| c.iter()) {
            if key.1 as usize >= s.variants.len() {
                return Err(err(format!("cell of unknown variant {}", key.1)));
            }
            if cell.users.iter().any(|&u| u as usize >= s.users.len()) {
                return Err(err(format!("cell of day {} holds an unknown user", key.0)));
            }
        }
        a.last_variant = vec![u32::MAX; s.licenses.len()];
        a.active_now = s
            .licenses
            .iter()
            .map(|l| [0, 1, 2].map(|r| active_summary(&l.activations[r])))
            .collect();
        a.licenses = s.licenses;
        a.cells = s.cells;
        a.variants = s.variants;
        a.users = s.users;
        a.inexact = s.inexact;
        a.applied_through = s.applied_through;
        Ok(a)
    }

    /// Counts an event that could not be applied again (it was purged before a replay).
    pub fn count_inexact(&mut self) {
        self.inexact += 1;
    }
}

#[cfg(test)]
mod tests;
