//! Clock trouble (issue 5): agents whose clocks run hours ahead of or behind the collector's,
//! run under libfaketime (`scripts/test-deps.sh` installs it). Each answer of the collector
//! carries its clock; an agent corrects the times it stamps itself by the difference, and
//! keeps the times its clients send. The collector exports each agent's offset. Events that
//! carry their own time outside 2000..2100 are refused at the agent (common's unit tests).

use std::time::Duration;

use keytrail_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const HOUR: i64 = 3600;

fn libfaketime() -> String {
    for dir in [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ] {
        let lib = format!("{dir}/libfaketime.so.1");
        if std::path::Path::new(&lib).exists() {
            return lib;
        }
    }
    panic!("libfaketime is not installed: run scripts/test-deps.sh (the README's test command does)");
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn agents_with_skewed_clocks_have_their_event_times_corrected() {
    let sb = Sandbox::new("clock");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let lib = libfaketime();
    let mut agents = Vec::new();
    for (name, skew) in [("agent-a", 3 * HOUR), ("agent-b", -5 * HOUR)] {
        let mut opts = AgentOpts::new(&sb, name);
        opts.env = vec![
            ("LD_PRELOAD".into(), lib.clone()),
            ("FAKETIME".into(), format!("{skew:+}s")),
            // Timers and timeouts keep the real monotonic clock.
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ];
        let agent = Agent::start(&sb, &collector.url(), opts);
        // One answer from the collector is enough to know the offset.
        agent.wait_ready(200, WAIT);
        let (_, status) = agent.get_json("/v1/status");
        let offset = status["clock_offset_seconds"]
            .as_f64()
            .expect("offset known after contact");
        assert!(
            (offset + skew as f64).abs() < 60.0,
            "{name}: offset {offset}, skew {skew}"
        );
        // The agent really runs on the skewed clock: its own view of "now" stamps these.
        let mut lines: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"id":"{name}-{i}","type":"license.validated","license":"lic-{name}"}}"#))
            .collect();
        // A client with its own (right) clock: its time is kept.
        lines.push(format!(
            r#"{{"id":"{name}-given","type":"license.validated","license":"lic-{name}-given","time":"2026-11-01T10:00:00Z"}}"#
        ));
        agent.post_until_accepted(&lines, WAIT);
        agents.push((name, skew, agent));
    }
    collector.wait_stored(82, WAIT, None);
    let real_now = now_s();
    for (name, skew, _agent) in &agents {
        let (status, body) = http(
            collector.api,
            "GET",
            &format!("/v1/events?license=lic-{name}&limit=100"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 40);
        let (_, given) = http(
            collector.api,
            "GET",
            &format!("/v1/events?license=lic-{name}-given"),
            &[],
            b"",
        )
        .unwrap();
        assert!(
            given.contains("2026-11-01T10:00:00Z"),
            "a client's own time is kept: {given}"
        );
        for e in events {
            let t = e["time"].as_str().unwrap();
            let out = std::process::Command::new("date")
                .args(["-u", "-d", t, "+%s"])
                .output()
                .unwrap();
            let secs: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert!(
                (secs - real_now).abs() < 120,
                "{name} (clock {skew:+} s): event time {t} is not the collector's now ({real_now})"
            );
        }
    }
    let (_, metrics) = http(collector.api, "GET", "/metrics", &[], b"").unwrap();
    for (name, skew, _) in &agents {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "keytrail_collector_agent_clock_offset_seconds{{agent_id=\"{name}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no clock offset for {name}:\n{metrics}"));
        let offset: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (offset + *skew as f64).abs() < 60.0,
            "{name}: measured offset {offset}, clock skewed {skew:+} s"
        );
    }
    let log = std::fs::read_to_string(&collector.proc.log).unwrap();
    assert!(log.contains("an agent's clock is off"), "the skew is logged");
    for (name, _, agent) in &agents {
        let log = std::fs::read_to_string(&agent.proc.log).unwrap();
        assert!(log.contains("differs from the collector's"), "{name} logs its skew");
    }
}
