//! Load generation against an agent's `POST /v1/events`: keep-alive connections posting
//! realistic NDJSON bodies, every event id unique, time-to-202 measured per request. Used by
//! `keytrail-load` and `keytrail-bench`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::traffic::Traffic;

/// What one load run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadResult {
    pub connections: usize,
    pub batch: usize,
    pub seconds: f64,
    pub events: u64,
    pub events_per_sec: f64,
    pub requests: usize,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
}

/// Drives `agent` (host:port) with `conns` connections posting `batch` events per request for
/// `seconds`, as fast as acknowledged or, with `rate`, paced to that many events/s in all.
/// `run` keeps event ids unique across runs against the same collector.
pub fn drive_agent(
    agent: &str,
    conns: usize,
    batch: usize,
    seconds: f64,
    run: u32,
    rate: Option<f64>,
) -> Result<LoadResult, String> {
    // Per connection: one request every `interval`, on a fixed schedule.
    let interval = rate.map(|r| Duration::from_secs_f64(batch as f64 * conns as f64 / r.max(1.0)));
    // Bodies are prepared up front so the generator spends its CPU on sending, not formatting.
    // Every event id carries a fixed-width request counter that is patched in place before
    // each send, so every event ever sent is unique (the collector would otherwise count
    // replays as duplicates).
    let bodies: Vec<Vec<(Vec<u8>, Vec<usize>)>> = (0..conns)
        .map(|c| {
            let mut t = Traffic::new(1000 + c as u64, 5000);
            (0..16).map(|b| template(&mut t, run, c, b, batch)).collect()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|mut bodies| {
            let agent = agent.to_string();
            std::thread::spawn(move || -> Result<(u64, Vec<Duration>), String> {
                let stream = TcpStream::connect(&agent).map_err(|e| format!("connecting to {agent}: {e}"))?;
                stream.set_nodelay(true).ok();
                let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
                let mut writer = stream;
                let mut lat = Vec::new();
                let mut events = 0u64;
                let mut i = 0;
                let mut next = Instant::now();
                while Instant::now() < deadline {
                    if let Some(iv) = interval {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += iv;
                    }
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
                    writer.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
                    writer.write_all(body).map_err(|e| e.to_string())?;
                    let status = read_response(&mut reader)?;
                    if status != 202 {
                        return Err(format!("agent answered {status}"));
                    }
                    lat.push(t0.elapsed());
                    events += batch as u64;
                }
                Ok((events, lat))
            })
        })
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for h in handles {
        let (e, l) = h.join().map_err(|_| "a load thread panicked".to_string())??;
        total += e;
        lat.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len().max(1)) - 1)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(LoadResult {
        connections: conns,
        batch,
        seconds: elapsed,
        events: total,
        events_per_sec: total as f64 / elapsed,
        requests: lat.len(),
        ack_p50_ms: pct(0.50),
        ack_p99_ms: pct(0.99),
    })
}

/// A body of `batch` NDJSON events whose ids are `L<run>-<conn>-<body>-<10-digit counter>-<i>`;
/// returns it with the offsets of the counter digits.
fn template(t: &mut Traffic, run: u32, conn: usize, body: usize, batch: usize) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut slots = Vec::with_capacity(batch);
    for i in 0..batch {
        let line = t.event();
        // Every generated line starts with {"id":"…", — keep what follows the id.
        let rest = &line[line.find("\",").expect("id field")..];
        let head = format!("{{\"id\":\"L{run}-{conn}-{body}-");
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
fn read_response(r: &mut BufReader<TcpStream>) -> Result<u16, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status)
}
