//! Shipping: sealing pending events into batches on time, sending sealed batches to the
//! collector over HTTPS (rustls, server verified, mTLS client certificate), and deciding what
//! each answer means.
//!
//! Owns: the TLS connection to the collector, batch timing, retry with capped exponential
//! backoff and full jitter (and `Retry-After`), the classification of answers (contract §6),
//! and the shipping half of readiness. Does not own: what is on disk (buffer decides what the
//! next batch is, and what ack / dead-letter do to it).
//!
//! Two batches are in flight at a time ([`SHIP_LANES`]), taken oldest first, so the collector
//! may store an agent's batches out of sequence order. Retries never give up: a batch leaves
//! the buffer only by a 200 or by a permanent reject (400/413 → dead-letter store).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use keytrail_common::time::UnixNanos;
use keytrail_common::tls::Reloading;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::buffer::{Buffer, SealDue, SealedBatch};
use crate::config::ShipConfig;
use crate::telemetry::AgentMetrics;

/// Longest answer body read from the collector.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// First retry delay; doubles per failure up to `backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// How often an idle agent checks that it can still reach the collector.
const IDLE_PING: Duration = Duration::from_secs(5);
/// The request header with this agent's clock, unix milliseconds.
const SENT_AT_HEADER: &str = keytrail_common::wire::SENT_AT_HEADER;

/// The collector's clock from an answer (`x-keytrail-received-at`, unix ms), in nanoseconds.
fn parts_received_at(headers: &http::HeaderMap) -> Option<UnixNanos> {
    headers
        .get(keytrail_common::wire::RECEIVED_AT_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000)
}

/// Largest difference to the collector's clock taken as is.
pub const CLOCK_TOLERANCE: UnixNanos = 60 * keytrail_common::time::NANOS_PER_SEC;

/// This agent's clock against the collector's, measured on every answer that carries the
/// collector's clock (`x-keytrail-received-at`): offset = collector time − the midpoint of the
/// request by this agent's clock. When it is off by more than [`CLOCK_TOLERANCE`], the times
/// the agent stamps itself (events that come without a `time`, proxied calls) get the offset
/// added, so they land where the collector's clock puts them. Times a sender gives are kept.
#[derive(Debug, Default)]
pub struct AgentClock {
    offset: std::sync::atomic::AtomicI64,
    known: std::sync::atomic::AtomicBool,
}

impl AgentClock {
    fn observe(&self, offset: UnixNanos) {
        use std::sync::atomic::Ordering;
        let before = self.offset.swap(offset, Ordering::Relaxed);
        let was_known = self.known.swap(true, Ordering::Relaxed);
        let (now_off, was_off) = (
            offset.abs() > CLOCK_TOLERANCE,
            was_known && before.abs() > CLOCK_TOLERANCE,
        );
        if now_off && !was_off {
            tracing::warn!(
                offset_seconds = offset as f64 / 1e9,
                "this host's clock differs from the collector's; the times this agent stamps are corrected by the difference"
            );
        } else if !now_off && was_off {
            tracing::info!("this host's clock agrees with the collector's again");
        }
    }

    /// What to add to this agent's clock for the times it stamps (0 within the tolerance or
    /// before the first answer).
    pub fn correction(&self) -> UnixNanos {
        use std::sync::atomic::Ordering;
        let o = self.offset.load(Ordering::Relaxed);
        if self.known.load(Ordering::Relaxed) && o.abs() > CLOCK_TOLERANCE {
            o
        } else {
            0
        }
    }

    /// The last measured offset, seconds (`None` before the first answer).
    pub fn offset_seconds(&self) -> Option<f64> {
        use std::sync::atomic::Ordering;
        self.known
            .load(Ordering::Relaxed)
            .then(|| self.offset.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// What the last contact with the collector said; feeds `/readyz` and `/v1/status`.
#[derive(Debug, Default)]
pub struct ShipHealth {
    inner: Mutex<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    ever_ok: bool,
    last_error: Option<String>,
    /// Set while failures last; cleared by a success.
    failing_since: Option<Instant>,
    /// A failure that retrying will not fix (certificate or authorization problem).
    config_problem: bool,
}

impl ShipHealth {
    fn ok(&self) {
        let mut h = self.inner.lock().expect("ship health");
        h.ever_ok = true;
        h.last_error = None;
        h.failing_since = None;
        h.config_problem = false;
    }

    fn failed(&self, error: &ShipError) {
        let mut h = self.inner.lock().expect("ship health");
        h.last_error = Some(error.to_string());
        h.failing_since.get_or_insert_with(Instant::now);
        h.config_problem = error.is_config_problem();
    }

    /// The last error, if the last contact failed.
    pub fn last_error(&self) -> Option<String> {
        self.inner.lock().expect("ship health").last_error.clone()
    }

    /// `None` when shipping is healthy, else why not.
    pub fn not_ready_reason(&self, stall_after: Duration) -> Option<String> {
        let h = self.inner.lock().expect("ship health");
        let err = h.last_error.clone().unwrap_or_default();
        if h.config_problem {
            return Some(err);
        }
        if !h.ever_ok {
            return Some(if err.is_empty() {
                "not yet connected to the collector".into()
            } else {
                format!("not yet connected to the collector: {err}")
            });
        }
        match h.failing_since {
            Some(t) if t.elapsed() >= stall_after => {
                Some(format!("shipping stalled for {}s: {err}", t.elapsed().as_secs()))
            }
            _ => None,
        }
    }
}

/// Why a send did not end in 200, classified the way the retry logic needs.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// 400/413: the batch will never be accepted.
    #[error("collector rejected the batch permanently ({status}): {body}")]
    Permanent { status: u16, body: String },
    /// 401/403: this agent is not allowed; fix the configuration or certificates.
    #[error("collector refused this agent ({status}): {body}")]
    Unauthorized { status: u16, body: String },
    /// 429/5xx and any unexpected status: try again later.
    #[error("collector answered {status}: {body}")]
    Retryable {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// The TLS handshake failed because a certificate was refused, on either side.
    #[error("TLS certificate problem: {0}")]
    Certificate(String),
    /// Connect, TLS, timeout or I/O: try again later.
    #[error("cannot reach the collector: {0}")]
    Network(String),
}

impl ShipError {
    fn is_config_problem(&self) -> bool {
        matches!(self, ShipError::Unauthorized { .. } | ShipError::Certificate(_))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ShipError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Classifies an I/O error of connect/handshake/request.
    fn from_io(context: &str, e: &(dyn std::error::Error + 'static)) -> ShipError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return classify_tls(context, tls);
            }
            // `io::Error::source` skips the error it wraps; look inside explicitly.
            if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    return classify_tls(context, tls);
                }
            }
            cur = err.source();
        }
        ShipError::Network(format!("{context}: {e}"))
    }
}

fn classify_tls(context: &str, e: &rustls::Error) -> ShipError {
    match e {
        rustls::Error::AlertReceived(alert) => ShipError::Certificate(format!(
            "{context}: the collector rejected our client certificate ({alert:?})"
        )),
        rustls::Error::InvalidCertificate(why) => ShipError::Certificate(format!(
            "{context}: the collector's certificate is not trusted ({why:?})"
        )),
        rustls::Error::NoCertificatesPresented => {
            ShipError::Certificate(format!("{context}: the collector presented no certificate"))
        }
        other => ShipError::Network(format!("{context}: TLS error: {other}")),
    }
}

/// Parses `Retry-After` (seconds form; HTTP dates are rare from our collector).
fn parse_retry_after(v: Option<&http::HeaderValue>) -> Option<Duration> {
    let secs: u64 = v?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// An HTTPS connection to the collector, reopened on demand.
pub struct CollectorClient {
    host: String,
    port: u16,
    authority: String,
    server_name: ServerName<'static>,
    /// CA, client certificate and key, re-read when the files change.
    tls: Arc<Reloading<rustls::ClientConfig>>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
    clock: Arc<AgentClock>,
}

impl CollectorClient {
    pub fn new(cfg: &ShipConfig, clock: Arc<AgentClock>) -> Result<CollectorClient, String> {
        let uri: http::Uri = cfg
            .collector
            .parse()
            .map_err(|e| format!("ship.collector {:?}: {e}", cfg.collector))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("ship.collector {:?}: must be https://", cfg.collector));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("ship.collector {:?}: no host", cfg.collector))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(443);
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("ship.collector host {host:?}: {e}"))?;
        let (ca, client_cert) = (cfg.ca.clone(), cfg.client_cert.clone());
        let mut files = vec![ca.clone()];
        if let Some((c, k)) = &client_cert {
            files.extend([c.clone(), k.clone()]);
        }
        let tls = Reloading::new("collector TLS", files, move || {
            let pair = client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            keytrail_common::tls::client_config(&ca, pair)
        })?;
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
        Ok(CollectorClient {
            host,
            port,
            authority,
            server_name,
            tls: Arc::new(tls),
            timeout: cfg.request_timeout,
            sender: None,
            clock,
        })
    }

    /// A client to the same collector with the same TLS material, on a connection of its own.
    pub fn another(&self) -> CollectorClient {
        CollectorClient {
            host: self.host.clone(),
            port: self.port,
            authority: self.authority.clone(),
            server_name: self.server_name.clone(),
            tls: Arc::clone(&self.tls),
            timeout: self.timeout,
            sender: None,
            clock: Arc::clone(&self.clock),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ShipError> {
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ShipError::Network(format!("resolving {}: {e}", self.host)))?
            .collect();
        let mut last = ShipError::Network(format!("{} resolved to no address", self.host));
        for addr in addrs {
            let tcp = match TcpStream::connect(addr).await {
                Ok(t) => t,
                Err(e) => {
                    last = ShipError::Network(format!("connecting to {addr}: {e}"));
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(self.tls.current())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| ShipError::from_io("TLS handshake", &e))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| ShipError::from_io("HTTP handshake", &e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "collector connection closed");
                }
            });
            return Ok(sender);
        }
        Err(last)
    }

    /// Sends one request and reads the answer, within the request timeout.
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ShipError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.request_inner(method, path, body)).await {
            Ok(r) => {
                if r.is_err() {
                    self.sender = None;
                }
                r
            }
            Err(_) => {
                self.sender = None;
                Err(ShipError::Network(format!("no answer within {}s", timeout.as_secs())))
            }
        }
    }

    async fn request_inner(
        &mut self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ShipError> {
        let reusable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = Some(self.connect().await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let sent_at = keytrail_common::time::now_ns();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/x-keytrail-batch")
            // This agent's clock at sending, so the collector can measure each agent's skew
            // (docs/wire-protocol.md). Not part of the frame: a resend carries a fresh one.
            .header(SENT_AT_HEADER, (sent_at / 1_000_000).to_string())
            .body(Full::new(body))
            .expect("static request parts are valid");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ShipError::from_io("sending", &e))?;
        let answered_at = keytrail_common::time::now_ns();
        if let Some(received) = parts_received_at(resp.headers()) {
            let midpoint = sent_at + (answered_at - sent_at) / 2;
            self.clock.observe(received.saturating_sub(midpoint));
        }
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| ShipError::Network(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// Sends a sealed frame and classifies the answer.
    pub async fn send_batch(&mut self, frame: Bytes) -> Result<(), ShipError> {
        let (status, headers, body) = self.request(http::Method::POST, "/v1/batches", frame).await?;
        classify(status, &headers, &body)
    }

    /// Checks that the collector accepts this agent (TLS, mTLS, route) without sending data.
    pub async fn ping(&mut self) -> Result<(), ShipError> {
        let (status, headers, body) = self.request(http::Method::GET, "/v1/ping", Bytes::new()).await?;
        classify(status, &headers, &body)
    }
}

/// Maps a collector answer to contract §6's classes.
pub fn classify(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Result<(), ShipError> {
    let text = || {
        let s = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string();
        if s.is_empty() {
            "(no body)".to_string()
        } else {
            s
        }
    };
    let code = status.as_u16();
    match code {
        200..=299 => Ok(()),
        400 | 413 => Err(ShipError::Permanent {
            status: code,
            body: text(),
        }),
        401 | 403 => Err(ShipError::Unauthorized {
            status: code,
            body: text(),
        }),
        _ => Err(ShipError::Retryable {
            status: code,
            body: text(),
            retry_after: parse_retry_after(headers.get(http::header::RETRY_AFTER)),
        }),
    }
}

/// Full-jitter backoff: uniform in `[0, min(cap, base * 2^attempt)]`, but never shorter than
/// a `Retry-After` the collector asked for.
pub fn backoff(attempt: u32, cap: Duration, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(20)).min(cap);
    let jittered = Duration::from_nanos(fastrand::u64(0..=exp.as_nanos() as u64));
    match retry_after {
        Some(ra) => jittered.max(ra),
        None => jittered,
    }
}

/// How long the sealer keeps its compression context and buffer after its last batch.
const SEAL_WORK_KEPT: Duration = Duration::from_secs(10);

/// Seals pending events when a batch is full or `batch_timeout` has passed, and reopens the
/// buffer after a storage error. Between seals it sleeps until the oldest pending event is
/// due, woken early only by what changes that (a first event after none, a full batch, a
/// storage error or its repair, shutdown); it checks again at least every `timeout` (at most
/// every 10 s).
pub async fn run_sealer(buffer: Arc<Buffer>, timeout: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // How long to wait when the counters and sled disagree, or while storage is broken.
    let retry = (timeout / 4).max(Duration::from_millis(5));
    buffer.sealer_running(true);
    let mut last_sealed = std::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            buffer.sealer_running(false);
            return;
        }
        // After a storage error the database is reopened from here too, so the buffer comes
        // back when there is room again even while no events arrive.
        if buffer.is_broken() {
            let b = Arc::clone(&buffer);
            let _ = tokio::task::spawn_blocking(move || b.heal()).await;
        }
        let mut wait = match buffer.seal_due(timeout) {
            SealDue::Now => {
                let b = Arc::clone(&buffer);
                match tokio::task::spawn_blocking(move || b.seal_one()).await {
                    Ok(Ok(Some(_))) => {
                        last_sealed = std::time::Instant::now();
                        continue;
                    }
                    // Due by the counters, yet nothing to seal (counters ahead of what sled
                    // holds): wait below rather than spin.
                    Ok(Ok(None)) => retry,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "sealing a batch failed; will retry");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "sealer task failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            SealDue::In(left) => left.min(timeout),
            SealDue::Nothing => timeout,
        };
        if buffer.is_broken() {
            wait = wait.min(retry);
        }
        // A long `batch_timeout` still lets the compression workspace go in time.
        wait = wait.min(SEAL_WORK_KEPT);
        if last_sealed.elapsed() >= SEAL_WORK_KEPT {
            buffer.release_seal_work();
        }
        tokio::select! {
            _ = buffer.pending_grew.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    // The agent is gone.
                    buffer.sealer_running(false);
                    return;
                }
            }
        }
    }
}

/// Batches sent at once, each on a connection of its own. With one, a batch waited for the
/// answer to the one before, and the collector answers after its fsync: end to end stalled
/// near 160 k events/s on a 2-core host with a fifth of the CPU idle (docs/benchmarks.md).
/// With two, the collector has the next batch while its answer to the last travels back.
/// Batches may then arrive out of order, which the collector handles: it deduplicates by
/// agent and sequence, and by event id, and the analytics take events in any order.
pub const SHIP_LANES: usize = 2;

/// Sends sealed batches oldest first, [`SHIP_LANES`] at a time, forever; never drops one on a
/// retryable failure.
pub async fn run_shipper(
    buffer: Arc<Buffer>,
    client: CollectorClient,
    cfg: ShipConfig,
    health: Arc<ShipHealth>,
    metrics: Arc<AgentMetrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let shipping = Arc::new(Shipping {
        lanes: Lanes::default(),
        buffer,
        cfg,
        health,
        metrics,
    });
    // Dropped (so its lanes are aborted) when this task is.
    let mut lanes = tokio::task::JoinSet::new();
    for _ in 1..SHIP_LANES {
        lanes.spawn(ship_lane(
            false,
            Arc::clone(&shipping),
            client.another(),
            shutdown.clone(),
        ));
    }
    ship_lane(true, shipping, client, shutdown).await;
    while let Some(ended) = lanes.join_next().await {
        if let Err(e) = ended {
            // A batch it held stays marked in flight until the agent restarts.
            tracing::error!(error = %e, "a shipping lane failed");
        }
    }
}

/// What every lane works with.
struct Shipping {
    lanes: Lanes,
    buffer: Arc<Buffer>,
    cfg: ShipConfig,
    health: Arc<ShipHealth>,
    metrics: Arc<AgentMetrics>,
}

/// What the lanes share: the retry timing, so that a failure on one pauses all and the lanes
/// do not multiply the retry rate a collector sees (nor cut a `Retry-After` short), and the
/// last contact with the collector.
#[derive(Default)]
struct Lanes(Mutex<LanesInner>);

#[derive(Default)]
struct LanesInner {
    /// Failure rounds in a row (failures of requests sent at the same time count once).
    attempt: u32,
    /// Failures so far, on any lane: a request remembers it when it starts, so an answer
    /// knows whether another lane failed meanwhile.
    failures: u64,
    /// No lane sends before this.
    paused_until: Option<Instant>,
    last_contact: Option<Instant>,
}

impl Lanes {
    /// To take before a request: what [`Lanes::ok`] and [`Lanes::failed`] compare with.
    fn epoch(&self) -> u64 {
        self.0.lock().expect("ship lanes").failures
    }

    /// A request started at `epoch` succeeded. It ends the backoff only when no request
    /// failed meanwhile: an older success must not lift a newer pause.
    fn ok(&self, epoch: u64) {
        let mut l = self.0.lock().expect("ship lanes");
        l.last_contact = Some(Instant::now());
        if l.failures == epoch {
            l.attempt = 0;
            l.paused_until = None;
        }
    }

    /// A request started at `epoch` failed: pauses every lane and returns for how long. The
    /// backoff grows once per round, not once per lane that failed in it.
    fn failed(&self, epoch: u64, backoff_max: Duration, retry_after: Option<Duration>) -> Duration {
        let mut l = self.0.lock().expect("ship lanes");
        if l.failures == epoch {
            l.attempt = l.attempt.saturating_add(1);
        }
        l.failures += 1;
        let wait = backoff(l.attempt.saturating_sub(1), backoff_max, retry_after);
        let until = Instant::now() + wait;
        l.paused_until = Some(l.paused_until.map_or(until, |u| u.max(until)));
        wait
    }

    /// The collector answered, though not with success.
    fn contact(&self) {
        self.0.lock().expect("ship lanes").last_contact = Some(Instant::now());
    }

    /// Whether the collector is due a check: no contact for `every`, or failing.
    fn check_due(&self, every: Duration) -> bool {
        let l = self.0.lock().expect("ship lanes");
        l.attempt > 0 || l.last_contact.is_none_or(|t| t.elapsed() >= every)
    }

    /// Waits out a pause set by any lane.
    async fn wait_pause(&self) {
        let until = self.0.lock().expect("ship lanes").paused_until;
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// One connection's loop: takes the oldest batch no other lane is sending, sends it, and
/// acknowledges, dead-letters or releases it. The lane that `pings` also checks the collector
/// while there is nothing to send, to keep readiness honest.
async fn ship_lane(
    pings: bool,
    shipping: Arc<Shipping>,
    mut client: CollectorClient,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Shipping {
        lanes,
        buffer,
        cfg,
        health,
        metrics,
    } = &*shipping;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let b = Arc::clone(buffer);
        let next = match tokio::task::spawn_blocking(move || b.next_sealed()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the next sealed batch failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => continue,
        };
        let Some(batch) = next else {
            // Idle: keep readiness honest by checking the collector now and then. Only when
            // nothing is being sent, so a ping's answer never speaks over a batch's.
            if pings && buffer.in_flight() == 0 && lanes.check_due(IDLE_PING) {
                lanes.wait_pause().await;
                let epoch = lanes.epoch();
                match client.ping().await {
                    Ok(()) => {
                        health.ok();
                        lanes.ok(epoch);
                    }
                    Err(e) => {
                        note_failure(health, metrics, &e, "ping");
                        let wait = lanes.failed(epoch, cfg.backoff_max, e.retry_after());
                        wait_or_data(buffer, wait).await;
                        continue;
                    }
                }
            }
            wait_or_data(buffer, IDLE_PING).await;
            continue;
        };
        lanes.wait_pause().await;
        let epoch = lanes.epoch();
        match client.send_batch(Bytes::from(batch.frame.clone())).await {
            Ok(()) => {
                health.ok();
                lanes.ok(epoch);
                metrics.sent.add(batch.events as u64);
                metrics.ship_batches.add(&["ok"], 1);
                finish(buffer, batch, None).await;
            }
            Err(ShipError::Permanent { status, body }) => {
                // The collector answered, so shipping itself works.
                health.ok();
                lanes.contact();
                let reason = format!("{status}: {body}");
                tracing::error!(seq = batch.seq.0, events = batch.events, %reason,
                    "collector rejected a batch permanently: moved to the dead-letter store");
                metrics.ship_batches.add(&["dead_letter"], 1);
                finish(buffer, batch, Some(reason)).await;
            }
            Err(e) => {
                buffer.release(batch.seq);
                note_failure(health, metrics, &e, "send");
                metrics.ship_batches.add(&["retry"], 1);
                let wait = lanes.failed(epoch, cfg.backoff_max, e.retry_after());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn wait_or_data(buffer: &Buffer, wait: Duration) {
    tokio::select! {
        _ = buffer.sealed_ready.notified() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

fn note_failure(health: &ShipHealth, metrics: &AgentMetrics, e: &ShipError, what: &str) {
    let kind = match e {
        ShipError::Permanent { .. } => "permanent",
        ShipError::Unauthorized { .. } => "unauthorized",
        ShipError::Retryable { .. } => "retryable_status",
        ShipError::Certificate(_) => "certificate",
        ShipError::Network(_) => "network",
    };
    metrics.errors.add(&["ship", kind], 1);
    if e.is_config_problem() {
        tracing::error!(error = %e, what, "collector refuses this agent: fix certificates or configuration");
    } else {
        tracing::warn!(error = %e, what, "shipping failed; will retry");
    }
    health.failed(e);
}

async fn finish(buffer: &Arc<Buffer>, batch: SealedBatch, dead_reason: Option<String>) {
    let b = Arc::clone(buffer);
    let result = tokio::task::spawn_blocking(move || match dead_reason {
        None => b.ack(&batch),
        Some(reason) => b.dead_letter(&batch, &reason),
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "updating the buffer after a send failed; the batch will be resent");
            // The buffer's storage is failing (it is being reopened): do not resend in a loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(e) => tracing::error!(error = %e, "buffer update task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sealer_seals_a_full_batch_at_once_and_stops_at_once_when_told() {
        let dir = std::env::temp_dir().join(format!("kt-sealer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let limits = crate::buffer::BufferLimits {
            max_bytes: 64 << 20,
            when_full: crate::config::WhenFull::Reject,
            cache_bytes: 1 << 20,
            batch_max_events: 2,
            batch_max_bytes: 1 << 20,
            zstd_level: 1,
        };
        let b = Buffer::open(&dir, Some("a"), limits, Arc::default()).unwrap();
        let app = b.start_writer();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // A timeout far longer than the test: only a full batch ends the sealer's sleep early,
        // and only the stop ends it at the end.
        let sealer = tokio::spawn(run_sealer(Arc::clone(&b), Duration::from_secs(600), stop_rx));
        let append = |i: i64| {
            let e = keytrail_common::event::Event::new(
                format!("e{i}"),
                keytrail_common::event::EventType::Validated,
                1_000 + i,
                "a",
            );
            let mut out = Vec::new();
            keytrail_common::wire::append_event(&e, &mut out);
            app.append(out, 1)
        };
        append(0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(b.counts().sealed_batches, 0, "half a batch, not yet due");
        append(1).await.unwrap();
        let full = Instant::now();
        while b.counts().sealed_batches == 0 {
            assert!(full.elapsed() < Duration::from_secs(60), "a full batch was not sealed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(b.counts().pending_events, 0);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(60), sealer)
            .await
            .expect("the sealer stops when told, not when its sleep ends")
            .unwrap();
        drop(app);
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failure_on_one_lane_pauses_all_and_only_a_later_success_resumes_them() {
        let lanes = Lanes::default();
        assert!(lanes.check_due(IDLE_PING), "never in contact");
        lanes.ok(lanes.epoch());
        assert!(!lanes.check_due(IDLE_PING));
        assert!(lanes.0.lock().unwrap().paused_until.is_none());
        // Two requests in flight; both fail: one round of backoff, not two.
        let (a, b) = (lanes.epoch(), lanes.epoch());
        let long = lanes.failed(a, Duration::from_secs(60), Some(Duration::from_secs(30)));
        assert!(long >= Duration::from_secs(30));
        let until = lanes.0.lock().unwrap().paused_until.unwrap();
        lanes.failed(b, Duration::from_secs(60), None);
        // A shorter wait from the other lane does not cut the Retry-After short.
        assert_eq!(lanes.0.lock().unwrap().paused_until, Some(until));
        assert_eq!(lanes.0.lock().unwrap().attempt, 1);
        assert!(lanes.check_due(IDLE_PING), "failing: check");
        // A success of a request sent before the failures does not lift the pause ...
        lanes.ok(a);
        assert_eq!(lanes.0.lock().unwrap().paused_until, Some(until));
        assert_eq!(lanes.0.lock().unwrap().attempt, 1);
        // ... the next failure is a new round ...
        lanes.failed(lanes.epoch(), Duration::from_secs(60), None);
        assert_eq!(lanes.0.lock().unwrap().attempt, 2);
        // ... and a success sent after them does.
        lanes.ok(lanes.epoch());
        let l = lanes.0.lock().unwrap();
        assert_eq!((l.attempt, l.paused_until), (0, None));
    }

    #[test]
    fn answers_are_classified() {
        let h = http::HeaderMap::new();
        assert!(classify(StatusCode::OK, &h, b"").is_ok());
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, b"x"),
            Err(ShipError::Permanent { .. })
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, &h, b""),
            Err(ShipError::Permanent { .. })
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &h, b""),
            Err(ShipError::Unauthorized { .. })
        ));
        let mut ra = http::HeaderMap::new();
        ra.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        match classify(StatusCode::TOO_MANY_REQUESTS, &ra, b"") {
            Err(ShipError::Retryable { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &h, b""),
            Err(ShipError::Retryable { .. })
        ));
    }

    #[test]
    fn backoff_is_capped_jittered_and_respects_retry_after() {
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(attempt, cap, None);
            assert!(d <= cap);
            assert!(d <= BACKOFF_BASE.saturating_mul(1 << attempt.min(20)));
        }
        assert!(backoff(0, cap, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        // Full jitter: over many draws at a high attempt, values spread across [0, cap].
        let draws: Vec<_> = (0..200).map(|_| backoff(30, cap, None)).collect();
        assert!(draws.iter().any(|d| *d < cap / 4) && draws.iter().any(|d| *d > cap * 3 / 4));
    }

    #[test]
    fn the_clock_corrects_only_beyond_the_tolerance() {
        let c = AgentClock::default();
        assert_eq!((c.correction(), c.offset_seconds()), (0, None));
        c.observe(30 * 1_000_000_000);
        assert_eq!(c.correction(), 0, "within a minute: trusted");
        assert_eq!(c.offset_seconds(), Some(30.0));
        let behind = 3 * 3600 * 1_000_000_000i64;
        c.observe(behind);
        assert_eq!(c.correction(), behind);
        c.observe(-behind);
        assert_eq!(c.correction(), -behind);
        let mut h = http::HeaderMap::new();
        h.insert(
            keytrail_common::wire::RECEIVED_AT_HEADER,
            http::HeaderValue::from_static("1790000000123"),
        );
        assert_eq!(parts_received_at(&h), Some(1_790_000_000_123_000_000));
        h.insert(
            keytrail_common::wire::RECEIVED_AT_HEADER,
            http::HeaderValue::from_static("9223372036854775807"),
        );
        assert_eq!(parts_received_at(&h), None);
    }

    #[test]
    fn readiness_reasons() {
        let h = ShipHealth::default();
        assert!(h
            .not_ready_reason(Duration::from_secs(30))
            .unwrap()
            .contains("not yet connected"));
        h.ok();
        assert!(h.not_ready_reason(Duration::from_secs(30)).is_none());
        h.failed(&ShipError::Network("down".into()));
        assert!(
            h.not_ready_reason(Duration::from_secs(30)).is_none(),
            "a short blip keeps readiness"
        );
        assert!(h.not_ready_reason(Duration::ZERO).unwrap().contains("stalled"));
        h.failed(&ShipError::Certificate("bad cert".into()));
        assert!(h
            .not_ready_reason(Duration::from_secs(30))
            .unwrap()
            .contains("bad cert"));
    }
}
