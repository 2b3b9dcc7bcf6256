//! `keytrail-load`: drives an agent's `POST /v1/events` with keep-alive connections and reports
//! acknowledged events/s and time-to-acknowledge percentiles. A measuring tool, not a test:
//! results depend on the machine, so record them with it (see docs/benchmarks.md).
//!
//! keytrail-load --agent 127.0.0.1:7070 [--connections 8] [--batch 500] [--seconds 10] [--rate EVENTS_PER_S]

fn main() {
    let mut agent = "127.0.0.1:7070".to_string();
    let (mut conns, mut batch, mut seconds) = (8usize, 500usize, 10f64);
    let mut rate = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
        match a.as_str() {
            "--agent" => agent = v.trim_start_matches("http://").to_string(),
            "--connections" => conns = v.parse().unwrap_or_else(|_| die("--connections: a count")),
            "--batch" => batch = v.parse().unwrap_or_else(|_| die("--batch: events per request")),
            "--seconds" => seconds = v.parse().unwrap_or_else(|_| die("--seconds: a duration")),
            "--rate" => rate = Some(v.parse().unwrap_or_else(|_| die("--rate: events/s"))),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    let run = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 1_000_000) as u32;
    match keytrail_tests::load::drive_agent(&agent, conns, batch, seconds, run, rate) {
        Ok(r) => println!("{}", serde_json::to_string(&r).expect("json")),
        Err(e) => die(&e),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("keytrail-load: {msg}");
    std::process::exit(2)
}
