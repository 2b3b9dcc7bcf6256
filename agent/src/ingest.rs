//! The agent's local API (contract §4): `POST /v1/events`, `/healthz`, `/readyz`, `/metrics`,
//! `/v1/status`.
//!
//! Owns: HTTP, body caps, content types, turning bodies into validated, pseudonymised events
//! (through `common::event`), and answering only after the buffer says the events are durable.
//! Does not own: storage (buffer) or anything about the collector (ship), whose state it
//! only reads for readiness and status.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keytrail_common::body::{read_capped, BodyError};
use keytrail_common::event::{self, BodyFormat, Context, IngestDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::time::{now_ns, UnixNanos};
use keytrail_common::wire;
use tokio::net::TcpListener;

use crate::buffer::{AppendError, Appender, Buffer};
use crate::config::AgentConfig;
use crate::ship::ShipHealth;
use crate::telemetry::AgentMetrics;

/// Most events in one request (a 10 MiB body of minimal events stays under it).
const MAX_EVENTS_PER_REQUEST: usize = 200_000;
/// Bodies larger than this are parsed off the async workers.
const PARSE_INLINE_BYTES: usize = 256 * 1024;
/// Seconds a client is asked to wait when the buffer is full.
const RETRY_AFTER_FULL: &str = "5";
/// How long a request body may take to arrive in full.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything a request handler needs; one per agent, shared.
pub struct Api {
    pub config: AgentConfig,
    pub buffer: Arc<Buffer>,
    pub appender: Appender,
    pub fingerprinter: Fingerprinter,
    pub metrics: Arc<AgentMetrics>,
    pub health: Arc<ShipHealth>,
    pub ids: EventIds,
    /// This host's clock against the collector's: corrects the times the agent stamps.
    pub clock: Arc<crate::ship::AgentClock>,
    /// Permits of 1 KiB: the budget of request bytes in flight (`ingest.max_inflight_bytes`).
    pub inflight: tokio::sync::Semaphore,
}

impl Api {
    /// The in-flight budget for a config, in 1 KiB permits.
    pub fn inflight_budget(config: &AgentConfig) -> tokio::sync::Semaphore {
        tokio::sync::Semaphore::new((config.max_inflight_bytes / 1024) as usize)
    }
}

/// Unique ids for events that come without one: a random per-process prefix and a counter.
pub struct EventIds {
    prefix: String,
    counter: AtomicU64,
}

impl EventIds {
    pub fn new() -> EventIds {
        let mut bytes = [0u8; 12];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the OS random source is available");
        EventIds {
            prefix: format!("kt-{}-", hex::encode(bytes)),
            counter: AtomicU64::new(0),
        }
    }

    /// A new id, unique in this process and across restarts.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

struct Defaults<'a> {
    api: &'a Api,
    now: UnixNanos,
}

impl IngestDefaults for Defaults<'_> {
    fn agent_id(&self) -> &str {
        self.api.buffer.agent_id()
    }
    fn context(&self) -> &Context {
        &self.api.config.context
    }
    fn now(&self) -> UnixNanos {
        self.now
    }
    fn new_event_id(&self) -> String {
        self.api.ids.next_id()
    }
}

/// Serves the local API until `shutdown` flips.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: tokio::sync::watch::Receiver<bool>) {
    keytrail_common::serve::accept_loop(listener, shutdown, move |stream, peer| {
        let api = Arc::clone(&api);
        async move {
            let service = service_fn(move |req| {
                let api = Arc::clone(&api);
                async move { Ok::<_, Infallible>(route(&api, req).await) }
            });
            if let Err(e) = keytrail_common::serve::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "ingest connection ended with an error");
            }
        }
    })
    .await
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message, "index": null, "field": null}}),
    )
}

async fn route(api: &Arc<Api>, req: Request<Incoming>) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/events") => {
            let resp = post_events(api, req).await;
            api.metrics.requests.add(&[resp.status().as_str()], 1);
            resp
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(api),
        (&Method::GET, "/metrics") => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(
                api.metrics.render(oldest_age_seconds(&api.buffer)),
            )))
            .expect("valid response"),
        (&Method::GET, "/v1/status") => json(StatusCode::OK, &status(api)),
        (_, "/v1/events" | "/healthz" | "/readyz" | "/metrics" | "/v1/status") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

fn oldest_age_seconds(buffer: &Buffer) -> f64 {
    buffer
        .oldest_arrival()
        .map_or(0.0, |t| (now_ns().saturating_sub(t)).max(0) as f64 / 1e9)
}

fn readyz(api: &Api) -> Resp {
    let reason = if !api.buffer.is_writable() {
        Some("the buffer cannot be written".to_string())
    } else {
        api.health.not_ready_reason(api.config.ship.stall_after)
    };
    match reason {
        None => json(StatusCode::OK, &serde_json::json!({"ready": true})),
        Some(r) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"ready": false, "reason": r}),
        ),
    }
}

/// `GET /v1/status` (contract §4), plus the dead letters and drop reasons.
pub fn status(api: &Api) -> serde_json::Value {
    let c = api.buffer.counts();
    let age = api
        .buffer
        .oldest_arrival()
        .map(|t| (now_ns().saturating_sub(t)).max(0) as f64 / 1e9);
    let dropped: serde_json::Map<String, serde_json::Value> = api
        .metrics
        .discarded
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.join(","), v.into()))
        .collect();
    serde_json::json!({
        "agent_id": api.buffer.agent_id(),
        "buffered_events": c.pending_events + c.sealed_events,
        "buffered_bytes": c.pending_bytes + c.sealed_bytes + c.dead_bytes,
        "oldest_buffered_age_seconds": age,
        "sealed_batches": c.sealed_batches,
        "shipped_events_total": api.metrics.sent.get(),
        "dead_letter_batches": c.dead_batches,
        "dead_letters": api.buffer.dead_letters(20),
        "dropped_events_total": api.metrics.discarded.total(),
        "dropped_events_by_reason": dropped,
        "received_events_total": api.metrics.received.get(),
        "last_ship_error": api.health.last_error(),
        "clock_offset_seconds": api.clock.offset_seconds(),
        "collector": api.config.ship.collector,
        "buffer_max_bytes": api.config.max_bytes,
        "buffer_recovered_from": api.buffer.recovered_from.as_ref().map(|p| p.display().to_string()),
        "proxy": api.config.proxy.as_ref().map(|p| {
            let unrecorded: serde_json::Map<String, serde_json::Value> = api
                .metrics
                .proxy_unrecorded
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.join(","), v.into()))
                .collect();
            serde_json::json!({
                "upstream": p.upstream,
                "adapter": p.adapter,
                "recorded_events_total": api.metrics.proxy_recorded.get(),
                "unrecorded_total": api.metrics.proxy_unrecorded.total(),
                "unrecorded_by_reason": unrecorded,
            })
        }),
    })
}

fn body_format(req: &Request<Incoming>) -> Result<BodyFormat, String> {
    let Some(ct) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let ct = ct.to_str().map_err(|_| "unreadable Content-Type".to_string())?;
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyFormat::Ndjson),
        _ => Err(format!(
            "unsupported Content-Type {mime:?}: use application/json or application/x-ndjson"
        )),
    }
}

async fn post_events(api: &Arc<Api>, req: Request<Incoming>) -> Resp {
    let format = match body_format(&req) {
        Ok(f) => f,
        Err(m) => {
            api.metrics.errors.add(&["ingest", "unsupported_media_type"], 1);
            return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", &m);
        }
    };
    let max = api.config.max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("the body is over the limit of {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Far over the cap: refused unread. Moderately over: read and discarded, so the client
    // reads the 413 instead of a connection reset.
    let drain_limit = max.saturating_mul(4);
    if declared.is_some_and(|n| n > drain_limit) {
        api.metrics.errors.add(&["ingest", "body_too_large"], 1);
        return too_large();
    }
    // Memory stays bounded however many clients post at once: a request holds its share of
    // the in-flight budget (the declared size, or the cap when the size is unknown) while its
    // body is read, parsed and made durable; others wait for room.
    let kib = (declared.unwrap_or(max).clamp(1024, max) / 1024) as u32;
    let Ok(_permit) = api.inflight.acquire_many(kib).await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the agent is shutting down",
        );
    };
    let body = match read_capped(req.into_body(), max, drain_limit, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(_)) => {
            api.metrics.errors.add(&["ingest", "body_too_large"], 1);
            return too_large();
        }
        Err(BodyError::Timeout(_)) => {
            api.metrics.errors.add(&["ingest", "body_timeout"], 1);
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive within 60s",
            );
        }
        Err(e) => {
            api.metrics.errors.add(&["ingest", "body_read_failed"], 1);
            return error(StatusCode::BAD_REQUEST, "body_read_failed", &e.to_string());
        }
    };
    // Events without a `time` take this: the arrival, by the collector's clock when this
    // host's clock is off.
    let now = now_ns().saturating_add(api.clock.correction());
    let parsed = if body.len() <= PARSE_INLINE_BYTES {
        let parsed = encode(api, &body, format, now);
        // Not held while the append waits for the flush.
        drop(body);
        parsed
    } else {
        // Large bodies are parsed on the blocking pool so small requests stay fast.
        let api2 = Arc::clone(api);
        match tokio::task::spawn_blocking(move || encode(&api2, &body, format, now)).await {
            Ok(r) => r,
            Err(e) => {
                api.metrics.errors.add(&["ingest", "parse_task_failed"], 1);
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &format!("parsing failed: {e}"),
                );
            }
        }
    };
    let (records, count) = match parsed {
        Ok(x) => x,
        Err(e) => {
            api.metrics.errors.add(&["ingest", "invalid_request"], 1);
            return json(StatusCode::BAD_REQUEST, &e.to_json());
        }
    };
    match api.appender.append(records, count).await {
        Ok(()) => {
            api.metrics.received.add(count as u64);
            json(StatusCode::ACCEPTED, &serde_json::json!({"accepted": count}))
        }
        Err(AppendError::Full { buffered, max }) => {
            api.metrics.errors.add(&["ingest", "buffer_full"], 1);
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "buffer_full",
                &format!("the buffer is full ({buffered} of {max} bytes); retry later"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static(RETRY_AFTER_FULL));
            r
        }
        Err(e @ AppendError::DiskLow { .. }) => {
            api.metrics.errors.add(&["ingest", "disk_low"], 1);
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "disk_low",
                &format!("{e}; retry later"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static(RETRY_AFTER_FULL));
            r
        }
        Err(e) => {
            api.metrics.errors.add(&["ingest", "buffer_unavailable"], 1);
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "buffer_unavailable", &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            r
        }
    }
}

/// Parses, validates, pseudonymises and encodes a body into wire records.
fn encode(api: &Api, body: &[u8], format: BodyFormat, now: UnixNanos) -> Result<(Vec<u8>, u32), event::IngestError> {
    let defaults = Defaults { api, now };
    // Encoded as parsed: one event is held at a time, not the whole request's.
    let mut records = Vec::with_capacity(body.len() / 2);
    let count = event::for_each_in_body(
        body,
        format,
        &api.fingerprinter,
        &defaults,
        MAX_EVENTS_PER_REQUEST,
        |e| wire::append_event(&e, &mut records),
    )?;
    Ok((records, count as u32))
}
