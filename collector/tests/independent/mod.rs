//! A plain reference computation of every metric, straight from the list of stored events.
//!
//! Nothing here is shared with the engine (`collector/src/analytics/`): every answer is derived
//! again from the raw events on every call, in the simplest way that reads like the definitions
//! of `spec/metrics.md` (quoted with `>` on each metric function) and the choices of
//! `docs/metrics.md` (cited as "docs item N"). Clarity over speed: most questions rescan a
//! license's events; only each query's grouping table is computed once per call.
//!
//! Points where the two documents leave room are marked `// AMBIGUOUS:`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use keytrail_collector::config::Plan;
use keytrail_common::event::{Event, EventType, ResultCode, Usage};
use keytrail_common::time::{NANOS_PER_DAY, NANOS_PER_SEC};
use serde_json::{json, Map, Value};

const DAY: i64 = NANOS_PER_DAY;
const UNKNOWN: &str = "unknown";

/// One question, with its parameters already resolved by the caller.
pub struct Query<'a> {
    /// e.g. "activation-rate", …, "health", "mrr", "churn-risk", "upgrade-signals"
    pub metric: &'a str,
    /// Days since 1970-01-01 (UTC), inclusive.
    pub from_day: i64,
    /// Inclusive.
    pub to_day: i64,
    /// Unix nanoseconds.
    pub at: i64,
    /// "plan" | "product" | "customer" | "region" | "country" | "deployment"
    pub by: Option<&'a str>,
    /// churn-risk threshold
    pub below: f64,
}

/// The rows of `q.metric` over `events`, given in the order the collector stored them (index =
/// store order, which breaks time ties: later index = later). Duplicate ids: the first copy wins,
/// later copies are ignored entirely. `churn-risk` and `upgrade-signals` answer their rows only.
pub fn compute(events: &[Event], catalog: &BTreeMap<String, Plan>, q: &Query<'_>) -> Vec<Value> {
    let db = Db::new(events, catalog);
    match q.metric {
        "activation-rate" => activation_rate(&db, q),
        "daily-active-validations" => daily_active_validations(&db, q),
        "validation-failures" => validation_failures(&db, q),
        "utilization" => utilization(&db, q),
        "time-to-first-validation" => time_to_first_validation(&db, q),
        "renewal-rate" => renewal_rate(&db, q),
        "time-to-upgrade" => time_to_upgrade(&db, q),
        "time-to-expiration" => time_to_expiration(&db, q),
        "active-users" => active_users(&db, q),
        "feature-usage" => feature_usage(&db, q),
        "geo" => geo(&db, q),
        "health" => health(&db, q),
        "mrr" => mrr(&db, q),
        "churn-risk" => churn_risk(&db, q),
        "upgrade-signals" => upgrade_signals(&db, q),
        other => panic!("reference: unknown metric {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The events
// ---------------------------------------------------------------------------------------------

/// A counted event: its store index (`seq`) and its license.
#[derive(Clone, Copy)]
struct Ev<'a> {
    seq: usize,
    license: &'a str,
    e: &'a Event,
}

impl Ev<'_> {
    fn time(self) -> i64 {
        self.e.time
    }

    /// "Events are ordered by time; ties by the order the collector stored them." (docs item 3)
    fn order(self) -> (i64, usize) {
        (self.e.time, self.seq)
    }

    fn is(self, t: EventType) -> bool {
        self.e.event_type == t
    }

    fn has_result(self, r: ResultCode) -> bool {
        self.e.result == r
    }

    /// "A missing `result` is `valid`" — the decoder already stores a missing result as `Valid`.
    fn valid(self) -> bool {
        self.has_result(ResultCode::Valid)
    }

    /// "Valid validation = a `license.validated` event with `result = valid`."
    fn valid_validation(self) -> bool {
        self.is(EventType::Validated) && self.valid()
    }

    /// "Its day is the UTC date of that time."
    fn day(self) -> i64 {
        self.e.time.div_euclid(DAY)
    }
}

/// The latest of some events: greatest (time, store order).
fn latest<'a>(evs: impl IntoIterator<Item = Ev<'a>>) -> Option<Ev<'a>> {
    evs.into_iter().max_by_key(|v| v.order())
}

/// The earliest time among some events.
fn earliest_time<'a>(evs: impl IntoIterator<Item = Ev<'a>>) -> Option<i64> {
    evs.into_iter().map(|v| v.time()).min()
}

/// The counted events, per license.
struct Db<'a> {
    by_license: BTreeMap<&'a str, Vec<Ev<'a>>>,
    catalog: &'a BTreeMap<String, Plan>,
}

impl<'a> Db<'a> {
    /// "Counting is effectively-once. An event whose `id` was already stored … is never counted
    /// again; if two copies differ, the first stored wins." "Events without a license count for
    /// no metric."
    fn new(events: &'a [Event], catalog: &'a BTreeMap<String, Plan>) -> Db<'a> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut by_license: BTreeMap<&'a str, Vec<Ev<'a>>> = BTreeMap::new();
        for (seq, e) in events.iter().enumerate() {
            if !seen.insert(e.id.as_str()) {
                continue; // a later copy of an id: ignored entirely
            }
            let Some(license) = e.license.as_deref() else {
                continue;
            };
            by_license.entry(license).or_default().push(Ev { seq, license, e });
        }
        Db { by_license, catalog }
    }

    /// Every license with at least one counted event, ascending.
    fn licenses(&self) -> Vec<&'a str> {
        self.by_license.keys().copied().collect()
    }

    /// Every counted event (in no particular order).
    fn all_events(&self) -> Vec<Ev<'a>> {
        self.by_license.values().flatten().copied().collect()
    }

    /// All events of a license.
    fn events(&self, l: &str) -> Vec<Ev<'a>> {
        self.by_license.get(l).cloned().unwrap_or_default()
    }

    /// "Up to t" always means `time <= t`.
    fn upto(&self, l: &str, t: i64) -> Vec<Ev<'a>> {
        self.events(l).into_iter().filter(|v| v.time() <= t).collect()
    }

    /// docs item 11: "An as-of metric sees a license when it has at least one event with
    /// `time <= at`."
    fn exists_at(&self, l: &str, t: i64) -> bool {
        !self.upto(l, t).is_empty()
    }

    /// "the field's value on the license's most recent event (by time) that carries it, up to
    /// the metric's end instant."
    fn latest_value(&self, l: &str, dim: &str, end: i64) -> Option<String> {
        let carrying = self.upto(l, end).into_iter().filter(|v| own_value(v.e, dim).is_some());
        latest(carrying).and_then(|v| own_value(v.e, dim))
    }

    /// "Issued at = the time of the license's earliest `license.issued` event." Any result
    /// (docs item 4); only events up to `upto` (pass `i64::MAX` for all of them).
    fn issued_at(&self, l: &str, upto: i64) -> Option<i64> {
        earliest_time(self.upto(l, upto).into_iter().filter(|v| v.is(EventType::Issued)))
    }

    /// The latest known `expires_at` up to t: the value on the latest event (by time, then store
    /// order) up to t that carries one.
    fn latest_expires_at(&self, l: &str, t: i64) -> Option<i64> {
        let carrying = self.upto(l, t).into_iter().filter(|v| v.e.expires_at.is_some());
        latest(carrying).and_then(|v| v.e.expires_at)
    }

    /// "Status at t: the type of the license's latest event up to t among `license.issued`,
    /// `license.renewed`, `license.reinstated`, `license.upgraded`, `license.downgraded` (all →
    /// `active`), `license.suspended` (→ `suspended`), `license.revoked` (→ `revoked`),
    /// `license.expired` (→ `expired`); a license with none of these has status `unknown` …
    /// An `active` or `unknown` license whose latest known `expires_at` (up to t) is `<= t` is
    /// `expired`."
    fn status_at(&self, l: &str, t: i64) -> Status {
        let status_events = self
            .upto(l, t)
            .into_iter()
            .filter(|v| status_of(v.e.event_type).is_some());
        let mut status = match latest(status_events) {
            Some(v) => status_of(v.e.event_type).expect("a status event"),
            None => Status::Unknown,
        };
        if status == Status::Active || status == Status::Unknown {
            if let Some(expires_at) = self.latest_expires_at(l, t) {
                if expires_at <= t {
                    status = Status::Expired;
                }
            }
        }
        status
    }

    /// "Live at t: status at t is neither `revoked` nor `expired`." Only licenses the as-of
    /// metric sees (docs item 11).
    fn is_live(&self, l: &str, t: i64) -> bool {
        self.exists_at(l, t) && !matches!(self.status_at(l, t), Status::Revoked | Status::Expired)
    }

    /// The live licenses at t, ascending.
    fn live_licenses(&self, t: i64) -> Vec<&'a str> {
        self.licenses().into_iter().filter(|l| self.is_live(l, t)).collect()
    }

    /// "A license is activated at the earliest `license.activated` or valid validation with
    /// time `<= at` (no lower bound)." Activations "count only with result `valid`".
    fn activated_at(&self, l: &str, at: i64) -> Option<i64> {
        // AMBIGUOUS: "the earliest `license.activated` or valid validation" — the activation must
        // be valid too, by the common rule "Activations … count only with result `valid`" and
        // docs item 4. An activation carrying no user/domain/machine still activates.
        let activations = self
            .upto(l, at)
            .into_iter()
            .filter(|v| v.valid() && (v.is(EventType::Activated) || v.is(EventType::Validated)));
        earliest_time(activations)
    }

    /// The time of the first valid validation with time `<= at`.
    fn first_valid_validation(&self, l: &str, at: i64) -> Option<i64> {
        earliest_time(self.upto(l, at).into_iter().filter(|v| v.valid_validation()))
    }

    /// utilization, for one resource of one license (None = the resource is skipped):
    /// "limit(r) = the latest reported `r_limit`, else the plan catalog's value for the license's
    /// plan, else unknown (the resource is skipped); used(r) = the latest reported `r_used` if one
    /// was ever reported, else the number of distinct values (`user` for seats, `domain` for
    /// domains, `machine` for machines) whose latest `license.activated` /
    /// `license.deactivated` event is an activation."
    /// docs item 13: "the latest reported `<r>_limit` up to `at`, else the catalog's value for the
    /// license's plan at `at`. A resource whose limit is unknown or 0 is skipped."
    fn resource_utilization(&self, l: &str, at: i64, r: Resource) -> Option<f64> {
        let seen = self.upto(l, at);
        let reported_limit = latest(seen.iter().copied().filter(|v| r.reported_limit(&v.e.usage).is_some()))
            .and_then(|v| r.reported_limit(&v.e.usage));
        // AMBIGUOUS: a reported limit of 0 "wins over the catalog's" and then skips the resource
        // (it does not fall back to the catalog) — the literal reading of docs item 13.
        let limit = match reported_limit {
            Some(limit) => Some(limit),
            None => self
                .latest_value(l, "plan", at)
                .and_then(|plan| self.catalog.get(&plan))
                .and_then(|plan| r.catalog_limit(plan)),
        };
        let limit = match limit {
            Some(limit) if limit > 0 => limit,
            _ => return None,
        };
        let reported_used = latest(seen.iter().copied().filter(|v| r.reported_used(&v.e.usage).is_some()))
            .and_then(|v| r.reported_used(&v.e.usage));
        let used = match reported_used {
            Some(used) => used,
            None => self.active_values(l, at, r),
        };
        Some(used as f64 / limit as f64)
    }

    /// "the number of distinct values … whose latest `license.activated` / `license.deactivated`
    /// event is an activation". docs item 5: "A valid `license.activated` /
    /// `license.deactivated` event sets or clears its `user` for seats, its `domain` for domains
    /// and its `machine` (pseudonym) for machines — each one it carries."
    fn active_values(&self, l: &str, at: i64, r: Resource) -> u64 {
        let toggles: Vec<Ev<'a>> = self
            .upto(l, at)
            .into_iter()
            .filter(|v| v.valid() && (v.is(EventType::Activated) || v.is(EventType::Deactivated)))
            .filter(|v| r.value(v.e).is_some())
            .collect();
        let values: BTreeSet<&str> = toggles.iter().filter_map(|v| r.value(v.e)).collect();
        let mut active = 0;
        for value in values {
            let last = latest(toggles.iter().copied().filter(|v| r.value(v.e) == Some(value)));
            if last.is_some_and(|v| v.is(EventType::Activated)) {
                active += 1;
            }
        }
        active
    }

    /// "A license's utilization = the largest used/limit over its resources with a known
    /// limit > 0"; None when there is no such resource.
    fn license_utilization(&self, l: &str, at: i64) -> Option<f64> {
        let mut largest: Option<f64> = None;
        for r in Resource::ALL {
            if let Some(u) = self.resource_utilization(l, at, r) {
                largest = Some(match largest {
                    Some(x) if x >= u => x,
                    _ => u,
                });
            }
        }
        largest
    }

    /// The health score of a (live) license at `at`, and its reasons in the spec's order.
    /// See [`health`] for the definition.
    fn health(&self, l: &str, at: i64) -> (u64, Vec<&'static str>) {
        let seen = self.upto(l, at);
        let mut score: i64 = 100;
        let mut reasons = Vec::new();

        // "last = time of the latest valid validation (if none: issued-at; if none: the license's
        // first event); days = floor((at − last) / 86400)."
        // AMBIGUOUS: issued-at and the first event are those up to `at` (an as-of metric sees
        // only events with `time <= at`).
        let last = seen
            .iter()
            .copied()
            .filter(|v| v.valid_validation())
            .map(|v| v.time())
            .max()
            .or_else(|| self.issued_at(l, at))
            .or_else(|| earliest_time(seen.iter().copied()))
            .expect("a live license has an event up to at");
        let days = (at - last).div_euclid(DAY);
        if days > 7 {
            score -= 20;
            reasons.push("inactive_7d");
        }
        if days > 30 {
            score -= 30;
            reasons.push("inactive_30d");
        }

        // "domain utilization (domains resource, as in `utilization`; a limit of 0 counts as
        // unknown) known and < 0.2: −15"
        if self
            .resource_utilization(l, at, Resource::Domains)
            .is_some_and(|u| u < 0.2)
        {
            score -= 15;
            reasons.push("low_domain_utilization");
        }

        // "this_week = valid validations in `(at − 7d, at]`, last_week = in `(at − 14d, at − 7d]`;
        // last_week > 0 and this_week / last_week < 0.5: −20"
        let valid_validations_in = |after: i64, upto: i64| {
            seen.iter()
                .filter(|v| v.valid_validation() && after < v.time() && v.time() <= upto)
                .count() as u64
        };
        let this_week = valid_validations_in(at - 7 * DAY, at);
        let last_week = valid_validations_in(at - 14 * DAY, at - 7 * DAY);
        if last_week > 0 && (this_week as f64 / last_week as f64) < 0.5 {
            score -= 20;
            reasons.push("validation_decline");
        }

        // "the license's latest `support.*` event is `support.ticket_opened`: −10"
        let support = latest(
            seen.iter()
                .copied()
                .filter(|v| v.e.event_type.as_str().starts_with("support.")),
        );
        if support.is_some_and(|v| v.is(EventType::SupportTicketOpened)) {
            score -= 10;
            reasons.push("open_support_ticket");
        }

        // "the license's latest `payment.*` event is `payment.failed`: −25"
        let payment = latest(
            seen.iter()
                .copied()
                .filter(|v| v.e.event_type.as_str().starts_with("payment.")),
        );
        if payment.is_some_and(|v| v.is(EventType::PaymentFailed)) {
            score -= 25;
            reasons.push("payment_failed");
        }

        // "score = max(0, total)"
        (score.max(0) as u64, reasons)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Active,
    Suspended,
    Revoked,
    Expired,
    Unknown,
}

/// The status an event type sets, if it is one of the status events.
fn status_of(t: EventType) -> Option<Status> {
    match t {
        EventType::Issued
        | EventType::Renewed
        | EventType::Reinstated
        | EventType::Upgraded
        | EventType::Downgraded => Some(Status::Active),
        EventType::Suspended => Some(Status::Suspended),
        EventType::Revoked => Some(Status::Revoked),
        EventType::Expired => Some(Status::Expired),
        _ => None,
    }
}

/// seats, domains, machines.
#[derive(Clone, Copy)]
enum Resource {
    Seats,
    Domains,
    Machines,
}

impl Resource {
    const ALL: [Resource; 3] = [Resource::Seats, Resource::Domains, Resource::Machines];

    fn reported_used(self, u: &Usage) -> Option<u64> {
        match self {
            Resource::Seats => u.seats_used,
            Resource::Domains => u.domains_used,
            Resource::Machines => u.machines_used,
        }
    }

    fn reported_limit(self, u: &Usage) -> Option<u64> {
        match self {
            Resource::Seats => u.seats_limit,
            Resource::Domains => u.domains_limit,
            Resource::Machines => u.machines_limit,
        }
    }

    fn catalog_limit(self, p: &Plan) -> Option<u64> {
        match self {
            Resource::Seats => p.seats,
            Resource::Domains => p.domains,
            Resource::Machines => p.machines,
        }
    }

    /// `user` for seats, `domain` for domains, `machine` for machines.
    fn value(self, e: &Event) -> Option<&str> {
        match self {
            Resource::Seats => e.user.as_deref(),
            Resource::Domains => e.domain.as_deref(),
            Resource::Machines => e.machine.as_deref(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dimensions, windows, rows
// ---------------------------------------------------------------------------------------------

/// An event's own value of a dimension.
fn own_value(e: &Event, dim: &str) -> Option<String> {
    match dim {
        "plan" => e.plan.clone(),
        "product" => e.product.clone(),
        "customer" => e.customer.clone(),
        "region" => e.region.clone(),
        "country" => e.country.clone(),
        "deployment" => e.deployment.map(|d| d.as_str().to_string()),
        other => panic!("reference: unknown dimension {other:?}"),
    }
}

/// How one query groups events and licenses by one dimension (or not at all).
///
/// "For a metric over events, an event's dimension is its own field if set, else the license's
/// latest known value. For a metric over licenses, it is the license's latest known value … up to
/// the metric's end instant. A missing value groups as `"unknown"`." docs item 2: the license's
/// value for an event without its own is also taken up to the metric's end instant.
struct Grouping {
    dim: Option<String>,
    /// license → its latest known value up to the end instant ("unknown" if none).
    license_value: BTreeMap<String, String>,
}

impl Grouping {
    /// `dim` None: everything is in the one group "".
    fn new(db: &Db<'_>, dim: Option<&str>, end: i64) -> Grouping {
        let mut license_value = BTreeMap::new();
        if let Some(d) = dim {
            for l in db.licenses() {
                let value = db.latest_value(l, d, end).unwrap_or_else(|| UNKNOWN.to_string());
                license_value.insert(l.to_string(), value);
            }
        }
        Grouping {
            dim: dim.map(str::to_string),
            license_value,
        }
    }

    fn of_license(&self, l: &str) -> String {
        match &self.dim {
            None => String::new(),
            Some(_) => self.license_value[l].clone(),
        }
    }

    fn of_event(&self, v: Ev<'_>) -> String {
        match &self.dim {
            None => String::new(),
            Some(d) => own_value(v.e, d).unwrap_or_else(|| self.license_value[v.license].clone()),
        }
    }
}

/// "`from` and `to` are UTC dates, both inclusive: the window is `[from 00:00, to+1 00:00)`."
/// "A metric's end instant is … `to+1 00:00` for windowed ones (cohorts included)."
struct Window {
    start: i64,
    end: i64,
}

impl Window {
    fn of(q: &Query<'_>) -> Window {
        Window {
            start: q.from_day * DAY,
            end: (q.to_day + 1) * DAY,
        }
    }

    fn contains(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }
}

/// "Ratios with a zero denominator are `null`."
fn ratio(numerator: u64, denominator: u64) -> Value {
    if denominator == 0 {
        Value::Null
    } else {
        json!(numerator as f64 / denominator as f64)
    }
}

/// docs item 7: "seconds = nanoseconds / 10⁹ as a 64-bit float" (after flooring at 0).
fn seconds(ns: i64) -> f64 {
    ns.max(0) as f64 / 1e9
}

/// "Percentiles are nearest-rank: the value at rank `ceil(p * n)` of the sorted values; `null`
/// over an empty set." docs item 6: "p50 is the value at rank `ceil(n / 2)`, p90 at rank
/// `ceil(9n / 10)` (computed in integers)". Returns (p50_seconds, p90_seconds).
fn p50_p90_seconds(mut delays_ns: Vec<i64>) -> (Value, Value) {
    delays_ns.sort();
    let n = delays_ns.len();
    if n == 0 {
        return (Value::Null, Value::Null);
    }
    let rank_50 = n.div_ceil(2);
    let rank_90 = (9 * n).div_ceil(10);
    (
        json!(seconds(delays_ns[rank_50 - 1])),
        json!(seconds(delays_ns[rank_90 - 1])),
    )
}

/// The mean of per-license values summed in ascending license order (docs item 7); `null` over
/// none. `values` must already be in ascending license order.
fn mean(values: &[f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    let mut sum: f64 = 0.0;
    for v in values {
        sum += *v;
    }
    json!(sum / values.len() as f64)
}

/// The `by` key of a row, if any: the dimension under its own name.
fn by_key(by: Option<&str>, group: &str) -> Vec<(String, Value)> {
    match by {
        Some(d) => vec![(d.to_string(), json!(group))],
        None => Vec::new(),
    }
}

/// One JSON object per cell, in key order: first the keys, then the fields.
fn rows<K, T>(
    cells: &BTreeMap<K, T>,
    keys: impl Fn(&K) -> Vec<(String, Value)>,
    fields: impl Fn(&T) -> Vec<(&'static str, Value)>,
) -> Vec<Value> {
    let mut out = Vec::new();
    for (k, cell) in cells {
        let mut m = Map::new();
        for (name, value) in keys(k) {
            m.insert(name, value);
        }
        for (name, value) in fields(cell) {
            m.insert(name.to_string(), value);
        }
        out.push(Value::Object(m));
    }
    out
}

/// docs item 8: one-row metrics "without `by` … always answer one row, zeros and `null` ratios
/// included; with `by`, rows only for groups where the metric counts at least one license".
/// `groups` holds only groups that counted a license; without `by` everything is in group "".
fn one_row_per_group<T: Default>(
    by: Option<&str>,
    mut groups: BTreeMap<String, T>,
    fields: impl Fn(&T) -> Vec<(&'static str, Value)>,
) -> Vec<Value> {
    if by.is_none() {
        groups.entry(String::new()).or_default();
    }
    rows(&groups, |g| by_key(by, g), fields)
}

/// docs item 8: day series "have a row for every day of the window; with `by`, rows only for
/// (day, group) with at least one validation". `cells` holds only (day, group) that counted an
/// event; without `by` the group is "" and every day of the window is added.
fn day_rows<T: Default>(
    q: &Query<'_>,
    mut cells: BTreeMap<(i64, String), T>,
    fields: impl Fn(&T) -> Vec<(&'static str, Value)>,
) -> Vec<Value> {
    if q.by.is_none() {
        for day in q.from_day..=q.to_day {
            cells.entry((day, String::new())).or_default();
        }
    }
    let by = q.by;
    rows(
        &cells,
        |k| {
            let mut keys = vec![("day".to_string(), json!(date_of_day(k.0)))];
            keys.extend(by_key(by, &k.1));
            keys
        },
        fields,
    )
}

// ---------------------------------------------------------------------------------------------
// Calendar
// ---------------------------------------------------------------------------------------------

/// (year, month 1-12, day 1-31) of a day number (days since 1970-01-01), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month, day)
}

/// The day number of (year, month, day); inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// "YYYY-MM-DD"
fn date_of_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------------------------
// The metrics
// ---------------------------------------------------------------------------------------------

/// `activation-rate` (cohort)
/// > Cohort: licenses whose issued-at falls in the window. A license is activated at the earliest
/// > `license.activated` or valid validation with time `<= at` (no lower bound).
/// > Fields: `issued`, `activated`, `activated_7d` (activation at most 7 days after issued-at; an
/// > activation before issued-at counts as 0 days), `rate` = activated / issued, `rate_7d`.
fn activation_rate(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        issued: u64,
        activated: u64,
        activated_7d: u64,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        // Issued-at is the earliest `license.issued` ever: "cohorts … `at` only bounds which
        // activations and validations they see".
        let Some(issued_at) = db.issued_at(l, i64::MAX) else {
            continue;
        };
        if !window.contains(issued_at) {
            continue;
        }
        let acc = groups.entry(grouping.of_license(l)).or_default();
        acc.issued += 1;
        if let Some(activated_at) = db.activated_at(l, q.at) {
            acc.activated += 1;
            if (activated_at - issued_at).max(0) <= 7 * DAY {
                acc.activated_7d += 1;
            }
        }
    }
    one_row_per_group(q.by, groups, |a| {
        vec![
            ("issued", json!(a.issued)),
            ("activated", json!(a.activated)),
            ("activated_7d", json!(a.activated_7d)),
            ("rate", ratio(a.activated, a.issued)),
            ("rate_7d", ratio(a.activated_7d, a.issued)),
        ]
    })
}

/// `daily-active-validations`
/// > For each day of the window: `active_licenses` = distinct licenses with a valid validation
/// > that day; `validations` = number of `license.validated` events that day (any result).
fn daily_active_validations(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        active_licenses: BTreeSet<String>,
        validations: u64,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut cells: BTreeMap<(i64, String), Acc> = BTreeMap::new();
    for v in db.all_events() {
        if !v.is(EventType::Validated) || !window.contains(v.time()) {
            continue;
        }
        let acc = cells.entry((v.day(), grouping.of_event(v))).or_default();
        acc.validations += 1;
        if v.valid() {
            acc.active_licenses.insert(v.license.to_string());
        }
    }
    day_rows(q, cells, |a| {
        vec![
            ("active_licenses", json!(a.active_licenses.len() as u64)),
            ("validations", json!(a.validations)),
        ]
    })
}

/// `validation-failures`
/// > For each day of the window: `validations`, `failed` (result ≠ `valid`), `failure_rate` =
/// > failed / validations, and `by_result` = an object with the count of each non-valid result
/// > seen.
fn validation_failures(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        validations: u64,
        failed: u64,
        by_result: BTreeMap<&'static str, u64>,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut cells: BTreeMap<(i64, String), Acc> = BTreeMap::new();
    for v in db.all_events() {
        if !v.is(EventType::Validated) || !window.contains(v.time()) {
            continue;
        }
        let acc = cells.entry((v.day(), grouping.of_event(v))).or_default();
        acc.validations += 1;
        if !v.valid() {
            acc.failed += 1;
            *acc.by_result.entry(v.e.result.as_str()).or_default() += 1;
        }
    }
    day_rows(q, cells, |a| {
        let mut by_result = Map::new();
        for (result, count) in &a.by_result {
            by_result.insert(result.to_string(), json!(count));
        }
        vec![
            ("validations", json!(a.validations)),
            ("failed", json!(a.failed)),
            ("failure_rate", ratio(a.failed, a.validations)),
            ("by_result", Value::Object(by_result)),
        ]
    })
}

/// `utilization` (as of `at`)
/// > For each license and resource r in seats, domains, machines:
/// > - limit(r) = the latest reported `r_limit`, else the plan catalog's value for the license's
/// >   plan, else unknown (the resource is skipped);
/// > - used(r) = the latest reported `r_used` if one was ever reported, else the number of
/// >   distinct values (`user` for seats, `domain` for domains, `machine` for machines) whose
/// >   latest `license.activated` / `license.deactivated` event is an activation.
/// > A license's utilization = the largest used/limit over its resources with a known limit > 0;
/// > live licenses with none are left out. A reported limit wins over the catalog's.
/// > Per group: `licenses`, `mean_utilization`, `at_or_above_80` (≥ 0.8), `at_or_above_90`
/// > (≥ 0.9), `over_limit` (> 1.0).
fn utilization(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        /// per license, in ascending license order
        utilizations: Vec<f64>,
    }
    let grouping = Grouping::new(db, q.by, q.at);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.live_licenses(q.at) {
        let Some(u) = db.license_utilization(l, q.at) else {
            continue;
        };
        groups.entry(grouping.of_license(l)).or_default().utilizations.push(u);
    }
    one_row_per_group(q.by, groups, |a| {
        let count = |pass: fn(f64) -> bool| a.utilizations.iter().filter(|u| pass(**u)).count() as u64;
        vec![
            ("licenses", json!(a.utilizations.len() as u64)),
            ("mean_utilization", mean(&a.utilizations)),
            ("at_or_above_80", json!(count(|u: f64| u >= 0.8))),
            ("at_or_above_90", json!(count(|u: f64| u >= 0.9))),
            ("over_limit", json!(count(|u: f64| u > 1.0))),
        ]
    })
}

/// `time-to-first-validation` (cohort)
/// > Cohort as in activation-rate. ttfv = time of the first valid validation (with time `<= at`)
/// > minus issued-at, in seconds, floored at 0. Fields: `issued`, `under_1h` (< 3600),
/// > `from_1h_to_24h` (< 86400), `from_1d_to_7d` (< 604800), `over_7d` (≥ 604800), `never`,
/// > `p50_seconds`, `p90_seconds` (over licenses with a ttfv).
fn time_to_first_validation(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        issued: u64,
        never: u64,
        /// ttfv in nanoseconds, floored at 0
        ttfvs: Vec<i64>,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        let Some(issued_at) = db.issued_at(l, i64::MAX) else {
            continue;
        };
        if !window.contains(issued_at) {
            continue;
        }
        let acc = groups.entry(grouping.of_license(l)).or_default();
        acc.issued += 1;
        match db.first_valid_validation(l, q.at) {
            Some(t) => acc.ttfvs.push((t - issued_at).max(0)),
            None => acc.never += 1,
        }
    }
    one_row_per_group(q.by, groups, |a| {
        // Bounds compared in exact nanoseconds: seconds < 3600 ⇔ ns < 3600·10⁹.
        let count = |in_bucket: &dyn Fn(i64) -> bool| a.ttfvs.iter().filter(|t| in_bucket(**t)).count() as u64;
        let s = NANOS_PER_SEC;
        let (p50, p90) = p50_p90_seconds(a.ttfvs.clone());
        vec![
            ("issued", json!(a.issued)),
            ("under_1h", json!(count(&|t: i64| t < 3600 * s))),
            (
                "from_1h_to_24h",
                json!(count(&|t: i64| 3600 * s <= t && t < 86_400 * s)),
            ),
            (
                "from_1d_to_7d",
                json!(count(&|t: i64| 86_400 * s <= t && t < 604_800 * s)),
            ),
            ("over_7d", json!(count(&|t: i64| t >= 604_800 * s))),
            ("never", json!(a.never)),
            ("p50_seconds", p50),
            ("p90_seconds", p90),
        ]
    })
}

/// `renewal-rate`
/// > Licenses with a `license.renewed` or `license.expired` event in the window, each classified
/// > by the latest such event in the window. Fields: `renewed`, `expired`, `rate` = renewed /
/// > (renewed + expired).
fn renewal_rate(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        renewed: u64,
        expired: u64,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        let in_window = db
            .events(l)
            .into_iter()
            .filter(|v| (v.is(EventType::Renewed) || v.is(EventType::Expired)) && window.contains(v.time()));
        let Some(last) = latest(in_window) else {
            continue;
        };
        let acc = groups.entry(grouping.of_license(l)).or_default();
        if last.is(EventType::Renewed) {
            acc.renewed += 1;
        } else {
            acc.expired += 1;
        }
    }
    one_row_per_group(q.by, groups, |a| {
        vec![
            ("renewed", json!(a.renewed)),
            ("expired", json!(a.expired)),
            ("rate", ratio(a.renewed, a.renewed + a.expired)),
        ]
    })
}

/// `time-to-upgrade`
/// > Licenses whose first-ever `license.upgraded` event falls in the window and that have an
/// > issued-at. delay = that upgrade's time minus issued-at, in seconds, floored at 0.
/// > Fields: `upgrades`, `p50_seconds`, `p90_seconds`.
fn time_to_upgrade(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        /// delays in nanoseconds, floored at 0
        delays: Vec<i64>,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        let Some(first_upgrade) = earliest_time(db.events(l).into_iter().filter(|v| v.is(EventType::Upgraded))) else {
            continue;
        };
        if !window.contains(first_upgrade) {
            continue;
        }
        // AMBIGUOUS: "that have an issued-at" — any `license.issued` event ever, even one after
        // the window's end (the delay is then floored at 0). Nothing bounds issued-at here.
        let Some(issued_at) = db.issued_at(l, i64::MAX) else {
            continue;
        };
        groups
            .entry(grouping.of_license(l))
            .or_default()
            .delays
            .push((first_upgrade - issued_at).max(0));
    }
    one_row_per_group(q.by, groups, |a| {
        let (p50, p90) = p50_p90_seconds(a.delays.clone());
        vec![
            ("upgrades", json!(a.delays.len() as u64)),
            ("p50_seconds", p50),
            ("p90_seconds", p90),
        ]
    })
}

/// `time-to-expiration` (as of `at`)
/// > Licenses whose status at `at` is not `revoked` and that have a known `expires_at` (latest
/// > reported). remaining = expires_at − at. Fields: `expired` (remaining ≤ 0), `under_7d`
/// > (< 7 d), `from_7d_to_30d` (< 30 d), `from_30d_to_90d` (< 90 d), `over_90d`.
///
/// docs item 12: "covers every license (live or not) whose status at `at` is not `revoked` and
/// that has a known `expires_at` up to `at`".
fn time_to_expiration(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        expired: u64,
        under_7d: u64,
        from_7d_to_30d: u64,
        from_30d_to_90d: u64,
        over_90d: u64,
    }
    let grouping = Grouping::new(db, q.by, q.at);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        if !db.exists_at(l, q.at) || db.status_at(l, q.at) == Status::Revoked {
            continue;
        }
        let Some(expires_at) = db.latest_expires_at(l, q.at) else {
            continue;
        };
        let remaining = expires_at - q.at;
        let acc = groups.entry(grouping.of_license(l)).or_default();
        if remaining <= 0 {
            acc.expired += 1;
        } else if remaining < 7 * DAY {
            acc.under_7d += 1;
        } else if remaining < 30 * DAY {
            acc.from_7d_to_30d += 1;
        } else if remaining < 90 * DAY {
            acc.from_30d_to_90d += 1;
        } else {
            acc.over_90d += 1;
        }
    }
    one_row_per_group(q.by, groups, |a| {
        vec![
            ("expired", json!(a.expired)),
            ("under_7d", json!(a.under_7d)),
            ("from_7d_to_30d", json!(a.from_7d_to_30d)),
            ("from_30d_to_90d", json!(a.from_30d_to_90d)),
            ("over_90d", json!(a.over_90d)),
        ]
    })
}

/// `active-users`
/// > Per license, the distinct `user` values on valid validations and on `feature.checked`
/// > events (any result) in the window; licenses grouped by their latest known dimension. Per
/// > group: `licenses` (with at least one user), `users` (sum over licenses),
/// > `mean_users_per_license`.
fn active_users(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        /// distinct users per license with at least one, in ascending license order
        users_per_license: Vec<u64>,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for l in db.licenses() {
        let users: BTreeSet<&str> = db
            .events(l)
            .into_iter()
            .filter(|v| window.contains(v.time()))
            .filter(|v| v.valid_validation() || v.is(EventType::FeatureChecked))
            .filter_map(|v| v.e.user.as_deref())
            .collect();
        if users.is_empty() {
            continue;
        }
        groups
            .entry(grouping.of_license(l))
            .or_default()
            .users_per_license
            .push(users.len() as u64);
    }
    one_row_per_group(q.by, groups, |a| {
        let as_f64: Vec<f64> = a.users_per_license.iter().map(|n| *n as f64).collect();
        vec![
            ("licenses", json!(a.users_per_license.len() as u64)),
            ("users", json!(a.users_per_license.iter().sum::<u64>())),
            ("mean_users_per_license", mean(&as_f64)),
        ]
    })
}

/// `feature-usage`
/// > `feature.checked` events in the window, per `feature` (missing: `"unknown"`; and per `by`
/// > group if given): `checks` (any result), `granted` (result `valid`), `denied` (result
/// > `feature_denied`), `licenses` (distinct).
fn feature_usage(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        checks: u64,
        granted: u64,
        denied: u64,
        licenses: BTreeSet<String>,
    }
    let window = Window::of(q);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut cells: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for v in db.all_events() {
        if !v.is(EventType::FeatureChecked) || !window.contains(v.time()) {
            continue;
        }
        let feature = v.e.feature.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let acc = cells.entry((feature, grouping.of_event(v))).or_default();
        acc.checks += 1;
        if v.valid() {
            acc.granted += 1;
        }
        if v.has_result(ResultCode::FeatureDenied) {
            acc.denied += 1;
        }
        acc.licenses.insert(v.license.to_string());
    }
    let by = q.by;
    rows(
        &cells,
        |k| {
            let mut keys = vec![("feature".to_string(), json!(k.0))];
            keys.extend(by_key(by, &k.1));
            keys
        },
        |a| {
            vec![
                ("checks", json!(a.checks)),
                ("granted", json!(a.granted)),
                ("denied", json!(a.denied)),
                ("licenses", json!(a.licenses.len() as u64)),
            ]
        },
    )
}

/// `geo`
/// > `license.validated` events in the window per `country` (event's own, else the license's):
/// > `validations`, `failed` (result ≠ `valid`), `active_licenses` (distinct licenses with a
/// > valid validation). With `by`, rows per (country, group).
fn geo(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        validations: u64,
        failed: u64,
        active_licenses: BTreeSet<String>,
    }
    let window = Window::of(q);
    let countries = Grouping::new(db, Some("country"), window.end);
    let grouping = Grouping::new(db, q.by, window.end);
    let mut cells: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for v in db.all_events() {
        if !v.is(EventType::Validated) || !window.contains(v.time()) {
            continue;
        }
        let acc = cells.entry((countries.of_event(v), grouping.of_event(v))).or_default();
        acc.validations += 1;
        if v.valid() {
            acc.active_licenses.insert(v.license.to_string());
        } else {
            acc.failed += 1;
        }
    }
    let by = q.by;
    rows(
        &cells,
        |k| {
            // AMBIGUOUS: with `by=country` both keys are `country` and always equal (the same
            // rule picks both), so the row carries `country` once.
            let mut keys = vec![("country".to_string(), json!(k.0))];
            keys.extend(by_key(by, &k.1));
            keys
        },
        |a| {
            vec![
                ("validations", json!(a.validations)),
                ("failed", json!(a.failed)),
                ("active_licenses", json!(a.active_licenses.len() as u64)),
            ]
        },
    )
}

/// `health` (as of `at`)
/// > Population: live licenses at `at`. Score starts at 100:
/// > - last = time of the latest valid validation (if none: issued-at; if none: the license's
/// >   first event); days = floor((at − last) / 86400). days > 7: −20 (`inactive_7d`); days > 30:
/// >   another −30 (`inactive_30d`).
/// > - domain utilization (domains resource, as in `utilization`; a limit of 0 counts as unknown)
/// >   known and < 0.2: −15 (`low_domain_utilization`).
/// > - this_week = valid validations in `(at − 7d, at]`, last_week = in `(at − 14d, at − 7d]`;
/// >   last_week > 0 and this_week / last_week < 0.5: −20 (`validation_decline`).
/// > - the license's latest `support.*` event is `support.ticket_opened`: −10
/// >   (`open_support_ticket`).
/// > - the license's latest `payment.*` event is `payment.failed`: −25 (`payment_failed`).
/// > - score = max(0, total). `health` rows: `license`, `score`, `reasons` (codes above, in that
/// >   order).
fn health(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    let mut out = Vec::new();
    for l in db.live_licenses(q.at) {
        let (score, reasons) = db.health(l, q.at);
        out.push(json!({"license": l, "score": score, "reasons": reasons}));
    }
    out
}

/// `GET /v1/churn-risk` (as of `at`)
/// > `churn-risk?below=N` (default 50): the licenses with score < N, ordered by score ascending,
/// > then license.
fn churn_risk(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    let mut at_risk: Vec<(u64, &str, Vec<&'static str>)> = Vec::new();
    for l in db.live_licenses(q.at) {
        let (score, reasons) = db.health(l, q.at);
        if (score as f64) < q.below {
            at_risk.push((score, l, reasons));
        }
    }
    at_risk.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    at_risk
        .into_iter()
        .map(|(score, l, reasons)| json!({"license": l, "score": score, "reasons": reasons}))
        .collect()
}

/// `GET /v1/upgrade-signals` (as of `at`, over `(at − 30d, at]`)
/// > Triggers per live license (both can fire): `limit_approaching` (utilization ≥ 0.8),
/// > `over_limit` (utilization > 1.0, or any event with result `limit_exceeded` in the window),
/// > `rate_limited_frequent` (more than 10 validations with result `rate_limited` in the window),
/// > `feature_interest` (more than 3 `feature.checked` events with result `feature_denied` in
/// > the window).
/// > Rows: licenses with at least one trigger: `license`, `triggers` (in the order listed here),
/// > `pipeline` (true when 2 or more triggers); ordered by number of triggers descending, then
/// > license.
fn upgrade_signals(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    let in_window = |v: &Ev<'_>| q.at - 30 * DAY < v.time() && v.time() <= q.at;
    let mut signals: Vec<(&str, Vec<&'static str>)> = Vec::new();
    for l in db.live_licenses(q.at) {
        let recent: Vec<Ev<'_>> = db.events(l).into_iter().filter(|v| in_window(v)).collect();
        let utilization = db.license_utilization(l, q.at);
        let limit_exceeded = recent.iter().any(|v| v.has_result(ResultCode::LimitExceeded));
        let rate_limited = recent
            .iter()
            .filter(|v| v.is(EventType::Validated) && v.has_result(ResultCode::RateLimited))
            .count();
        let denied = recent
            .iter()
            .filter(|v| v.is(EventType::FeatureChecked) && v.has_result(ResultCode::FeatureDenied))
            .count();
        let mut triggers = Vec::new();
        if utilization.is_some_and(|u| u >= 0.8) {
            triggers.push("limit_approaching");
        }
        if utilization.is_some_and(|u| u > 1.0) || limit_exceeded {
            triggers.push("over_limit");
        }
        if rate_limited > 10 {
            triggers.push("rate_limited_frequent");
        }
        if denied > 3 {
            triggers.push("feature_interest");
        }
        if !triggers.is_empty() {
            signals.push((l, triggers));
        }
    }
    signals.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    signals
        .into_iter()
        .map(|(l, triggers)| {
            let pipeline = triggers.len() >= 2;
            json!({"license": l, "triggers": triggers, "pipeline": pipeline})
        })
        .collect()
}

/// `mrr`
/// > For each calendar month touching the window, at instant E = the first instant of the next
/// > month (or `at` if earlier): `active_licenses` = licenses with status `active` at E; `mrr` =
/// > sum of their plan's (plan at E) `price_monthly` from the plan catalog (with `by`, a
/// > license's group is also taken at E); `unpriced_licenses` = active licenses whose plan is
/// > unknown or has no price; `change` = mrr minus the same group's mrr in the previous month
/// > (0 if it had no row; null for the window's first month). With `by`, rows only for groups
/// > with an active license at E.
///
/// docs item 10: "a group without a row in the previous month had an `mrr` of 0 … `null` for
/// the window's first month. E of a month is the first instant of the next month, or `at` if
/// earlier; "up to E" includes events at exactly E." docs item 7: "`mrr` sums prices in
/// ascending license order."
fn mrr(db: &Db<'_>, q: &Query<'_>) -> Vec<Value> {
    #[derive(Default)]
    struct Acc {
        active_licenses: u64,
        mrr: f64,
        unpriced_licenses: u64,
    }
    let (first_year, first_month, _) = civil_from_days(q.from_day);
    let (last_year, last_month, _) = civil_from_days(q.to_day);
    let (mut year, mut month) = (first_year, first_month);
    let mut previous: Option<BTreeMap<String, Acc>> = None;
    let mut out = Vec::new();
    loop {
        let next = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
        // AMBIGUOUS: a month that starts after `at` still gets E = `at` (so it repeats the state
        // at `at`); docs item 1 speaks of "`mrr`'s last month" only.
        let e = (days_from_civil(next.0, next.1, 1) * DAY).min(q.at);
        let grouping = Grouping::new(db, q.by, e);
        let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
        if q.by.is_none() {
            groups.insert(String::new(), Acc::default());
        }
        for l in db.licenses() {
            // Status `active` only (not `unknown`), after the expires_at rule of "Status at t".
            if db.status_at(l, e) != Status::Active {
                continue;
            }
            let price = db
                .latest_value(l, "plan", e)
                .and_then(|plan| db.catalog.get(&plan))
                .and_then(|plan| plan.price_monthly);
            let acc = groups.entry(grouping.of_license(l)).or_default();
            acc.active_licenses += 1;
            match price {
                Some(price) => acc.mrr += price,
                None => acc.unpriced_licenses += 1,
            }
        }
        let month_key = format!("{year:04}-{month:02}");
        for (group, acc) in &groups {
            let change = match &previous {
                None => Value::Null,
                Some(prev) => json!(acc.mrr - prev.get(group).map_or(0.0, |p| p.mrr)),
            };
            let mut m = Map::new();
            m.insert("month".to_string(), json!(month_key));
            for (name, value) in by_key(q.by, group) {
                m.insert(name, value);
            }
            m.insert("active_licenses".to_string(), json!(acc.active_licenses));
            m.insert("mrr".to_string(), json!(acc.mrr));
            m.insert("unpriced_licenses".to_string(), json!(acc.unpriced_licenses));
            m.insert("change".to_string(), change);
            out.push(Value::Object(m));
        }
        previous = Some(groups);
        if (year, month) == (last_year, last_month) {
            break;
        }
        (year, month) = next;
    }
    out
}

#[cfg(test)]
mod calendar_tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(date_of_day(days_from_civil(2024, 2, 29)), "2024-02-29");
        assert_eq!(days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28), 2);
        for day in -100_000..100_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
