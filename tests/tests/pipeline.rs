//! End-to-end: the pipeline's promises, with real processes (issue 2's list).

use std::time::Duration;

use keytrail_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// N events posted, all 202'd, the agent SIGKILLed mid-stream and restarted: the collector
/// ends with exactly N stored. Requests cut off by the kill are retried with the same ids, as
/// an SDK would; the collector must not count those twice.
#[test]
fn agent_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice() {
    let sb = Sandbox::new("agent-kill");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let mut agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    let events = validations("kill", 3000);
    let chunks: Vec<&[String]> = events.chunks(30).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        if i == chunks.len() / 3 || i == 2 * chunks.len() / 3 {
            agent.proc.kill9();
            agent.restart();
        }
        agent.post_until_accepted(chunk, WAIT);
    }
    collector.wait_stored(3000, WAIT, Some(&agent));
    // Let any resend after the restart arrive, then check nothing moved.
    std::thread::sleep(Duration::from_millis(500));
    let stats = collector.stats();
    assert_eq!(stats["events_stored"], 3000);
    assert_eq!(stats["agents"][0]["agent_id"], "agent-a");
    assert_eq!(stats["agents"][0]["events"], 3000);
}

/// A kill that lands while requests are in flight: whatever was 202'd before the kill must
/// arrive; requests without an answer are retried (same ids).
#[test]
fn agent_sigkill_during_concurrent_posts_keeps_every_acknowledged_event() {
    let sb = Sandbox::new("agent-kill-concurrent");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let mut agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    let addr = std::sync::Arc::new(std::sync::Mutex::new(agent.ingest));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let addr = std::sync::Arc::clone(&addr);
            std::thread::spawn(move || {
                for r in 0..50 {
                    let lines = validations(&format!("c{w}-{r}"), 20);
                    let body = lines.join("\n");
                    loop {
                        let a = *addr.lock().unwrap();
                        match post_ndjson_at(a, &body) {
                            Some((202, _)) => break,
                            _ => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    agent.proc.kill9();
    agent.restart();
    *addr.lock().unwrap() = agent.ingest;
    for w in workers {
        w.join().unwrap();
    }
    collector.wait_stored(4 * 50 * 20, WAIT, Some(&agent));
}

/// The collector down for a while (killed while batches flow), then back: the agent buffers,
/// readiness goes red and back to green, and the counts are exact.
#[test]
fn collector_outage_is_buffered_and_caught_up_exactly() {
    let sb = Sandbox::new("outage");
    let mut collector = Collector::start(&sb, CollectorOpts::default());
    let agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    agent.wait_ready(200, WAIT);
    let first = validations("before", 1000);
    for chunk in first.chunks(100) {
        agent.post_until_accepted(chunk, WAIT);
    }
    // Kill mid-stream: some batches are in flight or queued.
    collector.proc.kill9();
    let during = validations("during", 2000);
    for chunk in during.chunks(100) {
        let (status, body) = agent
            .post_ndjson(chunk)
            .expect("agent answers while the collector is down");
        assert_eq!(status, 202, "{body}");
    }
    agent.wait_not_ready_for("stalled", WAIT);
    let (_, status) = agent.get_json("/v1/status");
    assert!(status["buffered_events"].as_u64().unwrap() > 0, "{status}");
    assert!(status["last_ship_error"].is_string(), "{status}");
    collector.restart();
    collector.wait_stored(3000, WAIT, Some(&agent));
    agent.wait_ready(200, WAIT);
    let (_, status) = agent.get_json("/v1/status");
    assert_eq!(status["buffered_events"], 0, "{status}");
    assert!(status["shipped_events_total"].as_u64().unwrap() >= 2000, "{status}");
}

/// The same events (same ids) posted twice: stored once, reported as duplicates.
#[test]
fn same_ids_posted_twice_are_stored_once_and_reported() {
    let sb = Sandbox::new("dups");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    let events = validations("dup", 200);
    agent.post_until_accepted(&events, WAIT);
    collector.wait_stored(200, WAIT, Some(&agent));
    agent.post_until_accepted(&events, WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = collector.stats();
        if s["duplicates_dropped"] == 200 {
            assert_eq!(s["events_stored"], 200);
            assert_eq!(s["events_received"], 400);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A certificate from another CA, or none at all, when mTLS is on: nothing is stored and the
/// agent's readiness says why. A valid certificate claiming another agent's id is refused too.
#[test]
fn agents_without_a_trusted_certificate_are_refused() {
    let sb = Sandbox::new("mtls");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let rogue = sb.rogue_pki();
    let mut stranger = AgentOpts::new(&sb, "agent-a");
    stranger.cert = Some((rogue.join("agent-a.crt"), rogue.join("agent-a.key")));
    let stranger = Agent::start(&sb, &collector.url(), stranger);
    let mut anonymous = AgentOpts::new(&sb, "agent-b");
    anonymous.cert = None;
    let anonymous = Agent::start(&sb, &collector.url(), anonymous);
    let mut impostor = AgentOpts::new(&sb, "agent-b");
    impostor.agent_id = "agent-x".into();
    let impostor = Agent::start(&sb, &collector.url(), impostor);
    for (agent, needle) in [
        (&stranger, "certificate"),
        (&anonymous, "certificate"),
        (&impostor, "refused"),
    ] {
        agent.post_until_accepted(&validations(&agent.proc.name, 10), WAIT);
        agent.wait_not_ready_for(needle, WAIT);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(collector.stored(), 0);
    let (_, status) = impostor.get_json("/v1/status");
    assert!(
        status["last_ship_error"].as_str().unwrap().contains("agent-x"),
        "{status}"
    );
}

/// A raw license key (and machine id) posted to the agent appears in no file under either
/// data dir, nor in the logs; its pseudonym finds the event.
/// Twenty events make a chunk far under the agent's compression threshold (16 KiB), so the
/// buffer holds them uncompressed and a raw key there would be found.
#[test]
fn raw_license_keys_never_reach_disk() {
    let sb = Sandbox::new("privacy");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let mut agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    let raw_key = "RAW-LICENSE-KEY-5f3a9c";
    let raw_machine = "RAW-MACHINE-ID-77e1";
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"id":"p-{i}","type":"license.validated","license_key":"{raw_key}","machine":"{raw_machine}","result":"valid"}}"#
            )
        })
        .collect();
    agent.post_until_accepted(&lines, WAIT);
    collector.wait_stored(20, WAIT, Some(&agent));
    // Stop the agent gracefully so every sled file is written out before scanning.
    assert_eq!(agent.proc.terminate(), Some(0));
    let out = std::process::Command::new(bin("keytrail-agent"))
        .args(["fingerprint", raw_key, "--config"])
        .arg(sb.path("agent-agent-a.toml"))
        .output()
        .unwrap();
    let pseudonym = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(pseudonym.starts_with("lk_"), "{pseudonym}");
    let (status, body) = http(
        collector.api,
        "GET",
        &format!("/v1/events?license={pseudonym}&limit=1000"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 20);
    assert!(page["events"][0]["machine"].as_str().unwrap().starts_with("mf_"));
    // Nor do the secrets leave their files: the fingerprint secret and the agent's private
    // key (a line from the middle of its PEM body) appear in no log, buffer or store.
    let key_pem = std::fs::read_to_string(sb.pki.join("agent-a.key")).unwrap();
    let key_lines: Vec<&str> = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let key_line = key_lines[key_lines.len() / 2];
    assert!(key_line.len() >= 40, "{key_line}");
    for needle in [raw_key, raw_machine, SECRET, key_line, "PRIVATE KEY"] {
        let hits = files_containing(sb.dir.path(), needle.as_bytes());
        let hits: Vec<_> = hits
            .into_iter()
            .filter(|p| {
                !p.ends_with("fingerprint.secret") && !p.starts_with(&sb.pki) && !p.starts_with(sb.path("rogue-pki"))
            })
            .collect();
        assert!(hits.is_empty(), "{needle} found in {hits:?}");
    }
    agent.restart();
}

/// A batch the collector can never accept goes to the dead-letter store: counted, listed, not
/// retried forever, and the agent keeps shipping what comes after it.
#[test]
fn permanent_rejects_go_to_the_dead_letter_store() {
    let sb = Sandbox::new("dead-letter");
    let collector = Collector::start(
        &sb,
        CollectorOpts {
            max_batch_events: Some(50),
            ..CollectorOpts::default()
        },
    );
    let mut opts = AgentOpts::new(&sb, "agent-a");
    opts.batch_max_events = 100;
    opts.batch_timeout = "2s".into();
    let agent = Agent::start(&sb, &collector.url(), opts);
    agent.post_until_accepted(&validations("big", 100), WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, status) = agent.get_json("/v1/status");
        if status["dead_letter_batches"] == 1 {
            assert_eq!(status["dead_letters"][0]["events"], 100, "{status}");
            assert!(
                status["dead_letters"][0]["reason"].as_str().unwrap().contains("413"),
                "{status}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{status}\n{}",
            agent.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.post_until_accepted(&validations("small", 10), WAIT);
    collector.wait_stored(10, WAIT, Some(&agent));
    agent.wait_ready(200, WAIT);
}

/// SIGTERM stops both processes cleanly (exit 0) and nothing buffered is lost across it.
#[test]
fn graceful_restart_keeps_the_buffer() {
    let sb = Sandbox::new("sigterm");
    let mut collector = Collector::start(&sb, CollectorOpts::default());
    assert_eq!(collector.proc.terminate(), Some(0));
    let mut agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    agent.post_until_accepted(&validations("t", 500), WAIT);
    assert_eq!(agent.proc.terminate(), Some(0));
    agent.restart();
    let (_, status) = agent.get_json("/v1/status");
    assert_eq!(status["buffered_events"], 500, "{status}");
    collector.restart();
    collector.wait_stored(500, WAIT, Some(&agent));
}

/// The analyst API with a token: 401 without it, 200 with it; health stays open.
#[test]
fn analyst_token_guards_the_api() {
    let sb = Sandbox::new("token");
    let collector = Collector::start(
        &sb,
        CollectorOpts {
            token: Some("s3cret-token\n".into()),
            ..CollectorOpts::default()
        },
    );
    assert_eq!(http(collector.api, "GET", "/healthz", &[], b"").unwrap().0, 200);
    assert_eq!(http(collector.api, "GET", "/v1/stats", &[], b"").unwrap().0, 401);
    assert_eq!(
        http(
            collector.api,
            "GET",
            "/v1/stats",
            &[("Authorization", "Bearer wrong")],
            b""
        )
        .unwrap()
        .0,
        401
    );
    assert_eq!(
        http(
            collector.api,
            "GET",
            "/v1/events",
            &[("Authorization", "Bearer s3cret-token")],
            b""
        )
        .unwrap()
        .0,
        200
    );
    let log = std::fs::read_to_string(&collector.proc.log).unwrap();
    assert!(!log.contains("s3cret-token"), "the token must never be logged");
}

/// Certificates rotate without restarts: an agent started with a stranger's certificate
/// recovers when its files are replaced with good ones, and the collector picks up a
/// re-issued server certificate.
#[test]
fn certificates_are_reloaded_without_a_restart() {
    let sb = Sandbox::new("rotate");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let rogue = sb.rogue_pki();
    let (crt, key) = (sb.path("agent.crt"), sb.path("agent.key"));
    std::fs::copy(rogue.join("agent-a.crt"), &crt).unwrap();
    std::fs::copy(rogue.join("agent-a.key"), &key).unwrap();
    let mut opts = AgentOpts::new(&sb, "agent-a");
    opts.cert = Some((crt.clone(), key.clone()));
    let agent = Agent::start(&sb, &collector.url(), opts);
    agent.post_until_accepted(&validations("rot", 50), WAIT);
    agent.wait_not_ready_for("certificate", WAIT);
    // Rotate the way tools do: write next to it, then rename over it.
    for (src, dst) in [(sb.pki.join("agent-a.crt"), &crt), (sb.pki.join("agent-a.key"), &key)] {
        let tmp = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
    collector.wait_stored(50, WAIT, Some(&agent));
    agent.wait_ready(200, WAIT);
    assert!(std::fs::read_to_string(&agent.proc.log)
        .unwrap()
        .contains("TLS files changed: reloaded"));

    // Re-issue the collector's certificate from the same CA: new connections use it.
    let out = std::process::Command::new(bin("keytrail-collector"))
        .args(["certs", "--out"])
        .arg(&sb.pki)
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&collector.proc.log)
        .unwrap()
        .contains("TLS files changed: reloaded")
    {
        // Each new connection makes the collector look at its files.
        let _ = std::net::TcpStream::connect(collector.receive);
        assert!(std::time::Instant::now() < deadline, "{}", collector.proc.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.post_until_accepted(&validations("after", 10), WAIT);
    collector.wait_stored(60, WAIT, Some(&agent));
}

/// A secret other users of the machine can read is named in a warning at start-up.
#[test]
fn secrets_readable_by_other_users_are_warned_about() {
    let sb = Sandbox::new("exposed");
    let collector = Collector::start(&sb, CollectorOpts::default());
    set_mode(&sb.secret, 0o644);
    let mut agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    assert!(
        agent.proc.log_text().contains("readable by other users"),
        "{}",
        agent.proc.log_text()
    );
    assert!(!agent.proc.log_text().contains(SECRET));
    assert_eq!(agent.proc.terminate(), Some(0));
}
