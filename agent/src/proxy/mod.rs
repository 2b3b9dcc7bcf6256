//! The transparent reverse proxy (`[proxy]`): sits between an application and its license
//! server and turns the license calls it sees into events.
//!
//! Owns: forwarding (method, path, query, headers and body upstream; status, headers and body
//! back, streamed, bytes unchanged), the upstream connection pool, copying a capped prefix of
//! each body on the side, and handing finished exchanges to the recorder. Does not own: what an
//! exchange means (the adapters: [`keygen`], …) or storage (the buffer's [`Appender`]).
//!
//! # Rules
//!
//! * **Transparent.** Bodies are streamed as they arrive, never rebuffered or re-encoded.
//!   Clients may speak HTTP/1.1 or HTTP/2 (cleartext, prior knowledge); the upstream is
//!   spoken to in HTTP/1.1 over kept-alive connections, as nginx does.
//!   Headers pass unchanged except the hop-by-hop ones (RFC 9110 §7.6.1: `Connection`, the
//!   headers it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`,
//!   `Upgrade`), which belong to each connection, and `Host`, which names the upstream (as
//!   nginx's `proxy_pass` does by default).
//! * **Two paths.** License calls (HTTP/1.1, no body or a `Content-Length` one) take
//!   [`fast`]: one task per client connection copies bytes between the two sockets, as
//!   nginx's event loop does; an answer keeps its own framing (a chunked one its chunks and
//!   trailers, so its `Transfer-Encoding` and `Trailer` fields stay). Everything else —
//!   HTTP/2, HTTP/1.0, chunked or `Expect` requests, upgrades — is handed to hyper
//!   ([`serve_hyper`]) at a request boundary, with the bytes read so far.
//! * **Fail-open.** Nothing keytrail does can fail a request: recording happens after the
//!   response body has been passed on, on another thread: finished exchanges are staged on
//!   the proxy's thread (bounded) and handed over as one batch every 200 ms, or sooner once
//!   2,048 are staged (one cross-thread wake-up per batch, not per request); the proxy never
//!   waits for the recorder. What cannot be recorded — staging full, a body over the capture
//!   cap, an answer the adapter cannot read, a full buffer — is counted by reason in
//!   `keytrail_proxy_unrecorded_total{reason}` and `/v1/status`. An unreachable upstream gets
//!   a 502, as from any proxy.
//! * **Privacy.** An exchange (with raw keys in it) lives only in memory. Adapters produce
//!   events in the ingest schema with `license_key` / `machine` raw, and the same parser as
//!   `POST /v1/events` pseudonymises them before anything is written.

pub mod encode;
pub mod fast;
pub mod generic;
pub mod gumroad;
pub mod json;
pub mod keygen;
pub mod lemonsqueezy;

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keytrail_common::event::{self, Context, IngestDefaults, RawEvent, RawTime};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::time::{now_ns, UnixNanos};
use keytrail_common::wire;
use tokio::net::{TcpListener, TcpStream};

use crate::buffer::{AppendError, Appender};
use crate::ingest::EventIds;
use crate::telemetry::AgentMetrics;

/// Bytes of each body kept for the adapter; license API bodies are a few KiB.
pub const CAPTURE_BYTES: usize = 256 * 1024;
/// Finished exchanges the proxy stages before the next hand-over; beyond it they are counted
/// as `queue_full`. At most three such batches exist at once: staged, handed over, and the
/// one the recorder is on.
const RECORD_QUEUE: usize = 8192;
/// The bytes of bodies (and paths) staged exchanges may hold together; beyond it they are
/// counted as `queue_full` too (8,192 license calls of 2 KiB, or 64 whole captures).
const RECORD_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How often the proxy thread hands its finished exchanges to the recorder, at the latest:
/// one wake-up of another thread per interval instead of one per request. Each hand-over
/// sets off a chain of wake-ups at the normal priority (the recorder, the buffer's writer and
/// sled's I/O threads), and a call thread woken on a core one of them holds waits for it:
/// with 50 ms, keytrail's added p99 was 15–35 µs over nginx's; with 200 ms, −3 to 5 (three
/// alternated pairs, docs/benchmarks.md, session 22).
const HANDOFF_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// Staged exchanges that make a hand-over due before [`HANDOFF_EVERY`] has passed: under a
/// heavy load batches go over as soon as the recorder is free, so the staging never comes
/// near [`RECORD_QUEUE`] (200 ms of a saturating load alone would be 6,700 exchanges here).
/// Above what a single client's sequential calls reach in 200 ms (~1,500 here): with 1,024,
/// they made 7–8 hand-overs a second instead of 5, and sled's I/O threads woke 100 times a
/// second instead of 70 (docs/benchmarks.md, session 23).
const HANDOFF_AT: usize = 2048;
/// Idle upstream connections kept for reuse.
const MAX_IDLE: usize = 128;
/// An idle upstream connection older than this is not reused (a NAT or firewall may have
/// dropped it silently).
const IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// Connecting to the upstream, TLS included.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Events one exchange may turn into.
const MAX_EVENTS_PER_EXCHANGE: usize = 16;

/// Reasons an exchange was not recorded (`keytrail_proxy_unrecorded_total{reason}`).
pub const UNRECORDED_REASONS: [&[&str]; 7] = [
    &["queue_full"],
    &["no_license"],
    &["body_incomplete"],
    &["unreadable_response"],
    &["invalid_event"],
    &["buffer_full"],
    &["buffer_error"],
];

/// A copy of (the start of) a body.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    pub bytes: Vec<u8>,
    /// The whole body was seen and fit under [`CAPTURE_BYTES`].
    pub complete: bool,
}

/// One request and its response, as the adapters see them. Holds raw keys: memory only.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub time: UnixNanos,
    pub method: Method,
    /// The path as the client sent it.
    pub path: String,
    pub query: Option<String>,
    /// The headers the adapter asked for ([`Adapter::request_headers`]), copied.
    pub request_headers: HeaderMap,
    pub request_body: Capture,
    pub status: StatusCode,
    /// `Content-Encoding` and `Content-Type`, copied.
    pub response_headers: HeaderMap,
    pub response_body: Capture,
    /// The response body decompressed, once an adapter asked for it (`Default::default()`
    /// when building an exchange).
    pub decoded: Decoded,
}

/// A decompressed copy of a response body, made on first use. A clone takes the copy only if
/// it is made (it never waits for a thread making it).
#[derive(Debug, Clone, Default)]
pub struct Decoded(std::sync::OnceLock<Result<Vec<u8>, Unreadable>>);

impl Exchange {
    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_value(self.query.as_deref()?.as_bytes(), name)
    }

    /// The request body read as `T` (see [`json`]), when it is a JSON object.
    pub fn request<'a, T: serde::Deserialize<'a>>(&'a self) -> Option<T> {
        json::parse::<json::Obj<T>>(&self.request_body.bytes).ok()?.0
    }

    /// A request parameter as license APIs accept them: a top-level field of a JSON body, a
    /// field of a form-encoded body, or a query parameter (in that order).
    pub fn request_field(&self, name: &str) -> Option<Cow<'_, str>> {
        let body = &self.request_body.bytes;
        let from_body = if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            json::top_field(body, name).and_then(json::Scalar::into_text)
        } else {
            form_value(body, name).map(Cow::Owned)
        };
        from_body.or_else(|| self.query_param(name).map(Cow::Owned))
    }

    /// The response body read as `T` (see [`json`]): `Ok(None)` for an empty body, a body
    /// that is not a JSON object, or a non-JSON error page.
    pub fn response<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<Option<T>, Unreadable> {
        let Some(bytes) = self.response_bytes()? else {
            return Ok(None);
        };
        match json::parse::<json::Obj<T>>(bytes) {
            Ok(v) => Ok(v.0),
            // Error pages of proxies and load balancers in front of the server are often HTML.
            Err(_) if !self.status.is_success() => Ok(None),
            Err(e) => Err(Unreadable("unreadable_response", format!("response is not JSON: {e}"))),
        }
    }

    /// The response body as JSON (`Ok(None)` as for [`Exchange::response`]), for adapters
    /// that look fields up by configured JSON pointers.
    pub fn response_json(&self) -> Result<Option<serde_json::Value>, Unreadable> {
        let Some(bytes) = self.response_bytes()? else {
            return Ok(None);
        };
        match serde_json::from_slice(bytes) {
            Ok(v) => Ok(Some(v)),
            Err(_) if !self.status.is_success() => Ok(None),
            Err(e) => Err(Unreadable("unreadable_response", format!("response is not JSON: {e}"))),
        }
    }

    /// The request body as JSON, when it is JSON.
    pub fn request_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.request_body.bytes).ok()
    }

    /// The response body's bytes, decompressed: `None` when there is no body to read.
    fn response_bytes(&self) -> Result<Option<&[u8]>, Unreadable> {
        if matches!(self.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) || self.method == Method::HEAD {
            return Ok(None);
        }
        if !self.response_body.complete {
            return Err(Unreadable(
                "body_incomplete",
                "response body cut or over the capture cap".into(),
            ));
        }
        if self.response_body.bytes.is_empty() {
            return Ok(None);
        }
        match self
            .response_headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.as_bytes())
        {
            None | Some(b"identity") => Ok(Some(&self.response_body.bytes[..])),
            Some(enc) => match self
                .decoded
                .0
                .get_or_init(|| decompress(enc, &self.response_body.bytes))
            {
                Ok(d) => Ok(Some(&d[..])),
                Err(e) => Err(e.clone()),
            },
        }
    }
}

/// The most a compressed response may expand to before the adapter gives up on it.
const MAX_DECODED_BYTES: u64 = 4 * CAPTURE_BYTES as u64;

/// A copy of a `gzip` / `deflate` response body, decompressed under a cap (the client gets
/// the compressed bytes as sent).
fn decompress(encoding: &[u8], bytes: &[u8]) -> Result<Vec<u8>, Unreadable> {
    use std::io::Read;
    let enc = String::from_utf8_lossy(encoding).trim().to_ascii_lowercase();
    let mut out = Vec::new();
    let read = match enc.as_str() {
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(bytes)
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut out),
        // HTTP's "deflate" is zlib-wrapped; some servers send raw deflate.
        "deflate" => flate2::read::ZlibDecoder::new(bytes)
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut out)
            .or_else(|_| {
                out.clear();
                flate2::read::DeflateDecoder::new(bytes)
                    .take(MAX_DECODED_BYTES + 1)
                    .read_to_end(&mut out)
            }),
        other => {
            return Err(Unreadable(
                "unreadable_response",
                format!("response encoding {other:?} is not read (gzip and deflate are)"),
            ))
        }
    };
    read.map_err(|e| Unreadable("unreadable_response", format!("{enc} response: {e}")))?;
    if out.len() as u64 > MAX_DECODED_BYTES {
        return Err(Unreadable(
            "body_incomplete",
            format!("{enc} response expands past {MAX_DECODED_BYTES} bytes"),
        ));
    }
    Ok(out)
}

/// An event of the ingest schema under construction: type and time (the exchange's) set.
pub fn new_event<'a>(ex: &Exchange, ty: &'static str) -> RawEvent<'a> {
    RawEvent {
        event_type: Some(Cow::Borrowed(ty)),
        time: Some(RawTime::Millis(ex.time / 1_000_000)),
        ..RawEvent::default()
    }
}

/// A value of an `application/x-www-form-urlencoded` string, percent-decoded.
pub fn form_value(form: &[u8], name: &str) -> Option<String> {
    form.split(|b| *b == b'&').find_map(|pair| {
        let mut kv = pair.splitn(2, |b| *b == b'=');
        let k = percent_decode(kv.next()?)?;
        (k == name)
            .then(|| percent_decode(kv.next().unwrap_or_default()))
            .flatten()
    })
}

fn percent_decode(s: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Why an adapter could not turn an exchange into events (a reason label and a detail).
#[derive(Debug, Clone)]
pub struct Unreadable(pub &'static str, pub String);

/// Turns license-server exchanges into events of the ingest schema (`license_key` raw),
/// borrowing what it can from the exchange.
pub trait Adapter: Send + Sync {
    /// The events of one exchange; an empty list for calls that are not license events.
    fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable>;

    /// The request headers the adapter reads: the proxy copies only these into an exchange.
    fn request_headers(&self) -> Vec<HeaderName> {
        Vec::new()
    }
}

/// The adapter `[proxy]` names.
pub fn adapter(config: &crate::config::ProxyConfig) -> Result<Box<dyn Adapter>, String> {
    match config.adapter.as_str() {
        "keygen" => Ok(Box::new(keygen::Keygen)),
        "lemonsqueezy" => Ok(Box::new(lemonsqueezy::LemonSqueezy)),
        "gumroad" => Ok(Box::new(gumroad::Gumroad)),
        "generic" => Ok(Box::new(generic::Generic {
            routes: config.routes.clone(),
        })),
        other => Err(format!(
            "proxy.adapter {other:?}: use keygen, lemonsqueezy, gumroad or generic"
        )),
    }
}

/// A body that passes every frame on unchanged and keeps a copy of the first
/// [`CAPTURE_BYTES`]; `done` gets the copy when the body ends (or is dropped).
pub struct Tee<B> {
    inner: B,
    bytes: Vec<u8>,
    overflow: bool,
    /// The body was known to be empty from the start (hyper may never poll it).
    empty: bool,
    done: Option<Box<dyn FnOnce(Capture) + Send>>,
}

impl<B: Body> Tee<B> {
    pub fn new(inner: B, done: Box<dyn FnOnce(Capture) + Send>) -> Self {
        Tee {
            empty: inner.is_end_stream(),
            inner,
            bytes: Vec::new(),
            overflow: false,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            done(Capture {
                bytes: std::mem::take(&mut self.bytes),
                complete: complete && !self.overflow,
            });
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    // Once a frame is skipped, nothing more is copied: the copy never has a gap.
                    if !this.overflow && this.bytes.len() + d.len() <= CAPTURE_BYTES {
                        this.bytes.extend_from_slice(d);
                    } else {
                        this.overflow = true;
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        // An empty body hyper never polled (complete), or one cut off (not).
        if let Some(done) = self.done.take() {
            done(Capture {
                bytes: std::mem::take(&mut self.bytes),
                complete: self.empty,
            });
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as the `Host` header.
    pub authority: String,
    /// A path prefix of the upstream URL (without the trailing `/`), prepended to every path.
    pub base_path: String,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url.parse().map_err(|e| format!("proxy.upstream {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("proxy.upstream {url:?}: use an http:// or https:// URL")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("proxy.upstream {url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(
                "proxy.upstream: credentials in the URL are not supported (they would be sent as the Host header)"
                    .into(),
            );
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(format!("proxy.upstream {url:?}: a query is not allowed"));
        }
        Ok(Upstream {
            tls,
            host,
            port,
            authority: authority.as_str().to_string(),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

type UpstreamBody = Tee<Incoming>;
type Sender = http1::SendRequest<UpstreamBody>;
/// A pooled connection and when it became idle.
type Idle = (Sender, std::time::Instant);

/// The proxy: one per agent, shared by every connection.
pub struct Proxy {
    upstream: Upstream,
    /// The `Host` header sent upstream.
    host: Option<HeaderValue>,
    /// The request headers the adapter reads ([`Adapter::request_headers`]).
    keep_headers: Vec<HeaderName>,
    tls: Option<tokio_rustls::TlsConnector>,
    idle: Arc<Mutex<Vec<Idle>>>,
    /// Idle upstream connections of the HTTP/1.1 path ([`fast`]), and since when.
    pooled: Mutex<Vec<(fast::UpConn, std::time::Instant)>>,
    /// How long the HTTP/1.1 path waits for a client or the upstream.
    timeouts: fast::Timeouts,
    recorder: RecordSender,
    /// Finished exchanges, handed to `recorder` every [`HANDOFF_EVERY`].
    staged: Mutex<Staged>,
    metrics: Arc<AgentMetrics>,
}

/// Exchanges waiting for the next hand-over, and the bytes they hold.
#[derive(Default)]
struct Staged {
    list: Vec<Exchange>,
    bytes: usize,
}

/// The response body the proxy sends: the upstream's, teed, or a short error of its own.
type ProxyBody = Either<Tee<Incoming>, Full<Bytes>>;

impl Proxy {
    /// `ca`: the roots an `https://` upstream is checked against (the system's when `None`);
    /// `keep_headers`: the request headers the adapter reads.
    pub fn new(
        upstream: Upstream,
        ca: Option<&std::path::Path>,
        keep_headers: Vec<HeaderName>,
        recorder: RecordSender,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Proxy, String> {
        let tls = if upstream.tls {
            let config = keytrail_common::tls::upstream_client_config(ca)?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Proxy {
            host: HeaderValue::from_str(&upstream.authority).ok(),
            upstream,
            keep_headers,
            tls,
            idle: Arc::new(Mutex::new(Vec::new())),
            pooled: Mutex::new(Vec::new()),
            timeouts: fast::Timeouts::default(),
            recorder,
            staged: Mutex::default(),
            metrics,
        })
    }

    /// A new upstream connection (TLS included) for hyper's client.
    async fn connect(&self) -> Result<Sender, String> {
        let conn = self.open().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(conn))
            .await
            .map_err(|e| format!("HTTP with {}: {e}", self.upstream.authority))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// A new upstream connection, TLS included, within [`CONNECT_TIMEOUT`].
    async fn open(&self) -> Result<fast::UpConn, String> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.open_now())
            .await
            .map_err(|_| {
                format!(
                    "connecting to {} took over {CONNECT_TIMEOUT:?}",
                    self.upstream.authority
                )
            })?
    }

    async fn open_now(&self) -> Result<fast::UpConn, String> {
        let u = &self.upstream;
        let tcp = TcpStream::connect((u.host.as_str(), u.port))
            .await
            .map_err(|e| format!("connecting to {}: {e}", u.authority))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(u.host.clone())
                    .map_err(|e| format!("upstream host {:?}: {e}", u.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", u.authority))?;
                Ok(fast::UpConn::Tls(Box::new(stream)))
            }
            None => Ok(fast::UpConn::Plain(tcp)),
        }
    }

    /// An idle connection of the HTTP/1.1 path that is still open.
    fn take_pooled(&self) -> Option<fast::UpConn> {
        let now = std::time::Instant::now();
        let mut pooled = self.pooled.lock().expect("upstream pool");
        pooled.retain(|(_, since)| now.duration_since(*since) < IDLE_FOR);
        while let Some((mut conn, _)) = pooled.pop() {
            if conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection of the HTTP/1.1 path for the next request.
    fn park_pooled(&self, conn: fast::UpConn) {
        let mut pooled = self.pooled.lock().expect("upstream pool");
        if pooled.len() < MAX_IDLE {
            pooled.push((conn, std::time::Instant::now()));
        }
    }

    /// Logs and counts an upstream failure; the text of the client's 502 or 504.
    fn unavailable(&self, e: &str) -> String {
        tracing::warn!(error = %e, "proxy: upstream unavailable");
        self.metrics.errors.add(&["proxy", "upstream_unavailable"], 1);
        format!("keytrail proxy: upstream unavailable: {e}")
    }

    /// Stages a finished exchange for the next hand-over to the recorder.
    fn stage(&self, ex: Exchange) {
        let bytes = ex.request_body.bytes.len()
            + ex.response_body.bytes.len()
            + ex.path.len()
            + ex.query.as_ref().map_or(0, String::len);
        let mut staged = self.staged.lock().expect("staged exchanges");
        if staged.list.len() < RECORD_QUEUE && staged.bytes + bytes <= RECORD_QUEUE_BYTES {
            staged.list.push(ex);
            staged.bytes += bytes;
            if staged.list.len() >= HANDOFF_AT {
                self.offer_staged(&mut staged);
            }
        } else {
            self.metrics.proxy_unrecorded.add(&["queue_full"], 1);
        }
    }

    /// Sends on an idle connection, or a new one. A pooled connection the upstream closed
    /// meanwhile gives the request back unsent: it is retried once on a fresh connection.
    async fn send(&self, mut req: Request<UpstreamBody>) -> Result<Response<Incoming>, String> {
        loop {
            let pooled = {
                let now = std::time::Instant::now();
                let mut idle = self.idle.lock().expect("idle pool");
                idle.retain(|(_, since)| now.duration_since(*since) < IDLE_FOR);
                idle.pop().map(|(s, _)| s)
            };
            let fresh = pooled.is_none();
            let mut sender = match pooled {
                Some(s) => s,
                None => self.connect().await?,
            };
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(format!("{} closed the connection", self.upstream.authority));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.park(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(format!("{}: {}", self.upstream.authority, e.into_error())),
                },
            }
        }
    }

    /// Returns a connection to the pool once its response body has been read.
    fn park(&self, mut sender: Sender) {
        let idle = Arc::clone(&self.idle);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = idle.lock().expect("idle pool");
                if idle.len() < MAX_IDLE {
                    idle.push((sender, std::time::Instant::now()));
                }
            }
        });
    }

    /// Hands the staged exchanges to the recorder when it has taken the previous batch; while
    /// it is still on that one, they stay staged (up to [`RECORD_QUEUE`] and
    /// [`RECORD_QUEUE_BYTES`], beyond which new exchanges are counted as `queue_full`).
    fn hand_off(&self) {
        let mut staged = self.staged.lock().expect("staged exchanges");
        if !staged.list.is_empty() {
            self.offer_staged(&mut staged);
        }
    }

    /// [`Proxy::hand_off`] with the staging locked.
    fn offer_staged(&self, staged: &mut Staged) {
        let offered = self.recorder.offer(&mut staged.list);
        if staged.list.is_empty() {
            staged.bytes = 0;
        }
        match offered {
            Offered::Taken | Offered::Waiting => {}
            // The recorder ended (it never does while the agent runs): count what it will
            // never take; it is not kept.
            Offered::Discarded(lost) => self.metrics.proxy_unrecorded.add(&["queue_full"], lost as u64),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let time = now_ns();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().map(str::to_string);
        let request_slot: Arc<Mutex<Option<Capture>>> = Arc::default();
        let slot = Arc::clone(&request_slot);
        let body = Tee::new(body, Box::new(move |c| *slot.lock().expect("capture slot") = Some(c)));
        let request_headers = copy_headers(&parts.headers, &self.keep_headers);
        strip_hop_by_hop(&mut parts.headers);
        if parts.version == http::Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        let target = match &query {
            Some(q) => format!("{}{path}?{q}", self.upstream.base_path),
            None => format!("{}{path}", self.upstream.base_path),
        };
        parts.uri = match target.parse() {
            Ok(u) => u,
            Err(_) => {
                return Ok(plain(
                    StatusCode::BAD_REQUEST,
                    "keytrail proxy: unusable request target",
                ))
            }
        };
        parts.version = http::Version::HTTP_11;
        if let Some(h) = &self.host {
            parts.headers.insert(header::HOST, h.clone());
        }
        let method = parts.method.clone();
        let sent = tokio::time::timeout(self.timeouts.upstream, self.send(Request::from_parts(parts, body)));
        let resp = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Ok(plain(StatusCode::BAD_GATEWAY, &self.unavailable(&e))),
            Err(_) => {
                let e = format!(
                    "{}: no answer within {} s",
                    self.upstream.authority,
                    self.timeouts.upstream.as_secs()
                );
                return Ok(plain(StatusCode::GATEWAY_TIMEOUT, &self.unavailable(&e)));
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let status = rparts.status;
        let response_headers = copy_headers(&rparts.headers, &[header::CONTENT_ENCODING, header::CONTENT_TYPE]);
        let proxy = Arc::clone(&self);
        let done = Box::new(move |response_body: Capture| {
            let request_body = request_slot.lock().expect("capture slot").take().unwrap_or_default();
            let ex = Exchange {
                time,
                method,
                path,
                query,
                request_headers,
                request_body,
                status,
                response_headers,
                response_body,
                decoded: Default::default(),
            };
            proxy.stage(ex);
        });
        Ok(Response::from_parts(rparts, Either::Left(Tee::new(rbody, done))))
    }
}

/// HTTP/2 clients may send each cookie as a header field of its own (RFC 9113 §8.2.3); an
/// HTTP/1.1 request carries them in one `Cookie` field, joined with "; ".
fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// Copies of the named headers. Copies, not clones: a clone shares the connection's read
/// buffer and keeps it alive until the recorder is done, so the connection could not reuse it.
fn copy_headers(from: &HeaderMap, names: &[HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        for v in from.get_all(name) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                out.append(name.clone(), v);
            }
        }
    }
    out
}

impl Drop for Proxy {
    /// Everything staged goes to the recorder, then the recorder sees the hand-over closed.
    /// (Connections and the response bodies hyper still holds keep a reference: the proxy
    /// drops after the last of them has staged its exchange.)
    fn drop(&mut self) {
        if let Ok(mut staged) = self.staged.lock() {
            self.recorder.flush(&mut staged.list);
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(text.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Removes the headers that belong to one connection (RFC 9110 §7.6.1).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Serves the proxy until `shutdown` flips.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let handoff = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HANDOFF_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                proxy.hand_off();
            }
        })
    };
    let _stop_handoff = AbortOnDrop(handoff);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => {
                proxy.hand_off();
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(fast::serve_connection(Arc::clone(&proxy), stream));
    }
}

/// Serves a connection with hyper: HTTP/1.1, or HTTP/2 when the client opens with its preface
/// (h2c prior knowledge). [`fast`] hands over what it does not serve itself.
async fn serve_hyper<I>(proxy: Arc<Proxy>, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let head_within = proxy.timeouts.client;
    // Never shorter than the wait for the upstream: a call waiting on its upstream gets its
    // 504 rather than a closed connection.
    let idle = proxy
        .timeouts
        .idle
        .max(proxy.timeouts.upstream + std::time::Duration::from_secs(1));
    let service = service_fn(move |req| Arc::clone(&proxy).handle(req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // An HTTP/1 client that does not complete a request head within the client timeout is
    // closed on (without an answer). Unlike the HTTP/1.1 path's per-read limit, hyper's is
    // one deadline for the whole head, and it starts when the previous answer ends: an idle
    // kept-alive connection here closes after that time (60 s; nginx's default is 75 s), not
    // after the HTTP/1.1 path's 5 minutes. hyper has no limit of its own for an idle HTTP/2
    // connection or a stalled body: [`Inactivity`] closes a connection on which no byte has
    // moved either way for the idle limit (5 minutes).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_within);
    let _ = builder
        .serve_connection(TokioIo::new(Inactivity::new(io, idle)), service)
        .await;
}

/// A connection that fails its reads and writes once no byte has moved either way for
/// `limit`, while its owner waits on it (hyper then closes it).
struct Inactivity<I> {
    io: I,
    limit: std::time::Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<I> Inactivity<I> {
    fn new(io: I, limit: std::time::Duration) -> Self {
        Inactivity {
            io,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.limit;
        self.deadline.as_mut().reset(next);
    }

    /// A write's result: bytes written reset the limit, a pending write is checked against it.
    fn wrote(&mut self, r: Poll<std::io::Result<usize>>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Pending => self.pending(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }

    /// For an operation that is pending: an error once the limit has passed.
    fn pending<T>(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<T>> {
        match std::future::Future::poll(self.deadline.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no byte moved either way for {} s", self.limit.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Inactivity<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.pending(cx),
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Inactivity<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        this.wrote(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives recorded events their defaults (agent id, context, time, id).
pub struct RecorderDefaults {
    pub agent_id: String,
    pub context: Context,
    pub ids: Arc<EventIds>,
    now: std::cell::Cell<UnixNanos>,
    /// Corrects the exchange times (this host's clock against the collector's).
    clock: Arc<crate::ship::AgentClock>,
}

impl RecorderDefaults {
    pub fn new(agent_id: String, context: Context, clock: Arc<crate::ship::AgentClock>) -> Self {
        RecorderDefaults {
            agent_id,
            context,
            ids: Arc::new(EventIds::new()),
            now: std::cell::Cell::new(0),
            clock,
        }
    }

    /// Defaults for another recording thread: the same agent, context, clock and ids.
    pub fn for_another_thread(&self) -> Self {
        RecorderDefaults {
            agent_id: self.agent_id.clone(),
            context: self.context.clone(),
            ids: Arc::clone(&self.ids),
            now: std::cell::Cell::new(0),
            clock: Arc::clone(&self.clock),
        }
    }
}

impl IngestDefaults for RecorderDefaults {
    fn agent_id(&self) -> &str {
        &self.agent_id
    }
    fn context(&self) -> &Context {
        &self.context
    }
    fn now(&self) -> UnixNanos {
        self.now.get()
    }
    fn new_event_id(&self) -> String {
        self.ids.next_id()
    }
}

/// Records exchanges off the request path: adapter → ingest parser (pseudonymisation,
/// validation) → buffer. Exchanges that arrived together go into one append (one group
/// commit). Never blocks the proxy: the proxy only offers it batches ([`RecordSender`]).
/// The CPU work (adapter, validation, compression) runs on a background thread at the lowest
/// priority, with this one taking over when that falls behind ([`encode`]).
pub async fn run_recorder(
    mut rx: RecordReceiver,
    adapter: Arc<dyn Adapter>,
    fingerprinter: Fingerprinter,
    defaults: RecorderDefaults,
    appender: Appender,
    metrics: Arc<AgentMetrics>,
) {
    let mut encoder = encode::Encoder::start(
        encode::Encoding {
            adapter,
            fingerprinter,
            defaults,
        },
        appender.chunker(),
    );
    let mut exchanges = Vec::new();
    while rx.recv_many(&mut exchanges).await > 0 {
        let encode::Encoded {
            payload,
            count,
            unrecorded,
        } = encoder.encode(&mut exchanges);
        for (reason, n) in unrecorded.reasons {
            metrics.proxy_unrecorded.add(&[reason], n);
        }
        if let Some((error, n)) = unrecorded.invalid {
            tracing::warn!(%error, calls = n, "proxy: the adapter produced invalid events (the first one's error)");
        }
        if count == 0 {
            continue;
        }
        let appended = match payload {
            encode::Payload::Records(records) => appender.append(records, count).await,
            encode::Payload::Chunks(chunks) => appender.append_chunks(chunks).await,
        };
        match appended {
            Ok(()) => {
                metrics.received.add(count as u64);
                metrics.proxy_recorded.add(count as u64);
            }
            Err(AppendError::Full { .. } | AppendError::DiskLow { .. }) => {
                // Also a buffer drop (contract: "proxy traffic still flows, drops are counted").
                metrics.proxy_unrecorded.add(&["buffer_full"], count as u64);
                metrics.discarded.add(&["proxy_buffer_full"], count as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy: recording failed");
                metrics.proxy_unrecorded.add(&["buffer_error"], count as u64);
            }
        }
    }
}

/// Appends the wire records of one exchange's events; returns how many. What it does not
/// record goes into `unrecorded`.
fn record_one(
    ex: &Exchange,
    adapter: &dyn Adapter,
    fingerprinter: &Fingerprinter,
    defaults: &RecorderDefaults,
    unrecorded: &mut encode::Tally,
    records: &mut Vec<u8>,
) -> u32 {
    if !ex.request_body.complete {
        // Cut off, over the cap, or not yet read when the answer came: a field read from it
        // could be wrong (a key cut short would be a different license).
        unrecorded.add("body_incomplete", 1);
        return 0;
    }
    let mut values = match adapter.events(ex) {
        Ok(v) => v,
        Err(Unreadable(reason, detail)) => {
            // Not the path: Keygen accepts keys in it.
            tracing::debug!(reason, %detail, method = %ex.method, status = ex.status.as_u16(), "proxy: exchange not recorded");
            unrecorded.add(reason, 1);
            return 0;
        }
    };
    if values.is_empty() {
        return 0;
    }
    values.truncate(MAX_EVENTS_PER_EXCHANGE);
    let n = values.len();
    defaults.now.set(ex.time.saturating_add(defaults.clock.correction()));
    // The same validation and pseudonymisation as POST /v1/events, without a JSON round trip.
    match event::parse_raw(values, fingerprinter, defaults) {
        Ok(events) => {
            for e in &events {
                wire::append_event(e, records);
            }
            events.len() as u32
        }
        Err(e) => {
            unrecorded.add("invalid_event", n as u64);
            match &mut unrecorded.invalid {
                Some((_, calls)) => *calls += 1,
                None => {
                    let error = format!("{e} ({} {}, status {})", ex.method, ex.path, ex.status.as_u16());
                    unrecorded.invalid = Some((error, 1));
                }
            }
            0
        }
    }
}

/// The hand-over between the proxy and its recorder: one batch at a time, passed by swapping
/// vectors, so neither side allocates or copies exchanges in the steady state and the recorder
/// is woken once per batch.
#[derive(Default)]
struct Handover {
    /// The batch waiting for the recorder; empty when it has taken it.
    full: Mutex<Vec<Exchange>>,
    closed: std::sync::atomic::AtomicBool,
    /// The recorder's side was dropped.
    receiver_gone: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// The proxy's side of the hand-over.
pub struct RecordSender(Arc<Handover>);

/// What became of a batch offered to the recorder.
enum Offered {
    Taken,
    /// The recorder is still on the previous batch: the offer stays staged.
    Waiting,
    /// The recorder is gone: this many exchanges (the offer and what was handed over
    /// untaken) were dropped.
    Discarded(usize),
}

impl RecordSender {
    /// Moves `staged` over (leaving it empty, with the previous batch's room) if the recorder
    /// has taken the previous batch; otherwise leaves it for the next try.
    fn offer(&self, staged: &mut Vec<Exchange>) -> Offered {
        let mut full = self.0.full.lock().expect("handed-over exchanges");
        if self.0.receiver_gone.load(std::sync::atomic::Ordering::Acquire) {
            let lost = staged.len() + full.len();
            staged.clear();
            full.clear();
            return Offered::Discarded(lost);
        }
        if !full.is_empty() {
            return Offered::Waiting;
        }
        std::mem::swap(&mut *full, staged);
        drop(full);
        self.0.wake.notify_one();
        Offered::Taken
    }
}

impl RecordSender {
    /// Moves `staged` over whether or not the recorder has taken the previous batch (the
    /// proxy is stopping: nothing more follows).
    fn flush(&self, staged: &mut Vec<Exchange>) {
        self.0.full.lock().expect("handed-over exchanges").append(staged);
        self.0.wake.notify_one();
    }
}

impl Drop for RecordSender {
    fn drop(&mut self) {
        self.0.closed.store(true, std::sync::atomic::Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// The recorder's side of the hand-over.
pub struct RecordReceiver {
    handover: Arc<Handover>,
    /// For [`RecordReceiver::recv`].
    pending: std::collections::VecDeque<Exchange>,
}

impl RecordReceiver {
    /// Waits for the next batch and moves it into `out` (swapped in when `out` is empty, so
    /// `out`'s room goes back to the proxy). Returns how many; 0 once the proxy is gone and
    /// everything it handed over has been taken.
    pub async fn recv_many(&mut self, out: &mut Vec<Exchange>) -> usize {
        loop {
            let closed = self.handover.closed.load(std::sync::atomic::Ordering::Acquire);
            {
                let mut full = self.handover.full.lock().expect("handed-over exchanges");
                if !full.is_empty() {
                    if out.is_empty() {
                        std::mem::swap(out, &mut *full);
                    } else {
                        out.append(&mut full);
                    }
                    return out.len();
                }
            }
            if closed {
                return 0;
            }
            self.handover.wake.notified().await;
        }
    }

    /// One exchange (tests).
    pub async fn recv(&mut self) -> Option<Exchange> {
        if self.pending.is_empty() {
            let mut batch = Vec::new();
            self.recv_many(&mut batch).await;
            self.pending.extend(batch);
        }
        self.pending.pop_front()
    }
}

impl Drop for RecordReceiver {
    fn drop(&mut self) {
        // The proxy's next hand-over counts and frees what was handed over and not taken.
        self.handover
            .receiver_gone
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The hand-over between a proxy and its recorder.
pub fn record_channel() -> (RecordSender, RecordReceiver) {
    let handover = Arc::new(Handover::default());
    (
        RecordSender(Arc::clone(&handover)),
        RecordReceiver {
            handover,
            pending: Default::default(),
        },
    )
}

/// An exchange as the adapter tests write one: `path` may carry a `?query`; both bodies are
/// complete; time 2025-11-24T16:00:00Z.
#[cfg(test)]
pub(crate) fn test_exchange(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    request: &str,
    status: u16,
    response: &str,
) -> Exchange {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path.to_string(), None),
    };
    Exchange {
        time: 1_764_000_000_000_000_000,
        method: method.parse().unwrap(),
        path,
        query,
        request_headers: h,
        request_body: Capture {
            bytes: request.as_bytes().to_vec(),
            complete: true,
        },
        status: StatusCode::from_u16(status).unwrap(),
        response_headers: HeaderMap::new(),
        response_body: Capture {
            bytes: response.as_bytes().to_vec(),
            complete: true,
        },
        decoded: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn form_values_are_decoded() {
        let f = b"license_key=AB%2DC+D&instance_name=x%20y&empty=&flag";
        assert_eq!(form_value(f, "license_key").as_deref(), Some("AB-C D"));
        assert_eq!(form_value(f, "instance_name").as_deref(), Some("x y"));
        assert_eq!(form_value(f, "empty").as_deref(), Some(""));
        assert_eq!(form_value(f, "missing"), None);
        assert_eq!(form_value(b"k=%zz", "k"), None, "bad escape");
        assert_eq!(form_value(b"k=%4", "k"), None, "cut escape");
    }

    #[test]
    fn compressed_responses_are_read_from_a_capped_copy() {
        use std::io::Write;
        let json = br#"{"meta":{"valid":true,"code":"VALID"}}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(json).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress(b"gzip", &gz).unwrap(), json);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(json).unwrap();
        assert_eq!(decompress(b"deflate", &z.finish().unwrap()).unwrap(), json);
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(json).unwrap();
        assert_eq!(decompress(b"Deflate", &raw.finish().unwrap()).unwrap(), json);
        assert_eq!(decompress(b"br", b"x").unwrap_err().0, "unreadable_response");
        assert_eq!(decompress(b"gzip", b"not gzip").unwrap_err().0, "unreadable_response");
        // A bomb: 64 MiB of zeros in well under the capture cap is refused at the cap.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        bomb.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = bomb.finish().unwrap();
        assert!(bomb.len() < CAPTURE_BYTES);
        assert_eq!(decompress(b"gzip", &bomb).unwrap_err().0, "body_incomplete");
    }

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("https://api.keygen.sh").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("api.keygen.sh", 443, "")
        );
        let u = Upstream::parse("http://127.0.0.1:3000/base/").unwrap();
        assert_eq!(
            (u.port, u.base_path.as_str(), u.authority.as_str()),
            (3000, "/base", "127.0.0.1:3000")
        );
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http://x/?q=1").is_err());
        let e = Upstream::parse("https://user:secret@api.example").unwrap_err();
        assert!(e.contains("credentials") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("License k"));
        h.insert("keygen-signature", HeaderValue::from_static("sig"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["authorization", "keygen-signature"]);
    }

    /// A proxy in front of an in-process upstream that answers every request with its body
    /// reversed; returns the proxy's address and the recorder's queue.
    struct Echo {
        addr: std::net::SocketAddr,
        rx: RecordReceiver,
        proxy: Arc<Proxy>,
        /// Connections the upstream accepted.
        accepted: Arc<std::sync::atomic::AtomicUsize>,
    }

    async fn proxy_in_front_of_echo() -> Echo {
        proxy_in_front_of(None).await
    }

    /// With `tls`: the upstream speaks TLS with a certificate of the dev PKI in that directory.
    async fn proxy_in_front_of(tls: Option<&std::path::Path>) -> Echo {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let acceptor = tls.map(|dir| {
            let config =
                keytrail_common::tls::server_config(&dir.join("collector.crt"), &dir.join("collector.key"), None)
                    .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (s, _) = up.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        let cookies: Vec<String> = req
                            .headers()
                            .get_all(header::COOKIE)
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .collect();
                        let mut body = req.into_body().collect().await?.to_bytes().to_vec();
                        body.reverse();
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        r.headers_mut()
                            .insert("x-upstream-version", HeaderValue::from_str(&version).unwrap());
                        r.headers_mut().insert(
                            "x-upstream-cookies",
                            HeaderValue::from_str(&cookies.join(" | ")).unwrap(),
                        );
                        Ok::<_, hyper::Error>(r)
                    });
                    match acceptor {
                        Some(a) => {
                            let Ok(s) = a.accept(s).await else { return };
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        }
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        }
                    }
                });
            }
        });
        let (tx, rx) = record_channel();
        let (url, ca) = match tls {
            Some(dir) => (
                format!("https://localhost:{}", up_addr.port()),
                Some(dir.join("ca.crt")),
            ),
            None => (format!("http://{up_addr}"), None),
        };
        let upstream = Upstream::parse(&url).unwrap();
        let proxy = Arc::new(
            Proxy::new(
                upstream,
                ca.as_deref(),
                vec![header::AUTHORIZATION],
                tx,
                Arc::new(AgentMetrics::default()),
            )
            .unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let p = Arc::clone(&proxy);
        tokio::spawn(async move {
            let _keep = _stop;
            serve(l, p, stop_rx).await
        });
        Echo {
            addr,
            rx,
            proxy,
            accepted,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http2_clients_are_served_and_recorded() {
        let Echo { addr, mut rx, .. } = proxy_in_front_of_echo().await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in 0..3 {
            let req = Request::post(format!("http://{addr}/v1/licenses/actions/validate-key?n={i}"))
                .header(header::COOKIE, "a=1")
                .header(header::COOKIE, "b=2")
                .body(Full::new(Bytes::from(format!("abc{i}"))))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.headers()["x-upstream-version"], "HTTP/1.1");
            // Cookies split into fields (as HTTP/2 allows) reach HTTP/1.1 as one field.
            assert_eq!(resp.headers()["x-upstream-cookies"], "a=1; b=2");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], format!("{i}cba").as_bytes());
            let ex = rx.recv().await.unwrap();
            assert_eq!(ex.path, "/v1/licenses/actions/validate-key");
            assert_eq!(ex.query.as_deref(), Some(format!("n={i}").as_str()));
            assert_eq!(ex.request_body.bytes, format!("abc{i}").as_bytes());
            assert!(ex.response_body.complete);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exchanges_keep_only_the_headers_adapters_read() {
        let Echo { addr, mut rx, .. } = proxy_in_front_of_echo().await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post("/v1/x")
            .header(header::AUTHORIZATION, "License K-1")
            .header(header::COOKIE, "session=secret")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(
            resp.headers()["x-upstream-version"],
            "HTTP/1.1",
            "passed on to the client"
        );
        resp.into_body().collect().await.unwrap();
        let ex = rx.recv().await.unwrap();
        let names: Vec<&str> = ex.request_headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["authorization"]);
        assert_eq!(ex.request_headers[header::AUTHORIZATION], "License K-1");
        assert!(ex.response_headers.get("x-upstream-version").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upstream_connections_are_reused() {
        let Echo {
            addr,
            mut rx,
            proxy,
            accepted,
        } = proxy_in_front_of_echo().await;
        for i in 0..5 {
            // The previous exchange's connection is back in the pool (parked once its
            // response was read).
            for _ in 0..500 {
                if i == 0 || proxy.idle.lock().unwrap().len() == 1 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::post("/x")
                .body(Full::new(Bytes::from(vec![b'a'; i * 1000])))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().len(), i * 1000);
            rx.recv().await.unwrap();
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one upstream connection for five clients"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_upstreams_are_verified_against_the_configured_ca() {
        keytrail_common::tls::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("kt-proxy-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        keytrail_common::pki::write_dev_pki(&dir, &["localhost".to_string()], &[]).unwrap();
        let Echo { addr, mut rx, .. } = proxy_in_front_of(Some(&dir)).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(
                Request::post("/v1/x")
                    .body(Full::new(Bytes::from_static(b"tls")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"slt");
        assert_eq!(rx.recv().await.unwrap().response_body.bytes, b"slt");
        // Another CA: the upstream is refused, and the client gets a 502 naming TLS.
        let other = dir.join("other");
        keytrail_common::pki::write_dev_pki(&other, &["localhost".to_string()], &[]).unwrap();
        std::fs::copy(other.join("ca.crt"), dir.join("ca.crt")).unwrap();
        let Echo { addr, .. } = proxy_in_front_of(Some(&dir)).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(Request::post("/v1/x").body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&text).contains("TLS"), "{text:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_hand_over_passes_batches_in_order_and_everything_at_close() {
        let (tx, mut rx) = record_channel();
        let ex = |path: &str| test_exchange("POST", path, &[], "", 200, "");
        let mut staged = vec![ex("/1"), ex("/2")];
        tx.offer(&mut staged);
        assert!(staged.is_empty(), "taken");
        // The recorder has not taken the first batch: the next one stays staged.
        staged.push(ex("/3"));
        tx.offer(&mut staged);
        assert_eq!(staged.len(), 1);
        let mut got = Vec::new();
        assert_eq!(rx.recv_many(&mut got).await, 2);
        let paths: Vec<&str> = got.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/1", "/2"]);
        got.clear();
        tx.offer(&mut staged);
        assert!(staged.is_empty());
        // At close, what is staged goes over even while a batch waits, then the end shows.
        staged.push(ex("/4"));
        tx.flush(&mut staged);
        drop(tx);
        assert_eq!(rx.recv_many(&mut got).await, 2);
        let paths: Vec<&str> = got.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/3", "/4"]);
        got.clear();
        assert_eq!(rx.recv_many(&mut got).await, 0);
    }

    #[tokio::test]
    async fn a_full_staging_is_handed_over_without_waiting_for_the_interval() {
        // No serve loop, so no timer: only the staging's size hands over.
        let (tx, mut rx) = record_channel();
        let proxy = Proxy::new(
            Upstream::parse("http://127.0.0.1:9").unwrap(),
            None,
            Vec::new(),
            tx,
            Arc::default(),
        )
        .unwrap();
        let ex = |i: usize| test_exchange("POST", &format!("/{i}"), &[], "", 200, "");
        for i in 0..HANDOFF_AT - 1 {
            proxy.stage(ex(i));
        }
        let mut got = Vec::new();
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv_many(&mut got)).await;
        assert!(early.is_err(), "nothing handed over below {HANDOFF_AT}");
        proxy.stage(ex(HANDOFF_AT - 1));
        assert_eq!(rx.recv_many(&mut got).await, HANDOFF_AT);
        assert_eq!(got[HANDOFF_AT - 1].path, format!("/{}", HANDOFF_AT - 1));
        assert!(proxy.staged.lock().unwrap().list.is_empty());
    }

    #[tokio::test]
    async fn exchanges_for_a_recorder_that_ended_are_counted_not_kept() {
        let Echo { addr, rx, proxy, .. } = proxy_in_front_of_echo().await;
        drop(rx);
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            let req = Request::post("/v1/x")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "the proxy still forwards");
            resp.into_body().collect().await.unwrap();
        }
        let counted = || proxy.metrics.proxy_unrecorded.get(&["queue_full"]);
        for _ in 0..200 {
            if counted() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(counted(), 3);
        assert!(proxy.staged.lock().unwrap().list.is_empty());
    }

    #[tokio::test]
    async fn tee_passes_frames_and_keeps_a_capped_copy() {
        let got: Arc<Mutex<Option<Capture>>> = Arc::default();
        let g = Arc::clone(&got);
        let body = Full::new(Bytes::from_static(b"hello"));
        let tee = Tee::new(body, Box::new(move |c| *g.lock().unwrap() = Some(c)));
        let out = tee.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"hello");
        let c = got.lock().unwrap().take().unwrap();
        assert!(c.complete);
        assert_eq!(c.bytes, b"hello");
        // Over the cap: passed on whole, copy marked incomplete.
        let big = Bytes::from(vec![7u8; CAPTURE_BYTES + 1]);
        let g = Arc::clone(&got);
        let tee = Tee::new(Full::new(big.clone()), Box::new(move |c| *g.lock().unwrap() = Some(c)));
        assert_eq!(tee.collect().await.unwrap().to_bytes(), big);
        assert!(!got.lock().unwrap().take().unwrap().complete);
        // An empty body hyper never polls is complete; a body dropped unread is not.
        let g = Arc::clone(&got);
        drop(Tee::new(
            Full::new(Bytes::new()),
            Box::new(move |c| *g.lock().unwrap() = Some(c)),
        ));
        assert!(got.lock().unwrap().take().unwrap().complete);
        let g = Arc::clone(&got);
        drop(Tee::new(
            Full::new(Bytes::from_static(b"x")),
            Box::new(move |c| *g.lock().unwrap() = Some(c)),
        ));
        assert!(!got.lock().unwrap().take().unwrap().complete);
    }
}

/// The recorder's CPU per exchange, on the proxy bench's Keygen call. A measurement, not a
/// test (no assertion on time): `cargo test --release -p keytrail-agent recorder_cost --
/// --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn recorder_cost() {
        let ex = test_exchange(
            "POST",
            "/v1/accounts/acme/licenses/actions/validate-key",
            &[
                ("content-type", "application/vnd.api+json"),
                ("accept", "application/vnd.api+json"),
            ],
            r#"{"meta":{"key":"C1B6DE-39A6E3-DE1529-8559A0-4AF593-V3","scope":{"fingerprint":"4d:Eq:UV:D3:XZ:tL"}}}"#,
            200,
            r#"{"data":{"id":"8f1d2c3b-0a9e-4f5d-8c7b-6a5e4d3c2b1a","type":"licenses","attributes":{"expiry":"2027-06-01T00:00:00.000Z","maxMachines":5},"relationships":{"machines":{"meta":{"count":3}},"policy":{"data":{"type":"policies","id":"pro"}}}},"meta":{"ts":"2026-11-23T10:00:00.000Z","valid":true,"detail":"is valid","code":"VALID"}}"#,
        );
        let fp = Fingerprinter::new(b"bench-secret".to_vec());
        let defaults = RecorderDefaults::new(
            "bench".into(),
            Context::default(),
            Arc::new(crate::ship::AgentClock::default()),
        );
        let mut unrecorded = encode::Tally::default();
        let adapter = keygen::Keygen;
        let mut records = Vec::new();
        let n = 200_000;
        for round in 0..3 {
            let start = std::time::Instant::now();
            for _ in 0..n {
                records.clear();
                assert_eq!(
                    record_one(&ex, &adapter, &fp, &defaults, &mut unrecorded, &mut records),
                    1
                );
            }
            let per = start.elapsed().as_nanos() as f64 / n as f64;
            let adapter_only = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(adapter.events(&ex).unwrap());
            }
            let adapter_per = adapter_only.elapsed().as_nanos() as f64 / n as f64;
            println!(
                "round {round}: record_one {per:.0} ns/exchange, of which the adapter {adapter_per:.0} ns; {} wire bytes",
                records.len()
            );
        }
    }
}
