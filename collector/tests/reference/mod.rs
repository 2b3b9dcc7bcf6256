//! A plain reference computation of every metric, straight from the event list each time.
//!
//! Each function quotes the definition it implements (`spec/metrics.md`, plus the choices of
//! `docs/metrics.md`), so a reader can put it beside `collector/src/analytics/query.rs` and
//! see they agree. Slow on purpose: no state, no rollups, no cleverness.

// Written to read like the definitions ("the latest … up to t" = `.filter(..).last()`).
#![allow(clippy::double_ended_iterator_last, clippy::type_complexity)]

use std::collections::{BTreeMap, BTreeSet};

use keytrail_collector::config::Plan;
use keytrail_common::event::{Event, EventType as T, ResultCode as R};
use keytrail_common::time::{format_date, NANOS_PER_DAY};
use serde_json::{json, Map, Value};

const D: i64 = NANOS_PER_DAY;

pub struct Query<'a> {
    pub metric: &'a str,
    pub from_day: i64,
    pub to_day: i64,
    pub at: i64,
    pub by: Option<&'a str>,
    pub below: f64,
}

/// An event with its store position (breaks time ties: later index = later).
#[derive(Clone, Copy)]
struct Ev<'a> {
    pos: usize,
    e: &'a Event,
}

impl Ev<'_> {
    fn key(&self) -> (i64, usize) {
        (self.e.time, self.pos)
    }
    fn lic(&self) -> &str {
        self.e.license.as_deref().unwrap()
    }
}

struct World<'a> {
    /// "Events without a license count for no metric"; "the first stored copy wins".
    evs: Vec<Ev<'a>>,
    /// The same events per license, in (time, store order) — only so the reference is not
    /// quadratic; every function still reads the full list it needs.
    by_license: BTreeMap<&'a str, Vec<Ev<'a>>>,
    catalog: &'a BTreeMap<String, Plan>,
}

fn dim_of<'a>(e: &'a Event, dim: &str) -> Option<&'a str> {
    match dim {
        "plan" => e.plan.as_deref(),
        "product" => e.product.as_deref(),
        "customer" => e.customer.as_deref(),
        "region" => e.region.as_deref(),
        "country" => e.country.as_deref(),
        "deployment" => e.deployment.map(|d| d.as_str()),
        _ => panic!("dimension {dim}"),
    }
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

fn ratio(a: f64, b: f64) -> Value {
    if b == 0.0 {
        Value::Null
    } else {
        json!(a / b)
    }
}

/// Nearest rank: the value at rank ceil(p·n); integer ranks ceil(n/2) and ceil(9n/10).
fn pcts(mut v: Vec<i64>) -> (Value, Value) {
    if v.is_empty() {
        return (Value::Null, Value::Null);
    }
    v.sort();
    let n = v.len();
    (
        json!(secs(v[n.div_ceil(2) - 1])),
        json!(secs(v[(9 * n).div_ceil(10) - 1])),
    )
}

fn month_of(day: i64) -> (i64, i64) {
    let mut y = 1970;
    let mut d = day;
    loop {
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let len = if leap { 366 } else { 365 };
        if d < 0 {
            y -= 1;
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            d += if leap { 366 } else { 365 };
            continue;
        }
        if d < len {
            break;
        }
        d -= len;
        y += 1;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let lens = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut m = 0;
    while d >= lens[m] {
        d -= lens[m];
        m += 1;
    }
    (y, m as i64 + 1)
}

/// First day (days since epoch) of month (y, m), by walking from 1970.
fn first_day(y: i64, m: i64) -> i64 {
    let mut day = 0i64;
    let (mut yy, mut mm) = (1970, 1);
    if y < 1970 {
        unimplemented!("months before 1970");
    }
    while (yy, mm) < (y, m) {
        let leap = (yy % 4 == 0 && yy % 100 != 0) || yy % 400 == 0;
        let lens = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        day += lens[(mm - 1) as usize];
        mm += 1;
        if mm == 13 {
            mm = 1;
            yy += 1;
        }
    }
    day
}

impl<'a> World<'a> {
    fn licenses(&self) -> BTreeSet<&'a str> {
        self.evs.iter().map(|x| x.e.license.as_deref().unwrap()).collect()
    }

    fn of(&self, l: &str) -> Vec<Ev<'a>> {
        self.by_license.get(l).cloned().unwrap_or_default()
    }

    /// "the field's value on the license's most recent event (by time) that carries it, up to
    /// the metric's end instant"; missing → "unknown".
    fn latest_dim(&self, l: &str, dim: &str, end: i64) -> String {
        self.of(l)
            .iter()
            .filter(|x| x.e.time <= end)
            .filter_map(|x| dim_of(x.e, dim))
            .last()
            .unwrap_or("unknown")
            .to_string()
    }

    fn group(&self, l: &str, by: Option<&str>, end: i64) -> String {
        by.map_or(String::new(), |d| self.latest_dim(l, d, end))
    }

    /// "For a metric over events, an event's dimension is its own field if set, else the
    /// license's latest known value."
    fn event_group(&self, x: &Ev, by: &str, end: i64) -> String {
        dim_of(x.e, by).map_or_else(|| self.latest_dim(x.lic(), by, end), str::to_string)
    }

    /// "Issued at = the time of the license's earliest license.issued event."
    fn issued_at(&self, l: &str) -> Option<i64> {
        self.of(l)
            .iter()
            .filter(|x| x.e.event_type == T::Issued)
            .map(|x| x.e.time)
            .min()
    }

    /// "Status at t": type of the latest status event up to t; then the expires_at rule.
    fn status(&self, l: &str, t: i64) -> &'static str {
        let mut s = "unknown";
        for x in self.of(l).iter().filter(|x| x.e.time <= t) {
            s = match x.e.event_type {
                T::Issued | T::Renewed | T::Reinstated | T::Upgraded | T::Downgraded => "active",
                T::Suspended => "suspended",
                T::Revoked => "revoked",
                T::Expired => "expired",
                _ => s,
            };
        }
        if (s == "active" || s == "unknown") && self.expires(l, t).is_some_and(|x| x <= t) {
            return "expired";
        }
        s
    }

    fn expires(&self, l: &str, t: i64) -> Option<i64> {
        self.of(l)
            .iter()
            .filter(|x| x.e.time <= t)
            .filter_map(|x| x.e.expires_at)
            .last()
    }

    /// Licenses that exist at t (an event up to t) and whose status is not revoked/expired.
    fn live(&self, l: &str, t: i64) -> bool {
        self.of(l).iter().any(|x| x.e.time <= t) && !matches!(self.status(l, t), "revoked" | "expired")
    }

    /// used/limit for r in 0 seats, 1 domains, 2 machines, as of t.
    fn resource(&self, l: &str, r: usize, t: i64) -> (u64, Option<u64>) {
        let evs: Vec<Ev> = self.of(l).into_iter().filter(|x| x.e.time <= t).collect();
        let used_of = |e: &Event| [e.usage.seats_used, e.usage.domains_used, e.usage.machines_used][r];
        let limit_of = |e: &Event| [e.usage.seats_limit, e.usage.domains_limit, e.usage.machines_limit][r];
        let value_of = |e: &Event| [&e.user, &e.domain, &e.machine][r].clone();
        let limit = evs.iter().filter_map(|x| limit_of(x.e)).last().or_else(|| {
            let plan = evs.iter().filter_map(|x| x.e.plan.as_deref()).last()?;
            let p = self.catalog.get(plan)?;
            [p.seats, p.domains, p.machines][r]
        });
        let used = match evs.iter().filter_map(|x| used_of(x.e)).last() {
            Some(u) => u,
            None => {
                let mut state: BTreeMap<String, bool> = BTreeMap::new();
                for x in &evs {
                    let on = match x.e.event_type {
                        T::Activated => true,
                        T::Deactivated => false,
                        _ => continue,
                    };
                    if x.e.result != R::Valid {
                        continue;
                    }
                    if let Some(v) = value_of(x.e) {
                        state.insert(v, on);
                    }
                }
                state.values().filter(|on| **on).count() as u64
            }
        };
        (used, limit)
    }

    /// "A license's utilization = the largest used/limit over its resources with a known limit > 0."
    fn utilization(&self, l: &str, t: i64) -> Option<f64> {
        let mut best: Option<f64> = None;
        for r in 0..3 {
            if let (used, Some(limit)) = self.resource(l, r, t) {
                if limit > 0 {
                    let u = used as f64 / limit as f64;
                    best = Some(best.map_or(u, |b: f64| b.max(u)));
                }
            }
        }
        best
    }

    fn valid_validations(&self, l: &str) -> Vec<i64> {
        self.of(l)
            .iter()
            .filter(|x| x.e.event_type == T::Validated && x.e.result == R::Valid)
            .map(|x| x.e.time)
            .collect()
    }

    fn one_per_group(
        by: Option<&str>,
        groups: BTreeMap<String, Map<String, Value>>,
        empty: Map<String, Value>,
    ) -> Vec<Value> {
        match by {
            None => vec![Value::Object(groups.get("").cloned().unwrap_or(empty))],
            Some(d) => groups
                .into_iter()
                .map(|(g, fields)| {
                    let mut m = Map::new();
                    m.insert(d.to_string(), json!(g));
                    m.extend(fields);
                    Value::Object(m)
                })
                .collect(),
        }
    }
}

fn obj(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub fn compute(events: &[Event], catalog: &BTreeMap<String, Plan>, q: &Query) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    let evs: Vec<Ev> = events
        .iter()
        .filter(|e| seen.insert(e.id.clone()))
        .enumerate()
        .map(|(pos, e)| Ev { pos, e })
        .filter(|x| x.e.license.is_some())
        .collect();
    let mut by_license: BTreeMap<&str, Vec<Ev>> = BTreeMap::new();
    for x in &evs {
        by_license.entry(x.e.license.as_deref().unwrap()).or_default().push(*x);
    }
    for v in by_license.values_mut() {
        v.sort_by_key(|x| x.key());
    }
    let w = World {
        evs,
        by_license,
        catalog,
    };
    let start = q.from_day * D;
    let end = (q.to_day + 1) * D;
    let in_window = |t: i64| start <= t && t < end;
    let at = q.at;
    let lics = w.licenses();
    match q.metric {
        // Cohort: licenses whose issued-at falls in the window. Activated at the earliest
        // license.activated (valid) or valid validation with time <= at.
        "activation-rate" | "time-to-first-validation" => {
            let mut groups: BTreeMap<String, (u64, u64, u64, [u64; 5], Vec<i64>)> = BTreeMap::new();
            for l in &lics {
                let Some(issued) = w.issued_at(l).filter(|t| in_window(*t)) else {
                    continue;
                };
                let g = groups.entry(w.group(l, q.by, end)).or_default();
                g.0 += 1;
                let of = w.of(l);
                let act = of
                    .iter()
                    .filter(|x| x.e.time <= at && x.e.result == R::Valid)
                    .filter(|x| matches!(x.e.event_type, T::Activated | T::Validated))
                    .map(|x| x.e.time)
                    .min();
                if let Some(a) = act {
                    g.1 += 1;
                    if (a - issued).max(0) <= 7 * D {
                        g.2 += 1;
                    }
                }
                let first_valid = w.valid_validations(l).into_iter().filter(|t| *t <= at).min();
                match first_valid {
                    None => g.3[4] += 1,
                    Some(v) => {
                        let d = (v - issued).max(0);
                        let b = if d < 3600 * 1_000_000_000 {
                            0
                        } else if d < 86400 * 1_000_000_000 {
                            1
                        } else if d < 604800 * 1_000_000_000 {
                            2
                        } else {
                            3
                        };
                        g.3[b] += 1;
                        g.4.push(d);
                    }
                }
            }
            let fields = |g: &(u64, u64, u64, [u64; 5], Vec<i64>)| {
                if q.metric == "activation-rate" {
                    obj(vec![
                        ("issued", json!(g.0)),
                        ("activated", json!(g.1)),
                        ("activated_7d", json!(g.2)),
                        ("rate", ratio(g.1 as f64, g.0 as f64)),
                        ("rate_7d", ratio(g.2 as f64, g.0 as f64)),
                    ])
                } else {
                    let (p50, p90) = pcts(g.4.clone());
                    obj(vec![
                        ("issued", json!(g.0)),
                        ("under_1h", json!(g.3[0])),
                        ("from_1h_to_24h", json!(g.3[1])),
                        ("from_1d_to_7d", json!(g.3[2])),
                        ("over_7d", json!(g.3[3])),
                        ("never", json!(g.3[4])),
                        ("p50_seconds", p50),
                        ("p90_seconds", p90),
                    ])
                }
            };
            let out: BTreeMap<String, Map<String, Value>> =
                groups.iter().map(|(k, g)| (k.clone(), fields(g))).collect();
            World::one_per_group(q.by, out, fields(&Default::default()))
        }
        // For each day: active_licenses = distinct licenses with a valid validation that day;
        // validations = license.validated events that day (any result); failed, failure_rate,
        // by_result.
        "daily-active-validations" | "validation-failures" => {
            let mut rows = Vec::new();
            for day in q.from_day..=q.to_day {
                let vals: Vec<&Ev> = w
                    .evs
                    .iter()
                    .filter(|x| x.e.event_type == T::Validated && x.e.time.div_euclid(D) == day)
                    .collect();
                let mut groups: BTreeMap<String, Vec<&Ev>> = BTreeMap::new();
                for x in vals {
                    let g = q.by.map_or(String::new(), |d| w.event_group(x, d, end));
                    groups.entry(g).or_default().push(x);
                }
                if q.by.is_none() {
                    groups.entry(String::new()).or_default();
                }
                for (g, xs) in groups {
                    let mut m = Map::new();
                    m.insert("day".into(), json!(format_date(day * D)));
                    if let Some(d) = q.by {
                        m.insert(d.into(), json!(g));
                    }
                    let n = xs.len() as u64;
                    if q.metric == "daily-active-validations" {
                        let active: BTreeSet<&str> =
                            xs.iter().filter(|x| x.e.result == R::Valid).map(|x| x.lic()).collect();
                        m.insert("active_licenses".into(), json!(active.len()));
                        m.insert("validations".into(), json!(n));
                    } else {
                        let failed: Vec<&&Ev> = xs.iter().filter(|x| x.e.result != R::Valid).collect();
                        let mut by_result: BTreeMap<&str, u64> = BTreeMap::new();
                        for x in &failed {
                            *by_result.entry(x.e.result.as_str()).or_default() += 1;
                        }
                        m.insert("validations".into(), json!(n));
                        m.insert("failed".into(), json!(failed.len()));
                        m.insert("failure_rate".into(), ratio(failed.len() as f64, n as f64));
                        m.insert("by_result".into(), json!(by_result));
                    }
                    rows.push(Value::Object(m));
                }
            }
            rows
        }
        // license.validated events in the window per country (event's own, else the
        // license's): validations, failed, active_licenses; with by, per (country, group).
        "geo" => {
            let mut groups: BTreeMap<(String, String), (u64, u64, BTreeSet<&str>)> = BTreeMap::new();
            for x in w
                .evs
                .iter()
                .filter(|x| x.e.event_type == T::Validated && in_window(x.e.time))
            {
                let c = w.event_group(x, "country", end);
                let g = q.by.map_or(String::new(), |d| w.event_group(x, d, end));
                let a = groups.entry((c, g)).or_default();
                a.0 += 1;
                if x.e.result != R::Valid {
                    a.1 += 1;
                } else {
                    a.2.insert(x.lic());
                }
            }
            groups
                .into_iter()
                .map(|((c, g), a)| {
                    let mut m = Map::new();
                    m.insert("country".into(), json!(c));
                    if let Some(d) = q.by {
                        m.insert(d.into(), json!(g));
                    }
                    m.insert("validations".into(), json!(a.0));
                    m.insert("failed".into(), json!(a.1));
                    m.insert("active_licenses".into(), json!(a.2.len()));
                    Value::Object(m)
                })
                .collect()
        }
        // feature.checked events in the window, per feature (missing: "unknown") and group:
        // checks, granted (valid), denied (feature_denied), licenses (distinct).
        "feature-usage" => {
            let mut groups: BTreeMap<(String, String), (u64, u64, u64, BTreeSet<&str>)> = BTreeMap::new();
            for x in w
                .evs
                .iter()
                .filter(|x| x.e.event_type == T::FeatureChecked && in_window(x.e.time))
            {
                let f = x.e.feature.clone().unwrap_or_else(|| "unknown".into());
                let g = q.by.map_or(String::new(), |d| w.event_group(x, d, end));
                let a = groups.entry((f, g)).or_default();
                a.0 += 1;
                a.1 += u64::from(x.e.result == R::Valid);
                a.2 += u64::from(x.e.result == R::FeatureDenied);
                a.3.insert(x.lic());
            }
            groups
                .into_iter()
                .map(|((f, g), a)| {
                    let mut m = Map::new();
                    m.insert("feature".into(), json!(f));
                    if let Some(d) = q.by {
                        m.insert(d.into(), json!(g));
                    }
                    m.insert("checks".into(), json!(a.0));
                    m.insert("granted".into(), json!(a.1));
                    m.insert("denied".into(), json!(a.2));
                    m.insert("licenses".into(), json!(a.3.len()));
                    Value::Object(m)
                })
                .collect()
        }
        // Per license, the distinct user values on valid validations and feature.checked
        // events (any result) in the window.
        "active-users" => {
            let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for l in &lics {
                let users: BTreeSet<&str> = w
                    .of(l)
                    .iter()
                    .filter(|x| in_window(x.e.time))
                    .filter(|x| {
                        (x.e.event_type == T::Validated && x.e.result == R::Valid)
                            || x.e.event_type == T::FeatureChecked
                    })
                    .filter_map(|x| x.e.user.as_deref())
                    .collect();
                if users.is_empty() {
                    continue;
                }
                let g = groups.entry(w.group(l, q.by, end)).or_default();
                g.0 += 1;
                g.1 += users.len() as u64;
            }
            let f = |g: &(u64, u64)| {
                obj(vec![
                    ("licenses", json!(g.0)),
                    ("users", json!(g.1)),
                    ("mean_users_per_license", ratio(g.1 as f64, g.0 as f64)),
                ])
            };
            World::one_per_group(
                q.by,
                groups.iter().map(|(k, g)| (k.clone(), f(g))).collect(),
                f(&(0, 0)),
            )
        }
        // Live licenses at `at` with a utilization; mean summed in license order.
        "utilization" => {
            let mut groups: BTreeMap<String, (u64, f64, u64, u64, u64)> = BTreeMap::new();
            for l in &lics {
                if !w.live(l, at) {
                    continue;
                }
                let Some(u) = w.utilization(l, at) else { continue };
                let g = groups.entry(w.group(l, q.by, at)).or_default();
                g.0 += 1;
                g.1 += u;
                g.2 += u64::from(u >= 0.8);
                g.3 += u64::from(u >= 0.9);
                g.4 += u64::from(u > 1.0);
            }
            let f = |g: &(u64, f64, u64, u64, u64)| {
                obj(vec![
                    ("licenses", json!(g.0)),
                    ("mean_utilization", ratio(g.1, g.0 as f64)),
                    ("at_or_above_80", json!(g.2)),
                    ("at_or_above_90", json!(g.3)),
                    ("over_limit", json!(g.4)),
                ])
            };
            World::one_per_group(
                q.by,
                groups.iter().map(|(k, g)| (k.clone(), f(g))).collect(),
                f(&Default::default()),
            )
        }
        // Licenses with a renewed/expired event in the window, classified by the latest one.
        "renewal-rate" => {
            let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for l in &lics {
                let last = w
                    .of(l)
                    .into_iter()
                    .filter(|x| matches!(x.e.event_type, T::Renewed | T::Expired) && in_window(x.e.time))
                    .last();
                let Some(last) = last else { continue };
                let g = groups.entry(w.group(l, q.by, end)).or_default();
                if last.e.event_type == T::Renewed {
                    g.0 += 1;
                } else {
                    g.1 += 1;
                }
            }
            let f = |g: &(u64, u64)| {
                obj(vec![
                    ("renewed", json!(g.0)),
                    ("expired", json!(g.1)),
                    ("rate", ratio(g.0 as f64, (g.0 + g.1) as f64)),
                ])
            };
            World::one_per_group(
                q.by,
                groups.iter().map(|(k, g)| (k.clone(), f(g))).collect(),
                f(&(0, 0)),
            )
        }
        // First-ever license.upgraded in the window, with an issued-at; delay floored at 0.
        "time-to-upgrade" => {
            let mut groups: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            for l in &lics {
                let first = w.of(l).into_iter().find(|x| x.e.event_type == T::Upgraded);
                let (Some(up), Some(issued)) = (first, w.issued_at(l)) else {
                    continue;
                };
                if !in_window(up.e.time) {
                    continue;
                }
                groups
                    .entry(w.group(l, q.by, end))
                    .or_default()
                    .push((up.e.time - issued).max(0));
            }
            let f = |v: &Vec<i64>| {
                let (p50, p90) = pcts(v.clone());
                obj(vec![
                    ("upgrades", json!(v.len())),
                    ("p50_seconds", p50),
                    ("p90_seconds", p90),
                ])
            };
            World::one_per_group(
                q.by,
                groups.iter().map(|(k, g)| (k.clone(), f(g))).collect(),
                f(&Vec::new()),
            )
        }
        // Status at `at` not revoked, known expires_at; remaining = expires_at − at.
        "time-to-expiration" => {
            let mut groups: BTreeMap<String, [u64; 5]> = BTreeMap::new();
            for l in &lics {
                if !w.of(l).iter().any(|x| x.e.time <= at) || w.status(l, at) == "revoked" {
                    continue;
                }
                let Some(x) = w.expires(l, at) else { continue };
                let rem = x - at;
                let b = match rem {
                    r if r <= 0 => 0,
                    r if r < 7 * D => 1,
                    r if r < 30 * D => 2,
                    r if r < 90 * D => 3,
                    _ => 4,
                };
                groups.entry(w.group(l, q.by, at)).or_default()[b] += 1;
            }
            let f = |g: &[u64; 5]| {
                obj(vec![
                    ("expired", json!(g[0])),
                    ("under_7d", json!(g[1])),
                    ("from_7d_to_30d", json!(g[2])),
                    ("from_30d_to_90d", json!(g[3])),
                    ("over_90d", json!(g[4])),
                ])
            };
            World::one_per_group(
                q.by,
                groups.iter().map(|(k, g)| (k.clone(), f(g))).collect(),
                f(&[0; 5]),
            )
        }
        "health" | "churn-risk" => {
            let mut rows: Vec<(i64, String, Vec<&str>)> = Vec::new();
            for l in &lics {
                if !w.live(l, at) {
                    continue;
                }
                rows.push(health(&w, l, at));
            }
            if q.metric == "churn-risk" {
                rows.retain(|r| (r.0 as f64) < q.below);
                rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            }
            rows.into_iter()
                .map(|(s, l, r)| json!({"license": l, "score": s, "reasons": r}))
                .collect()
        }
        "upgrade-signals" => {
            let mut rows: Vec<(usize, String, Vec<&str>)> = Vec::new();
            for l in &lics {
                if !w.live(l, at) {
                    continue;
                }
                let win: Vec<Ev> = w
                    .of(l)
                    .into_iter()
                    .filter(|x| x.e.time > at - 30 * D && x.e.time <= at)
                    .collect();
                let u = w.utilization(l, at);
                let mut t = Vec::new();
                if u.is_some_and(|u| u >= 0.8) {
                    t.push("limit_approaching");
                }
                if u.is_some_and(|u| u > 1.0) || win.iter().any(|x| x.e.result == R::LimitExceeded) {
                    t.push("over_limit");
                }
                let rl = win
                    .iter()
                    .filter(|x| x.e.event_type == T::Validated && x.e.result == R::RateLimited)
                    .count();
                if rl > 10 {
                    t.push("rate_limited_frequent");
                }
                let fd = win
                    .iter()
                    .filter(|x| x.e.event_type == T::FeatureChecked && x.e.result == R::FeatureDenied)
                    .count();
                if fd > 3 {
                    t.push("feature_interest");
                }
                if !t.is_empty() {
                    rows.push((t.len(), l.to_string(), t));
                }
            }
            rows.sort_by(|a, b| (std::cmp::Reverse(a.0), &a.1).cmp(&(std::cmp::Reverse(b.0), &b.1)));
            rows.into_iter()
                .map(|(n, l, t)| json!({"license": l, "triggers": t, "pipeline": n >= 2}))
                .collect()
        }
        // For each calendar month touching the window, at E = first instant of the next month
        // (or at if earlier): active licenses, their plan's price, unpriced, change.
        "mrr" => {
            let (mut y, mut m) = month_of(q.from_day);
            let last = month_of(q.to_day);
            let mut rows = Vec::new();
            let mut prev: Option<BTreeMap<String, f64>> = None;
            while (y, m) <= last {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let e = (first_day(ny, nm) * D).min(at);
                let mut groups: BTreeMap<String, (u64, f64, u64)> = BTreeMap::new();
                for l in &lics {
                    if !w.of(l).iter().any(|x| x.e.time <= e) || w.status(l, e) != "active" {
                        continue;
                    }
                    let plan = w
                        .of(l)
                        .iter()
                        .filter(|x| x.e.time <= e)
                        .filter_map(|x| x.e.plan.clone())
                        .last();
                    let price = plan.and_then(|p| catalog.get(&p).and_then(|p| p.price_monthly));
                    let g = groups.entry(w.group(l, q.by, e)).or_default();
                    g.0 += 1;
                    match price {
                        Some(p) => g.1 += p,
                        None => g.2 += 1,
                    }
                }
                if q.by.is_none() {
                    groups.entry(String::new()).or_default();
                }
                for (g, a) in &groups {
                    let mut row = Map::new();
                    row.insert("month".into(), json!(format!("{y:04}-{m:02}")));
                    if let Some(d) = q.by {
                        row.insert(d.into(), json!(g));
                    }
                    row.insert("active_licenses".into(), json!(a.0));
                    row.insert("mrr".into(), json!(a.1));
                    row.insert("unpriced_licenses".into(), json!(a.2));
                    let change = match &prev {
                        None => Value::Null,
                        Some(p) => json!(a.1 - p.get(g).copied().unwrap_or(0.0)),
                    };
                    row.insert("change".into(), change);
                    rows.push(Value::Object(row));
                }
                prev = Some(groups.into_iter().map(|(g, a)| (g, a.1)).collect());
                (y, m) = (ny, nm);
            }
            rows
        }
        other => panic!("metric {other}"),
    }
}

/// The health score of a live license at `at`, with its reasons in the spec's order.
fn health(w: &World, l: &str, at: i64) -> (i64, String, Vec<&'static str>) {
    let of: Vec<Ev> = w.of(l).into_iter().filter(|x| x.e.time <= at).collect();
    let valid: Vec<i64> = of
        .iter()
        .filter(|x| x.e.event_type == T::Validated && x.e.result == R::Valid)
        .map(|x| x.e.time)
        .collect();
    let issued = of
        .iter()
        .filter(|x| x.e.event_type == T::Issued)
        .map(|x| x.e.time)
        .min();
    let first = of.iter().map(|x| x.e.time).min().unwrap();
    let last = valid.iter().copied().max().or(issued).unwrap_or(first);
    let days = (at - last).div_euclid(D);
    let mut score = 100;
    let mut reasons = Vec::new();
    if days > 7 {
        score -= 20;
        reasons.push("inactive_7d");
    }
    if days > 30 {
        score -= 30;
        reasons.push("inactive_30d");
    }
    if let (used, Some(limit)) = w.resource(l, 1, at) {
        if limit > 0 && (used as f64 / limit as f64) < 0.2 {
            score -= 15;
            reasons.push("low_domain_utilization");
        }
    }
    let this_week = valid.iter().filter(|t| **t > at - 7 * D && **t <= at).count();
    let last_week = valid.iter().filter(|t| **t > at - 14 * D && **t <= at - 7 * D).count();
    if last_week > 0 && (this_week as f64 / last_week as f64) < 0.5 {
        score -= 20;
        reasons.push("validation_decline");
    }
    let support = of
        .iter()
        .filter(|x| matches!(x.e.event_type, T::SupportTicketOpened | T::SupportTicketClosed))
        .last();
    if support.is_some_and(|x| x.e.event_type == T::SupportTicketOpened) {
        score -= 10;
        reasons.push("open_support_ticket");
    }
    let payment = of
        .iter()
        .filter(|x| matches!(x.e.event_type, T::PaymentSucceeded | T::PaymentFailed))
        .last();
    if payment.is_some_and(|x| x.e.event_type == T::PaymentFailed) {
        score -= 25;
        reasons.push("payment_failed");
    }
    (score.max(0), l.to_string(), reasons)
}
