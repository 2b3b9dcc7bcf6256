//! Bad input at both boundaries gets a clear error, the process stays up, and nothing else is
//! lost: the agent's local API and the collector's batch receiver, with real processes.

use std::io::{Read, Write};
use std::time::Duration;

use keytrail_common::event::{Event, EventType};
use keytrail_common::wire::{self, BatchSeq};
use keytrail_tests::*;

const WAIT: Duration = Duration::from_secs(60);

fn post(agent: &Agent, ct: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let (s, b) = http(agent.ingest, "POST", "/v1/events", &[("Content-Type", ct)], body).expect("agent answers");
    (s, serde_json::from_str(&b).unwrap_or(serde_json::Value::Null))
}

#[test]
fn the_agent_refuses_bad_bodies_clearly_and_keeps_working() {
    let sb = Sandbox::new("hostile-agent");
    let collector = Collector::start(&sb, CollectorOpts::default());
    let agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    let json = "application/json";
    let cases: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        (
            "invalid UTF-8",
            b"{\"type\":\"license.validated\",\"license\":\"\xff\xfe\"}".to_vec(),
            json,
            400,
        ),
        (
            "truncated JSON",
            br#"[{"type":"license.validated","license":"a"},{"type":"#.to_vec(),
            json,
            400,
        ),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            json,
            400,
        ),
        (
            "a string over the field limit",
            format!(r#"{{"type":"payment.failed","customer":"{}"}}"#, "x".repeat(300)).into_bytes(),
            json,
            400,
        ),
        (
            "a number where a count goes",
            br#"{"type":"license.validated","license":"a","seats_used":1e400}"#.to_vec(),
            json,
            400,
        ),
        ("not an object", b"42".to_vec(), json, 400),
        ("empty body", Vec::new(), json, 400),
        (
            "unknown content type",
            b"type=license.validated".to_vec(),
            "application/x-www-form-urlencoded",
            415,
        ),
        ("a body over 10 MiB", vec![b' '; (10 << 20) + 1], json, 413),
        (
            "more tiny events than a request may hold",
            "{\"type\":\"payment.failed\"}\n".repeat(200_001).into_bytes(),
            "application/x-ndjson",
            400,
        ),
    ];
    for (what, body, ct, want) in cases {
        let (status, answer) = post(&agent, ct, &body);
        assert_eq!(status, want, "{what}: {answer}");
        if status == 400 {
            assert!(
                answer["error"]["code"].is_string() && answer["error"]["message"].is_string(),
                "{what}: {answer}"
            );
        }
    }
    // A body without Content-Length (chunked) over the cap is cut off too.
    let mut s = std::net::TcpStream::connect(agent.ingest).unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..11 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // A slow client that never finishes its head is dropped, and others are served meanwhile.
    let mut slow = std::net::TcpStream::connect(agent.ingest).unwrap();
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n").unwrap();
    // After all that, real events still go through, and only they are stored.
    agent.post_until_accepted(&validations("after-abuse", 25), WAIT);
    collector.wait_stored(25, WAIT, Some(&agent));
    assert_eq!(agent.get_json("/healthz").0, 200);
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || text.contains("408"),
        "a slow-loris connection is closed: {text}"
    );
}

fn frame(agent: &str, seq: u64, ids: &[&str]) -> Vec<u8> {
    let mut payload = Vec::new();
    for id in ids {
        let mut e = Event::new(*id, EventType::Validated, 1_790_000_000_000_000_000, agent);
        e.license = Some("lic-1".into());
        wire::append_event(&e, &mut payload);
    }
    wire::seal_frame(agent, BatchSeq(seq), ids.len() as u32, &payload, 3)
}

#[test]
fn the_collector_refuses_bad_batches_clearly_and_keeps_working() {
    let sb = Sandbox::new("hostile-collector");
    let collector = Collector::start(&sb, CollectorOpts::default());
    // A slow client on the receive port: a few bytes of a TLS hello, then nothing.
    let mut slow = std::net::TcpStream::connect(collector.receive).unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let slow_since = std::time::Instant::now();
    let good = frame("agent-a", 1, &["g-1", "g-2"]);
    assert_eq!(post_batch_as(&sb, &collector, Some("agent-a"), &good).unwrap().0, 200);

    let mut corrupted = good.clone();
    corrupted[40] ^= 0xff;
    let mut bomb = Vec::new();
    {
        // 64 MiB of zeros in a few KiB, with a header that tells the truth about its size.
        let zeros = vec![0u8; 64 << 20];
        let z = zstd::bulk::compress(&zeros, 3).unwrap();
        bomb.extend_from_slice(b"KTRB");
        bomb.extend_from_slice(&1u16.to_be_bytes());
        bomb.extend_from_slice(&0u16.to_be_bytes());
        bomb.extend_from_slice(&9u64.to_be_bytes());
        bomb.extend_from_slice(&1u32.to_be_bytes());
        bomb.extend_from_slice(&((64u32) << 20).to_be_bytes());
        bomb.extend_from_slice(&(z.len() as u32).to_be_bytes());
        bomb.extend_from_slice(&7u16.to_be_bytes());
        bomb.extend_from_slice(&0u16.to_be_bytes());
        bomb.extend_from_slice(b"agent-a");
        bomb.extend_from_slice(&z);
        let crc = crc32(&bomb);
        bomb.extend_from_slice(&crc.to_be_bytes());
    }
    // A frame whose header lies, with a checksum that matches the lie.
    let lying = |at: usize, value: &[u8]| {
        let mut f = frame("agent-a", 40 + at as u64, &["lie-1", "lie-2"]);
        f[at..at + value.len()].copy_from_slice(value);
        let n = f.len() - 4;
        let crc = crc32(&f[..n]);
        f[n..].copy_from_slice(&crc.to_be_bytes());
        f
    };
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        ("garbage", Some("agent-a"), b"hello, collector".to_vec(), 400),
        (
            "an unknown wire version",
            Some("agent-a"),
            lying(4, &99u16.to_be_bytes()),
            400,
        ),
        (
            "an event count that lies",
            Some("agent-a"),
            lying(16, &7u32.to_be_bytes()),
            400,
        ),
        (
            "an uncompressed length that lies",
            Some("agent-a"),
            lying(20, &3u32.to_be_bytes()),
            400,
        ),
        (
            "a compressed length that lies",
            Some("agent-a"),
            lying(24, &1u32.to_be_bytes()),
            400,
        ),
        (
            "an agent id length that lies",
            Some("agent-a"),
            lying(28, &300u16.to_be_bytes()),
            400,
        ),
        ("an empty body", Some("agent-a"), Vec::new(), 400),
        ("a flipped byte", Some("agent-a"), corrupted, 400),
        ("a zstd bomb", Some("agent-a"), bomb, 413),
        // Regression: the collector used to answer 413 and close while the agent was still
        // sending, so the agent saw a reset (retryable) instead of the 413 (permanent) and would
        // have retried that batch forever. Over-cap bodies are now read and discarded first.
        ("a body over the cap", Some("agent-a"), vec![0u8; 17 << 20], 413),
        (
            "another agent's batch",
            Some("agent-b"),
            frame("agent-a", 2, &["x-1"]),
            403,
        ),
    ];
    for (what, who, body, want) in cases {
        let (status, answer) = post_batch_as(&sb, &collector, who, &body).unwrap_or((0, String::new()));
        assert_eq!(status, want, "{what}: {answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        assert!(v["error"]["message"].is_string(), "{what}: {answer}");
    }
    // A resend of a stored batch is acknowledged and counted once.
    assert_eq!(post_batch_as(&sb, &collector, Some("agent-a"), &good).unwrap().0, 200);
    // Wrong method, wrong route, wrong content: clear errors too.
    assert_eq!(
        receive_request_as(&sb, &collector, Some("agent-a"), "GET /v1/batches HTTP/1.1", b"")
            .unwrap()
            .0,
        405
    );
    assert_eq!(
        receive_request_as(&sb, &collector, Some("agent-a"), "POST /v1/other HTTP/1.1", b"")
            .unwrap()
            .0,
        404
    );
    // No certificate at all: the handshake is refused.
    assert!(post_batch_as(&sb, &collector, None, &good).is_none_or(|(s, _)| s != 200));
    // Still up; only the good batch's events exist.
    let g2 = frame("agent-a", 3, &["g-3"]);
    assert_eq!(post_batch_as(&sb, &collector, Some("agent-a"), &g2).unwrap().0, 200);
    // Stats move once the analytics have applied the group, a moment after the 200.
    collector.wait_stored(3, WAIT, None);
    let stats = collector.stats();
    assert_eq!(stats["events_stored"], 3, "{stats}");
    // The slow client was cut off (the handshake has a deadline) while all that was served.
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        slow_since.elapsed() < Duration::from_secs(25),
        "a slow handshake is closed"
    );
    assert_eq!(stats["agents"].as_array().unwrap().len(), 1, "{stats}");
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), so the test does not lean on the code under test.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
