//! The analyst API (contract §7): `/v1/stats`, `/v1/events`, `/v1/metrics/<name>`,
//! `/v1/licenses/<license>`, `/v1/churn-risk`, `/v1/upgrade-signals`, health, readiness,
//! Prometheus metrics.
//!
//! Owns: HTTP for analysts, the bearer token check, parameter validation with clear 400s.
//! Does not own: how anything is stored or computed — it asks the store.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keytrail_common::event::EventType;
use keytrail_common::time::{parse_date_ns, parse_rfc3339_ns, NANOS_PER_DAY};
use tokio::net::TcpListener;

use crate::analytics::{output, Dim, Metric, MetricQuery};
use crate::errors::ApiError;
use crate::store::{EventQuery, Store};
use crate::telemetry::CollectorMetrics;

pub struct Api {
    pub store: Arc<Store>,
    pub metrics: Arc<CollectorMetrics>,
    /// `Authorization: Bearer <token>` required on every route but health and readiness.
    pub token: Option<String>,
}

pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: tokio::sync::watch::Receiver<bool>) {
    keytrail_common::serve::accept_loop(listener, shutdown, move |tcp, peer| {
        let api = Arc::clone(&api);
        async move {
            let service = service_fn(move |req| {
                let api = Arc::clone(&api);
                async move {
                    let resp = match route(&api, req).await {
                        Ok(r) => r,
                        Err(e) => e.into_response(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = keytrail_common::serve::http1()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        }
    })
    .await
}

type Resp = Response<Full<Bytes>>;

fn json(value: &serde_json::Value) -> Resp {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(api: &Api, req: &Request<Incoming>) -> bool {
    let Some(token) = &api.token else { return true };
    let Some(value) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match value.strip_prefix("Bearer ") {
        Some(given) => constant_time_eq(given.trim().as_bytes(), token.as_bytes()),
        None => false,
    }
}

async fn route(api: &Api, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET && path == "/healthz" {
        return Ok(json(&serde_json::json!({"status": "ok"})));
    }
    if req.method() == Method::GET && path == "/readyz" {
        return if let Some((free, reserve)) = api.store.ready_room() {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("the data directory's disk is nearly full: {free} bytes free, {reserve} kept in reserve"),
            ))
        } else if api.store.is_writable() {
            Ok(json(&serde_json::json!({"ready": true})))
        } else {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the store cannot be written",
            ))
        };
    }
    if !authorized(api, &req) {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return Ok(r);
    }
    if req.method() != Method::GET {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the analyst API is read-only",
        ));
    }
    let query = parse_query(req.uri().query().unwrap_or(""))?;
    match path.as_str() {
        "/metrics" => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(api.metrics.render(&api.store))))
            .expect("valid response")),
        "/v1/stats" => Ok(json(&stats(&api.store))),
        "/v1/events" => events(api, &query),
        "/v1/churn-risk" => metric(api, Metric::ChurnRisk, &query).await,
        "/v1/upgrade-signals" => metric(api, Metric::UpgradeSignals, &query).await,
        p if p.starts_with("/v1/metrics/") => {
            let name = &p["/v1/metrics/".len()..];
            let m = Metric::parse(name)
                .filter(|m| !matches!(m, Metric::ChurnRisk | Metric::UpgradeSignals))
                .ok_or_else(|| {
                    let known: Vec<&str> = Metric::ALL[..13].iter().map(|m| m.name()).collect();
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_metric",
                        format!("no metric {name:?}; known: {}", known.join(", ")),
                    )
                })?;
            metric(api, m, &query).await
        }
        p if p.starts_with("/v1/licenses/") => license(api, &p["/v1/licenses/".len()..], &query).await,
        "/" => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::new(Bytes::from(index_page(&api.store))))
            .expect("valid response")),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {path}"),
        )),
    }
}

pub fn stats(store: &Store) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, v) in store.counters() {
        m.insert(name.to_string(), v.into());
    }
    m.insert(
        "agents".into(),
        serde_json::to_value(store.agents()).expect("serializable"),
    );
    serde_json::Value::Object(m)
}

/// Decoded query string; repeated keys are an error (ambiguous).
fn parse_query(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    if q.len() > 8192 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "query_too_long",
            "the query string is over 8 KiB",
        ));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if out.iter().any(|(x, _)| *x == k) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "duplicate_parameter",
                format!("parameter {k:?} given twice"),
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "malformed percent-encoding in the query",
        )
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3).ok_or_else(bad)?).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn get<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
}

/// `from` as a date (its midnight) or an RFC 3339 instant.
fn parse_from(v: &str) -> Result<i64, ApiError> {
    parse_date_ns(v).or_else(|| parse_rfc3339_ns(v)).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_from",
            format!("from {v:?}: use YYYY-MM-DD or an RFC 3339 time"),
        )
    })
}

/// `to` as a date (inclusive: up to the next midnight) or an RFC 3339 instant (inclusive).
fn parse_to(v: &str) -> Result<i64, ApiError> {
    if let Some(d) = parse_date_ns(v) {
        return Ok(d + NANOS_PER_DAY);
    }
    parse_rfc3339_ns(v).map(|t| t.saturating_add(1)).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_to",
            format!("to {v:?}: use YYYY-MM-DD or an RFC 3339 time"),
        )
    })
}

fn events(api: &Api, q: &[(String, String)]) -> Result<Resp, ApiError> {
    for (k, _) in q {
        if !["license", "type", "from", "to", "limit", "cursor"].contains(&k.as_str()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_parameter",
                format!("unknown parameter {k:?}"),
            ));
        }
    }
    let mut eq = EventQuery {
        limit: 100,
        ..EventQuery::default()
    };
    eq.license = get(q, "license").map(str::to_string);
    if let Some(t) = get(q, "type") {
        eq.event_type = Some(EventType::parse(t).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_type",
                format!("type {t:?} is not an event type"),
            )
        })?);
    }
    eq.from = get(q, "from").map(parse_from).transpose()?;
    eq.to = get(q, "to").map(parse_to).transpose()?;
    if let (Some(f), Some(t)) = (eq.from, eq.to) {
        if f >= t {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_range",
                "from must be before to",
            ));
        }
    }
    if let Some(l) = get(q, "limit") {
        eq.limit = l.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                "limit must be an integer 1..=1000",
            )
        })?;
    }
    if let Some(c) = get(q, "cursor") {
        eq.cursor = Some(decode_cursor(c).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "cursor is not one this API returned",
            )
        })?);
    }
    let page = api.store.events(&eq)?;
    let events: Vec<serde_json::Value> = page.events.iter().map(|e| e.to_json()).collect();
    Ok(json(&serde_json::json!({
        "events": events,
        "next_cursor": page.next_cursor.map(encode_cursor),
    })))
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// The longest window a metric answers, in days.
pub const MAX_WINDOW_DAYS: i32 = 3660;

/// `at`: an RFC 3339 instant; default now.
fn parse_at(q: &[(String, String)]) -> Result<i64, ApiError> {
    match get(q, "at") {
        None => Ok(keytrail_common::time::now_ns()),
        Some(v) => parse_rfc3339_ns(v).ok_or_else(|| {
            bad(
                "invalid_at",
                format!("at {v:?}: use an RFC 3339 instant such as 2026-11-01T00:00:00Z"),
            )
        }),
    }
}

fn parse_day(q: &[(String, String)], name: &'static str, code: &'static str) -> Result<Option<i32>, ApiError> {
    get(q, name)
        .map(|v| {
            parse_date_ns(v)
                .map(|ns| ns.div_euclid(NANOS_PER_DAY) as i32)
                .ok_or_else(|| bad(code, format!("{name} {v:?}: use a UTC date YYYY-MM-DD")))
        })
        .transpose()
}

/// Resolves and validates the parameters of a metric (docs/metrics.md "Asking").
pub fn metric_query(metric: Metric, q: &[(String, String)]) -> Result<MetricQuery, ApiError> {
    let allowed: &[&str] = match metric {
        Metric::ChurnRisk => &["at", "below", "format"],
        Metric::UpgradeSignals => &["at", "format"],
        _ => &["from", "to", "by", "at", "format"],
    };
    if let Some((k, _)) = q.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(bad(
            "unknown_parameter",
            format!(
                "unknown parameter {k:?} for {}; accepted: {}",
                metric.name(),
                allowed.join(", ")
            ),
        ));
    }
    let at = parse_at(q)?;
    let to_day = parse_day(q, "to", "invalid_to")?.unwrap_or(at.div_euclid(NANOS_PER_DAY) as i32);
    let from_day = parse_day(q, "from", "invalid_from")?.unwrap_or(to_day - 29);
    if from_day > to_day {
        return Err(bad("invalid_range", "from must not be after to"));
    }
    if to_day - from_day >= MAX_WINDOW_DAYS {
        return Err(bad(
            "window_too_long",
            format!("the window from..to is longer than {MAX_WINDOW_DAYS} days"),
        ));
    }
    let by = match get(q, "by") {
        None => None,
        Some(_) if !metric.takes_by() => {
            return Err(bad("by_not_accepted", format!("{} takes no \"by\"", metric.name())));
        }
        Some(v) => Some(Dim::parse(v).ok_or_else(|| {
            let dims: Vec<&str> = Dim::ALL.iter().map(|d| d.as_str()).collect();
            bad("invalid_by", format!("by {v:?}: use one of {}", dims.join(", ")))
        })?),
    };
    let below = match get(q, "below") {
        None => 50.0,
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|b| b.is_finite())
            .ok_or_else(|| bad("invalid_below", format!("below {v:?}: use a number such as 50")))?,
    };
    Ok(MetricQuery {
        metric,
        from_day,
        to_day,
        at,
        by,
        below,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Csv,
}

fn parse_format(q: &[(String, String)]) -> Result<Format, ApiError> {
    match get(q, "format") {
        None | Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv),
        Some(v) => Err(bad("invalid_format", format!("format {v:?}: use json or csv"))),
    }
}

async fn metric(api: &Api, metric: Metric, q: &[(String, String)]) -> Result<Resp, ApiError> {
    let format = parse_format(q)?;
    let mq = metric_query(metric, q)?;
    let store = Arc::clone(&api.store);
    let query = mq.clone();
    let rows = tokio::task::spawn_blocking(move || store.metric(&query))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| bad("by_not_accepted", e.to_string()))?;
    if format == Format::Csv {
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
            .body(Full::new(Bytes::from(output::to_csv(&rows, &metric.columns(mq.by)))))
            .expect("valid response"));
    }
    let at = keytrail_common::time::format_rfc3339(mq.at);
    let body = match metric {
        Metric::ChurnRisk | Metric::UpgradeSignals => serde_json::json!({"at": at, "rows": rows}),
        _ => serde_json::to_value(output::Answer {
            metric: metric.name(),
            from: keytrail_common::time::format_date(mq.from_day as i64 * NANOS_PER_DAY),
            to: keytrail_common::time::format_date(mq.to_day as i64 * NANOS_PER_DAY),
            at,
            by: mq.by.map(Dim::as_str),
            rows,
        })
        .expect("serializable"),
    };
    Ok(json(&body))
}

async fn license(api: &Api, raw_name: &str, q: &[(String, String)]) -> Result<Resp, ApiError> {
    let name = percent_decode(raw_name)?;
    if name.is_empty() || name.len() > keytrail_common::event::MAX_LICENSE_LEN.max(64) {
        return Err(bad("invalid_license", "the license id is empty or too long"));
    }
    if let Some((k, _)) = q.iter().find(|(k, _)| k != "at") {
        return Err(bad(
            "unknown_parameter",
            format!("unknown parameter {k:?}; accepted: at"),
        ));
    }
    let at = parse_at(q)?;
    let store = Arc::clone(&api.store);
    let n = name.clone();
    let detail = tokio::task::spawn_blocking(move || store.license(&n, at))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match detail {
        Some(v) => Ok(json(&v)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_license",
            format!("no events were stored for license {name:?}"),
        )),
    }
}

fn encode_cursor((t, seq): (i64, u64)) -> String {
    format!("{:016x}{:016x}", t as u64, seq)
}

fn decode_cursor(s: &str) -> Option<(i64, u64)> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    Some((
        u64::from_str_radix(&s[..16], 16).ok()? as i64,
        u64::from_str_radix(&s[16..], 16).ok()?,
    ))
}

fn index_page(store: &Store) -> String {
    let c: std::collections::BTreeMap<_, _> = store.counters().into_iter().collect();
    format!(
        "<!doctype html><meta charset=utf-8><title>keytrail collector</title>\
         <h1>keytrail collector</h1>\
         <p>{} events stored from {} agents ({} duplicates dropped).</p>\
         <ul><li><a href=\"/v1/stats\">/v1/stats</a></li><li><a href=\"/v1/events\">/v1/events</a></li>\
         <li><a href=\"/metrics\">/metrics</a></li></ul>",
        c["events_stored"],
        store.agents().len(),
        c["duplicates_dropped"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_and_cursor_round_trip() {
        let q = parse_query("license=lk_1&from=2026-11-01&type=license.validated&x=a%20b+c").unwrap();
        assert_eq!(get(&q, "x"), Some("a b c"));
        assert!(parse_query("a=1&a=2").is_err());
        assert!(parse_query("a=%zz").is_err());
        assert_eq!(decode_cursor(&encode_cursor((-5, 9))), Some((-5, 9)));
        assert!(decode_cursor("nope").is_none());
        assert_eq!(
            parse_to("2026-11-01").unwrap() - parse_from("2026-11-01").unwrap(),
            NANOS_PER_DAY
        );
        assert!(parse_from("yesterday").is_err());
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"a", b"ab")
        );
    }
}
