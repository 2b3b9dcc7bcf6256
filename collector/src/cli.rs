//! `keytrail-collector query`: asks a running collector's analyst API and prints the answer as
//! an aligned table (default), JSON or CSV.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::analytics::{Dim, Metric};

/// The longest answer the CLI reads.
const MAX_ANSWER_BYTES: usize = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug)]
pub struct QueryArgs {
    pub metric: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub by: Option<String>,
    pub at: Option<String>,
    pub below: Option<String>,
    pub format: OutputFormat,
    pub api: String,
    pub token: Option<String>,
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The API path and query for the arguments.
pub fn request_path(a: &QueryArgs) -> Result<(Metric, String), String> {
    let metric = Metric::parse(&a.metric).ok_or_else(|| {
        let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        format!("no metric {:?}; known: {}", a.metric, known.join(", "))
    })?;
    let path = match metric {
        Metric::ChurnRisk => "/v1/churn-risk".to_string(),
        Metric::UpgradeSignals => "/v1/upgrade-signals".to_string(),
        m => format!("/v1/metrics/{}", m.name()),
    };
    let mut params = Vec::new();
    for (k, v) in [
        ("from", &a.from),
        ("to", &a.to),
        ("by", &a.by),
        ("at", &a.at),
        ("below", &a.below),
    ] {
        if let Some(v) = v {
            params.push(format!("{k}={}", encode(v)));
        }
    }
    if a.format == OutputFormat::Csv {
        params.push("format=csv".into());
    }
    let q = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    Ok((metric, format!("{path}{q}")))
}

async fn get(api: &str, path_and_query: &str, token: Option<&str>) -> Result<(StatusCode, Bytes), String> {
    let base: Uri = api.parse().map_err(|e| format!("--api {api:?}: {e}"))?;
    if base.scheme_str() != Some("http") {
        return Err(format!(
            "--api {api:?}: use an http:// URL (the analyst API speaks plain HTTP)"
        ));
    }
    let authority = base
        .authority()
        .ok_or_else(|| format!("--api {api:?}: no host"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("connecting to {api}: timed out"))?
    .map_err(|e| format!("connecting to {api}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("talking to {api}: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::get(path_and_query).header(header::HOST, authority.as_str());
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
        .await
        .map_err(|_| format!("{api}: no answer within 60 s"))?
        .map_err(|e| format!("{api}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer from {api}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) => o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        Some(v) => v.to_string(),
    }
}

/// An aligned table: text columns left, numbers right.
pub fn table(columns: &[&str], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(r.get(*c))).collect())
        .collect();
    let numeric: Vec<bool> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .all(|r| r.get(*c).is_none_or(|v| v.is_number() || v.is_null()))
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |vals: &[String], out: &mut String| {
        let parts: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if numeric[i] {
                    format!("{v:>w$}", w = widths[i])
                } else {
                    format!("{v:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&columns.iter().map(|c| c.to_string()).collect::<Vec<_>>(), &mut out);
    for r in &cells {
        line(r, &mut out);
    }
    out
}

/// Runs `query`: prints the answer on stdout, or returns the reason it failed.
pub async fn run(a: QueryArgs) -> Result<String, String> {
    let (metric, path) = request_path(&a)?;
    let (status, body) = get(&a.api, &path, a.token.as_deref()).await?;
    if status != StatusCode::OK {
        let msg = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        return Err(format!("{status}: {msg}"));
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    match a.format {
        OutputFormat::Csv => Ok(text),
        OutputFormat::Json => {
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("the API answered malformed JSON: {e}"))?;
            Ok(format!("{}\n", serde_json::to_string_pretty(&v).expect("serializable")))
        }
        OutputFormat::Table => {
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("the API answered malformed JSON: {e}"))?;
            let by = v["by"].as_str().and_then(Dim::parse);
            let rows = v["rows"].as_array().cloned().unwrap_or_default();
            let mut out = String::new();
            if let (Some(f), Some(t)) = (v["from"].as_str(), v["to"].as_str()) {
                out.push_str(&format!(
                    "{}  {f} .. {t}  at {}\n",
                    metric.name(),
                    v["at"].as_str().unwrap_or("")
                ));
            } else {
                out.push_str(&format!("{}  at {}\n", metric.name(), v["at"].as_str().unwrap_or("")));
            }
            out.push_str(&table(&metric.columns(by), &rows));
            if rows.is_empty() {
                out.push_str("(no rows)\n");
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_text_left_and_numbers_right() {
        let rows = vec![
            serde_json::json!({"plan": "pro", "issued": 10, "rate": 0.5}),
            serde_json::json!({"plan": "enterprise", "issued": 2, "rate": null}),
        ];
        assert_eq!(
            table(&["plan", "issued", "rate"], &rows),
            "plan        issued  rate\npro             10   0.5\nenterprise       2     -\n"
        );
    }

    #[test]
    fn request_paths() {
        let mut a = QueryArgs {
            metric: "geo".into(),
            from: Some("2026-11-01".into()),
            to: None,
            by: Some("plan".into()),
            at: Some("2026-11-02T00:00:00+01:00".into()),
            below: None,
            format: OutputFormat::Csv,
            api: "http://127.0.0.1:7444".into(),
            token: None,
        };
        assert_eq!(
            request_path(&a).unwrap().1,
            "/v1/metrics/geo?from=2026-11-01&by=plan&at=2026-11-02T00:00:00%2B01:00&format=csv"
        );
        a.metric = "churn-risk".into();
        a.format = OutputFormat::Table;
        a.by = None;
        assert!(request_path(&a).unwrap().1.starts_with("/v1/churn-risk?"));
        a.metric = "nope".into();
        assert!(request_path(&a).unwrap_err().contains("known: activation-rate"));
    }
}
