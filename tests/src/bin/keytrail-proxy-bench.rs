//! `keytrail-proxy-bench`: the latency the agent's proxy adds to a license call, against a
//! direct connection and against nginx as a reverse proxy, measured in the same run.
//!
//! keytrail-proxy-bench [--requests 20000] [--rounds 3] [--seconds 5] [--targets keytrail,nginx[,nginx-log]]
//!                      [--collector none|local]
//!
//! Starts a Keygen-shaped upstream (keep-alive, answers a validate-key call), a keytrail agent
//! with `[proxy] adapter = "keygen"` in front of it (recording every call into its durable
//! buffer, with the batch and backoff settings it ships with; with `--collector none`, the
//! default, its collector does not exist and nothing is shipped; with `local`, a collector on
//! this machine receives the batches over mTLS as they are sealed), and nginx (`proxy_pass` with upstream
//! keep-alive, one worker, no access log, keep-alive without a request limit) if `nginx` is
//! installed (`scripts/bench-deps.sh`). Named in `--targets`, `nginx-log` adds nginx writing an
//! access log (buffered, flushed every 50 ms) that a thread of the bench `fdatasync`s every 50 ms:
//! a proxy that keeps a durable record of each call at the least cost.
//! Per round: each target's sequential requests on one keep-alive connection (p50/p99
//! latency), then each target under 16 connections for `--seconds` (requests/s), with a pause
//! of 2 s after each load but the run's last, so no target is measured while the agent works
//! off a load. Printed as
//! Markdown: medians over rounds, and the quantiles of all rounds' sequential calls together
//! (with many short rounds, the targets meet the same conditions of a shared machine). With `BENCH_TRACE=prefix`, each target's
//! sequential requests (start and latency, µs) are written to `prefix-<port>`. `--targets` limits the run to some of the
//! proxies (the direct call always runs, as the baseline), e.g. to profile one of them. A
//! measuring tool, not a test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keytrail_tests::fake_upstream::{Answer, FakeUpstream};
use keytrail_tests::Sandbox;

const BODY: &str =
    r#"{"meta":{"key":"C1B6DE-39A6E3-DE1529-8559A0-4AF593-V3","scope":{"fingerprint":"4d:Eq:UV:D3:XZ:tL"}}}"#;
const ANSWER: &str = r#"{"data":{"id":"8f1d2c3b-0a9e-4f5d-8c7b-6a5e4d3c2b1a","type":"licenses","attributes":{"expiry":"2027-06-01T00:00:00.000Z","maxMachines":5},"relationships":{"machines":{"meta":{"count":3}},"policy":{"data":{"type":"policies","id":"pro"}}}},"meta":{"ts":"2026-11-23T10:00:00.000Z","valid":true,"detail":"is valid","code":"VALID"}}"#;

/// The pause after each load, before the next target's load or the next round's calls.
const SETTLE: Duration = Duration::from_secs(2);

fn die(m: &str) -> ! {
    eprintln!("keytrail-proxy-bench: {m}");
    std::process::exit(2)
}

fn request(host: SocketAddr) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/vnd.api+json\r\nAccept: application/vnd.api+json\r\nContent-Length: {}\r\n\r\n{BODY}",
        std::env::var("BENCH_PATH").unwrap_or_else(|_| "/v1/accounts/acme/licenses/actions/validate-key".into()),
        BODY.len()
    )
    .into_bytes()
}

/// One keep-alive client connection: sends a request, reads one response (Content-Length).
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    req: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| die(&format!("connecting to {addr}: {e}")));
        s.set_nodelay(true).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
            req: request(addr),
        }
    }

    fn call(&mut self) {
        self.w.write_all(&self.req).unwrap();
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            if self.r.read_line(&mut line).unwrap() == 0 {
                die("connection closed");
            }
            if first {
                if !line.starts_with("HTTP/1.1 200") {
                    die(&format!("unexpected answer: {line}"));
                }
                first = false;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
    }
}

/// `n` sequential calls on one keep-alive connection (after `n / 10` to warm up): each one's
/// latency in µs, sorted.
fn latencies(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut c = Client::new(addr);
    for _ in 0..n / 10 {
        c.call(); // warm-up
    }
    let t0 = Instant::now();
    let t0_monotonic = monotonic_us();
    let mut started = Vec::with_capacity(n);
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            c.call();
            started.push(s - t0);
            s.elapsed()
        })
        .collect();
    if let Ok(prefix) = std::env::var("BENCH_TRACE") {
        // Each request's start and latency in µs, to look for a pattern in the slow ones.
        // The first line places the run on CLOCK_MONOTONIC, the clock `perf record -k mono`
        // stamps its samples with, to line slow requests up with what ran then.
        let head = format!("# t0 {t0_monotonic} (CLOCK_MONOTONIC, µs)\n");
        let lines: String = std::iter::once(head)
            .chain(
                started
                    .iter()
                    .zip(&t)
                    .map(|(s, d)| format!("{} {}\n", s.as_micros(), d.as_micros())),
            )
            .collect();
        let path = format!("{prefix}-{}", addr.port());
        std::fs::write(&path, lines).unwrap_or_else(|e| die(&format!("writing {path}: {e}")));
    }
    t.sort();
    t.into_iter().map(|d| d.as_secs_f64() * 1e6).collect()
}

/// The `p` quantile of sorted latencies.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// CLOCK_MONOTONIC now, in µs.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts)
    };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn throughput(addr: SocketAddr, conns: usize, seconds: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    c.call();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

/// nginx in front of `upstream`, from `dir/<name>`; with `log`, writing its access log there
/// (buffered, flushed every 50 ms) instead of none.
fn nginx(dir: &Path, name: &str, upstream: SocketAddr, log: Option<&Path>) -> Option<(Child, SocketAddr)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n access_log {access};\n keepalive_requests 10000000;\n\
             upstream license {{ server {upstream}; keepalive 32; keepalive_requests 10000000; }}\n\
             server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   proxy_pass http://license;\n   proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n  }}\n }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            err = prefix.join("logs/error.log").display(),
            access = log.map_or("off".to_string(), |l| format!("{} combined buffer=64k flush=50ms", l.display())),
        ),
    )
    .unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return Some((child, addr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let (mut requests, mut rounds, mut seconds) = (20_000usize, 3usize, 5u64);
    let mut only: Option<Vec<String>> = None;
    let mut ship = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
        match a.as_str() {
            "--requests" => requests = v.parse().unwrap_or_else(|_| die("--requests: a count")),
            "--rounds" => rounds = v.parse().unwrap_or_else(|_| die("--rounds: a count")),
            "--seconds" => seconds = v.parse().unwrap_or_else(|_| die("--seconds: a duration")),
            "--targets" => only = Some(v.split(',').map(str::to_string).collect()),
            "--collector" => {
                ship = match v.as_str() {
                    "none" => false,
                    "local" => true,
                    _ => die("--collector: none or local"),
                }
            }
            _ => die(&format!("unknown argument {a}")),
        }
    }
    let up = FakeUpstream::start(Arc::new(|_req: &keytrail_tests::fake_upstream::Seen| Answer {
        status: 200,
        headers: vec![
            ("Content-Type".into(), "application/vnd.api+json; charset=utf-8".into()),
            (
                "Keygen-Signature".into(),
                "keyid=\"acme\", algorithm=\"ed25519\", signature=\"c2ln\"".into(),
            ),
        ],
        body: ANSWER.as_bytes().to_vec(),
    }));
    let sb = Sandbox::new("proxy-bench");
    let collector = ship.then(|| keytrail_tests::Collector::start(&sb, keytrail_tests::CollectorOpts::default()));
    let mut opts = keytrail_tests::AgentOpts::new(&sb, "agent-a");
    // The agent's own batch and backoff settings. The test harness seals 500-event batches
    // every 100 ms, ten times the sealing work of an agent as shipped, and retries an absent
    // collector every 500 ms, where an agent backs off to 30 s.
    opts.batch_max_events = 5_000;
    opts.batch_timeout = "1s".into();
    opts.backoff_max = "30s".into();
    opts.extra_toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{}\"\nadapter = \"keygen\"\n",
        up.addr
    );
    // Without a collector, one that does not exist: the agent records, nothing ships.
    let collector_url = collector.as_ref().map_or_else(
        || "https://127.0.0.1:9".to_string(),
        |c| format!("https://{}", c.receive),
    );
    let agent = keytrail_tests::Agent::start(&sb, &collector_url, opts);
    let proxy = agent.proxy.unwrap_or_else(|| die("the agent did not start its proxy"));
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|t| name.starts_with(t.as_str())))
    };
    let ng = if wanted("nginx") {
        nginx(sb.path("").as_path(), "nginx", up.addr, None)
    } else {
        None
    };
    // Only when asked for by name: nginx whose access log is made durable every 50 ms by a
    // thread of this process (`fdatasync`), the least a proxy that keeps a durable record of
    // every call has to do: what keytrail's recording costs beyond that, and what durability
    // itself costs on cores shared with the client and the upstream.
    let logged_path = sb.path("nginx-log.access");
    let logged = if only.as_ref().is_some_and(|o| o.iter().any(|t| t == "nginx-log")) {
        nginx(sb.path("").as_path(), "nginx-log", up.addr, Some(&logged_path))
    } else {
        None
    };
    let syncing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let syncer = logged.as_ref().map(|_| {
        let (syncing, path) = (Arc::clone(&syncing), logged_path.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| die(&format!("opening {}: {e}", path.display())));
            while syncing.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                file.sync_data()
                    .unwrap_or_else(|e| die(&format!("syncing {}: {e}", path.display())));
            }
        })
    });
    if ng.is_none() {
        eprintln!("nginx not found: run scripts/bench-deps.sh for the side-by-side figures");
    }
    let mut targets: Vec<(&str, SocketAddr)> = vec![("direct", up.addr)];
    if wanted("keytrail") {
        targets.push(("keytrail proxy", proxy));
    }
    if let Some((_, a)) = &ng {
        targets.push(("nginx", *a));
    }
    if let Some((_, a)) = &logged {
        targets.push(("nginx, access log synced every 50 ms", *a));
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); targets.len()];
    // Every sequential call of every round, per target.
    let mut pooled: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let opened = || *up.connections.lock().expect("connection count");
    for round in 0..rounds {
        // The sequential calls of all targets first, then the loads: no target's calls are
        // measured while the agent still works off the load just sent through it.
        for (i, (name, addr)) in targets.iter().enumerate() {
            let before = opened();
            let t = latencies(*addr, requests);
            let (p50, p99) = (quantile(&t, 0.50), quantile(&t, 0.99));
            eprintln!(
                "round {round} {name}: p50 {p50:.0} µs, p99 {p99:.0} µs; upstream connections opened: {} for {} sequential requests",
                opened() - before,
                requests + requests / 10
            );
            results[i].0.push(p50);
            results[i].1.push(p99);
            pooled[i].extend(t);
        }
        for (i, (name, addr)) in targets.iter().enumerate() {
            let before = opened();
            let rps = throughput(*addr, 16, seconds);
            eprintln!(
                "round {round} {name}: {rps:.0} req/s (16 connections); upstream connections opened: {}",
                opened() - before
            );
            results[i].2.push(rps);
            if round + 1 < rounds || i + 1 < targets.len() {
                // The agent seals what the load left within its batch timeout (1 s).
                std::thread::sleep(SETTLE);
            }
        }
    }
    let (_, status) = agent.get_json("/v1/status");
    let (d50, d99) = (median(results[0].0.clone()), median(results[0].1.clone()));
    println!("Medians over rounds:\n");
    println!("| target | p50 µs | p99 µs | added p50 µs | added p99 µs | req/s, 16 connections |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (name, _)) in targets.iter().enumerate() {
        let (p50, p99, rps) = (
            median(results[i].0.clone()),
            median(results[i].1.clone()),
            median(results[i].2.clone()),
        );
        println!(
            "| {name} | {p50:.0} | {p99:.0} | {:.0} | {:.0} | {rps:.0} |",
            p50 - d50,
            p99 - d99
        );
    }
    println!("\nAll rounds' sequential calls together:\n");
    println!("| target | calls | p50 µs | p99 µs | added p50 µs | added p99 µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    for t in &mut pooled {
        t.sort_by(f64::total_cmp);
    }
    let (d50, d99) = (quantile(&pooled[0], 0.50), quantile(&pooled[0], 0.99));
    for (i, (name, _)) in targets.iter().enumerate() {
        let (p50, p99) = (quantile(&pooled[i], 0.50), quantile(&pooled[i], 0.99));
        println!(
            "| {name} | {} | {p50:.0} | {p99:.0} | {:.0} | {:.0} |",
            pooled[i].len(),
            p50 - d50,
            p99 - d99
        );
    }
    println!(
        "\nrecorded by the proxy: {} events, not recorded: {} ({})",
        status["proxy"]["recorded_events_total"],
        status["proxy"]["unrecorded_total"],
        status["proxy"]["unrecorded_by_reason"]
    );
    if collector.is_some() {
        println!(
            "shipped to the local collector: {} events, {} buffered",
            status["shipped_events_total"], status["buffered_events"]
        );
    }
    syncing.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = syncer {
        let _ = s.join();
    }
    for (mut child, _) in ng.into_iter().chain(logged) {
        // SIGTERM, not SIGKILL: the master stops its worker too (a killed master leaves the
        // worker running).
        // SAFETY: sending a signal to our own child process id.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
    }
}
