//! The agent's transparent proxy in front of a fake Keygen: responses come back byte for
//! byte, requests reach the upstream unchanged, license calls become events at the
//! collector, no raw key reaches disk, and keytrail trouble never fails a request.

use std::sync::Arc;
use std::time::Duration;

use keytrail_tests::fake_upstream::{Answer, FakeUpstream, Seen};
use keytrail_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const SIGNATURE: &str = r#"keyid="acme", algorithm="ed25519", signature="c2lnbmF0dXJl+/=""#;

/// Keygen-shaped answers; the body's exact bytes (spacing included) must survive the proxy.
fn keygen(req: &Seen) -> Answer {
    let body = String::from_utf8_lossy(&req.body);
    let (status, text) = if req.target.ends_with("/licenses/actions/validate-key") {
        if body.contains("KEY-GOOD") {
            (
                200,
                r#"{"data":{"id":"lic-1","type":"licenses","attributes":{"key":"KEY-GOOD-0001","expiry":"2027-06-01T00:00:00.000Z","maxMachines":2},
  "relationships":{"machines":{"meta":{"count":3}},"policy":{"data":{"type":"policies","id":"pro"}}}},
  "meta":{"ts":"2026-11-23T10:00:00.000Z","valid":true,"detail":"has too many associated machines","code":"TOO_MANY_MACHINES"}}"#,
            )
        } else {
            (
                200,
                r#"{"data":null,"meta":{"valid":false,"detail":"does not exist","code":"NOT_FOUND"}}"#,
            )
        }
    } else if req.target.ends_with("/machines") {
        (
            422,
            r#"{"errors":[{"title":"Unprocessable resource","detail":"machine count has exceeded maximum allowed for license (2)","code":"MACHINE_LIMIT_EXCEEDED","source":{"pointer":"/data"}}]}"#,
        )
    } else {
        (200, r#"{"data":{"type":"users","id":"u-1"}}"#)
    };
    Answer {
        status,
        headers: vec![
            ("Content-Type".into(), "application/vnd.api+json; charset=utf-8".into()),
            ("Keygen-Signature".into(), SIGNATURE.into()),
            ("Date".into(), "Mon, 23 Nov 2026 10:00:00 GMT".into()),
        ],
        body: text.as_bytes().to_vec(),
    }
}

fn proxy_toml(upstream: &FakeUpstream) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{}\"\nadapter = \"keygen\"\n",
        upstream.addr
    )
}

/// Raw response of one request through the proxy: (status line + headers, body bytes).
fn raw(addr: std::net::SocketAddr, req: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    (
        String::from_utf8_lossy(&out[..split]).into_owned(),
        out[split..].to_vec(),
    )
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: license.example\r\nConnection: close\r\nContent-Type: application/vnd.api+json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn proxied_keygen_calls_are_unchanged_and_recorded_without_raw_keys() {
    let sb = Sandbox::new("proxy");
    let up = FakeUpstream::start(Arc::new(keygen));
    let collector = Collector::start(&sb, CollectorOpts::default());
    let mut opts = AgentOpts::new(&sb, "agent-a");
    opts.extra_toml = proxy_toml(&up);
    let agent = Agent::start(&sb, &collector.url(), opts);
    let proxy = agent.proxy.expect("the proxy listens");

    // 1. validate-key: the response arrives byte for byte, signature header included.
    let validate = r#"{"meta":{"key":"KEY-GOOD-0001","scope":{"fingerprint":"fp-aa"}}}"#;
    let (head, body) = raw(
        proxy,
        &post("/v1/accounts/acme/licenses/actions/validate-key", "", validate),
    );
    let want = keygen(&up.requests()[0].clone());
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, want.body, "response body changed");
    assert!(head.contains(SIGNATURE), "signature header changed: {head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("date: mon, 23 nov 2026 10:00:00 gmt"));
    // The upstream got the request unchanged (but Host names the upstream, as with nginx).
    let seen = &up.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/v1/accounts/acme/licenses/actions/validate-key");
    assert_eq!(seen.body, validate.as_bytes());
    assert_eq!(seen.header("content-type"), Some("application/vnd.api+json"));
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));

    // 2. An unknown key, a refused activation (key in the Authorization header), a call that
    //    is not a license event, and a query string passed through.
    let (h, _) = raw(
        proxy,
        &post(
            "/v1/accounts/acme/licenses/actions/validate-key",
            "",
            r#"{"meta":{"key":"KEY-NOPE-0002"}}"#,
        ),
    );
    assert!(h.starts_with("HTTP/1.1 200"));
    let activation = r#"{"data":{"type":"machines","attributes":{"fingerprint":"fp-bb"},"relationships":{"license":{"data":{"type":"licenses","id":"lic-1"}}}}}"#;
    let (h, b) = raw(
        proxy,
        &post(
            "/v1/accounts/acme/machines",
            "Authorization: License KEY-GOOD-0001\r\n",
            activation,
        ),
    );
    assert!(h.starts_with("HTTP/1.1 422"), "{h}");
    assert!(String::from_utf8_lossy(&b).contains("MACHINE_LIMIT_EXCEEDED"));
    let (h, _) = raw(
        proxy,
        "GET /v1/accounts/acme/me?include=x%20y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(h.starts_with("HTTP/1.1 200"));
    let reqs = up.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[2].header("authorization"), Some("License KEY-GOOD-0001"));
    assert_eq!(reqs[3].target, "/v1/accounts/acme/me?include=x%20y");

    // 3. Three events at the collector (the `me` call is none), under the key's pseudonym.
    collector.wait_stored(3, WAIT, Some(&agent));
    let (status, text) = http(collector.api, "GET", "/v1/events?limit=10", &[], b"").unwrap();
    assert_eq!(status, 200, "{text}");
    let page: Value = serde_json::from_str(&text).unwrap();
    let events = page["events"].as_array().unwrap();
    let pseudonym = |key: &str| {
        let out = std::process::Command::new(bin("keytrail-agent"))
            .args(["fingerprint", key, "--config"])
            .arg(agent.config_path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let good = pseudonym("KEY-GOOD-0001");
    assert!(good.starts_with("lk_"), "{good}");
    let find = |ty: &str, license: &str| {
        events
            .iter()
            .find(|e| e["type"] == ty && e["license"] == license)
            .unwrap_or_else(|| panic!("no {ty} for {license} in {events:?}"))
            .clone()
    };
    let v = find("license.validated", &good);
    assert_eq!(v["result"], "valid", "valid:true with an over-limit code: {v}");
    assert_eq!(
        (v["machines_used"].as_u64(), v["machines_limit"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(v["plan"], "pro");
    assert!(v["machine"].as_str().unwrap().starts_with("mf_"), "{v}");
    assert_eq!(
        find("license.validated", &pseudonym("KEY-NOPE-0002"))["result"],
        "not_found"
    );
    assert_eq!(find("license.activated", &good)["result"], "limit_exceeded");

    // 4. No raw key or machine fingerprint anywhere on disk, at the agent or the collector.
    for needle in ["KEY-GOOD-0001", "KEY-NOPE-0002", "fp-aa", "fp-bb"] {
        for dir in [&agent.data_dir, &collector.data_dir] {
            let hits = files_containing(dir, needle.as_bytes());
            assert!(hits.is_empty(), "{needle} found in {hits:?}");
        }
    }
    let (_, status) = agent.get_json("/v1/status");
    assert_eq!(status["proxy"]["recorded_events_total"], 3, "{status}");
    assert_eq!(status["proxy"]["unrecorded_total"], 0, "{status}");
}

#[test]
fn requests_go_through_when_nothing_can_be_recorded() {
    // No collector, and a buffer far too small: every license call still gets its answer;
    // what could not be recorded is counted by reason.
    let sb = Sandbox::new("proxy-failopen");
    let up = FakeUpstream::start(Arc::new(keygen));
    let mut opts = AgentOpts::new(&sb, "agent-b");
    opts.extra_toml = proxy_toml(&up);
    opts.max_bytes = "1MiB".into();
    let agent = Agent::start(&sb, "https://127.0.0.1:9", opts);
    let proxy = agent.proxy.unwrap();
    // Fill the buffer through the local API until it refuses (incompressible padding, since
    // sealed batches are stored compressed).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut pad = || {
        (0..15)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")
            })
            .collect::<String>()
    };
    // Requests of 2000 events, then smaller ones after each refusal, down to one event; again
    // once the sealer has compressed what was pending (which frees room), until even then
    // one event is refused.
    let mut n = 0;
    let mut size = 2000;
    loop {
        if size == 0 {
            std::thread::sleep(Duration::from_millis(500));
            let probe = format!(r#"{{"id":"probe-{n}","type":"license.validated","license":"lic-probe"}}"#);
            n += 1;
            match agent.post_ndjson(&[probe]).unwrap().0 {
                503 => break,
                202 => size = 2000,
                other => panic!("status {other}"),
            }
        }
        let lines: Vec<String> = (0..size)
            .map(|i| {
                format!(
                    r#"{{"id":"fill-{n}-{i}","type":"license.validated","license":"lic-{i}","attrs":{{"pad":"{}"}}}}"#,
                    pad()
                )
            })
            .collect();
        let (status, _) = agent.post_ndjson(&lines).unwrap();
        match status {
            503 => size /= 2,
            202 => {}
            other => panic!("status {other}"),
        }
        n += 1;
        assert!(n < 1000, "the buffer never filled");
    }
    for i in 0..40 {
        let body = format!(r#"{{"meta":{{"key":"KEY-GOOD-{i:04}"}}}}"#);
        let (h, b) = raw(proxy, &post("/v1/licenses/actions/validate-key", "", &body));
        assert!(h.starts_with("HTTP/1.1 200"), "request {i}: {h}");
        assert_eq!(b, keygen(&up.requests()[i]).body, "request {i}");
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, s) = agent.get_json("/v1/status");
        let p = &s["proxy"];
        let (rec, unrec) = (
            p["recorded_events_total"].as_u64().unwrap(),
            p["unrecorded_total"].as_u64().unwrap(),
        );
        if rec + unrec == 40 {
            assert_eq!(p["unrecorded_by_reason"]["buffer_full"].as_u64(), Some(40 - rec), "{s}");
            assert!(rec < 40, "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
