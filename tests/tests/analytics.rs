//! End-to-end: events posted to an agent become metrics at the collector's API and CLI,
//! exactly once, in the right day, and survive a collector restart.

use std::process::Command;
use std::time::Duration;

use keytrail_tests::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "analyst-token-1";

fn get(c: &Collector, path: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    http(c.api, "GET", path, &[("Authorization", &auth)], b"").expect("the API answers")
}

fn get_json(c: &Collector, path: &str) -> Value {
    let (status, body) = get(c, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn query(c: &Collector, args: &[&str], token: &str) -> std::process::Output {
    Command::new(bin("keytrail-collector"))
        .arg("query")
        .args(args)
        .args(["--api", &format!("http://{}", c.api)])
        .env("KEYTRAIL_API_TOKEN", token)
        .output()
        .unwrap()
}

fn ev(id: &str, ty: &str, license: &str, time: &str, extra: &str) -> String {
    format!(r#"{{"id":"{id}","type":"{ty}","license":"{license}","time":"{time}"{extra}}}"#)
}

#[test]
fn metrics_flow_from_agent_to_api_and_cli_exactly_once() {
    let sb = Sandbox::new("analytics");
    let mut collector = Collector::start(
        &sb,
        CollectorOpts {
            token: Some(TOKEN.into()),
            extra_toml: "[plans.pro]\nprice_monthly = 49.0\nseats = 10\n[plans.team]\nprice_monthly = 99.0\n".into(),
            ..CollectorOpts::default()
        },
    );
    let agent = Agent::start(&sb, &collector.url(), AgentOpts::new(&sb, "agent-a"));
    // The later validation first, then the license's issue (late), then a resent id.
    let first = vec![ev("v3", "license.validated", "L2", "2026-10-03T09:00:00Z", "")];
    let second = vec![
        ev("i1", "license.issued", "L1", "2026-10-01T00:00:00Z", r#","plan":"pro""#),
        ev(
            "i2",
            "license.issued",
            "L2",
            "2026-10-01T12:00:00Z",
            r#","plan":"team""#,
        ),
        ev(
            "v1",
            "license.validated",
            "L1",
            "2026-10-02T10:00:00Z",
            r#","country":"DE""#,
        ),
        ev(
            "v2",
            "license.validated",
            "L1",
            "2026-10-02T11:00:00Z",
            r#","result":"expired""#,
        ),
    ];
    agent.post_until_accepted(&first, WAIT);
    agent.post_until_accepted(&second, WAIT);
    agent.post_until_accepted(&second[2..3], WAIT); // the same id again: counted once
    collector.wait_stored(5, WAIT, Some(&agent));

    let check = |c: &Collector| {
        let r = get_json(c, "/v1/metrics/daily-active-validations?from=2026-10-01&to=2026-10-03");
        assert_eq!(r["metric"], "daily-active-validations");
        assert_eq!(r["by"], Value::Null);
        assert_eq!(
            r["rows"],
            json!([
                {"day": "2026-10-01", "active_licenses": 0, "validations": 0},
                {"day": "2026-10-02", "active_licenses": 1, "validations": 2},
                {"day": "2026-10-03", "active_licenses": 1, "validations": 1},
            ])
        );
        let r = get_json(
            c,
            "/v1/metrics/daily-active-validations?from=2026-10-01&to=2026-10-03&by=plan",
        );
        assert_eq!(
            r["rows"],
            json!([
                {"day": "2026-10-02", "plan": "pro", "active_licenses": 1, "validations": 2},
                {"day": "2026-10-03", "plan": "team", "active_licenses": 1, "validations": 1},
            ])
        );
        let r = get_json(
            c,
            "/v1/metrics/mrr?from=2026-10-01&to=2026-10-31&at=2026-11-01T00:00:00Z",
        );
        assert_eq!(
            r["rows"],
            json!([{"month": "2026-10", "active_licenses": 2, "mrr": 148.0, "unpriced_licenses": 0, "change": null}])
        );
        let r = get_json(c, "/v1/metrics/activation-rate?from=2026-10-01&to=2026-10-01");
        assert_eq!(
            r["rows"],
            json!([{"issued": 2, "activated": 2, "activated_7d": 2, "rate": 1.0, "rate_7d": 1.0}])
        );
    };
    check(&collector);

    let (status, csv) = get(
        &collector,
        "/v1/metrics/validation-failures?from=2026-10-02&to=2026-10-02&format=csv",
    );
    assert_eq!(status, 200);
    assert_eq!(
        csv,
        "day,validations,failed,failure_rate,by_result\r\n2026-10-02,2,1,0.5,\"{\"\"expired\"\":1}\"\r\n"
    );
    let r = get_json(&collector, "/v1/churn-risk?below=101&at=2026-10-03T12:00:00Z");
    assert_eq!(
        r,
        json!({"at": "2026-10-03T12:00:00Z", "rows": [
            {"license": "L1", "score": 100, "reasons": []},
            {"license": "L2", "score": 100, "reasons": []},
        ]})
    );
    assert_eq!(get_json(&collector, "/v1/upgrade-signals")["rows"], json!([]));
    let l = get_json(&collector, "/v1/licenses/L1?at=2026-10-03T00:00:00Z");
    assert_eq!(l["status"], "active");
    assert_eq!(l["attributes"]["plan"], "pro");
    assert_eq!(l["attributes"]["country"], "DE");
    assert_eq!(l["timeline"]["last_valid_validation"], "2026-10-02T10:00:00Z");
    assert_eq!(l["health"]["score"], 100);
    assert_eq!(get(&collector, "/v1/licenses/nope").0, 404);

    // Clear errors.
    for (path, status, code) in [
        ("/v1/metrics/geo?from=2026-13-01", 400, "invalid_from"),
        ("/v1/metrics/geo?from=2026-10-05&to=2026-10-01", 400, "invalid_range"),
        ("/v1/metrics/geo?from=2000-01-01&to=2026-10-01", 400, "window_too_long"),
        ("/v1/metrics/geo?by=colour", 400, "invalid_by"),
        ("/v1/metrics/health?by=plan", 400, "by_not_accepted"),
        ("/v1/metrics/geo?at=yesterday", 400, "invalid_at"),
        ("/v1/metrics/geo?form=2026-10-01", 400, "unknown_parameter"),
        ("/v1/metrics/geo?format=xml", 400, "invalid_format"),
        ("/v1/churn-risk?below=lots", 400, "invalid_below"),
        ("/v1/metrics/nope", 404, "unknown_metric"),
    ] {
        let (s, body) = get(&collector, path);
        assert_eq!(s, status, "{path}: {body}");
        assert!(body.contains(code), "{path}: {body}");
    }
    for path in [
        "/v1/metrics/geo",
        "/v1/licenses/L1",
        "/v1/churn-risk",
        "/v1/upgrade-signals",
    ] {
        assert_eq!(http(collector.api, "GET", path, &[], b"").unwrap().0, 401, "{path}");
    }

    // The CLI: an aligned table by default, CSV and JSON on request, errors on stderr.
    let out = query(
        &collector,
        &[
            "daily-active-validations",
            "--from",
            "2026-10-02",
            "--to",
            "2026-10-03",
            "--by",
            "plan",
        ],
        TOKEN,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.ends_with(
            "day         plan  active_licenses  validations\n\
             2026-10-02  pro                 1            2\n\
             2026-10-03  team                1            1\n"
        ),
        "{text}"
    );
    let out = query(
        &collector,
        &["geo", "--from", "2026-10-02", "--to", "2026-10-03", "--format", "csv"],
        TOKEN,
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "country,validations,failed,active_licenses\r\nDE,2,1,1\r\nunknown,1,0,1\r\n"
    );
    let out = query(&collector, &["renewal-rate", "--format", "json"], TOKEN);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"], json!([{"renewed": 0, "expired": 0, "rate": null}]));
    let out = query(&collector, &["geo"], "wrong");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // Rollups are stored with the events: the same answers after a restart.
    collector.restart();
    check(&collector);
}
