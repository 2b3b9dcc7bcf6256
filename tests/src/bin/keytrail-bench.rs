//! `keytrail-bench`: the load harness. Starts real processes on loopback, drives them with
//! realistic license traffic, and writes the results as JSON and Markdown, stamped with the
//! machine and the commit. A measuring tool, not a test: nothing here asserts a time.
//!
//! ```text
//! cargo run --release -p keytrail-tests --bin keytrail-bench -- all [--runs 3] [--seconds 5] [--out target/bench]
//! keytrail-bench agent-ingest | e2e | collector | proxy | footprint | queries | all
//! ```
//!
//! * `agent-ingest` — `POST /v1/events` (NDJSON, 202 only after the flush) at several
//!   connection counts and request sizes: events/s and time-to-202 p50/p99, medians of runs.
//! * `e2e` — the load generator saturating an agent that ships over mTLS to a collector:
//!   events/s stored at the collector while the load runs, the time to drain what is left, and
//!   the freshness of a probe event (`POST` to the agent until the collector's
//!   `/v1/licenses/<l>` knows its license), p50/p99.
//! * `collector` — pre-sealed wire batches sent over mTLS by two fake agents, two connections
//!   each: events/s stored (dedup and rollups on) and collector CPU seconds per million events.
//! * `proxy` — runs `keytrail-proxy-bench` (direct vs keytrail vs nginx, same run).
//! * `footprint` — agent RSS idle, under load, and with a 10 M-event backlog (collector down);
//!   disk bytes per buffered event; wire bytes per event; binary sizes.
//! * `queries` — runs the collector's `metrics_bench` example: every dashboard metric's
//!   p50/p99 over 10 M stored events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keytrail_common::event::{self, BodyFormat, Context, FixedDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::wire::{self, BatchSeq};
use keytrail_tests::load::{drive_agent, LoadResult};
use keytrail_tests::traffic::Traffic;
use keytrail_tests::{bin, http, Agent, AgentOpts, Collector, CollectorOpts, Sandbox};
use serde_json::{json, Value};

/// A benchmark: its JSON results and its Markdown section.
type Section = fn(&Opts) -> (Value, String);

struct Opts {
    runs: usize,
    seconds: f64,
    out: PathBuf,
    events: u64,
}

fn die(m: &str) -> ! {
    eprintln!("keytrail-bench: {m}");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args
        .next()
        .unwrap_or_else(|| die("which benchmark? agent-ingest | e2e | collector | proxy | footprint | queries | all"));
    let mut o = Opts {
        runs: 3,
        seconds: 5.0,
        out: PathBuf::from("target/bench"),
        events: 10_000_000,
    };
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
        match a.as_str() {
            "--runs" => o.runs = v.parse().unwrap_or_else(|_| die("--runs: a count")),
            "--seconds" => o.seconds = v.parse().unwrap_or_else(|_| die("--seconds: a duration")),
            "--out" => o.out = PathBuf::from(v),
            "--events" => o.events = v.parse().unwrap_or_else(|_| die("--events: a count")),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    keytrail_common::tls::install_crypto_provider();
    let all = what == "all";
    let sections: &[(&str, Section)] = &[
        ("agent-ingest", agent_ingest),
        ("e2e", end_to_end),
        ("collector", collector_ingest),
        ("proxy", proxy),
        ("footprint", footprint),
        ("queries", queries),
    ];
    if !all && !sections.iter().any(|(n, _)| *n == what) {
        die(&format!("unknown benchmark {what}"));
    }
    let machine = machine();
    let mut results = serde_json::Map::new();
    let mut md = format!(
        "## {} — keytrail-bench {what}\n\n{}\n",
        machine["date"].as_str().unwrap_or(""),
        machine_line(&machine)
    );
    for (name, f) in sections {
        if all || *name == what {
            eprintln!("keytrail-bench: {name} …");
            let (v, text) = f(&o);
            results.insert(name.to_string(), v);
            md += &format!("\n### {name}\n\n{text}");
        }
    }
    let doc = json!({ "machine": machine, "results": results });
    std::fs::create_dir_all(&o.out).unwrap_or_else(|e| die(&format!("creating {}: {e}", o.out.display())));
    let stamp = keytrail_common::time::now_ns() / 1_000_000_000;
    let json_path = o.out.join(format!("bench-{what}-{stamp}.json"));
    let md_path = o.out.join(format!("bench-{what}-{stamp}.md"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc).expect("json")).expect("writing results");
    std::fs::write(&md_path, &md).expect("writing results");
    println!("{md}");
    eprintln!(
        "keytrail-bench: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
}

// ---- machine stamp and process measurements ----

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let tmp = std::env::temp_dir();
    let source = sh("df", &["--output=source", &tmp.to_string_lossy()]);
    let device = source.lines().last().unwrap_or("").to_string();
    let dev_name = device.trim_start_matches("/dev/").trim_end_matches(char::is_numeric);
    let rotational = std::fs::read_to_string(format!("/sys/block/{dev_name}/queue/rotational")).ok();
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "date": keytrail_common::time::format_rfc3339(keytrail_common::time::now_ns()),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "disk": json!({
            "tmp_device": device,
            "rotational": rotational.map(|r| r.trim() == "1"),
        }),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": dirty,
    })
}

fn machine_line(m: &Value) -> String {
    format!(
        "Machine: {} cores, {}, {} GiB, Linux {}, temp dir on {} ({}). Commit {}{}.\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["disk"]["tmp_device"].as_str().unwrap_or("?"),
        match m["disk"]["rotational"].as_bool() {
            Some(true) => "rotational",
            Some(false) => "not rotational",
            None => "type unknown",
        },
        m["commit"].as_str().unwrap_or("?"),
        if m["dirty"].as_bool() == Some(true) {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}

/// Runs a tool to completion and returns its stdout; a failure stops the bench with its stderr.
fn stdout_of(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| die(&format!("running {what}: {e}")));
    if !out.status.success() {
        die(&format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cells of the body rows of the Markdown tables in `text` whose header row starts with
/// `header`.
fn table_cells(text: &str, header: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with(header))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

fn pid_of(p: &keytrail_tests::Proc) -> u32 {
    p.child
        .as_ref()
        .map(|c| c.id())
        .unwrap_or_else(|| die("process not running"))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ
}

/// Samples a process's RSS every 100 ms until stopped; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max((rss_mib(pid) * 1024.0) as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn peak_mib(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// An agent with production batch settings (5,000 events or 1 s per batch).
fn bench_agent(sb: &Sandbox, collector_url: &str) -> Agent {
    let mut o = AgentOpts::new(sb, "agent-a");
    o.max_bytes = "64GiB".into();
    o.batch_max_events = 5000;
    o.batch_timeout = "1s".into();
    o.stall_after = "30s".into();
    Agent::start(sb, collector_url, o)
}

fn status(agent: &Agent) -> Value {
    agent.get_json("/v1/status").1
}

// ---- 1. agent durable ingest ----

fn agent_ingest(o: &Opts) -> (Value, String) {
    let sb = Sandbox::new("bench-ingest");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let agent = bench_agent(&sb, &collector.url());
    let pid = pid_of(&agent.proc);
    let mut rows = Vec::new();
    let mut md = "Agent on production batch settings, mTLS to a local collector that receives at the same time; \
                  the load generator on the same machine. 202 only after flush + fdatasync.\n\n\
                  | connections × events/request | events/s (median) | runs | ack p50 ms | ack p99 ms | agent peak RSS MiB |\n|---|---:|---:|---:|---:|---:|\n"
        .to_string();
    let mut run = 0;
    for (conns, batch) in [(1usize, 100usize), (8, 100), (8, 500), (32, 500), (64, 50)] {
        let sampler = RssSampler::start(pid);
        let results: Vec<LoadResult> = (0..o.runs)
            .map(|_| {
                run += 1;
                drive_agent(&agent.ingest.to_string(), conns, batch, o.seconds, run, None).unwrap_or_else(|e| die(&e))
            })
            .collect();
        let peak = sampler.peak_mib();
        let eps = median(results.iter().map(|r| r.events_per_sec).collect());
        let p50 = median(results.iter().map(|r| r.ack_p50_ms).collect());
        let p99 = median(results.iter().map(|r| r.ack_p99_ms).collect());
        md += &format!(
            "| {conns} × {batch} | {:.0} k | {} | {p50:.2} | {p99:.2} | {peak:.0} |\n",
            eps / 1e3,
            results.len()
        );
        rows.push(json!({
            "connections": conns, "batch": batch, "events_per_sec_median": eps,
            "ack_p50_ms_median": p50, "ack_p99_ms_median": p99, "agent_peak_rss_mib": peak, "runs": results,
        }));
    }
    md += "\nAnchor (`../shared/design/anchors.md`, same kind of machine, not this run): Fluent Bit 5.1.1 tuned accepted 386 k events/s *without* syncing before acknowledging.\n";
    (json!({ "rows": rows }), md)
}

// ---- 2. end to end ----

fn end_to_end(o: &Opts) -> (Value, String) {
    let sb = Sandbox::new("bench-e2e");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let agent = bench_agent(&sb, &collector.url());
    let seconds = (o.seconds * 2.0).max(10.0);
    let mut rows = Vec::new();
    let mut md = format!(
        "The load generator paces 8 connections × 500 events/request at each offered rate for {seconds:.0} s into the agent, which ships \
         over mTLS (batches of 5,000, zstd 3) to the collector (dedup, rollups); everything on this machine. Freshness: one probe event \
         every 200 ms, from its `POST` until the collector's `/v1/licenses/<l>` knows its license. A rate is sustained when the \
         collector stored it and the agent's backlog stayed under a second of traffic.\n\n\
         | offered events/s | accepted by the agent | stored by the collector | backlog at the end | freshness p50 / p99 ms (probes) | agent / collector CPU s per M events | sustained |\n\
         |---:|---:|---:|---:|---:|---:|---|\n"
    );
    let mut best = 0.0f64;
    for (k, rate) in [50_000.0f64, 100_000.0, 150_000.0, 200_000.0, 250_000.0]
        .into_iter()
        .enumerate()
    {
        let stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let (stop, ingest, api) = (Arc::clone(&stop), agent.ingest, collector.api);
            std::thread::spawn(move || {
                let mut delays = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    // `license` is an opaque id, passed through (`license_key` is pseudonymised).
                    let key = format!("fresh-{}-{k}-{i}", std::process::id());
                    let line =
                        format!(r#"{{"id":"probe-{key}","type":"license.validated","license":"{key}","plan":"pro"}}"#);
                    let t0 = Instant::now();
                    match http(
                        ingest,
                        "POST",
                        "/v1/events",
                        &[("Content-Type", "application/x-ndjson")],
                        line.as_bytes(),
                    ) {
                        Some((202, _)) => {}
                        other => {
                            eprintln!("keytrail-bench: probe not accepted: {other:?}");
                            continue;
                        }
                    }
                    let path = format!("/v1/licenses/{key}");
                    loop {
                        if let Some((200, _)) = http(api, "GET", &path, &[], b"") {
                            delays.push(t0.elapsed().as_secs_f64() * 1e3);
                            break;
                        }
                        if t0.elapsed() > Duration::from_secs(120) {
                            eprintln!("keytrail-bench: probe {key} not seen within 120 s");
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                delays
            })
        };
        let stored0 = collector.stored();
        let cpu0 = (cpu_secs(pid_of(&agent.proc)), cpu_secs(pid_of(&collector.proc)));
        let t0 = Instant::now();
        let load = drive_agent(&agent.ingest.to_string(), 8, 500, seconds, 10 + k as u32, Some(rate))
            .unwrap_or_else(|e| die(&e));
        let stored = collector.stored() - stored0;
        let secs = t0.elapsed().as_secs_f64();
        let backlog = status(&agent)["buffered_events"].as_u64().unwrap_or(0);
        let cpu1 = (cpu_secs(pid_of(&agent.proc)), cpu_secs(pid_of(&collector.proc)));
        stop.store(true, Ordering::Relaxed);
        let mut fresh = probe.join().unwrap_or_default();
        let (p50, p99) = (pct(&mut fresh, 0.5), pct(&mut fresh, 0.99));
        let per_m = |c: f64| c / (load.events.max(1) as f64 / 1e6);
        let sustained = (backlog as f64) < load.events_per_sec && load.events_per_sec >= 0.97 * rate;
        if sustained {
            best = best.max(stored as f64 / secs);
        }
        md += &format!(
            "| {:.0} k | {:.0} k | {:.0} k | {backlog} | {p50:.0} / {p99:.0} ({}) | {:.2} / {:.2} | {} |\n",
            rate / 1e3,
            load.events_per_sec / 1e3,
            stored as f64 / secs / 1e3,
            fresh.len(),
            per_m(cpu1.0 - cpu0.0),
            per_m(cpu1.1 - cpu0.1),
            if sustained { "yes" } else { "no" }
        );
        rows.push(json!({
            "offered_per_sec": rate, "load": load, "stored_per_sec": stored as f64 / secs, "backlog_events": backlog,
            "freshness_ms": {"p50": p50, "p99": p99, "probes": fresh.len()},
            "cpu_s_per_million": {"agent": per_m(cpu1.0 - cpu0.0), "collector": per_m(cpu1.1 - cpu0.1)}, "sustained": sustained,
        }));
        // Let the backlog drain before the next rate.
        let deadline = Instant::now() + Duration::from_secs(600);
        while status(&agent)["buffered_events"].as_u64().unwrap_or(0) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !sustained {
            break;
        }
    }
    md += &format!("\nHighest sustained rate: **{:.0} k events/s**.\n", best / 1e3);
    (json!({ "rows": rows, "sustained_per_sec": best }), md)
}

// ---- 3. collector ingest ----

/// A sealed frame of `n` realistic events from `t` for `agent`; returns it with its raw
/// (uncompressed) payload size.
fn frame(t: &mut Traffic, agent: &str, seq: u64, n: usize, fp: &Fingerprinter) -> (Vec<u8>, u64) {
    let d = FixedDefaults {
        agent_id: agent.to_string(),
        context: Context::default(),
        now: keytrail_common::time::now_ns(),
    };
    let body: String = (0..n).map(|_| t.event() + "\n").collect();
    let events =
        event::parse_body(body.as_bytes(), BodyFormat::Ndjson, fp, &d, n).unwrap_or_else(|e| die(&e.to_string()));
    let mut payload = Vec::new();
    for e in &events {
        wire::append_event(e, &mut payload);
    }
    let raw = payload.len() as u64;
    (
        wire::seal_frame(agent, BatchSeq(seq), events.len() as u32, &payload, 3),
        raw,
    )
}

fn tls_stream(pki: &Path, agent: &str, port: u16) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let cfg = keytrail_common::tls::client_config(
        &pki.join("ca.crt"),
        Some((&pki.join(format!("{agent}.crt")), &pki.join(format!("{agent}.key")))),
    )
    .unwrap_or_else(|e| die(&e));
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().expect("server name"))
        .unwrap_or_else(|e| die(&e.to_string()));
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| die(&e.to_string()));
    tcp.set_nodelay(true).ok();
    rustls::StreamOwned::new(conn, tcp)
}

/// Posts a frame on a keep-alive connection; returns the status.
fn post_frame<S: Read + Write>(s: &mut BufReader<S>, frame: &[u8]) -> u16 {
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-keytrail-batch\r\nContent-Length: {}\r\n\r\n",
        frame.len()
    );
    let w = s.get_mut();
    w.write_all(head.as_bytes()).unwrap_or_else(|e| die(&e.to_string()));
    w.write_all(frame).unwrap_or_else(|e| die(&e.to_string()));
    w.flush().ok();
    let mut line = String::new();
    s.read_line(&mut line).unwrap_or_else(|e| die(&e.to_string()));
    let status = line.split(' ').nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut len = 0;
    loop {
        line.clear();
        s.read_line(&mut line).unwrap_or_else(|e| die(&e.to_string()));
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap_or_else(|e| die(&e.to_string()));
    status
}

fn collector_ingest(o: &Opts) -> (Value, String) {
    let sb = Sandbox::new("bench-collector");
    let fp = Fingerprinter::from_file(&sb.secret).unwrap_or_else(|e| die(&e));
    let per_frame = 5000;
    let frames_per_conn = ((o.seconds * 300_000.0 / 4.0) as usize / per_frame).max(4);
    eprintln!(
        "keytrail-bench: sealing {} frames of {per_frame} events …",
        4 * frames_per_conn
    );
    // Two agents × two connections, each connection with its own sequence range. Frames are
    // made round-robin, so event times interleave across connections as they do across agents
    // running side by side.
    let conns = ["agent-a", "agent-a", "agent-b", "agent-b"];
    let mut sets: Vec<(String, Vec<Vec<u8>>)> = conns.iter().map(|a| (a.to_string(), Vec::new())).collect();
    let mut traffic: Vec<Traffic> = (0..conns.len()).map(|c| Traffic::new(77 + c as u64, 5000)).collect();
    let mut raw = 0;
    for k in 0..frames_per_conn {
        for (c, agent) in conns.iter().enumerate() {
            let (f, r) = frame(&mut traffic[c], agent, c as u64 * 1_000_000 + k as u64, per_frame, &fp);
            raw += r;
            sets[c].1.push(f);
        }
    }
    let wire_bytes: u64 = sets.iter().flat_map(|(_, f)| f.iter()).map(|f| f.len() as u64).sum();
    let events = (4 * frames_per_conn * per_frame) as u64;
    let mut rows = Vec::new();
    for r in 0..o.runs {
        let _ = std::fs::remove_dir_all(sb.path("collector-data"));
        let collector = Collector::start(&sb, CollectorOpts::default());
        let pid = pid_of(&collector.proc);
        let sampler = RssSampler::start(pid);
        let cpu0 = cpu_secs(pid);
        let t0 = Instant::now();
        let handles: Vec<_> = sets
            .iter()
            .map(|(agent, frames)| {
                let (agent, frames, port, pki) =
                    (agent.clone(), frames.clone(), collector.receive.port(), sb.pki.clone());
                std::thread::spawn(move || {
                    let mut s = BufReader::new(tls_stream(&pki, &agent, port));
                    for f in &frames {
                        let status = post_frame(&mut s, f);
                        if status != 200 {
                            die(&format!("collector answered {status}"));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|_| die("a sender panicked"));
        }
        // Stored means counted by the analytics too (stats move after they applied a group).
        let mut stored = collector.stored();
        while stored < events && t0.elapsed() < Duration::from_secs(600) {
            std::thread::sleep(Duration::from_millis(2));
            stored = collector.stored();
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu0;
        let peak = sampler.peak_mib();
        if stored != events {
            die(&format!("collector stored {stored} of {events} events"));
        }
        eprintln!("run {r}: {:.0} events/s", events as f64 / secs);
        rows.push(
            json!({"seconds": secs, "events": events, "events_per_sec": events as f64 / secs,
            "cpu_s_per_million": cpu / (events as f64 / 1e6), "peak_rss_mib": peak}),
        );
    }
    let eps = median(
        rows.iter()
            .map(|r| r["events_per_sec"].as_f64().unwrap_or(0.0))
            .collect(),
    );
    let cpu = median(
        rows.iter()
            .map(|r| r["cpu_s_per_million"].as_f64().unwrap_or(0.0))
            .collect(),
    );
    let rss = median(rows.iter().map(|r| r["peak_rss_mib"].as_f64().unwrap_or(0.0)).collect());
    let md = format!(
        "{events} unique events in frames of {per_frame} (zstd 3, {:.1} wire bytes/event, {:.0} raw), sent over mTLS by 2 agents × 2 connections, \
         one frame in flight per connection; a fresh collector per run (dedup, rollups, group commit, fsync); medians of {} runs.\n\n\
         | what | value |\n|---|---:|\n| stored | {:.0} k events/s |\n| collector CPU per million events | {cpu:.2} s |\n| collector peak RSS | {rss:.0} MiB |\n",
        wire_bytes as f64 / events as f64,
        raw as f64 / events as f64,
        rows.len(),
        eps / 1e3
    );
    (
        json!({"events_per_sec_median": eps, "cpu_s_per_million_median": cpu, "peak_rss_mib_median": rss,
        "wire_bytes_per_event": wire_bytes as f64 / events as f64, "runs": rows}),
        md,
    )
}

// ---- 4. proxy ----

fn proxy(o: &Opts) -> (Value, String) {
    // nginx from Debian, for the side-by-side (the script does nothing when it is there).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match Command::new("sh").arg(root.join("scripts/bench-deps.sh")).status() {
        Ok(s) if s.success() => {}
        other => eprintln!("keytrail-bench: scripts/bench-deps.sh failed ({other:?}); the proxy runs without nginx"),
    }
    let exe = bin("keytrail-proxy-bench");
    let mut cmd = Command::new(&exe);
    cmd.env("KT_NO_BUILD", "1")
        .args(["--rounds", &o.runs.to_string(), "--seconds", &o.seconds.to_string()]);
    let text = stdout_of(cmd, "keytrail-proxy-bench");
    // Two tables: medians over rounds, then all rounds' sequential calls pooled.
    let (medians, pooled) = text
        .split_once("All rounds'")
        .unwrap_or_else(|| die("keytrail-proxy-bench printed no pooled table"));
    // Each row as an object with these keys, in the table's column order.
    let objects = |table: &str, keys: &[&str]| -> Vec<Value> {
        table_cells(table, "| target")
            .into_iter()
            .map(|c| {
                Value::Object(
                    keys.iter()
                        .enumerate()
                        .map(|(i, k)| (k.to_string(), c.get(i).cloned().map_or(Value::Null, Value::from)))
                        .collect(),
                )
            })
            .collect()
    };
    let rows = objects(
        medians,
        &[
            "target",
            "p50_us",
            "p99_us",
            "added_p50_us",
            "added_p99_us",
            "req_per_sec_16_connections",
        ],
    );
    let pooled = objects(
        pooled,
        &["target", "calls", "p50_us", "p99_us", "added_p50_us", "added_p99_us"],
    );
    (json!({"rows": rows, "pooled": pooled, "markdown": text}), text)
}

// ---- 5. footprint ----

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Bytes per event of the frames in the agent's sealed batch files, which are what it sends:
/// each file is a 25-byte header (`1 ‖ crc32 ‖ count u32 ‖ sealed i64 ‖ first_arrived i64`,
/// agent/src/buffer.rs) and the frame. Returns the number of files too.
fn sealed_wire_bytes(dir: &Path) -> (u64, f64) {
    let (mut files, mut frame_bytes, mut events) = (0u64, 0u64, 0u64);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("batch") {
            continue;
        }
        let mut head = [0u8; 9];
        let read = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head));
        let len = entry.metadata().map_or(0, |m| m.len());
        if read.is_ok() && len > 25 {
            files += 1;
            frame_bytes += len - 25;
            events += u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) as u64;
        }
    }
    (files, frame_bytes as f64 / events.max(1) as f64)
}

fn footprint(o: &Opts) -> (Value, String) {
    let sb = Sandbox::new("bench-footprint");
    // No collector: everything stays in the buffer.
    let agent = bench_agent(&sb, "https://localhost:9");
    let pid = pid_of(&agent.proc);
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_mib(pid);
    let sampler = RssSampler::start(pid);
    let target = o.events;
    let mut run = 100;
    let mut buffered = 0;
    let t0 = Instant::now();
    while buffered < target {
        run += 1;
        drive_agent(&agent.ingest.to_string(), 8, 500, 5.0, run, None).unwrap_or_else(|e| die(&e));
        buffered = status(&agent)["buffered_events"].as_u64().unwrap_or(0);
        eprintln!("keytrail-bench: {buffered} events buffered");
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let under_load = sampler.peak_mib();
    std::thread::sleep(Duration::from_secs(5));
    let backlog_rest = rss_mib(pid);
    let st = status(&agent);
    let record_bytes = st["buffered_bytes"].as_u64().unwrap_or(0);
    let disk = dir_bytes(&agent.data_dir);
    let (sealed_batches, sealed_wire) = sealed_wire_bytes(&agent.data_dir.join("sealed"));
    // Restarted on the backlog.
    let mut agent = agent;
    agent.restart();
    std::thread::sleep(Duration::from_secs(3));
    let restarted = rss_mib(pid_of(&agent.proc));
    // Wire bytes per event: a batch of 5,000 generated events as the agent seals it.
    let fp = Fingerprinter::from_file(&sb.secret).unwrap_or_else(|e| die(&e));
    let mut t = Traffic::new(5, 5000);
    let wire = (0..4)
        .map(|k| frame(&mut t, "agent-a", k, 5000, &fp).0.len())
        .sum::<usize>() as f64
        / 20_000.0;
    let size = |n: &str| std::fs::metadata(bin(n)).map_or(0, |m| m.len());
    let (agent_bin, collector_bin) = (size("keytrail-agent"), size("keytrail-collector"));
    let md = format!(
        "Agent alone (collector unreachable), production batch settings; 8 × 500 until {buffered} events were buffered ({load_secs:.0} s).\n\n\
         | what | value |\n|---|---:|\n\
         | agent RSS idle, empty buffer | {idle:.1} MiB |\n\
         | agent peak RSS while loading the backlog | {under_load:.1} MiB |\n\
         | agent RSS holding the {:.1} M-event backlog, at rest | {backlog_rest:.1} MiB |\n\
         | agent RSS restarted on that backlog | {restarted:.1} MiB |\n\
         | buffer records per event | {:.1} B |\n\
         | buffer directory on disk per event (sled files + sealed batches) | {:.1} B |\n\
         | wire bytes per event, the frames the agent sealed ({sealed_batches} batches) | {sealed_wire:.1} B |\n\
         | wire bytes per event, one 5,000-event frame of the same traffic (zstd 3) | {wire:.1} B |\n\
         | binaries (release, with debug info stripped or not as built) | agent {:.1} MB, collector {:.1} MB |\n",
        buffered as f64 / 1e6,
        record_bytes as f64 / buffered.max(1) as f64,
        disk as f64 / buffered.max(1) as f64,
        agent_bin as f64 / 1e6,
        collector_bin as f64 / 1e6,
    );
    (
        json!({"idle_rss_mib": idle, "load_peak_rss_mib": under_load, "backlog_rss_mib": backlog_rest, "restarted_rss_mib": restarted,
               "buffered_events": buffered, "record_bytes_per_event": record_bytes as f64 / buffered.max(1) as f64,
               "disk_bytes_per_event": disk as f64 / buffered.max(1) as f64, "wire_bytes_per_event": wire,
               "sealed_wire_bytes_per_event": sealed_wire, "sealed_batches": sealed_batches,
               "binary_bytes": {"agent": agent_bin, "collector": collector_bin}}),
        md,
    )
}

// ---- 6. queries ----

fn queries(o: &Opts) -> (Value, String) {
    let dir = std::env::temp_dir().join(format!("kt-bench-queries-{}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "keytrail-collector",
        "--example",
        "metrics_bench",
        "--",
    ])
    .arg(o.events.to_string())
    .args(["10000", "90"])
    .arg(&dir)
    .env("RUST_LOG", "error");
    let text = stdout_of(cmd, "metrics_bench");
    let _ = std::fs::remove_dir_all(&dir);
    let rows: Vec<Value> = table_cells(&text, "| metric")
        .into_iter()
        .map(|c| {
            json!({"metric": c.first(), "by": c.get(1), "p50_ms": c.get(2).and_then(|v| v.parse::<f64>().ok()),
                   "p99_ms": c.get(3).and_then(|v| v.parse::<f64>().ok()), "rows": c.get(4)})
        })
        .collect();
    let worst = rows.iter().filter_map(|r| r["p99_ms"].as_f64()).fold(0.0, f64::max);
    (json!({"rows": rows, "worst_p99_ms": worst, "output": text}), text)
}
