//! `keytrail-load`: drives an agent's `POST /v1/events` with keep-alive connections and reports
//! acknowledged events/s and time-to-acknowledge percentiles. A measuring tool, not a test:
//! results depend on the machine, so record them with it (see docs/benchmarks.md).
//!
//! keytrail-load --agent 127.0.0.1:7070 [--connections 8] [--batch 500] [--seconds 10]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use keytrail_tests::traffic::Traffic;

fn main() {
    let mut agent = "127.0.0.1:7070".to_string();
    let (mut conns, mut batch, mut seconds) = (8usize, 500usize, 10u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
        match a.as_str() {
            "--agent" => agent = v.trim_start_matches("http://").to_string(),
            "--connections" => conns = v.parse().unwrap_or_else(|_| die("--connections: a count")),
            "--batch" => batch = v.parse().unwrap_or_else(|_| die("--batch: events per request")),
            "--seconds" => seconds = v.parse().unwrap_or_else(|_| die("--seconds: a duration")),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    // Bodies are prepared up front so the generator spends its CPU on sending, not formatting.
    // Every event id carries a fixed-width request counter that is patched in place before
    // each send, so every event ever sent is unique (the collector would otherwise count
    // replays as duplicates).
    let bodies: Vec<Vec<(Vec<u8>, Vec<usize>)>> = (0..conns)
        .map(|c| {
            let mut t = Traffic::new(1000 + c as u64, 5000);
            (0..16).map(|b| template(&mut t, c, b, batch)).collect()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|mut bodies| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(&agent).unwrap_or_else(|e| die(&format!("connecting to {agent}: {e}")));
                stream.set_nodelay(true).ok();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut lat = Vec::new();
                let mut events = 0u64;
                let mut i = 0;
                while Instant::now() < deadline {
                    let n = bodies.len();
                    let (body, slots) = &mut bodies[i % n];
                    let stamp = format!("{:010}", i / n);
                    for &at in slots.iter() {
                        body[at..at + 10].copy_from_slice(stamp.as_bytes());
                    }
                    i += 1;
                    let body = &*body;
                    let t0 = Instant::now();
                    let head = format!(
                        "POST /v1/events HTTP/1.1\r\nHost: {agent}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    writer.write_all(head.as_bytes()).unwrap();
                    writer.write_all(body).unwrap();
                    let status = read_response(&mut reader);
                    if status != 202 {
                        die(&format!("agent answered {status}"));
                    }
                    lat.push(t0.elapsed());
                    events += batch as u64;
                }
                (events, lat)
            })
        })
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for h in handles {
        let (e, l) = h.join().unwrap();
        total += e;
        lat.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    println!(
        "{{\"connections\":{conns},\"batch\":{batch},\"seconds\":{elapsed:.2},\"events\":{total},\"events_per_sec\":{:.0},\"requests\":{},\"ack_p50_ms\":{:.2},\"ack_p99_ms\":{:.2}}}",
        total as f64 / elapsed,
        lat.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
}

/// A body of `batch` NDJSON events whose ids are `L<conn>-<body>-<10-digit counter>-<i>`;
/// returns it with the offsets of the counter digits.
fn template(t: &mut Traffic, conn: usize, body: usize, batch: usize) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut slots = Vec::with_capacity(batch);
    for i in 0..batch {
        let line = t.event();
        // Every generated line starts with {"id":"…", — keep what follows the id.
        let rest = &line[line.find("\",").expect("id field")..];
        let head = format!("{{\"id\":\"L{conn}-{body}-");
        slots.push(out.len() + head.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(format!("0000000000-{i}").as_bytes());
        out.extend_from_slice(rest.as_bytes());
        out.push(b'\n');
    }
    (out, slots)
}

/// Reads one response; returns its status. Bodies are sized by Content-Length (the agent
/// never chunks its small JSON answers).
fn read_response(r: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    status
}

fn die(msg: &str) -> ! {
    eprintln!("keytrail-load: {msg}");
    std::process::exit(2)
}
