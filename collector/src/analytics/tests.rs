//! Hand-built event sets whose answers are worked out from `spec/metrics.md` by hand, one per
//! metric and edge case. The generated-traffic comparison against a plain reference
//! computation lives in `collector/tests/metrics_reference.rs`.

use super::query::days_from_civil;
use super::*;
use crate::analytics::{Dim, Metric, MetricQuery};
use keytrail_common::event::{EventType as T, ResultCode as R};
use keytrail_common::time::NANOS_PER_SEC;
use serde_json::{json, Value};

const D: i64 = NANOS_PER_DAY;
const H: i64 = 3600 * NANOS_PER_SEC;

/// Day number of 2026-11-01, the first day of every test.
fn day0() -> i32 {
    days_from_civil(2026, 11)
}

/// The instant `days` days (and `hours` hours) after 2026-11-01 00:00 UTC.
fn at(days: i64, hours: i64) -> i64 {
    day0() as i64 * D + days * D + hours * H
}

struct Builder {
    a: Analytics,
    seq: u64,
    applied: Vec<(u64, Event)>,
}

/// The events applied so far, as the store's raw events would answer.
struct Applied<'a>(&'a [(u64, Event)]);

impl History for Applied<'_> {
    fn next_after(&self, license: &str, after: i64, carries: &dyn Fn(&Event) -> bool) -> Option<(u64, Event)> {
        self.0
            .iter()
            .filter(|(_, e)| e.license.as_deref() == Some(license) && e.time > after && carries(e))
            .min_by_key(|(s, e)| (e.time, *s))
            .cloned()
    }
}

impl Builder {
    fn new() -> Builder {
        let mut plans = BTreeMap::new();
        plans.insert(
            "pro".to_string(),
            Plan {
                price_monthly: Some(49.0),
                seats: Some(10),
                domains: Some(5),
                machines: None,
            },
        );
        plans.insert(
            "team".to_string(),
            Plan {
                price_monthly: Some(99.5),
                seats: Some(0),
                domains: None,
                machines: None,
            },
        );
        plans.insert("free".to_string(), Plan::default());
        Builder {
            a: Analytics::new(plans),
            seq: 0,
            applied: Vec::new(),
        }
    }

    fn add(&mut self, ty: T, license: &str, time: i64, f: impl FnOnce(&mut Event)) -> &mut Self {
        let mut e = Event::new(format!("e{}", self.seq), ty, time, "agent");
        e.license = Some(license.to_string());
        f(&mut e);
        self.a.apply(&e, self.seq, &Applied(&self.applied));
        self.applied.push((self.seq, e));
        self.seq += 1;
        self
    }

    fn ev(&mut self, ty: T, license: &str, time: i64) -> &mut Self {
        self.add(ty, license, time, |_| {})
    }

    fn rows(&self, metric: Metric, from: i64, to: i64, at: i64, by: Option<Dim>) -> Vec<Value> {
        let q = MetricQuery {
            metric,
            from_day: day0() + from as i32,
            to_day: day0() + to as i32,
            at,
            by,
            below: 50.0,
        };
        self.a.query(&q).unwrap().iter().map(Row::to_value).collect()
    }
}

fn plan(p: &str) -> impl FnOnce(&mut Event) + '_ {
    move |e| e.plan = Some(p.into())
}

#[test]
fn activation_rate_cohort_and_at_bound() {
    let mut b = Builder::new();
    b.add(T::Issued, "l1", at(0, 0), plan("pro"))
        .ev(T::Activated, "l1", at(3, 0))
        // l2: activated by its first valid validation, 10 days after issue.
        .add(T::Issued, "l2", at(0, 1), plan("team"))
        .add(T::Validated, "l2", at(2, 0), |e| e.result = R::Expired)
        .ev(T::Validated, "l2", at(10, 0))
        // after the window: the license's plan at the end instant is still "team"
        .add(T::Validated, "l2", at(40, 0), plan("pro"))
        // l3: activated before it was issued: counts as 0 days.
        .ev(T::Activated, "l3", at(-2, 0))
        .ev(T::Issued, "l3", at(1, 0))
        // l4: only refused attempts.
        .ev(T::Issued, "l4", at(2, 0))
        .add(T::Activated, "l4", at(2, 1), |e| e.result = R::LimitExceeded)
        // l5: no issued event: not in the cohort; l6: issued after the window.
        .ev(T::Validated, "l5", at(1, 0))
        .ev(T::Issued, "l6", at(7, 0));
    let r = b.rows(Metric::ActivationRate, 0, 6, at(30, 0), None);
    assert_eq!(
        r,
        vec![json!({"issued": 4, "activated": 3, "activated_7d": 2, "rate": 0.75, "rate_7d": 0.5})]
    );
    // As of day 5, l2's activation on day 10 has not happened yet.
    let r = b.rows(Metric::ActivationRate, 0, 6, at(5, 0), None);
    assert_eq!(r[0]["activated"], 2);
    // Exactly 7 days after issue still counts for activated_7d.
    let mut b2 = Builder::new();
    b2.ev(T::Issued, "x", at(0, 0)).ev(T::Validated, "x", at(7, 0));
    assert_eq!(
        b2.rows(Metric::ActivationRate, 0, 0, at(9, 0), None)[0]["activated_7d"],
        1
    );
    let r = b.rows(Metric::ActivationRate, 0, 6, at(30, 0), Some(Dim::Plan));
    assert_eq!(
        r,
        vec![
            json!({"plan": "pro", "issued": 1, "activated": 1, "activated_7d": 1, "rate": 1.0, "rate_7d": 1.0}),
            json!({"plan": "team", "issued": 1, "activated": 1, "activated_7d": 0, "rate": 1.0, "rate_7d": 0.0}),
            json!({"plan": "unknown", "issued": 2, "activated": 1, "activated_7d": 1, "rate": 0.5, "rate_7d": 0.5}),
        ]
    );
    // Zero denominator: null rates, one row.
    let r = b.rows(Metric::ActivationRate, 20, 25, at(30, 0), None);
    assert_eq!(
        r,
        vec![json!({"issued": 0, "activated": 0, "activated_7d": 0, "rate": null, "rate_7d": null})]
    );
    assert!(b
        .rows(Metric::ActivationRate, 20, 25, at(30, 0), Some(Dim::Plan))
        .is_empty());
}

#[test]
fn daily_series_count_every_day_and_group_events_by_their_own_value() {
    let mut b = Builder::new();
    // Inserted out of order: the late event lands on its own day.
    b.add(T::Validated, "l1", at(1, 5), |e| e.country = Some("DE".into()))
        .add(T::Validated, "l1", at(1, 6), |e| e.result = R::Expired)
        .add(T::Validated, "l2", at(1, 7), |e| e.result = R::RateLimited)
        .add(T::Validated, "l2", at(1, 8), |e| e.result = R::RateLimited)
        .add(T::Validated, "l1", at(0, 1), |e| e.country = Some("FR".into()))
        .ev(T::Validated, "l1", at(0, 2))
        // no license: counts for nothing
        .add(T::Validated, "", at(0, 3), |e| e.license = None);
    let r = b.rows(Metric::DailyActiveValidations, 0, 2, at(9, 0), None);
    assert_eq!(
        r,
        vec![
            json!({"day": "2026-11-01", "active_licenses": 1, "validations": 2}),
            json!({"day": "2026-11-02", "active_licenses": 1, "validations": 4}),
            json!({"day": "2026-11-03", "active_licenses": 0, "validations": 0}),
        ]
    );
    // by country: l1's latest country up to the end instant is DE (its event on day 1).
    let r = b.rows(Metric::DailyActiveValidations, 0, 2, at(9, 0), Some(Dim::Country));
    assert_eq!(
        r,
        vec![
            json!({"day": "2026-11-01", "country": "DE", "active_licenses": 1, "validations": 1}),
            json!({"day": "2026-11-01", "country": "FR", "active_licenses": 1, "validations": 1}),
            json!({"day": "2026-11-02", "country": "DE", "active_licenses": 1, "validations": 2}),
            json!({"day": "2026-11-02", "country": "unknown", "active_licenses": 0, "validations": 2}),
        ]
    );
    // A window that ends before day 1: l1's latest country is then FR.
    let r = b.rows(Metric::DailyActiveValidations, 0, 0, at(9, 0), Some(Dim::Country));
    assert_eq!(
        r,
        vec![json!({"day": "2026-11-01", "country": "FR", "active_licenses": 1, "validations": 2})]
    );
    let r = b.rows(Metric::ValidationFailures, 1, 2, at(9, 0), None);
    assert_eq!(
        r,
        vec![
            json!({"day": "2026-11-02", "validations": 4, "failed": 3, "failure_rate": 0.75,
                   "by_result": {"expired": 1, "rate_limited": 2}}),
            json!({"day": "2026-11-03", "validations": 0, "failed": 0, "failure_rate": null, "by_result": {}}),
        ]
    );
}

#[test]
fn geo_feature_usage_and_active_users() {
    let mut b = Builder::new();
    b.add(T::Validated, "l1", at(0, 1), |e| {
        e.country = Some("DE".into());
        e.user = Some("ann".into());
    })
    .add(T::Validated, "l1", at(1, 1), |e| {
        e.user = Some("bob".into());
        e.result = R::Suspended; // not valid: bob is not an active user from this
    })
    .add(T::Validated, "l2", at(1, 1), |e| e.country = Some("US".into()))
    .add(T::Validated, "l2", at(1, 2), |e| {
        e.country = Some("DE".into());
        e.result = R::NotFound;
    })
    .add(T::FeatureChecked, "l1", at(1, 3), |e| {
        e.feature = Some("export".into());
        e.user = Some("cat".into());
        e.result = R::FeatureDenied;
    })
    .add(T::FeatureChecked, "l2", at(1, 4), |e| e.feature = Some("export".into()))
    .add(T::FeatureChecked, "l2", at(1, 5), |e| e.feature = Some("export".into()))
    .ev(T::FeatureChecked, "l2", at(1, 6));
    let r = b.rows(Metric::Geo, 0, 1, at(9, 0), None);
    assert_eq!(
        r,
        vec![
            json!({"country": "DE", "validations": 3, "failed": 2, "active_licenses": 1}),
            json!({"country": "US", "validations": 1, "failed": 0, "active_licenses": 1}),
        ]
    );
    // by=country: the country column once, not twice.
    let q = MetricQuery {
        metric: Metric::Geo,
        from_day: day0(),
        to_day: day0() + 1,
        at: at(9, 0),
        by: Some(Dim::Country),
        below: 50.0,
    };
    let keys: Vec<Vec<&str>> =
        b.a.query(&q)
            .unwrap()
            .iter()
            .map(|r| r.0.iter().map(|(k, _)| *k).collect())
            .collect();
    assert_eq!(
        keys,
        vec![vec!["country", "validations", "failed", "active_licenses"]; 2]
    );
    let r = b.rows(Metric::FeatureUsage, 0, 1, at(9, 0), None);
    assert_eq!(
        r,
        vec![
            json!({"feature": "export", "checks": 3, "granted": 2, "denied": 1, "licenses": 2}),
            json!({"feature": "unknown", "checks": 1, "granted": 1, "denied": 0, "licenses": 1}),
        ]
    );
    // l1: ann (valid validation) and cat (feature check, any result); l2: none.
    let r = b.rows(Metric::ActiveUsers, 0, 1, at(9, 0), None);
    assert_eq!(
        r,
        vec![json!({"licenses": 1, "users": 2, "mean_users_per_license": 2.0})]
    );
    let r = b.rows(Metric::ActiveUsers, 5, 6, at(9, 0), None);
    assert_eq!(
        r,
        vec![json!({"licenses": 0, "users": 0, "mean_users_per_license": null})]
    );
}

#[test]
fn utilization_limits_usage_and_activations() {
    let mut b = Builder::new();
    // l1, plan pro (catalog: 10 seats, 5 domains): 2 of 3 activated domains still active,
    // a refused activation does not count; seats reported 9 of 10 → 0.9.
    b.add(T::Issued, "l1", at(0, 0), plan("pro"))
        .add(T::Activated, "l1", at(0, 1), |e| e.domain = Some("a.com".into()))
        .add(T::Activated, "l1", at(0, 2), |e| e.domain = Some("b.com".into()))
        .add(T::Activated, "l1", at(0, 3), |e| e.domain = Some("c.com".into()))
        .add(T::Deactivated, "l1", at(0, 4), |e| e.domain = Some("a.com".into()))
        .add(T::Activated, "l1", at(0, 5), |e| {
            e.domain = Some("d.com".into());
            e.result = R::LimitExceeded;
        })
        .add(T::Validated, "l1", at(1, 0), |e| e.usage.seats_used = Some(9))
        // l2: reported machine limit wins; 3 of 2 machines → 1.5.
        .add(T::Issued, "l2", at(0, 0), plan("free"))
        .add(T::Validated, "l2", at(1, 0), |e| {
            e.usage.machines_used = Some(3);
            e.usage.machines_limit = Some(2);
        })
        // l3: plan team has seats = 0: skipped, no other limit: left out.
        .add(T::Issued, "l3", at(0, 0), plan("team"))
        // l4: revoked: not live.
        .add(T::Validated, "l4", at(1, 0), |e| {
            e.usage.seats_used = Some(5);
            e.usage.seats_limit = Some(5);
        })
        .ev(T::Revoked, "l4", at(2, 0));
    let r = b.rows(Metric::Utilization, 0, 0, at(5, 0), None);
    // mean over l1 (0.9) and l2 (1.5), in license order.
    assert_eq!(
        r,
        vec![
            json!({"licenses": 2, "mean_utilization": (0.9 + 1.5) / 2.0, "at_or_above_80": 2,
                    "at_or_above_90": 2, "over_limit": 1})
        ]
    );
    // As of day 1 noon... before l4's revocation it is live and at 1.0.
    let r = b.rows(Metric::Utilization, 0, 0, at(1, 12), None);
    assert_eq!(r[0]["licenses"], 3);
    // Before l1's seat report: domains 2/5 = 0.4.
    let r = b.rows(Metric::Utilization, 0, 0, at(0, 6), Some(Dim::Plan));
    assert_eq!(
        r,
        vec![
            json!({"plan": "pro", "licenses": 1, "mean_utilization": 0.4, "at_or_above_80": 0,
                    "at_or_above_90": 0, "over_limit": 0})
        ]
    );
}

#[test]
fn time_to_first_validation_buckets_and_percentiles() {
    let mut b = Builder::new();
    let delays = [0, H / 2, 2 * H, 30 * H, 8 * D];
    for (i, d) in delays.iter().enumerate() {
        let l = format!("l{i}");
        b.ev(T::Issued, &l, at(0, 0)).ev(T::Validated, &l, at(0, 0) + d);
    }
    b.ev(T::Issued, "never", at(0, 0))
        .add(T::Validated, "never", at(0, 1), |e| e.result = R::Expired);
    // A validation before issue floors at 0.
    b.ev(T::Validated, "early", at(-1, 0)).ev(T::Issued, "early", at(0, 0));
    let r = b.rows(Metric::TimeToFirstValidation, 0, 0, at(20, 0), None);
    // values (s): 0, 0, 1800, 7200, 108000, 691200 → p50 rank 3, p90 rank ceil(5.4)=6.
    assert_eq!(
        r,
        vec![
            json!({"issued": 7, "under_1h": 3, "from_1h_to_24h": 1, "from_1d_to_7d": 1, "over_7d": 1,
                    "never": 1, "p50_seconds": 1800.0, "p90_seconds": 691200.0})
        ]
    );
    let r = b.rows(Metric::TimeToFirstValidation, 0, 0, at(1, 0), None);
    assert_eq!(
        r[0]["never"], 3,
        "as of day 1 the 30-hour and 8-day licenses have not validated yet"
    );
    let r = b.rows(Metric::TimeToFirstValidation, 3, 3, at(20, 0), None);
    assert_eq!(r[0]["p50_seconds"], Value::Null);
}

#[test]
fn renewal_upgrade_and_expiration() {
    let mut b = Builder::new();
    b.ev(T::Issued, "a", at(0, 0))
        .ev(T::Expired, "a", at(2, 0))
        .ev(T::Renewed, "a", at(3, 0)) // latest in the window: renewed
        .ev(T::Issued, "b", at(0, 0))
        .ev(T::Renewed, "b", at(2, 0))
        .ev(T::Expired, "b", at(2, 0)) // same time, stored later: the latest
        .ev(T::Renewed, "c", at(9, 0)) // outside the window
        .ev(T::Upgraded, "a", at(1, 0))
        .ev(T::Upgraded, "a", at(4, 0))
        .ev(T::Upgraded, "c", at(1, 0)); // no issued-at: not counted
    let r = b.rows(Metric::RenewalRate, 0, 5, at(20, 0), None);
    assert_eq!(r, vec![json!({"renewed": 1, "expired": 1, "rate": 0.5})]);
    let r = b.rows(Metric::TimeToUpgrade, 0, 5, at(20, 0), None);
    assert_eq!(
        r,
        vec![json!({"upgrades": 1, "p50_seconds": 86400.0, "p90_seconds": 86400.0})]
    );
    // first-ever upgrade of a is on day 1: a window of day 4 has none.
    assert_eq!(b.rows(Metric::TimeToUpgrade, 4, 4, at(20, 0), None)[0]["upgrades"], 0);

    let mut b = Builder::new();
    let now = at(10, 0);
    for (l, expires) in [
        ("x0", now),
        ("x1", now + D),
        ("x7", now + 7 * D),
        ("x30", now + 30 * D),
        ("x90", now + 90 * D),
    ] {
        b.add(T::Validated, l, at(0, 0), |e| e.expires_at = Some(expires));
    }
    b.add(T::Validated, "rev", at(0, 0), |e| e.expires_at = Some(now + D))
        .ev(T::Revoked, "rev", at(1, 0));
    // A later report of a new expiry replaces the old one.
    b.add(T::Renewed, "x0", at(0, 1), |e| e.expires_at = Some(now + 100 * D))
        .add(T::Validated, "x0", at(0, 2), |e| e.expires_at = Some(now));
    let r = b.rows(Metric::TimeToExpiration, 0, 0, now, None);
    assert_eq!(
        r,
        vec![json!({"expired": 1, "under_7d": 1, "from_7d_to_30d": 1, "from_30d_to_90d": 1, "over_90d": 1})]
    );
}

#[test]
fn health_boundaries_at_7_and_30_days_and_reasons() {
    let mut b = Builder::new();
    let last = at(0, 12);
    b.ev(T::Validated, "a", last);
    let score = |b: &Builder, at: i64| -> (Value, Value) {
        let r = b.rows(Metric::Health, 0, 0, at, None);
        (r[0]["score"].clone(), r[0]["reasons"].clone())
    };
    // days = floor((at − last) / 1 day): 7 days and 23 h is 7 days, not "more than 7". The
    // one validation is then in last week's window (at − 14d, at − 7d] and none this week: a
    // decline as well.
    assert_eq!(score(&b, last + 8 * D - 1), (json!(80), json!(["validation_decline"])));
    assert_eq!(
        score(&b, last + 8 * D),
        (json!(60), json!(["inactive_7d", "validation_decline"]))
    );
    assert_eq!(score(&b, last + 31 * D - 1), (json!(80), json!(["inactive_7d"])));
    assert_eq!(
        score(&b, last + 31 * D),
        (json!(50), json!(["inactive_7d", "inactive_30d"]))
    );

    // Validation decline: last week (at−14d, at−7d] = 4, this week (at−7d, at] = 1 < 2.
    let mut b = Builder::new();
    let t = at(20, 0);
    for h in [-7 * D, -7 * D - 1, -10 * D, -14 * D + 1] {
        b.ev(T::Validated, "d", t + h);
    }
    b.ev(T::Validated, "d", t - 14 * D); // exactly at−14d: in neither week
    b.ev(T::Validated, "d", t); // exactly at: this week
    assert_eq!(score(&b, t), (json!(80), json!(["validation_decline"])));
    b.ev(T::Validated, "d", t - 1); // 2 of 4: not a decline
    assert_eq!(score(&b, t), (json!(100), json!([])));

    // Domains 0.2 is not below 0.2; support and payment take the latest event of each kind.
    let mut b = Builder::new();
    b.add(T::Issued, "p", at(0, 0), plan("pro"))
        .add(T::Activated, "p", at(0, 1), |e| e.domain = Some("a".into()))
        .ev(T::SupportTicketOpened, "p", at(0, 2))
        .ev(T::PaymentFailed, "p", at(0, 3))
        .ev(T::PaymentSucceeded, "p", at(0, 4))
        .ev(T::Validated, "p", at(1, 0));
    assert_eq!(score(&b, at(1, 0)), (json!(90), json!(["open_support_ticket"])));
    b.ev(T::PaymentFailed, "p", at(1, 1))
        .ev(T::Deactivated, "p", at(1, 2))
        .add(T::Deactivated, "p", at(1, 2), |e| e.domain = Some("a".into()));
    assert_eq!(
        score(&b, at(1, 3)),
        (
            json!(50),
            json!(["low_domain_utilization", "open_support_ticket", "payment_failed"])
        )
    );

    // No validation: last = issued-at; none: the first event. Expired licenses are not live.
    let mut b = Builder::new();
    b.ev(T::Issued, "i", at(0, 0))
        .ev(T::SupportTicketClosed, "f", at(6, 0))
        .add(T::Issued, "gone", at(0, 0), |e| e.expires_at = Some(at(3, 0)));
    let r = b.rows(Metric::Health, 0, 0, at(13, 1), None);
    assert_eq!(
        r,
        vec![
            json!({"license": "f", "score": 100, "reasons": []}),
            json!({"license": "i", "score": 80, "reasons": ["inactive_7d"]}),
        ]
    );
}

#[test]
fn churn_risk_and_upgrade_signals_order() {
    let mut b = Builder::new();
    let t = at(40, 0);
    b.ev(T::Validated, "z", at(0, 0)); // 40 days inactive: 50
    b.ev(T::Validated, "y", at(0, 0)).ev(T::PaymentFailed, "y", at(1, 0)); // 25
    b.ev(T::Validated, "a", at(0, 0)); // 50
    b.ev(T::Validated, "ok", t);
    let q = MetricQuery {
        metric: Metric::ChurnRisk,
        from_day: day0(),
        to_day: day0(),
        at: t,
        by: None,
        below: 51.0,
    };
    let names: Vec<String> =
        b.a.query(&q)
            .unwrap()
            .iter()
            .map(|r| r.get("license").unwrap().to_string())
            .collect();
    assert_eq!(names, vec!["\"y\"", "\"a\"", "\"z\""]);

    let mut b = Builder::new();
    for i in 0..11 {
        b.add(T::Validated, "rl", t - i * H, |e| e.result = R::RateLimited);
    }
    for i in 0..10 {
        b.add(T::Validated, "rl10", t - i * H, |e| e.result = R::RateLimited);
    }
    for i in 0..4 {
        b.add(T::FeatureChecked, "fi", t - i * H, |e| e.result = R::FeatureDenied);
    }
    // Over limit by report (also ≥ 0.8) and by a limit_exceeded event 30 days ago minus 1 ns.
    b.add(T::Validated, "big", t, |e| {
        e.usage.seats_used = Some(11);
        e.usage.seats_limit = Some(10);
    });
    b.add(T::Activated, "le", t - 30 * D + 1, |e| e.result = R::LimitExceeded);
    b.add(T::Activated, "old", t - 30 * D, |e| e.result = R::LimitExceeded);
    let r = b.rows(Metric::UpgradeSignals, 0, 0, t, None);
    assert_eq!(
        r,
        vec![
            json!({"license": "big", "triggers": ["limit_approaching", "over_limit"], "pipeline": true}),
            json!({"license": "fi", "triggers": ["feature_interest"], "pipeline": false}),
            json!({"license": "le", "triggers": ["over_limit"], "pipeline": false}),
            json!({"license": "rl", "triggers": ["rate_limited_frequent"], "pipeline": false}),
        ]
    );
}

#[test]
fn mrr_by_month_with_change_and_unpriced() {
    let mut b = Builder::new();
    // Window 2026-10-15 .. 2026-12-10 touches October, November, December.
    b.add(T::Issued, "a", at(-20, 0), plan("pro")) // Oct 12
        .add(T::Issued, "b", at(5, 0), plan("team")) // Nov 6
        .add(T::Issued, "c", at(6, 0), plan("enterprise")) // not in the catalog: unpriced
        .ev(T::Suspended, "a", at(20, 0)) // Nov 21: not active at Dec 1
        .ev(T::Reinstated, "a", at(30, 0)); // Dec 1 00:00 exactly: active at E of November
    let q = |by| MetricQuery {
        metric: Metric::Mrr,
        from_day: day0() - 17,
        to_day: day0() + 39,
        at: at(35, 0),
        by,
        below: 50.0,
    };
    let rows: Vec<Value> = b.a.query(&q(None)).unwrap().iter().map(Row::to_value).collect();
    assert_eq!(
        rows,
        vec![
            json!({"month": "2026-10", "active_licenses": 1, "mrr": 49.0, "unpriced_licenses": 0, "change": null}),
            json!({"month": "2026-11", "active_licenses": 3, "mrr": 148.5, "unpriced_licenses": 1, "change": 99.5}),
            // E = at (Dec 6) for the current month.
            json!({"month": "2026-12", "active_licenses": 3, "mrr": 148.5, "unpriced_licenses": 1, "change": 0.0}),
        ]
    );
    let rows: Vec<Value> =
        b.a.query(&q(Some(Dim::Plan)))
            .unwrap()
            .iter()
            .map(Row::to_value)
            .collect();
    assert_eq!(
        rows[0],
        json!({"month": "2026-10", "plan": "pro", "active_licenses": 1, "mrr": 49.0, "unpriced_licenses": 0, "change": null})
    );
    assert_eq!(rows[1]["plan"], "enterprise");
    assert_eq!(
        rows[3],
        json!({"month": "2026-11", "plan": "team", "active_licenses": 1, "mrr": 99.5, "unpriced_licenses": 0, "change": 99.5}),
        "no row last month: change from 0"
    );
}

#[test]
fn state_survives_a_round_trip_through_a_snapshot() {
    let mut b = Builder::new();
    b.add(T::Issued, "a", at(0, 0), plan("pro"))
        .add(T::Validated, "a", at(1, 0), |e| e.user = Some("u".into()))
        .add(T::FeatureChecked, "b", at(2, 0), |e| e.country = Some("SE".into()))
        .ev(T::Validated, "a", at(3, 0));
    b.a.set_applied_through(4);
    let bytes = b.a.snapshot();
    let loaded = Analytics::from_snapshot(b.a.catalog().clone(), &bytes).unwrap();
    assert_eq!(loaded.applied_through(), 4);
    assert_eq!(loaded.snapshot(), bytes, "the same state, byte for byte");
    for m in Metric::ALL {
        let q = MetricQuery {
            metric: m,
            from_day: day0(),
            to_day: day0() + 5,
            at: at(6, 0),
            by: None,
            below: 101.0,
        };
        assert_eq!(loaded.query(&q), b.a.query(&q), "{}", m.name());
    }
    // The loaded state goes on applying events like the original.
    let mut loaded = loaded;
    let mut e = Event::new("late", T::Validated, at(1, 5), "agent");
    e.license = Some("b".into());
    loaded.apply(&e, 9, &NoHistory);
    b.a.apply(&e, 9, &NoHistory);
    assert_eq!(loaded.snapshot(), b.a.snapshot());
    // Anything damaged is an error naming what, never silently wrong numbers.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let e = Analytics::from_snapshot(BTreeMap::new(), &flipped).err().unwrap();
    assert!(e.to_string().contains("checksum"), "{e}");
    let mut version = bytes.clone();
    version[0] = 99;
    let e = Analytics::from_snapshot(BTreeMap::new(), &version).err().unwrap();
    assert!(e.to_string().contains("version 99"), "{e}");
    assert!(Analytics::from_snapshot(BTreeMap::new(), &bytes[..3]).is_err());
    let mut short = bytes[..bytes.len() - 7].to_vec();
    let crc = crc32fast::hash(&short[5..]).to_be_bytes();
    short[1..5].copy_from_slice(&crc);
    assert!(
        Analytics::from_snapshot(BTreeMap::new(), &short).is_err(),
        "truncated body"
    );
}

#[test]
fn answers_spread_over_threads_equal_the_serial_answers() {
    // Enough licenses, days and kinds of event that every metric has rows; blocks of 7
    // licenses on 3 threads, so every answer is merged from many blocks.
    let mut b = Builder::new();
    let mut r = fastrand::Rng::with_seed(11);
    let kinds = [
        T::Validated,
        T::Validated,
        T::Validated,
        T::Validated,
        T::FeatureChecked,
        T::FeatureChecked,
        T::Activated,
        T::Deactivated,
        T::Issued,
        T::Renewed,
        T::Upgraded,
        T::Expired,
        T::Suspended,
        T::Revoked,
        T::PaymentSucceeded,
        T::PaymentFailed,
        T::SupportTicketOpened,
        T::SupportTicketClosed,
    ];
    for i in 0..8000 {
        let l = (r.f64().powi(2) * 240.0) as usize;
        let ty = kinds[r.usize(..kinds.len())];
        let time = at(i * 40 / 8000, r.i64(0..24));
        let mut e = Event::new(format!("p{i}"), ty, time, "agent");
        e.license = Some(format!("lic-{l:03}"));
        e.plan = Some(["pro", "team", "free"][(l + i as usize / 3000) % 3].to_string());
        e.country = Some(["SE", "US", "JP"][r.usize(..3)].to_string());
        e.customer = Some(format!("c{}", l / 5));
        e.user = Some(format!("u{}", r.u8(..20)));
        match ty {
            T::Validated => {
                e.result = [
                    R::Valid,
                    R::Valid,
                    R::Valid,
                    R::Expired,
                    R::RateLimited,
                    R::LimitExceeded,
                ][r.usize(..6)];
            }
            T::FeatureChecked => {
                e.feature = Some(["sso", "export", "api"][r.usize(..3)].to_string());
                if r.bool() {
                    e.result = R::FeatureDenied;
                }
            }
            T::Activated | T::Deactivated => e.machine = Some(format!("m{}", r.u8(..6))),
            T::Issued | T::Renewed => e.expires_at = Some(time + r.i64(1..60) * D),
            _ => {}
        }
        if r.u8(..10) == 0 {
            e.usage.domains_used = Some(r.u64(0..6));
        }
        b.a.apply(&e, i as u64, &NoHistory);
    }
    assert!(b.a.license_count() > 150, "{}", b.a.license_count());
    for m in Metric::ALL {
        for by in [None, Some(Dim::Plan), Some(Dim::Country), Some(Dim::Customer)] {
            if by.is_some() && !m.takes_by() {
                continue;
            }
            let q = MetricQuery {
                metric: m,
                from_day: day0() + 5,
                to_day: day0() + 34,
                at: at(35, 0),
                by,
                below: 80.0,
            };
            b.a.set_parallel(Parallel::SERIAL);
            let serial = b.a.query(&q).unwrap();
            assert!(!serial.is_empty(), "{} by {by:?}: no rows", m.name());
            b.a.set_parallel(Parallel { threads: 3, block: 7 });
            assert_eq!(b.a.query(&q).unwrap(), serial, "{} by {by:?}", m.name());
        }
    }
}
