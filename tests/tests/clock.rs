//! Clock trouble (issue 5): agents whose clocks run hours ahead of or behind the collector's,
//! run under libfaketime (`scripts/test-deps.sh` installs it). Their requests carry their
//! clock; the collector measures each agent's offset, exports it, and stores event times by
//! its own clock. Events that carry their own time outside 2000..2100 are refused at the
//! agent (common's unit tests).

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
        // The agent really runs on the skewed clock: its own view of "now".
        let lines: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"id":"{name}-{i}","type":"license.validated","license":"lic-{name}"}}"#))
            .collect();
        agent.post_until_accepted(&lines, WAIT);
        agents.push((name, skew, agent));
    }
    collector.wait_stored(80, WAIT, None);
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
}
