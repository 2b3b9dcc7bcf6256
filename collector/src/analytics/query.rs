//! The metric queries: each reads the rollups and timelines, never raw events.
//!
//! Every function here follows `spec/metrics.md` and the choices of `docs/metrics.md`; the
//! reference computation in `collector/tests/reference/` is the same definitions written the
//! plain way, over raw events, and the tests compare the two.

use std::collections::{BTreeMap, HashMap};

use keytrail_common::event::ResultCode;
use keytrail_common::time::{format_date, format_rfc3339, UnixNanos, NANOS_PER_DAY, NANOS_PER_SEC};
use serde_json::{json, Value};

use super::output::{num_value, ratio, Row};
use super::{day_of, Analytics, Cell, License, Status, RESOURCES};

const DAY: i64 = NANOS_PER_DAY;
const VALID: usize = 0;

/// A `by=` dimension (metrics.md "Dimensions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Plan,
    Product,
    Customer,
    Region,
    Country,
    Deployment,
}

impl Dim {
    pub const ALL: [Dim; 6] = [
        Dim::Plan,
        Dim::Product,
        Dim::Customer,
        Dim::Region,
        Dim::Country,
        Dim::Deployment,
    ];

    pub fn as_str(self) -> &'static str {
        ["plan", "product", "customer", "region", "country", "deployment"][self as usize]
    }

    pub fn parse(s: &str) -> Option<Dim> {
        Dim::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// A metric name of `GET /v1/metrics/<name>` or `keytrail-collector query`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    ActivationRate,
    DailyActiveValidations,
    ValidationFailures,
    Utilization,
    TimeToFirstValidation,
    RenewalRate,
    TimeToUpgrade,
    TimeToExpiration,
    ActiveUsers,
    FeatureUsage,
    Geo,
    Health,
    Mrr,
    ChurnRisk,
    UpgradeSignals,
}

impl Metric {
    pub const ALL: [Metric; 15] = [
        Metric::ActivationRate,
        Metric::DailyActiveValidations,
        Metric::ValidationFailures,
        Metric::Utilization,
        Metric::TimeToFirstValidation,
        Metric::RenewalRate,
        Metric::TimeToUpgrade,
        Metric::TimeToExpiration,
        Metric::ActiveUsers,
        Metric::FeatureUsage,
        Metric::Geo,
        Metric::Health,
        Metric::Mrr,
        Metric::ChurnRisk,
        Metric::UpgradeSignals,
    ];

    pub fn name(self) -> &'static str {
        [
            "activation-rate",
            "daily-active-validations",
            "validation-failures",
            "utilization",
            "time-to-first-validation",
            "renewal-rate",
            "time-to-upgrade",
            "time-to-expiration",
            "active-users",
            "feature-usage",
            "geo",
            "health",
            "mrr",
            "churn-risk",
            "upgrade-signals",
        ][self as usize]
    }

    pub fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == s)
    }

    /// `health`, `churn-risk` and `upgrade-signals` are per license and take no `by`.
    pub fn takes_by(self) -> bool {
        !matches!(self, Metric::Health | Metric::ChurnRisk | Metric::UpgradeSignals)
    }

    /// The columns of an answer with no rows (CSV header), group keys included.
    pub fn columns(self, by: Option<Dim>) -> Vec<&'static str> {
        let mut c: Vec<&'static str> = match self {
            Metric::DailyActiveValidations | Metric::ValidationFailures => vec!["day"],
            Metric::FeatureUsage => vec!["feature"],
            Metric::Geo => vec!["country"],
            Metric::Mrr => vec!["month"],
            Metric::Health | Metric::ChurnRisk | Metric::UpgradeSignals => vec!["license"],
            _ => vec![],
        };
        c.extend(by.map(Dim::as_str));
        c.extend_from_slice(match self {
            Metric::ActivationRate => &["issued", "activated", "activated_7d", "rate", "rate_7d"][..],
            Metric::DailyActiveValidations => &["active_licenses", "validations"],
            Metric::ValidationFailures => &["validations", "failed", "failure_rate", "by_result"],
            Metric::Utilization => &[
                "licenses",
                "mean_utilization",
                "at_or_above_80",
                "at_or_above_90",
                "over_limit",
            ],
            Metric::TimeToFirstValidation => &[
                "issued",
                "under_1h",
                "from_1h_to_24h",
                "from_1d_to_7d",
                "over_7d",
                "never",
                "p50_seconds",
                "p90_seconds",
            ],
            Metric::RenewalRate => &["renewed", "expired", "rate"],
            Metric::TimeToUpgrade => &["upgrades", "p50_seconds", "p90_seconds"],
            Metric::TimeToExpiration => &["expired", "under_7d", "from_7d_to_30d", "from_30d_to_90d", "over_90d"],
            Metric::ActiveUsers => &["licenses", "users", "mean_users_per_license"],
            Metric::FeatureUsage => &["checks", "granted", "denied", "licenses"],
            Metric::Geo => &["validations", "failed", "active_licenses"],
            Metric::Health | Metric::ChurnRisk => &["score", "reasons"],
            Metric::Mrr => &["active_licenses", "mrr", "unpriced_licenses", "change"],
            Metric::UpgradeSignals => &["triggers", "pipeline"],
        });
        c
    }
}

/// A resolved, validated question.
#[derive(Clone, Debug)]
pub struct MetricQuery {
    pub metric: Metric,
    /// Days since 1970-01-01, inclusive.
    pub from_day: i32,
    pub to_day: i32,
    pub at: UnixNanos,
    pub by: Option<Dim>,
    /// `churn-risk` threshold.
    pub below: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("{0} takes no \"by\"")]
    ByNotAccepted(&'static str),
}

fn day_start(d: i32) -> i64 {
    (d as i64).saturating_mul(DAY)
}

fn seconds(ns: i64) -> f64 {
    ns as f64 / NANOS_PER_SEC as f64
}

/// Nearest rank with integer ranks: p50 at `ceil(n/2)`, p90 at `ceil(9n/10)` (1-based).
fn percentiles(values: &mut [i64]) -> (Value, Value) {
    if values.is_empty() {
        return (Value::Null, Value::Null);
    }
    values.sort_unstable();
    let n = values.len();
    let p50 = values[n.div_ceil(2) - 1];
    let p90 = values[(9 * n).div_ceil(10) - 1];
    (num_value(seconds(p50)), num_value(seconds(p90)))
}

/// Times in `(a, b]` among the given sorted lists.
fn count_in<'a>(lists: impl Iterator<Item = &'a [i64]>, a: i64, b: i64) -> u64 {
    lists
        .map(|v| (v.partition_point(|x| *x <= b) - v.partition_point(|x| *x <= a)) as u64)
        .sum()
}

/// `(y, m)` of a day number (proleptic Gregorian, days since 1970-01-01).
pub fn civil_from_days(z: i32) -> (i32, u32) {
    let z = z as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u32)
}

/// The day number of the first day of month `(y, m)`.
pub fn days_from_civil(y: i32, m: u32) -> i32 {
    let y = y as i64 - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) as i32
}

/// What a per-license question needs about one resource.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceUse {
    pub used: u64,
    pub limit: Option<u64>,
    /// The limit came from a usage report (else from the plan catalog).
    pub reported_limit: bool,
}

/// Strings to dense ids, in first-seen order.
#[derive(Default)]
struct Interner<'a> {
    names: Vec<&'a str>,
    map: HashMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, s: &'a str) -> u32 {
        // Few names (features, plans): a scan beats hashing.
        if self.names.len() <= 16 {
            if let Some(i) = self.names.iter().position(|n| *n == s) {
                return i as u32;
            }
        } else if let Some(&i) = self.map.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s);
        self.map.insert(s, i);
        i
    }
}

/// The group of every event cell in one query, as dense ids (see [`Analytics::groups`]).
struct EventGroups<'a> {
    names: Vec<&'a str>,
    license: Vec<u32>,
    variant: Vec<Option<u32>>,
}

impl EventGroups<'_> {
    /// An event's group: its own value if set, else its license's.
    fn of(&self, license: u32, variant: u32) -> u32 {
        self.variant[variant as usize].unwrap_or(self.license[license as usize])
    }

    /// Group ids in ascending name order.
    fn order(&self) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.names.len()).collect();
        o.sort_by_key(|&i| self.names[i]);
        o
    }
}

struct Health {
    score: i64,
    reasons: Vec<&'static str>,
}

impl Analytics {
    fn dim_at<'a>(&'a self, l: &'a License, d: Dim, t: i64) -> &'a str {
        l.dims[d as usize].at(t).map_or("unknown", String::as_str)
    }

    fn license_group<'a>(&'a self, l: &'a License, by: Option<Dim>, t: i64) -> &'a str {
        by.map_or("", |d| self.dim_at(l, d, t))
    }

    /// metrics.md "Status at t", with the `expires_at` rule.
    pub fn status_at(&self, l: &License, t: i64) -> Option<Status> {
        let s = l.status.at(t).copied();
        match s {
            None | Some(Status::Active) if l.expires.at(t).is_some_and(|x| *x <= t) => Some(Status::Expired),
            s => s,
        }
    }

    fn live(&self, l: &License, t: i64) -> bool {
        l.first_event <= t && !matches!(self.status_at(l, t), Some(Status::Revoked | Status::Expired))
    }

    /// Used and limit of resource `r` (0 seats, 1 domains, 2 machines) of license `id` as of `at`.
    pub fn resource(&self, id: u32, r: usize, at: i64) -> ResourceUse {
        let l = &self.licenses[id as usize];
        let reported = l.usage[2 * r + 1].at(at).copied();
        let limit = reported.or_else(|| {
            let plan = l.dims[Dim::Plan as usize].at(at)?;
            let p = self.catalog.get(plan)?;
            [p.seats, p.domains, p.machines][r]
        });
        let used = match l.usage[2 * r].at(at) {
            Some(u) => *u,
            None => super::active_at(&l.activations[r], Some(self.active_now[id as usize][r]), at),
        };
        ResourceUse {
            used,
            limit,
            reported_limit: reported.is_some(),
        }
    }

    /// The largest used/limit over resources with a known limit > 0.
    pub fn utilization(&self, id: u32, at: i64) -> Option<f64> {
        let l = &self.licenses[id as usize];
        (0..3)
            .filter_map(|r| {
                // The limit first: without one, the (costlier) use is not needed.
                self.limit_of(l, r, at).filter(|&x| x > 0)?;
                let u = self.resource(id, r, at);
                u.limit.filter(|&x| x > 0).map(|lim| u.used as f64 / lim as f64)
            })
            .reduce(f64::max)
    }

    fn limit_of(&self, l: &License, r: usize, at: i64) -> Option<u64> {
        l.usage[2 * r + 1].at(at).copied().or_else(|| {
            let plan = l.dims[Dim::Plan as usize].at(at)?;
            let p = self.catalog.get(plan)?;
            [p.seats, p.domains, p.machines][r]
        })
    }

    fn cells_between(
        &self,
        id: u32,
        first_day: i32,
        last_day: i32,
    ) -> impl DoubleEndedIterator<Item = (&(i32, u32), &Cell)> {
        self.cells[id as usize].range((first_day, 0)..=(last_day, u32::MAX))
    }

    /// Events of one kind (picked from cells) with time in `(a, b]`.
    fn count_between(&self, id: u32, a: i64, b: i64, pick: fn(&Cell) -> &Vec<i64>) -> u64 {
        self.counts_between(id, a, b, [pick])[0]
    }

    /// Events of several kinds with time in `(a, b]`, in one pass over the cells. A cell of a
    /// day strictly between the ends counts whole; only the two end days need a search.
    fn counts_between<const N: usize>(&self, id: u32, a: i64, b: i64, picks: [fn(&Cell) -> &Vec<i64>; N]) -> [u64; N] {
        let (da, db) = (day_of(a), day_of(b));
        let mut out = [0u64; N];
        for (&(d, _), c) in self.cells_between(id, da, db) {
            let whole = d > da && d < db;
            for (o, pick) in out.iter_mut().zip(picks) {
                let v = pick(c);
                *o += if whole {
                    v.len() as u64
                } else {
                    count_in(std::iter::once(v.as_slice()), a, b)
                };
            }
        }
        out
    }

    fn last_valid_validation(&self, id: u32, at: i64) -> Option<i64> {
        let mut best: Option<i64> = None;
        for ((day, _), cell) in self.cells[id as usize].range(..=(day_of(at), u32::MAX)).rev() {
            if best.is_some_and(|b| day_of(b) > *day) {
                break;
            }
            let idx = cell.valid.partition_point(|x| *x <= at);
            if idx > 0 {
                best = best.max(Some(cell.valid[idx - 1]));
            }
        }
        best
    }

    fn health(&self, id: u32, at: i64) -> Health {
        let l = &self.licenses[id as usize];
        let mut score = 100;
        let mut reasons = Vec::new();
        let last = self
            .last_valid_validation(id, at)
            .or(l.issued_at.filter(|&t| t <= at))
            .unwrap_or(l.first_event);
        let days = (at - last).div_euclid(DAY);
        if days > 7 {
            score -= 20;
            reasons.push("inactive_7d");
        }
        if days > 30 {
            score -= 30;
            reasons.push("inactive_30d");
        }
        let d = self.resource(id, 1, at);
        if let Some(limit) = d.limit.filter(|&x| x > 0) {
            if (d.used as f64 / limit as f64) < 0.2 {
                score -= 15;
                reasons.push("low_domain_utilization");
            }
        }
        let this_week = self.count_between(id, at - 7 * DAY, at, |c| &c.valid);
        let last_week = self.count_between(id, at - 14 * DAY, at - 7 * DAY, |c| &c.valid);
        if last_week > 0 && (this_week as f64 / last_week as f64) < 0.5 {
            score -= 20;
            reasons.push("validation_decline");
        }
        if l.support_open.at(at) == Some(&true) {
            score -= 10;
            reasons.push("open_support_ticket");
        }
        if l.payment_failed.at(at) == Some(&true) {
            score -= 25;
            reasons.push("payment_failed");
        }
        Health {
            score: score.max(0),
            reasons,
        }
    }

    fn signals(&self, id: u32, at: i64) -> Vec<&'static str> {
        let from = at - 30 * DAY;
        let util = self.utilization(id, at);
        let mut t = Vec::new();
        if util.is_some_and(|u| u >= 0.8) {
            t.push("limit_approaching");
        }
        let [limit_exceeded, rate_limited, denied] = self.counts_between(
            id,
            from,
            at,
            [|c| &c.limit_exceeded, |c| &c.rate_limited, |c| &c.denied],
        );
        if util.is_some_and(|u| u > 1.0) || limit_exceeded > 0 {
            t.push("over_limit");
        }
        if rate_limited > 10 {
            t.push("rate_limited_frequent");
        }
        if denied > 3 {
            t.push("feature_interest");
        }
        t
    }

    /// Licenses in name order.
    fn in_order(&self) -> impl Iterator<Item = (u32, &License)> {
        self.by_name.values().map(|&id| (id, &self.licenses[id as usize]))
    }

    /// `f` of every live license as of `at` that it answers for, in name order, spread over
    /// threads (see [`Parallel`]).
    fn per_live_license<'a, T: Send>(&'a self, at: i64, f: impl Fn(u32, &'a License) -> Option<T> + Sync) -> Vec<T> {
        let order: Vec<u32> = self.by_name.values().copied().collect();
        self.parallel
            .map_blocks(order.len(), |r| {
                order[r]
                    .iter()
                    .map(|&id| (id, &self.licenses[id as usize]))
                    .filter(|(_, l)| self.live(l, at))
                    .filter_map(|(id, l)| f(id, l))
                    .collect::<Vec<T>>()
            })
            .into_iter()
            .flatten()
            .collect()
    }

    /// Answers a metric. Parameters are already validated by the caller.
    pub fn query(&self, q: &MetricQuery) -> Result<Vec<Row>, QueryError> {
        if q.by.is_some() && !q.metric.takes_by() {
            return Err(QueryError::ByNotAccepted(q.metric.name()));
        }
        let start = day_start(q.from_day);
        let end = day_start(q.to_day.saturating_add(1));
        Ok(match q.metric {
            Metric::ActivationRate => self.activation_rate(q, start, end),
            Metric::TimeToFirstValidation => self.time_to_first_validation(q, start, end),
            Metric::DailyActiveValidations | Metric::ValidationFailures => self.day_series(q, end),
            Metric::Geo => self.geo(q, end),
            Metric::FeatureUsage => self.feature_usage(q, end),
            Metric::ActiveUsers => self.active_users(q, end),
            Metric::Utilization => self.utilization_rows(q),
            Metric::RenewalRate => self.renewal_rate(q, start, end),
            Metric::TimeToUpgrade => self.time_to_upgrade(q, start, end),
            Metric::TimeToExpiration => self.time_to_expiration(q),
            Metric::Health => self.health_rows(q.at),
            Metric::ChurnRisk => self.churn_risk(q.at, q.below),
            Metric::UpgradeSignals => self.upgrade_signals(q.at),
            Metric::Mrr => self.mrr(q),
        })
    }

    /// Rows of a one-row-per-group metric: without `by` exactly one row (the "" group, made
    /// with `empty` when nothing counted); with `by` one row per group that counted.
    fn group_rows<A>(by: Option<Dim>, mut groups: BTreeMap<&str, A>, empty: A, f: impl Fn(Row, &A) -> Row) -> Vec<Row> {
        match by {
            None => {
                let a = groups.remove("").unwrap_or(empty);
                vec![f(Row::default(), &a)]
            }
            Some(d) => groups
                .iter()
                .map(|(g, a)| f(Row::default().with(d.as_str(), *g), a))
                .collect(),
        }
    }

    fn activation_rate(&self, q: &MetricQuery, start: i64, end: i64) -> Vec<Row> {
        let mut groups: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        for (_, l) in self.in_order() {
            let Some(issued) = l.issued_at.filter(|t| (start..end).contains(t)) else {
                continue;
            };
            let a = groups.entry(self.license_group(l, q.by, end)).or_default();
            a[0] += 1;
            if let Some(act) = l.first_activation.filter(|&t| t <= q.at) {
                a[1] += 1;
                if (act - issued).max(0) <= 7 * DAY {
                    a[2] += 1;
                }
            }
        }
        Self::group_rows(q.by, groups, [0; 3], |r, a| {
            r.with("issued", a[0])
                .with("activated", a[1])
                .with("activated_7d", a[2])
                .with("rate", ratio(a[1] as f64, a[0] as f64))
                .with("rate_7d", ratio(a[2] as f64, a[0] as f64))
        })
    }

    fn time_to_first_validation(&self, q: &MetricQuery, start: i64, end: i64) -> Vec<Row> {
        #[derive(Default)]
        struct A {
            issued: u64,
            buckets: [u64; 5],
            values: Vec<i64>,
        }
        let mut groups: BTreeMap<&str, A> = BTreeMap::new();
        for (_, l) in self.in_order() {
            let Some(issued) = l.issued_at.filter(|t| (start..end).contains(t)) else {
                continue;
            };
            let a = groups.entry(self.license_group(l, q.by, end)).or_default();
            a.issued += 1;
            match l.first_valid_validation.filter(|&t| t <= q.at) {
                None => a.buckets[4] += 1,
                Some(v) => {
                    let d = (v - issued).max(0);
                    let b = if d < 3600 * NANOS_PER_SEC {
                        0
                    } else if d < DAY {
                        1
                    } else if d < 7 * DAY {
                        2
                    } else {
                        3
                    };
                    a.buckets[b] += 1;
                    a.values.push(d);
                }
            }
        }
        Self::group_rows(q.by, groups, A::default(), |r, a| {
            let (p50, p90) = percentiles(&mut a.values.clone());
            r.with("issued", a.issued)
                .with("under_1h", a.buckets[0])
                .with("from_1h_to_24h", a.buckets[1])
                .with("from_1d_to_7d", a.buckets[2])
                .with("over_7d", a.buckets[3])
                .with("never", a.buckets[4])
                .with("p50_seconds", p50)
                .with("p90_seconds", p90)
        })
    }

    /// Interned group ids for one query: per license (its latest value up to `end`) and per
    /// variant (the events' own value, if they have one). Without `by`, one group `""`.
    fn groups(&self, by: Option<Dim>, end: i64) -> EventGroups<'_> {
        let mut g = Interner::default();
        let Some(d) = by else {
            g.id("");
            return EventGroups {
                names: g.names,
                license: vec![0; self.licenses.len()],
                variant: vec![Some(0); self.variants.len()],
            };
        };
        let license = self.licenses.iter().map(|l| g.id(self.dim_at(l, d, end))).collect();
        let variant = self
            .variants
            .iter()
            .map(|v| v.0[d as usize].as_deref().map(|x| g.id(x)))
            .collect();
        EventGroups {
            names: g.names,
            license,
            variant,
        }
    }

    /// `daily-active-validations` and `validation-failures`.
    fn day_series(&self, q: &MetricQuery, end: i64) -> Vec<Row> {
        let groups = self.groups(q.by, end);
        let ng = groups.names.len();
        let days = (q.to_day - q.from_day + 1) as usize;
        // Per thread: results and active licenses per (day, group) slot, and the license that
        // last counted in each slot (a license is wholly in one thread's blocks).
        let parts = self.parallel.within(days * ng * (12 * 8 + 8 + 4)).fold(
            self.licenses.len(),
            || {
                (
                    vec![[0u64; 12]; days * ng],
                    vec![0u64; days * ng],
                    vec![u32::MAX; days * ng],
                )
            },
            |(results, active, marked), ids| {
                for id in ids.start as u32..ids.end as u32 {
                    for (&(day, variant), cell) in self.cells_between(id, q.from_day, q.to_day) {
                        if cell.results.iter().all(|n| *n == 0) {
                            continue;
                        }
                        let slot = (day - q.from_day) as usize * ng + groups.of(id, variant) as usize;
                        for (x, y) in results[slot].iter_mut().zip(cell.results) {
                            *x += y as u64;
                        }
                        if cell.results[VALID] > 0 && marked[slot] != id {
                            marked[slot] = id;
                            active[slot] += 1;
                        }
                    }
                }
            },
        );
        let mut parts = parts.into_iter();
        let (mut results, mut active, _) = parts.next().expect("fold gives one part at least");
        for (r, a, _) in parts {
            for (x, y) in results.iter_mut().zip(r) {
                for (x, y) in x.iter_mut().zip(y) {
                    *x += y;
                }
            }
            for (x, y) in active.iter_mut().zip(a) {
                *x += y;
            }
        }
        let mut rows = Vec::new();
        for (day_index, day) in (q.from_day..=q.to_day).enumerate() {
            for g in groups.order() {
                let slot = day_index * ng + g;
                let r = &results[slot];
                let validations: u64 = r.iter().sum();
                if q.by.is_some() && validations == 0 {
                    continue;
                }
                let mut row = Row::default().with("day", format_date(day_start(day)));
                if let Some(d) = q.by {
                    row = row.with(d.as_str(), groups.names[g]);
                }
                if q.metric == Metric::DailyActiveValidations {
                    rows.push(
                        row.with("active_licenses", active[slot])
                            .with("validations", validations),
                    );
                    continue;
                }
                let failed = validations - r[VALID];
                let mut seen: Vec<(&str, u64)> = ResultCode::ALL
                    .iter()
                    .zip(r)
                    .skip(1)
                    .filter(|(_, n)| **n > 0)
                    .map(|(c, n)| (c.as_str(), *n))
                    .collect();
                seen.sort_unstable();
                let by_result: serde_json::Map<String, Value> =
                    seen.into_iter().map(|(c, n)| (c.to_string(), json!(n))).collect();
                rows.push(
                    row.with("validations", validations)
                        .with("failed", failed)
                        .with("failure_rate", ratio(failed as f64, validations as f64))
                        .with("by_result", Value::Object(by_result)),
                );
            }
        }
        rows
    }

    fn geo(&self, q: &MetricQuery, end: i64) -> Vec<Row> {
        let groups = self.groups(q.by, end);
        let countries = self.groups(Some(Dim::Country), end);
        let (ng, nc) = (groups.names.len(), countries.names.len());
        // Per thread, as in `day_series`.
        let parts = self.parallel.within(nc * ng * (3 * 8 + 4)).fold(
            self.licenses.len(),
            || (vec![[0u64; 3]; nc * ng], vec![u32::MAX; nc * ng]),
            |(acc, marked), ids| {
                for id in ids.start as u32..ids.end as u32 {
                    for (&(_, variant), cell) in self.cells_between(id, q.from_day, q.to_day) {
                        let validations: u32 = cell.results.iter().sum();
                        if validations == 0 {
                            continue;
                        }
                        let slot = countries.of(id, variant) as usize * ng + groups.of(id, variant) as usize;
                        let a = &mut acc[slot];
                        a[0] += validations as u64;
                        a[1] += (validations - cell.results[VALID]) as u64;
                        if cell.results[VALID] > 0 && marked[slot] != id {
                            marked[slot] = id;
                            a[2] += 1;
                        }
                    }
                }
            },
        );
        let mut parts = parts.into_iter();
        let (mut acc, _) = parts.next().expect("fold gives one part at least");
        for (other, _) in parts {
            for (x, y) in acc.iter_mut().zip(other) {
                for (x, y) in x.iter_mut().zip(y) {
                    *x += y;
                }
            }
        }
        let mut rows = Vec::new();
        for c in countries.order() {
            for g in groups.order() {
                let a = &acc[c * ng + g];
                if a[0] == 0 {
                    continue;
                }
                let mut r = Row::default().with("country", countries.names[c]);
                // by=country groups by the row's own key: the column is printed once.
                if let Some(d) = q.by.filter(|&d| d != Dim::Country) {
                    r = r.with(d.as_str(), groups.names[g]);
                }
                rows.push(
                    r.with("validations", a[0])
                        .with("failed", a[1])
                        .with("active_licenses", a[2]),
                );
            }
        }
        rows
    }

    fn feature_usage(&self, q: &MetricQuery, end: i64) -> Vec<Row> {
        let groups = self.groups(q.by, end);
        let ng = groups.names.len();
        // Per thread: features interned, and per feature id: per group [checks, granted,
        // denied, licenses], and the license that last counted in the slot.
        let parts = self.parallel.fold(
            self.licenses.len(),
            || (Interner::default(), Vec::<Vec<([u64; 4], u32)>>::new()),
            |(features, acc), ids| {
                for id in ids.start as u32..ids.end as u32 {
                    for (&(_, variant), cell) in self.cells_between(id, q.from_day, q.to_day) {
                        let g = groups.of(id, variant) as usize;
                        for (f, c) in &cell.features {
                            let fid = features.id(f) as usize;
                            if fid == acc.len() {
                                acc.push(vec![([0; 4], u32::MAX); ng]);
                            }
                            let (a, last) = &mut acc[fid][g];
                            for i in 0..3 {
                                a[i] += c[i] as u64;
                            }
                            if *last != id {
                                *last = id;
                                a[3] += 1;
                            }
                        }
                    }
                }
            },
        );
        let mut parts = parts.into_iter();
        let (mut features, mut acc) = parts.next().expect("fold gives one part at least");
        for (names, other) in parts {
            for (name, per_group) in names.names.into_iter().zip(other) {
                let fid = features.id(name) as usize;
                if fid == acc.len() {
                    acc.push(per_group);
                    continue;
                }
                for ((a, _), (b, _)) in acc[fid].iter_mut().zip(per_group) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..features.names.len()).collect();
        order.sort_by_key(|&f| features.names[f]);
        let mut rows = Vec::new();
        for f in order {
            for g in groups.order() {
                let (a, _) = &acc[f][g];
                if a[0] == 0 {
                    continue;
                }
                let mut r = Row::default().with("feature", features.names[f]);
                if let Some(d) = q.by {
                    r = r.with(d.as_str(), groups.names[g]);
                }
                rows.push(
                    r.with("checks", a[0])
                        .with("granted", a[1])
                        .with("denied", a[2])
                        .with("licenses", a[3]),
                );
            }
        }
        rows
    }

    fn active_users(&self, q: &MetricQuery, end: i64) -> Vec<Row> {
        // Per thread: the groups, and per user id the license that last counted it (distinct
        // users per license without sorting).
        let parts = self.parallel.within(self.user_count() * 4).fold(
            self.licenses.len(),
            || (BTreeMap::<&str, [u64; 2]>::new(), vec![u32::MAX; self.user_count()]),
            |(groups, counted_for), ids| {
                for id in ids.start as u32..ids.end as u32 {
                    let mut users = 0u64;
                    for (_, c) in self.cells_between(id, q.from_day, q.to_day) {
                        for &u in &c.users {
                            if counted_for[u as usize] != id {
                                counted_for[u as usize] = id;
                                users += 1;
                            }
                        }
                    }
                    if users == 0 {
                        continue;
                    }
                    let l = &self.licenses[id as usize];
                    let a = groups.entry(self.license_group(l, q.by, end)).or_default();
                    a[0] += 1;
                    a[1] += users;
                }
            },
        );
        let mut groups: BTreeMap<&str, [u64; 2]> = BTreeMap::new();
        for (part, _) in parts {
            for (g, b) in part {
                let a = groups.entry(g).or_default();
                a[0] += b[0];
                a[1] += b[1];
            }
        }
        Self::group_rows(q.by, groups, [0; 2], |r, a| {
            r.with("licenses", a[0])
                .with("users", a[1])
                .with("mean_users_per_license", ratio(a[1] as f64, a[0] as f64))
        })
    }

    fn utilization_rows(&self, q: &MetricQuery) -> Vec<Row> {
        #[derive(Default)]
        struct A {
            n: u64,
            sum: f64,
            c: [u64; 3],
        }
        let mut groups: BTreeMap<&str, A> = BTreeMap::new();
        // The sums in name order, whatever the threads: the answer does not depend on them.
        let each = self.per_live_license(q.at, |id, l| {
            let u = self.utilization(id, q.at)?;
            Some((self.license_group(l, q.by, q.at), u))
        });
        for (group, u) in each {
            let a = groups.entry(group).or_default();
            a.n += 1;
            a.sum += u;
            a.c[0] += u64::from(u >= 0.8);
            a.c[1] += u64::from(u >= 0.9);
            a.c[2] += u64::from(u > 1.0);
        }
        Self::group_rows(q.by, groups, A::default(), |r, a| {
            r.with("licenses", a.n)
                .with("mean_utilization", ratio(a.sum, a.n as f64))
                .with("at_or_above_80", a.c[0])
                .with("at_or_above_90", a.c[1])
                .with("over_limit", a.c[2])
        })
    }

    fn renewal_rate(&self, q: &MetricQuery, start: i64, end: i64) -> Vec<Row> {
        let mut groups: BTreeMap<&str, [u64; 2]> = BTreeMap::new();
        for (_, l) in self.in_order() {
            let Some(last) = l.renewals.iter().rev().find(|r| (start..end).contains(&r.0)) else {
                continue;
            };
            let a = groups.entry(self.license_group(l, q.by, end)).or_default();
            a[usize::from(!last.2)] += 1;
        }
        Self::group_rows(q.by, groups, [0; 2], |r, a| {
            r.with("renewed", a[0])
                .with("expired", a[1])
                .with("rate", ratio(a[0] as f64, (a[0] + a[1]) as f64))
        })
    }

    fn time_to_upgrade(&self, q: &MetricQuery, start: i64, end: i64) -> Vec<Row> {
        let mut groups: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (_, l) in self.in_order() {
            let (Some(up), Some(issued)) = (l.first_upgrade, l.issued_at) else {
                continue;
            };
            if !(start..end).contains(&up) {
                continue;
            }
            groups
                .entry(self.license_group(l, q.by, end))
                .or_default()
                .push((up - issued).max(0));
        }
        Self::group_rows(q.by, groups, Vec::new(), |r, a| {
            let (p50, p90) = percentiles(&mut a.clone());
            r.with("upgrades", a.len() as u64)
                .with("p50_seconds", p50)
                .with("p90_seconds", p90)
        })
    }

    fn time_to_expiration(&self, q: &MetricQuery) -> Vec<Row> {
        let mut groups: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
        for (_, l) in self.in_order() {
            if l.first_event > q.at || self.status_at(l, q.at) == Some(Status::Revoked) {
                continue;
            }
            let Some(&expires) = l.expires.at(q.at) else { continue };
            let rem = expires - q.at;
            let b = if rem <= 0 {
                0
            } else if rem < 7 * DAY {
                1
            } else if rem < 30 * DAY {
                2
            } else if rem < 90 * DAY {
                3
            } else {
                4
            };
            groups.entry(self.license_group(l, q.by, q.at)).or_default()[b] += 1;
        }
        Self::group_rows(q.by, groups, [0; 5], |r, a| {
            r.with("expired", a[0])
                .with("under_7d", a[1])
                .with("from_7d_to_30d", a[2])
                .with("from_30d_to_90d", a[3])
                .with("over_90d", a[4])
        })
    }

    fn health_rows(&self, at: i64) -> Vec<Row> {
        self.per_live_license(at, |id, l| {
            let h = self.health(id, at);
            Some(
                Row::default()
                    .with("license", l.name.as_str())
                    .with("score", h.score)
                    .with("reasons", json!(h.reasons)),
            )
        })
    }

    fn churn_risk(&self, at: i64, below: f64) -> Vec<Row> {
        let mut rows: Vec<(i64, Row)> = self.per_live_license(at, |id, l| {
            let h = self.health(id, at);
            ((h.score as f64) < below).then(|| {
                let r = Row::default()
                    .with("license", l.name.as_str())
                    .with("score", h.score)
                    .with("reasons", json!(h.reasons));
                (h.score, r)
            })
        });
        // Stable: licenses are already in name order within a score.
        rows.sort_by_key(|(s, _)| *s);
        rows.into_iter().map(|(_, r)| r).collect()
    }

    fn upgrade_signals(&self, at: i64) -> Vec<Row> {
        let mut rows: Vec<(usize, Row)> = self.per_live_license(at, |id, l| {
            let t = self.signals(id, at);
            (!t.is_empty()).then(|| {
                let n = t.len();
                let r = Row::default()
                    .with("license", l.name.as_str())
                    .with("triggers", json!(t))
                    .with("pipeline", n >= 2);
                (n, r)
            })
        });
        rows.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        rows.into_iter().map(|(_, r)| r).collect()
    }

    fn mrr(&self, q: &MetricQuery) -> Vec<Row> {
        #[derive(Default, Clone)]
        struct A {
            active: u64,
            mrr: f64,
            unpriced: u64,
        }
        let (y0, m0) = civil_from_days(q.from_day);
        let (y1, m1) = civil_from_days(q.to_day);
        let mut rows = Vec::new();
        let mut previous: Option<BTreeMap<&str, A>> = None;
        let (mut y, mut m) = (y0, m0);
        while (y, m) <= (y1, m1) {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let e = day_start(days_from_civil(ny, nm)).min(q.at);
            let mut groups: BTreeMap<&str, A> = BTreeMap::new();
            for (_, l) in self.in_order() {
                if l.first_event > e || self.status_at(l, e) != Some(Status::Active) {
                    continue;
                }
                let price = l.dims[Dim::Plan as usize]
                    .at(e)
                    .and_then(|p| self.catalog.get(p))
                    .and_then(|p| p.price_monthly);
                let a = groups.entry(self.license_group(l, q.by, e)).or_default();
                a.active += 1;
                match price {
                    Some(p) => a.mrr += p,
                    None => a.unpriced += 1,
                }
            }
            if q.by.is_none() {
                groups.entry("").or_default();
            }
            for (g, a) in &groups {
                let mut r = Row::default().with("month", format!("{y:04}-{m:02}"));
                if let Some(d) = q.by {
                    r = r.with(d.as_str(), *g);
                }
                let change = match &previous {
                    None => Value::Null,
                    Some(p) => num_value(a.mrr - p.get(g).map_or(0.0, |x| x.mrr)),
                };
                rows.push(
                    r.with("active_licenses", a.active)
                        .with("mrr", num_value(a.mrr))
                        .with("unpriced_licenses", a.unpriced)
                        .with("change", change),
                );
            }
            previous = Some(groups);
            (y, m) = (ny, nm);
        }
        rows
    }

    /// `GET /v1/licenses/<license>`: everything known about one license as of `at`.
    pub fn license_detail(&self, name: &str, at: i64) -> Option<Value> {
        let &id = self.by_name.get(name)?;
        let l = &self.licenses[id as usize];
        let t = |x: Option<i64>| x.filter(|&x| x <= at).map(format_rfc3339);
        let exists = l.first_event <= at;
        let live = self.live(l, at);
        let attributes: serde_json::Map<String, Value> = Dim::ALL
            .iter()
            .map(|d| (d.as_str().to_string(), json!(l.dims[*d as usize].at(at))))
            .collect();
        let resources: Vec<Value> = (0..3)
            .map(|r| {
                let u = self.resource(id, r, at);
                json!({
                    "resource": RESOURCES[r],
                    "used": u.used,
                    "limit": u.limit,
                    "limit_source": u.limit.map(|_| if u.reported_limit { "reported" } else { "plan" }),
                    "utilization": u.limit.filter(|&x| x > 0).map(|x| u.used as f64 / x as f64),
                })
            })
            .collect();
        let health = (exists && live).then(|| {
            let h = self.health(id, at);
            json!({"score": h.score, "reasons": h.reasons})
        });
        let status_history: Vec<Value> = l
            .status
            .points_until(at)
            .map(|(time, s)| json!({"time": format_rfc3339(time), "status": Status::as_str(Some(*s))}))
            .collect();
        let renewals: Vec<Value> = l
            .renewals
            .iter()
            .filter(|r| r.0 <= at)
            .map(|r| json!({"time": format_rfc3339(r.0), "type": if r.2 { "license.renewed" } else { "license.expired" }}))
            .collect();
        let counts: serde_json::Map<String, Value> = keytrail_common::event::EventType::ALL
            .iter()
            .zip(&l.event_counts)
            .filter(|(_, n)| **n > 0)
            .map(|(ty, n)| (ty.as_str().to_string(), json!(n)))
            .collect();
        Some(json!({
            "license": l.name,
            "at": format_rfc3339(at),
            "exists_at": exists,
            "status": Status::as_str(self.status_at(l, at)),
            "live": live,
            "attributes": attributes,
            "expires_at": l.expires.at(at).map(|x| format_rfc3339(*x)),
            "timeline": {
                "first_seen": t(Some(l.first_event)),
                "issued_at": t(l.issued_at),
                "first_activation": t(l.first_activation),
                "first_valid_validation": t(l.first_valid_validation),
                "last_valid_validation": self.last_valid_validation(id, at).map(format_rfc3339),
                "first_upgrade": t(l.first_upgrade),
                "status_changes": status_history,
                "renewals": renewals,
                "support_ticket_open": l.support_open.at(at).copied().unwrap_or(false),
                "last_payment_failed": l.payment_failed.at(at).copied().unwrap_or(false),
            },
            "resources": resources,
            "utilization": if exists { self.utilization(id, at) } else { None },
            "health": health,
            "signals": if exists && live { self.signals(id, at) } else { Vec::new() },
            "events_stored_by_type": counts,
        }))
    }
}
