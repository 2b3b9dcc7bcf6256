//! `keytrail-traffic`: posts realistic sample license events to an agent's local API.
//!
//! keytrail-traffic [--agent http://127.0.0.1:7070] [--rate 200] [--licenses 500]
//!                  [--batch 20] [--seed N] [--count N]
//!
//! Runs until `--count` events were accepted (default: forever); retries refused requests
//! with the same event ids, as an SDK should.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keytrail_tests::traffic::Traffic;

fn main() {
    let mut agent = "127.0.0.1:7070".to_string();
    let (mut rate, mut licenses, mut batch, mut count) = (200.0f64, 500u32, 20usize, u64::MAX);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--agent" => agent = val().trim_start_matches("http://").trim_end_matches('/').to_string(),
            "--rate" => rate = val().parse().unwrap_or_else(|_| usage("--rate: events per second")),
            "--licenses" => licenses = val().parse().unwrap_or_else(|_| usage("--licenses: a count")),
            "--batch" => batch = val().parse().unwrap_or_else(|_| usage("--batch: events per request")),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage("--seed: an integer")),
            "--count" => count = val().parse().unwrap_or_else(|_| usage("--count: an integer")),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let addr: SocketAddr = agent.parse().unwrap_or_else(|_| usage("--agent: http://ip:port"));
    let mut traffic = Traffic::new(seed, licenses);
    let mut sent = 0u64;
    let start = Instant::now();
    let mut last_report = Instant::now();
    while sent < count {
        let n = batch.min((count - sent) as usize).max(1);
        let lines: Vec<String> = (0..n).map(|_| traffic.event()).collect();
        let body = lines.join("\n");
        loop {
            match keytrail_tests::http(
                addr,
                "POST",
                "/v1/events",
                &[("Content-Type", "application/x-ndjson")],
                body.as_bytes(),
            ) {
                Some((202, _)) => break,
                Some((400, b)) => {
                    eprintln!("keytrail-traffic: the agent refused a request: {b}");
                    std::process::exit(1);
                }
                other => {
                    eprintln!("keytrail-traffic: agent not accepting yet ({other:?}); retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        sent += n as u64;
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!("keytrail-traffic: {sent} events accepted");
            last_report = Instant::now();
        }
        let due = Duration::from_secs_f64(sent as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    eprintln!("keytrail-traffic: done, {sent} events accepted");
}

fn usage(msg: &str) -> ! {
    eprintln!("keytrail-traffic: {msg}\nusage: keytrail-traffic [--agent http://127.0.0.1:7070] [--rate 200] [--licenses 500] [--batch 20] [--seed N] [--count N]");
    std::process::exit(2)
}
