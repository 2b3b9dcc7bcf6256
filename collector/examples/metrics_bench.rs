//! Benchmark: ingest with aggregation on, then query latency of every metric.
//!
//! ```text
//! cargo run --release -p keytrail-collector --example metrics_bench -- [EVENTS] [LICENSES] [DAYS] [DIR]
//! ```
//!
//! Stores EVENTS (default 10,000,000) generated license events spread over DAYS (default 90)
//! days and LICENSES (default 10,000) licenses with skewed popularity, through the real store
//! (dedup, rollups, group commit, fsync) in batches of 5,000, and reports events/s. Then asks
//! every metric 30 times with dashboard-like parameters (30-day window, `at` = end of data;
//! then by plan) and prints p50/p99 latency. Disk use, RSS, the final snapshot and reopening the
//! store (analytics loaded back) are measured too. Prints Markdown rows for docs/benchmarks.md.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keytrail_collector::analytics::{days_from_civil, Dim, Metric, MetricQuery};
use keytrail_collector::config::Plan;
use keytrail_collector::store::{IncomingBatch, Store, StoreOptions};
use keytrail_common::event::{Deployment, Event, EventType, ResultCode};
use keytrail_common::time::NANOS_PER_DAY;
use keytrail_common::wire::BatchSeq;

const BATCH: usize = 5000;

fn plans() -> BTreeMap<String, Plan> {
    let mut p = BTreeMap::new();
    for (name, price, seats) in [
        ("free", None, 1),
        ("pro", Some(49.0), 10),
        ("enterprise", Some(499.0), 100),
    ] {
        p.insert(
            name.to_string(),
            Plan {
                price_monthly: price,
                seats: Some(seats),
                domains: Some(seats / 2 + 1),
                machines: Some(seats * 2),
            },
        );
    }
    p
}

struct Gen {
    rng: fastrand::Rng,
    licenses: usize,
    start: i64,
    span: i64,
    n: u64,
}

impl Gen {
    fn event(&mut self, progress: f64) -> Event {
        self.n += 1;
        let r = &mut self.rng;
        // Time advances with the run (agents send roughly in order), with 5% late by up to 3 days.
        let mut t = self.start + (progress * self.span as f64) as i64 + r.i64(0..NANOS_PER_DAY / 4);
        if r.u8(..100) < 5 {
            t -= r.i64(0..3 * NANOS_PER_DAY);
        }
        let l = (r.f64().powi(3) * self.licenses as f64) as usize;
        let ty = match r.u8(..100) {
            0..=79 => EventType::Validated,
            80..=89 => EventType::FeatureChecked,
            90..=92 => EventType::Activated,
            93 => EventType::Deactivated,
            94 => EventType::Issued,
            95 => EventType::Renewed,
            96 => EventType::Upgraded,
            97 => EventType::PaymentSucceeded,
            98 => EventType::PaymentFailed,
            _ => EventType::SupportTicketOpened,
        };
        let mut e = Event::new(format!("bench-{}", self.n), ty, t, "bench-agent");
        e.license = Some(format!("lk_{l:08x}"));
        e.plan = Some(["free", "pro", "enterprise"][l % 3].to_string());
        e.region = Some(["eu-west-1", "us-east-1", "ap-south-1"][l % 3].to_string());
        e.country = Some(["DE", "US", "FR", "JP", "BR", "IN"][l % 6].to_string());
        e.deployment = Some([Deployment::Cloud, Deployment::OnPrem, Deployment::Hybrid][l % 3]);
        e.customer = Some(format!("customer-{}", l / 4));
        e.user = Some(format!("user-{}", r.u8(..8)));
        if ty == EventType::FeatureChecked {
            e.feature = Some(["export", "sso", "audit-log", "api"][r.usize(..4)].to_string());
            if r.u8(..100) < 20 {
                e.result = ResultCode::FeatureDenied;
            }
        } else if ty == EventType::Validated && r.u8(..100) < 8 {
            e.result = [ResultCode::Expired, ResultCode::RateLimited, ResultCode::LimitExceeded][r.usize(..3)];
        }
        if ty == EventType::Activated || ty == EventType::Deactivated {
            e.machine = Some(format!("mf_{:04x}", r.u16(..64)));
        }
        if r.u8(..100) < 5 {
            e.usage.seats_used = Some(r.u64(0..12));
        }
        if ty == EventType::Renewed || ty == EventType::Issued {
            e.expires_at = Some(t + 365 * NANOS_PER_DAY);
        }
        e
    }
}

/// Bytes under `dir`, recursively.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A line of /proc/self/status, e.g. `VmHWM` (peak RSS) or `VmRSS`, in MiB.
fn proc_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn pct(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    let i = (v.len() * p).div_ceil(100).max(1) - 1;
    v[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let licenses: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let days: i64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(90);
    let dir = args
        .get(4)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kt-metrics-bench"));
    // EVENTS = 0: no ingest, only reopen DIR (kept from a run with KEEP=1) and ask the queries.
    let keep = std::env::var_os("KEEP").is_some() || events == 0;
    if events > 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    keytrail_common::logging::init(keytrail_common::logging::LogFormat::Human);
    let options = StoreOptions {
        cache_bytes: 512 << 20,
        dedup_window: Duration::from_secs(3650 * 86400),
        raw_events: Duration::from_secs(3650 * 86400),
        plans: plans(),
        snapshot_every: keytrail_collector::store::DEFAULT_SNAPSHOT_EVENTS,
        snapshot_bytes_per_event: std::env::var("SNAPSHOT_BYTES_PER_EVENT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(keytrail_collector::store::DEFAULT_SNAPSHOT_BYTES_PER_EVENT),
    };
    let start_day = days_from_civil(2026, 8);
    let gen = Gen {
        rng: fastrand::Rng::with_seed(1),
        licenses,
        start: start_day as i64 * NANOS_PER_DAY,
        span: days * NANOS_PER_DAY,
        n: 0,
    };
    // APPLY_ONLY=1: only the in-memory aggregation (no store), to separate its cost from sled's.
    if std::env::var_os("APPLY_ONLY").is_some() {
        apply_only(events, days, gen);
        return;
    }
    if events > 0 {
        ingest(&dir, &options, events, days, gen).await;
    }
    let t = Instant::now();
    let store = Store::open(&dir, options).unwrap();
    println!(
        "reopen: {:.1} s ({:?}); RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        store.analytics_origin(),
        proc_mib("VmRSS:")
    );
    let end_day = start_day + days as i32 - 1;
    queries(&store, end_day);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn apply_only(events: u64, _days: i64, mut gen: Gen) {
    let all: Vec<Event> = (0..events).map(|i| gen.event(i as f64 / events as f64)).collect();
    let mut a = keytrail_collector::analytics::Analytics::new(plans());
    let t = Instant::now();
    for (i, e) in all.iter().enumerate() {
        a.apply(e, i as u64, &keytrail_collector::analytics::NoHistory);
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "apply only: {events} events in {s:.2} s = {:.0} events/s",
        events as f64 / s
    );
}

async fn ingest(dir: &std::path::Path, options: &StoreOptions, events: u64, days: i64, mut gen: Gen) {
    let store = Store::open(dir, options.clone()).unwrap();
    let writer = store.start_writer();
    // Two batches in flight, like two agents: generation overlaps the store's commit.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<IncomingBatch>(4);
    let producer = std::thread::spawn(move || {
        let mut seq = 0;
        let mut made = 0u64;
        while made < events {
            let n = BATCH.min((events - made) as usize);
            let batch: Vec<Event> = (0..n)
                .map(|i| gen.event((made + i as u64) as f64 / events as f64))
                .collect();
            made += n as u64;
            seq += 1;
            let b = IncomingBatch {
                agent_id: "bench-agent".into(),
                seq: BatchSeq(seq),
                frame_crc: seq as u32,
                events: batch,
            };
            if tx.blocking_send(b).is_err() {
                break;
            }
        }
    });
    let began = Instant::now();
    let mut stored = 0u64;
    let mut inflight: tokio::task::JoinSet<
        Result<keytrail_collector::store::IngestOutcome, keytrail_collector::store::StoreError>,
    > = tokio::task::JoinSet::new();
    let mut last_report = Instant::now();
    while let Some(b) = rx.recv().await {
        while inflight.len() >= 2 {
            stored += inflight.join_next().await.unwrap().unwrap().unwrap().stored as u64;
        }
        let w = writer.clone();
        inflight.spawn(async move { w.ingest(b).await });
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "  {stored} stored, {:.0} events/s so far",
                stored as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(r) = inflight.join_next().await {
        stored += r.unwrap().unwrap().stored as u64;
    }
    // The analytics apply just behind the writer: the rate counts them done.
    store.wait_applied(Duration::from_secs(600));
    producer.join().unwrap();
    let secs = began.elapsed().as_secs_f64();
    let (lic, cells) = store.analytics_size();
    println!(
        "ingest with aggregation: {stored} events in {secs:.1} s = {:.0} events/s ({lic} licenses, {cells} cells, {days} days)",
        stored as f64 / secs
    );
    println!(
        "after ingest: {:.2} GB on disk, RSS {:.0} MiB (peak {:.0} MiB)",
        disk_bytes(dir) as f64 / 1e9,
        proc_mib("VmRSS:"),
        proc_mib("VmHWM:")
    );
    drop(writer);
    while Arc::strong_count(&store) > 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    store.close();
    drop(store);
    println!(
        "close (flush + final snapshot): {:.1} s; snapshot {:.1} MB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(dir.join("analytics.snap")).map_or(0, |m| m.len()) as f64 / 1e6
    );
}

fn queries(store: &Store, end_day: i32) {
    let at = (end_day as i64 + 1) * NANOS_PER_DAY - 1;
    println!("\n| metric | by | p50 ms | p99 ms | rows |\n|---|---|---:|---:|---:|");
    // ONLY=<metric> asks just that one (for profiling).
    let only = std::env::var("ONLY").ok();
    for metric in Metric::ALL {
        if only.as_deref().is_some_and(|o| o != metric.name()) {
            continue;
        }
        for by in [Some(Dim::Plan), None] {
            if by.is_some() && !metric.takes_by() {
                continue;
            }
            let q = MetricQuery {
                metric,
                from_day: end_day - 29,
                to_day: end_day,
                at,
                by,
                below: 50.0,
            };
            let mut times = Vec::new();
            let mut rows = 0;
            for _ in 0..if only.is_some() { 300 } else { 30 } {
                let t = Instant::now();
                rows = store.metric(&q).unwrap().len();
                times.push(t.elapsed());
            }
            println!(
                "| {} | {} | {:.1} | {:.1} | {rows} |",
                metric.name(),
                by.map_or("-", Dim::as_str),
                pct(&mut times, 50),
                pct(&mut times, 99)
            );
        }
    }
}
