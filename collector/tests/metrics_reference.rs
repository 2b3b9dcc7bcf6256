//! The incremental analytics, checked against a plain reference computation.
//!
//! Generated license traffic — late and out-of-order events, time ties, duplicate ids and
//! duplicate batches, events with and without their own dimensions, usage reports, activations,
//! status changes — goes through the real store (dedup, rollups, sled). Every metric, with and
//! without each `by`, over several windows and `at` instants, must equal what each of two plain
//! references computes from the raw event list; then again after reopening the store.
//! `reference/mod.rs` was written beside the engine and quotes each definition;
//! `independent/mod.rs` was written by someone who never saw the engine, from `spec/metrics.md`
//! and `docs/metrics.md` alone — so a misreading shared with the engine shows up as a disagreement.

mod independent;
mod reference;

use std::collections::BTreeMap;
use std::time::Duration;

use keytrail_collector::analytics::days_from_civil;
use keytrail_collector::analytics::{Dim, Metric, MetricQuery};
use keytrail_collector::config::Plan;
use keytrail_collector::store::{AnalyticsOrigin, IncomingBatch, Store, StoreOptions, StoreWriter};
use keytrail_common::event::{Deployment, Event, EventType, ResultCode};
use keytrail_common::time::NANOS_PER_DAY;
use keytrail_common::wire::BatchSeq;
use serde_json::Value;

const D: i64 = NANOS_PER_DAY;
const H: i64 = 3_600_000_000_000;

fn catalog() -> BTreeMap<String, Plan> {
    let mut p = BTreeMap::new();
    let plan = |price, seats, domains, machines| Plan {
        price_monthly: price,
        seats,
        domains,
        machines,
    };
    p.insert("basic".into(), plan(Some(19.0), Some(3), Some(1), Some(2)));
    p.insert("pro".into(), plan(Some(49.5), Some(10), Some(5), None));
    p.insert("team".into(), plan(Some(199.0), Some(0), None, Some(20)));
    p.insert("trial".into(), plan(None, Some(1), Some(1), Some(1)));
    p
}

/// Deterministic traffic over `days` days from `start_day`, shuffled into a store order where
/// about a third of the events arrive late.
fn traffic(seed: u64, n: usize, licenses: usize, start_day: i64, days: i64) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let pick = |rng: &mut fastrand::Rng, xs: &[&str]| xs[rng.usize(..xs.len())].to_string();
    let types = [
        (EventType::Validated, 50),
        (EventType::FeatureChecked, 12),
        (EventType::Activated, 8),
        (EventType::Deactivated, 4),
        (EventType::Issued, 4),
        (EventType::Renewed, 2),
        (EventType::Expired, 2),
        (EventType::Upgraded, 2),
        (EventType::Downgraded, 1),
        (EventType::Suspended, 1),
        (EventType::Reinstated, 1),
        (EventType::Revoked, 1),
        (EventType::PaymentSucceeded, 2),
        (EventType::PaymentFailed, 2),
        (EventType::SupportTicketOpened, 2),
        (EventType::SupportTicketClosed, 2),
        (EventType::Assigned, 1),
    ];
    let total: u32 = types.iter().map(|t| t.1).sum();
    let mut events = Vec::with_capacity(n);
    for i in 0..n {
        let mut w = rng.u32(..total);
        let ty = types
            .iter()
            .find(|(_, x)| {
                if w < *x {
                    true
                } else {
                    w -= x;
                    false
                }
            })
            .expect("weights")
            .0;
        // Whole hours half of the time: plenty of exact ties.
        let mut time = start_day * D + rng.i64(0..days * D);
        if rng.bool() {
            time -= time.rem_euclid(H);
        }
        let mut e = Event::new(format!("ev-{i}"), ty, time, "agent-a");
        // Skewed popularity; a few events without a license.
        if rng.u8(..100) > 1 {
            let l = (rng.f64().powi(2) * licenses as f64) as usize;
            e.license = Some(format!("lic-{l:03}"));
        }
        if rng.u8(..100) < 30 {
            e.plan = Some(pick(&mut rng, &["basic", "pro", "team", "trial", "legacy"]));
        }
        if rng.u8(..100) < 15 {
            e.product = Some(pick(&mut rng, &["cad", "cam"]));
        }
        if rng.u8(..100) < 20 {
            e.customer = Some(pick(&mut rng, &["acme", "globex", "initech"]));
        }
        if rng.u8(..100) < 60 {
            e.region = Some(pick(&mut rng, &["eu-west-1", "us-east-1"]));
        }
        if rng.u8(..100) < 40 {
            e.country = Some(pick(&mut rng, &["DE", "FR", "US", "JP"]));
        }
        if rng.u8(..100) < 60 {
            e.deployment = Some([Deployment::Cloud, Deployment::OnPrem, Deployment::Hybrid][rng.usize(..3)]);
        }
        if rng.u8(..100) < 40 {
            e.user = Some(pick(&mut rng, &["ann", "bob", "cy", "di", "ed"]));
        }
        if rng.u8(..100) < 30 {
            e.domain = Some(pick(&mut rng, &["a.com", "b.com", "c.com"]));
        }
        if rng.u8(..100) < 30 {
            e.machine = Some(pick(&mut rng, &["mf_1", "mf_2", "mf_3", "mf_4"]));
        }
        if ty == EventType::FeatureChecked {
            if rng.u8(..100) < 90 {
                e.feature = Some(pick(&mut rng, &["export", "sso", "api"]));
            }
            e.result = [ResultCode::Valid, ResultCode::FeatureDenied, ResultCode::Error][rng.usize(..3)];
        } else if rng.u8(..100) < 25 {
            e.result = ResultCode::ALL[rng.usize(..ResultCode::ALL.len())];
        }
        if rng.u8(..100) < 10 {
            e.expires_at = Some(time + rng.i64(-10 * D..120 * D));
        }
        if rng.u8(..100) < 15 {
            let r = rng.usize(..3);
            let used = rng.u64(0..12);
            match r {
                0 => e.usage.seats_used = Some(used),
                1 => e.usage.domains_used = Some(used),
                _ => e.usage.machines_used = Some(used),
            }
            if rng.bool() {
                let limit = rng.u64(0..10);
                match r {
                    0 => e.usage.seats_limit = Some(limit),
                    1 => e.usage.domains_limit = Some(limit),
                    _ => e.usage.machines_limit = Some(limit),
                }
            }
        }
        events.push(e);
    }
    // Mostly in time order (as agents send), a third moved to arrive late.
    events.sort_by_key(|e| e.time);
    let mut late: Vec<Event> = Vec::new();
    let mut order: Vec<Event> = Vec::new();
    for e in events {
        if rng.u8(..3) == 0 {
            late.push(e);
        } else {
            order.push(e);
        }
    }
    for e in late {
        let at = rng.usize(..=order.len());
        order.insert(at, e);
    }
    // Duplicate ids, some with different content (the first stored copy wins).
    for _ in 0..n / 20 {
        let mut copy = order[rng.usize(..order.len())].clone();
        if rng.bool() {
            copy.result = ResultCode::Error;
            copy.time += H;
        }
        let at = rng.usize(..=order.len());
        order.insert(at, copy);
    }
    order
}

fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| close(v, w)),
        _ => a == b,
    }
}

struct Questions {
    start_day: i32,
    days: i32,
}

impl Questions {
    /// Windows and instants that cut through the data: partial days, month ends, empty spans.
    fn all(&self) -> Vec<(i32, i32, i64)> {
        let s = self.start_day;
        let e = s + self.days;
        let mut out = Vec::new();
        for (from, to) in [(s, e), (s + 3, s + 9), (s + 20, s + 50), (e + 5, e + 10)] {
            for at in [
                e as i64 * D + 12 * H,
                (s + 25) as i64 * D + 7 * H + 1,
                (s + 10) as i64 * D,
            ] {
                out.push((from, to, at));
            }
        }
        out
    }
}

fn compare(store: &Store, events: &[Event], questions: &Questions) -> usize {
    // The analytics apply committed groups on their own thread, just behind the writer.
    assert!(
        store.wait_applied(std::time::Duration::from_secs(60)),
        "analytics caught up"
    );
    let catalog = catalog();
    let mut checked = 0;
    for (from, to, at) in questions.all() {
        for metric in Metric::ALL {
            let bys: Vec<Option<Dim>> = if metric.takes_by() {
                std::iter::once(None).chain(Dim::ALL.into_iter().map(Some)).collect()
            } else {
                vec![None]
            };
            for by in bys {
                let below = [50.0, 81.0][checked % 2];
                let q = MetricQuery {
                    metric,
                    from_day: from,
                    to_day: to,
                    at,
                    by,
                    below,
                };
                let got: Vec<Value> = store.metric(&q).unwrap().iter().map(|r| r.to_value()).collect();
                let references = [
                    (
                        "reference",
                        reference::compute(
                            events,
                            &catalog,
                            &reference::Query {
                                metric: metric.name(),
                                from_day: from as i64,
                                to_day: to as i64,
                                at,
                                by: by.map(Dim::as_str),
                                below,
                            },
                        ),
                    ),
                    (
                        "independent",
                        independent::compute(
                            events,
                            &catalog,
                            &independent::Query {
                                metric: metric.name(),
                                from_day: from as i64,
                                to_day: to as i64,
                                at,
                                by: by.map(Dim::as_str),
                                below,
                            },
                        ),
                    ),
                ];
                for (name, want) in &references {
                    let same = got.len() == want.len() && got.iter().zip(want).all(|(g, w)| close(g, w));
                    if !same {
                        let first = got
                            .iter()
                            .zip(want)
                            .position(|(g, w)| !close(g, w))
                            .unwrap_or(got.len().min(want.len()));
                        panic!(
                            "{} by={:?} from={from} to={to} at={at}: {} rows vs {name} {}; first difference at row {first}:\n  got       {}\n  {name:<9} {}",
                            metric.name(),
                            by.map(Dim::as_str),
                            got.len(),
                            want.len(),
                            got.get(first).map_or("-".into(), |v| v.to_string()),
                            want.get(first).map_or("-".into(), |v| v.to_string()),
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_agree_with_the_reference_on_generated_traffic() {
    let dir = std::env::temp_dir().join(format!("kt-metrics-ref-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start_day = days_from_civil(2026, 9) + 17;
    let days = 60;
    let events = traffic(42, 4000, 50, start_day as i64, days as i64);
    let options = StoreOptions {
        cache_bytes: 16 << 20,
        dedup_window: Duration::from_secs(3650 * 86400),
        raw_events: Duration::from_secs(3650 * 86400),
        plans: catalog(),
        // Snapshots and journal replay both happen on the way (4,000 events).
        snapshot_every: 700,
        snapshot_bytes_per_event: 0,
    };
    let questions = Questions { start_day, days };
    // Batches of varying size; every fifth batch is sent twice (an agent's retry).
    let mut rng = fastrand::Rng::with_seed(9);
    let mut seq = 0;
    async fn ingest(writer: &StoreWriter, mut rest: &[Event], seq: &mut u64, rng: &mut fastrand::Rng) {
        while !rest.is_empty() {
            let n = rng.usize(1..200).min(rest.len());
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            *seq += 1;
            for _ in 0..if *seq % 5 == 0 { 2 } else { 1 } {
                writer
                    .ingest(IncomingBatch {
                        agent_id: "agent-a".into(),
                        seq: BatchSeq(*seq),
                        frame_crc: *seq as u32,
                        events: batch.to_vec(),
                    })
                    .await
                    .unwrap();
            }
        }
    }
    async fn stop(store: &std::sync::Arc<Store>, writer: StoreWriter) {
        drop(writer);
        for _ in 0..500 {
            if std::sync::Arc::strong_count(store) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (head, tail) = events.split_at(events.len() - 150);
    // 1. Most of the traffic (snapshots every 700 events on the way), then a clean stop.
    let covers = {
        let store = Store::open(&dir, options.clone()).unwrap();
        let writer = store.start_writer();
        ingest(&writer, head, &mut seq, &mut rng).await;
        stop(&store, writer).await;
        store.close();
        store.counters().into_iter().find(|c| c.0 == "events_stored").unwrap().1
    };
    // 2. Reopen from the final snapshot alone; the rest of the traffic; compare.
    {
        let store = Store::open(&dir, options.clone()).unwrap();
        assert_eq!(
            store.analytics_origin(),
            &AnalyticsOrigin::Snapshot { covers, replayed: 0 }
        );
        let writer = store.start_writer();
        ingest(&writer, tail, &mut seq, &mut rng).await;
        let checked = compare(&store, &events, &questions);
        assert!(checked > 500, "{checked} questions");
        stop(&store, writer).await;
        // No close(): as after a crash, the snapshot plus the journal must carry it all.
    }
    // 3. Reopen from the snapshot plus the journal of the tail: the same answers.
    let store = Store::open(&dir, options).unwrap();
    let stored = store.counters().into_iter().find(|c| c.0 == "events_stored").unwrap().1;
    assert!(stored > covers);
    assert_eq!(
        store.analytics_origin(),
        &AnalyticsOrigin::Snapshot {
            covers,
            replayed: stored - covers
        }
    );
    compare(&store, &events, &questions);
    std::fs::remove_dir_all(&dir).unwrap();
}
