//! The proxy's HTTP/1.1 path: one task per client connection reads a request, writes it to a
//! pooled upstream connection and copies the answer back, the way nginx's event loop does.
//! No task, channel or header map stands between the two sockets; a license call costs two
//! reads and two writes.
//!
//! Served here: HTTP/1.1 requests in origin form, without a body or with a `Content-Length`
//! one, and any HTTP/1.x answer to them (`Content-Length`, chunked, or up to the close).
//! Answers pass byte for byte after the status line (rewritten as `HTTP/1.1`) and the
//! hop-by-hop fields; a chunked answer keeps its chunks, trailers included.
//!
//! Handed to hyper ([`super::serve_hyper`]) with the bytes read so far, always at a request
//! boundary: HTTP/2 (prior knowledge; once its whole preface has arrived under this path's
//! timeouts, since hyper's version sniffing waits for it without a limit), HTTP/1.0, a
//! request with `Transfer-Encoding`, `Expect` or `Upgrade`, `CONNECT`, targets not in origin
//! form, heads over [`MAX_HEAD`] bytes or [`MAX_FIELDS`] fields, and whatever httparse
//! refuses. hyper serves or refuses those as it always did, and keeps the connection from
//! then on.
//!
//! A field named by `Connection` is dropped like the hop-by-hop ones, unless it frames the
//! message (`Content-Length`, `Transfer-Encoding`, …): such a request goes to hyper and such
//! an answer is a 502, so no two peers cut a message differently. Chunked bodies are read
//! strictly (hex sizes, CRLF lines). [`Timeouts`]: a kept-alive client connection closes after
//! 5 minutes without a request; within an exchange, 60 s without a byte moving closes it (and
//! a client whose upstream sent no answer head gets a 504). A connection handed to hyper has
//! 60 s for each HTTP/1 request head, idle time included, and closes after 5 minutes without
//! a byte moving either way (an idle HTTP/2 connection, a stalled body).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use keytrail_common::time::now_ns;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{Capture, Exchange, Proxy, CAPTURE_BYTES};

/// The longest request or answer head read here (a longer request goes to hyper; a longer
/// answer is a 502).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a head.
pub const MAX_FIELDS: usize = 100;
/// Bytes asked of a socket at once.
const READ_SIZE: usize = 16 * 1024;
/// A chunk-size line, or one trailer field, of a chunked answer.
const MAX_LINE: usize = 8 * 1024;
/// All trailer fields of a chunked answer together.
const MAX_TRAILERS: usize = 64 * 1024;
/// How long this path waits for a peer.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A kept-alive client connection that starts no request for this long is closed.
    pub idle: Duration,
    /// Within a request or its answer, the longest wait for the client to send or take a byte.
    /// On connections handed to hyper (HTTP/1): the deadline for a whole request head,
    /// counted from the end of the previous answer, so also their idle limit.
    pub client: Duration,
    /// The longest wait for the upstream to take or send a byte (nginx's
    /// `proxy_read_timeout`); before its answer starts, the client gets a 504.
    pub upstream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(300),
            client: Duration::from_secs(60),
            upstream: Duration::from_secs(60),
        }
    }
}

/// An upstream connection.
pub enum UpConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpConn {
    /// Whether a pooled connection can carry another request: nothing arrived on it while it
    /// was idle, not even its end. (TLS records that carry no data, such as session tickets,
    /// are consumed by the TLS layer and do not count.)
    pub fn is_reusable(&mut self) -> bool {
        let mut cx = TaskContext::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for UpConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpConn::Plain(s) => s.is_write_vectored(),
            UpConn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_flush(cx),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A client connection handed to hyper: the bytes already read come first.
pub struct Rewind {
    read: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request this path serves.
struct Plan {
    method: Method,
    path: String,
    query: Option<String>,
    head_len: usize,
    body_len: u64,
    /// The client asked to close the connection after this exchange.
    close: bool,
    request_headers: HeaderMap,
}

enum Parsed {
    Partial,
    Request(Plan),
    /// Not for this path: hyper serves the connection from here on.
    Hyper,
}

/// How an answer's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Up to the upstream's close.
    Close,
}

/// An answer's head, parsed; the head for the client is in the connection's `out`.
struct Answer {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The upstream connection can carry another request after this answer.
    reusable: bool,
    response_headers: HeaderMap,
}

/// Fields that belong to one connection (RFC 9110 §7.6.1), and `Host` (the upstream's is
/// sent), dropped from a request.
fn dropped_from_request(name: &str) -> bool {
    [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

/// Fields dropped from an answer. `Transfer-Encoding` and `Trailer` stay: the body passes with
/// its framing.
fn dropped_from_answer(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

/// Fields that say where a message ends, or what the request expects of the exchange: never
/// dropped because `Connection` names them (that would cut a message differently from the
/// peer that sent it).
const FRAMING: [&str; 5] = ["content-length", "transfer-encoding", "expect", "upgrade", "host"];

/// The tokens of `Connection` fields: whether one is `close`, whether one is `upgrade`, and
/// the other field names they list (dropped too). `None` when a value is not text or names
/// one of [`FRAMING`].
fn connection_tokens<'a>(fields: &[httparse::Header<'a>]) -> Option<(bool, bool, Vec<&'a str>)> {
    let (mut close, mut upgrade, mut named) = (false, false, Vec::new());
    for f in fields.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")) {
        let v = std::str::from_utf8(f.value).ok()?;
        for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t.eq_ignore_ascii_case("close") {
                close = true;
            } else if t.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if FRAMING.iter().any(|f| f.eq_ignore_ascii_case(t)) {
                return None;
            } else if !t.eq_ignore_ascii_case("keep-alive") {
                named.push(t);
            }
        }
    }
    Some((close, upgrade, named))
}

/// A `Content-Length` value: digits only.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a request head from `buf` and writes the upstream's version of it into `out`.
fn parse_request(proxy: &Proxy, buf: &[u8], out: &mut Vec<u8>) -> Parsed {
    if buf.starts_with(b"PRI ") {
        // HTTP/2 with prior knowledge: hyper's version sniffing reads up to the whole
        // preface with no time limit, so it gets the connection only once the preface is
        // here, read under this path's timeouts; a client that stalls inside it is closed.
        return if buf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(buf) {
            Parsed::Hyper
        } else {
            Parsed::Partial
        };
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    let Some((close, upgrade, named)) = connection_tokens(req.headers) else {
        return Parsed::Hyper;
    };
    if upgrade {
        return Parsed::Hyper;
    }
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(proxy.upstream.base_path.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_field(out, "Host", proxy.upstream.authority.as_bytes());
    let mut body_len = None;
    let mut request_headers = HeaderMap::new();
    for f in req.headers.iter() {
        let name = f.name;
        if dropped_from_request(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        if ["transfer-encoding", "upgrade", "expect"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
        {
            return Parsed::Hyper;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (body_len, content_length(f.value)) {
                (None, Some(n)) => body_len = Some(n),
                _ => return Parsed::Hyper,
            }
        }
        if proxy.keep_headers.iter().any(|k| k.as_str().eq_ignore_ascii_case(name)) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(f.value),
            ) {
                request_headers.append(n, v);
            }
        }
        push_field(out, name, f.value);
    }
    out.extend_from_slice(b"\r\n");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Parsed::Request(Plan {
        method,
        path,
        query,
        head_len,
        body_len: body_len.unwrap_or(0),
        close,
        request_headers,
    })
}

/// Reads an answer head from `buf`; the client's version of it goes into `out`. `Ok(None)`:
/// not all of it yet.
fn parse_answer(
    buf: &[u8],
    head_request: bool,
    close_client: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Answer>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(format!("an answer head over {MAX_HEAD} bytes")),
        Err(e) => return Err(format!("an unreadable answer head ({e})")),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err("an answer head without a version or status".into());
    };
    if status == 101 {
        return Err("101 Switching Protocols to a request that asked for no upgrade".into());
    }
    let (close, _, named) =
        connection_tokens(resp.headers).ok_or("a Connection field that is not text or names a framing field")?;
    let informational = (100..200).contains(&status);
    let mut length = None;
    let mut chunked = None;
    let mut response_headers = HeaderMap::new();
    out.clear();
    let _ = std::io::Write::write_fmt(out, format_args!("HTTP/1.1 {status} "));
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in resp.headers.iter() {
        let name = f.name;
        if dropped_from_answer(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = content_length(f.value).ok_or("an unreadable Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("Content-Length fields that disagree".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding applied decides (RFC 9112 §6.3).
            let last = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.split(',').map(str::trim).rfind(|c| !c.is_empty()));
            chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")));
        } else if name.eq_ignore_ascii_case("content-encoding") || name.eq_ignore_ascii_case("content-type") {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(f.value),
            ) {
                response_headers.append(n, v);
            }
        }
        push_field(out, name, f.value);
    }
    let framing = if informational || head_request || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(_), Some(_)) => return Err("both Transfer-Encoding and Content-Length".into()),
            (Some(true), None) => Framing::Chunked,
            (Some(false), None) | (None, None) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    if !informational && (close_client || framing == Framing::Close) {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Answer {
        head_len,
        status,
        framing,
        reusable: version == 1 && !close && framing != Framing::Close,
        response_headers,
    }))
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

/// Finds the end of a chunked body in the bytes passing by, and hands on the data.
#[derive(Debug)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
    trailer_bytes: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
            line: Vec::new(),
            trailer_bytes: 0,
        }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes bytes of the body from the start of `input`, stopping at its end; the chunks'
    /// data goes to `data`. Returns how many bytes of `input` belong to the body.
    pub fn feed(&mut self, input: &[u8], data: &mut impl FnMut(&[u8])) -> Result<usize, String> {
        let mut at = 0;
        while at < input.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Data(left) => {
                    let n = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&input[at..at + n]);
                    at += n;
                    self.state = match left - n as u64 {
                        0 => ChunkState::DataEnd,
                        left => ChunkState::Data(left),
                    };
                }
                _ => {
                    // A line: up to and including its LF.
                    let rest = &input[at..];
                    let (take, complete) = match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (rest.len(), false),
                    };
                    if self.line.len() + take > MAX_LINE {
                        return Err(format!("a chunked body's line over {MAX_LINE} bytes"));
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    at += take;
                    if complete {
                        self.end_line()?;
                    }
                }
            }
        }
        Ok(at)
    }

    fn end_line(&mut self) -> Result<(), String> {
        let line = std::mem::take(&mut self.line);
        if !line.ends_with(b"\r\n") {
            return Err("a chunked body's line without CRLF".into());
        }
        let blank = line == b"\r\n";
        self.state = match self.state {
            ChunkState::Size if !line[0].is_ascii_hexdigit() => return Err("an unreadable chunk size".into()),
            ChunkState::Size => match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, 0))) => ChunkState::Trailers,
                Ok(httparse::Status::Complete((_, n))) => ChunkState::Data(n),
                _ => return Err("an unreadable chunk size".into()),
            },
            ChunkState::DataEnd if blank => ChunkState::Size,
            ChunkState::DataEnd => return Err("a chunk's data longer than its size".into()),
            ChunkState::Trailers if blank => ChunkState::Done,
            ChunkState::Trailers => {
                self.trailer_bytes += line.len();
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(format!("trailers over {MAX_TRAILERS} bytes"));
                }
                ChunkState::Trailers
            }
            s => s,
        };
        self.line = line;
        self.line.clear();
        Ok(())
    }
}

/// The first [`CAPTURE_BYTES`] of a body.
#[derive(Default)]
struct CaptureBuf {
    bytes: Vec<u8>,
    overflow: bool,
}

impl CaptureBuf {
    fn add(&mut self, d: &[u8]) {
        // Once a piece is skipped, nothing more is copied: the copy never has a gap.
        if !self.overflow && self.bytes.len() + d.len() <= CAPTURE_BYTES {
            self.bytes.extend_from_slice(d);
        } else {
            self.overflow = true;
        }
    }

    fn finish(self, complete: bool) -> Capture {
        Capture {
            bytes: self.bytes,
            complete: complete && !self.overflow,
        }
    }
}

/// Reads more into `buf`; `Ok(0)` at the end.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(READ_SIZE);
    r.read_buf(buf).await
}

/// `f`, or a `TimedOut` error once `limit` has passed.
async fn within<T>(limit: Duration, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing moved for {} s", limit.as_secs()),
        ))
    })
}

/// Reads more into `buf` within `limit`.
async fn read_within<R: AsyncRead + Unpin>(limit: Duration, r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    within(limit, read_more(r, buf)).await
}

/// Writes all of `bytes` within `limit` (from the start).
async fn write_within<W: AsyncWrite + Unpin>(limit: Duration, w: &mut W, bytes: &[u8]) -> io::Result<()> {
    within(limit, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
}

/// What ended an exchange.
enum Outcome {
    /// The client connection can carry another request.
    KeepAlive,
    Close,
}

/// One client connection.
struct Conn {
    proxy: Arc<Proxy>,
    client: TcpStream,
    /// Bytes from the client not yet passed on.
    from_client: Vec<u8>,
    /// Bytes from the upstream not yet passed on.
    from_upstream: Vec<u8>,
    /// What is written next.
    out: Vec<u8>,
}

/// Serves one client connection; hands it to hyper when a request is not for this path.
pub async fn serve_connection(proxy: Arc<Proxy>, client: TcpStream) {
    let mut c = Conn {
        proxy,
        client,
        from_client: Vec::new(),
        from_upstream: Vec::new(),
        out: Vec::new(),
    };
    loop {
        let plan = loop {
            if !c.from_client.is_empty() {
                match parse_request(&c.proxy, &c.from_client, &mut c.out) {
                    Parsed::Request(plan) => break plan,
                    Parsed::Hyper => {
                        let io = Rewind {
                            read: c.from_client,
                            at: 0,
                            inner: c.client,
                        };
                        return super::serve_hyper(c.proxy, io).await;
                    }
                    Parsed::Partial => {}
                }
            }
            let limit = if c.from_client.is_empty() {
                c.proxy.timeouts.idle
            } else {
                c.proxy.timeouts.client
            };
            match read_within(limit, &mut c.client, &mut c.from_client).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        match c.exchange(plan).await {
            Outcome::KeepAlive => {}
            Outcome::Close => {
                let _ = c.client.shutdown().await;
                return;
            }
        }
    }
}

impl Conn {
    /// Passes one request upstream and its answer back; `out` holds the upstream's head.
    async fn exchange(&mut self, plan: Plan) -> Outcome {
        let time = now_ns();
        self.from_client.drain(..plan.head_len);
        let mut request_body = CaptureBuf::default();
        let buffered = usize::try_from(plan.body_len)
            .unwrap_or(usize::MAX)
            .min(self.from_client.len());
        request_body.add(&self.from_client[..buffered]);
        self.out.extend_from_slice(&self.from_client[..buffered]);
        self.from_client.drain(..buffered);
        // The whole request is in `out`: it can be sent again on another connection.
        let whole = buffered as u64 == plan.body_len;
        let idempotent = matches!(
            plan.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
        );
        let mut retried = false;
        let (mut up, answer) = loop {
            let (mut up, pooled) = match self.proxy.take_pooled() {
                Some(c) => (c, true),
                None => match self.proxy.open().await {
                    Ok(c) => (c, false),
                    Err(e) => return self.bad_gateway(BAD_GATEWAY, &e).await,
                },
            };
            let may_retry = pooled && whole && !retried;
            if let Err(e) = write_within(self.proxy.timeouts.upstream, &mut up, &self.out).await {
                if may_retry {
                    retried = true;
                    continue;
                }
                let e = format!("{}: {e}", self.proxy.upstream.authority);
                return self.bad_gateway(BAD_GATEWAY, &e).await;
            }
            if !whole {
                if let Err(e) = self
                    .stream_request_body(&mut up, plan.body_len - buffered as u64, &mut request_body)
                    .await
                {
                    return match e {
                        // The client went away: nothing to answer.
                        Side::Client => Outcome::Close,
                        Side::Upstream(e) => self.bad_gateway(BAD_GATEWAY, &e).await,
                    };
                }
            }
            self.from_upstream.clear();
            match self
                .read_answer_head(&mut up, plan.method == Method::HEAD, plan.close)
                .await
            {
                Ok(a) => break (up, a),
                // The upstream closed a kept-alive connection as the request went out: it was
                // not read (RFC 9112 §9.3.1), and may go again if it is idempotent.
                Err(HeadError::Closed) if may_retry && idempotent => {
                    retried = true;
                    continue;
                }
                Err(e) => {
                    let (status, what) = match e {
                        HeadError::Closed => (BAD_GATEWAY, "closed the connection".to_string()),
                        HeadError::TimedOut => (
                            GATEWAY_TIMEOUT,
                            format!("no answer within {} s", self.proxy.timeouts.upstream.as_secs()),
                        ),
                        HeadError::Other(e) => (BAD_GATEWAY, e),
                    };
                    let e = format!("{}: {what}", self.proxy.upstream.authority);
                    return self.bad_gateway(status, &e).await;
                }
            }
        };
        // The answer: its head is in `out`, what followed it in `from_upstream`.
        let mut response_body = CaptureBuf::default();
        let mut chunked = Chunked::default();
        let mut left = match answer.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut ended = matches!(answer.framing, Framing::Empty | Framing::Length(0));
        let mut client_ok = true;
        let mut upstream_ok = true;
        loop {
            let avail = &self.from_upstream[..];
            let take = match answer.framing {
                Framing::Empty => 0,
                Framing::Length(_) => avail.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
                Framing::Close => avail.len(),
                Framing::Chunked => match chunked.feed(avail, &mut |d| response_body.add(d)) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy: an unreadable chunked answer; the connection closes");
                        upstream_ok = false;
                        0
                    }
                },
            };
            if answer.framing != Framing::Chunked {
                response_body.add(&avail[..take]);
            }
            self.out.extend_from_slice(&avail[..take]);
            self.from_upstream.drain(..take);
            if let Framing::Length(_) = answer.framing {
                left -= take as u64;
            }
            if !self.out.is_empty() && client_ok {
                client_ok = write_within(self.proxy.timeouts.client, &mut self.client, &self.out)
                    .await
                    .is_ok();
            }
            self.out.clear();
            ended = ended
                || match answer.framing {
                    Framing::Length(_) => left == 0,
                    Framing::Chunked => chunked.is_done(),
                    _ => false,
                };
            if ended || !upstream_ok || !client_ok {
                break;
            }
            match read_within(self.proxy.timeouts.upstream, &mut up, &mut self.from_upstream).await {
                Ok(0) => {
                    // The end of a body that runs to the close; a cut-off one otherwise.
                    ended = answer.framing == Framing::Close;
                    upstream_ok = false;
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    upstream_ok = false;
                    break;
                }
            }
        }
        // Bytes after the answer's end were never asked for: that connection is not reused.
        if ended && upstream_ok && client_ok && answer.reusable && self.from_upstream.is_empty() {
            self.proxy.park_pooled(up);
        }
        // A body cut off is recorded as incomplete, as one hyper dropped half-way was.
        self.proxy.stage(Exchange {
            time,
            method: plan.method,
            path: plan.path,
            query: plan.query,
            request_headers: plan.request_headers,
            request_body: request_body.finish(true),
            status: StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
            response_headers: answer.response_headers,
            response_body: response_body.finish(ended),
            decoded: Default::default(),
        });
        if ended && client_ok && !plan.close && answer.framing != Framing::Close {
            Outcome::KeepAlive
        } else {
            Outcome::Close
        }
    }

    /// Passes the rest of a request body (`left` bytes) from the client to the upstream.
    async fn stream_request_body(
        &mut self,
        up: &mut UpConn,
        mut left: u64,
        capture: &mut CaptureBuf,
    ) -> Result<(), Side> {
        while left > 0 {
            match read_within(self.proxy.timeouts.client, &mut self.client, &mut self.from_client).await {
                Ok(0) | Err(_) => return Err(Side::Client),
                Ok(_) => {}
            }
            let n = self.from_client.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            capture.add(&self.from_client[..n]);
            write_within(self.proxy.timeouts.upstream, up, &self.from_client[..n])
                .await
                .map_err(|e| Side::Upstream(format!("{}: {e}", self.proxy.upstream.authority)))?;
            // What follows belongs to the client's next request.
            self.from_client.drain(..n);
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads the answer's head (after any informational ones, which pass to the client).
    async fn read_answer_head(
        &mut self,
        up: &mut UpConn,
        head_request: bool,
        close: bool,
    ) -> Result<Answer, HeadError> {
        let mut got_any = false;
        loop {
            if !self.from_upstream.is_empty() {
                match parse_answer(&self.from_upstream, head_request, close, &mut self.out) {
                    Ok(Some(a)) if (100..200).contains(&a.status) => {
                        self.from_upstream.drain(..a.head_len);
                        if write_within(self.proxy.timeouts.client, &mut self.client, &self.out)
                            .await
                            .is_err()
                        {
                            return Err(HeadError::Other("the client went away".into()));
                        }
                        self.out.clear();
                        continue;
                    }
                    Ok(Some(a)) => {
                        self.from_upstream.drain(..a.head_len);
                        return Ok(a);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(HeadError::Other(e)),
                }
            }
            match read_within(self.proxy.timeouts.upstream, up, &mut self.from_upstream).await {
                Ok(0) if !got_any => return Err(HeadError::Closed),
                Ok(0) => return Err(HeadError::Other("the answer ended in its head".into())),
                Ok(_) => got_any = true,
                Err(e) if !got_any && e.kind() == io::ErrorKind::ConnectionReset => return Err(HeadError::Closed),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(HeadError::TimedOut),
                Err(e) => return Err(HeadError::Other(e.to_string())),
            }
        }
    }

    /// Answers `status` (502 or 504); the client's connection then closes (its request may be
    /// half-read).
    async fn bad_gateway(&mut self, status: &str, e: &str) -> Outcome {
        let text = self.proxy.unavailable(e);
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                text.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(text.as_bytes());
        let _ = write_within(self.proxy.timeouts.client, &mut self.client, &self.out).await;
        self.out.clear();
        Outcome::Close
    }
}

const BAD_GATEWAY: &str = "502 Bad Gateway";
const GATEWAY_TIMEOUT: &str = "504 Gateway Timeout";

/// Why no answer head came.
enum HeadError {
    /// The upstream closed before sending a byte.
    Closed,
    TimedOut,
    Other(String),
}

/// Which side of an exchange failed.
enum Side {
    Client,
    Upstream(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{record_channel, RecordReceiver, Upstream};
    use crate::telemetry::AgentMetrics;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    const CHUNKED: &[u8] = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: t\r\n\r\n";

    fn feed_all(c: &mut Chunked, input: &[u8], data: &mut Vec<u8>) -> Result<usize, String> {
        c.feed(input, &mut |d| data.extend_from_slice(d))
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_arrive() {
        let mut input = CHUNKED.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..=input.len() {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let a = feed_all(&mut c, &input[..split], &mut data).unwrap();
            let b = if c.is_done() {
                0
            } else {
                feed_all(&mut c, &input[a..], &mut data).unwrap()
            };
            assert!(c.is_done(), "split at {split}");
            assert_eq!(a + b, CHUNKED.len(), "split at {split}");
            assert_eq!(data, b"hello world");
        }
        // A byte at a time.
        let mut c = Chunked::default();
        let mut data = Vec::new();
        let mut used = 0;
        for b in input.chunks(1) {
            used += feed_all(&mut c, b, &mut data).unwrap();
        }
        assert_eq!(
            (used, c.is_done(), &data[..]),
            (CHUNKED.len(), true, &b"hello world"[..])
        );
    }

    #[test]
    fn broken_chunked_bodies_are_named() {
        for (input, want) in [
            (&b"zz\r\nab"[..], "chunk size"),
            (b"3\r\nabcd\r\n", "longer than its size"),
            // Sizes without digits, and lines without CR, are not guessed at.
            (b"\r\nabc", "chunk size"),
            (b";x=1\r\nabc", "chunk size"),
            (b"5\nhello\r\n", "CRLF"),
            (b"5\r\nhello\n", "CRLF"),
            (&[b'1'; MAX_LINE + 1][..], "line over"),
        ] {
            let err = feed_all(&mut Chunked::default(), input, &mut Vec::new()).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() <= MAX_TRAILERS {
            trailers.extend_from_slice(b"X-T: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let err = feed_all(&mut Chunked::default(), &trailers, &mut Vec::new()).unwrap_err();
        assert!(err.contains("trailers over"), "{err}");
    }

    fn proxy_to(url: &str) -> (Arc<Proxy>, RecordReceiver) {
        proxy_with(url, Timeouts::default())
    }

    fn proxy_with(url: &str, timeouts: Timeouts) -> (Arc<Proxy>, RecordReceiver) {
        let (tx, rx) = record_channel();
        let mut proxy = Proxy::new(
            Upstream::parse(url).unwrap(),
            None,
            vec![http::header::AUTHORIZATION],
            tx,
            Arc::new(AgentMetrics::default()),
        )
        .unwrap();
        proxy.timeouts = timeouts;
        (Arc::new(proxy), rx)
    }

    fn plan(proxy: &Proxy, head: &str) -> (Option<Plan>, String) {
        let mut out = Vec::new();
        match parse_request(proxy, head.as_bytes(), &mut out) {
            Parsed::Request(p) => (Some(p), String::from_utf8(out).unwrap()),
            Parsed::Partial => (None, "partial".into()),
            Parsed::Hyper => (None, "hyper".into()),
        }
    }

    #[test]
    fn request_heads_go_upstream_without_their_hop_by_hop_fields() {
        let (proxy, _rx) = proxy_to("http://license.example:8080/base");
        let (p, out) = plan(
            &proxy,
            "POST /v1/validate?auth=K-1 HTTP/1.1\r\nHost: agent:9\r\nAuthorization: License K-1\r\n\
             Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Case: Kept\r\n\
             Content-Length: 4\r\n\r\nbody",
        );
        let p = p.unwrap();
        assert_eq!(
            out,
            "POST /base/v1/validate?auth=K-1 HTTP/1.1\r\nHost: license.example:8080\r\n\
             Authorization: License K-1\r\nX-Case: Kept\r\nContent-Length: 4\r\n\r\n"
        );
        assert_eq!(
            (p.path.as_str(), p.query.as_deref()),
            ("/v1/validate", Some("auth=K-1"))
        );
        assert_eq!((p.body_len, p.close, p.method), (4, false, Method::POST));
        assert_eq!(p.request_headers[http::header::AUTHORIZATION], "License K-1");
        assert_eq!(p.request_headers.len(), 1);
        let (p, _) = plan(&proxy, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(p.unwrap().close);
        assert_eq!(plan(&proxy, "GET / HTTP/1.1\r\nHost: a\r\n").1, "partial");
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Field: x\r\n\r\n",
            // A framing field named by Connection is not dropped here (the message would be
            // cut differently from how its sender cut it).
            "POST / HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 40\r\n\r\n",
            "POST / HTTP/1.1\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: host\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(plan(&proxy, head).1, "hyper", "{head:?}");
        }
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(plan(&proxy, &long).1, "hyper");
    }

    fn answer(head: &str, head_request: bool, close_client: bool) -> Result<(Answer, String), String> {
        let mut out = Vec::new();
        let a = parse_answer(head.as_bytes(), head_request, close_client, &mut out)?.expect("a whole head");
        Ok((a, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn answer_heads_name_how_their_body_ends() {
        let (a, out) = answer(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        );
        assert_eq!((a.framing, a.reusable, a.status), (Framing::Length(2), true, 200));
        assert_eq!(a.response_headers[http::header::CONTENT_TYPE], "application/json");
        let (a, out) = answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
            true,
        )
        .unwrap();
        assert_eq!(a.framing, Framing::Chunked);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
        );
        let (a, out) = answer("HTTP/1.0 200 OK\r\n\r\n", false, false).unwrap();
        assert_eq!((a.framing, a.reusable), (Framing::Close, false));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let (a, _) = answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, false).unwrap();
        assert_eq!(a.framing, Framing::Close);
        let (a, _) = answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n", false, false).unwrap();
        assert_eq!(a.framing, Framing::Chunked);
        let (a, _) = answer("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false).unwrap();
        assert_eq!(a.framing, Framing::Empty);
        for status in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let (a, _) = answer(&format!("HTTP/1.1 {status}\r\nContent-Length: 9\r\n\r\n"), false, false).unwrap();
            assert_eq!(a.framing, Framing::Empty, "{status}");
        }
        let (a, _) = answer(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!((a.framing, a.reusable), (Framing::Length(1), false));
        for (head, want) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "disagree",
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "Content-Length"),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            ("HTTP/9 200 OK\r\n\r\n", "unreadable"),
            (
                "HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
                "framing",
            ),
        ] {
            let err = answer(head, false, false).err().unwrap();
            assert!(err.contains(want), "{head:?}: {err}");
        }
    }

    /// An upstream answering by path from a script, counting the connections it accepts.
    async fn scripted_upstream() -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let accepted: Arc<AtomicUsize> = Arc::default();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let (head_len, path, method, body_len, chunked) = loop {
                            let mut fields = [httparse::EMPTY_HEADER; 32];
                            let mut req = httparse::Request::new(&mut fields);
                            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                                let len = req
                                    .headers
                                    .iter()
                                    .find(|f| f.name.eq_ignore_ascii_case("content-length"))
                                    .map_or(0, |f| content_length(f.value).unwrap() as usize);
                                let chunked = req
                                    .headers
                                    .iter()
                                    .any(|f| f.name.eq_ignore_ascii_case("transfer-encoding"));
                                break (
                                    n,
                                    req.path.unwrap().to_string(),
                                    req.method.unwrap().to_string(),
                                    len,
                                    chunked,
                                );
                            }
                            if read_more(&mut s, &mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        };
                        buf.drain(..head_len);
                        let mut body = Vec::new();
                        if chunked {
                            let mut c = Chunked::default();
                            loop {
                                let n = c.feed(&buf, &mut |d| body.extend_from_slice(d)).unwrap();
                                buf.drain(..n);
                                if c.is_done() {
                                    break;
                                }
                                if read_more(&mut s, &mut buf).await.unwrap_or(0) == 0 {
                                    return;
                                }
                            }
                        } else {
                            while buf.len() < body_len {
                                if read_more(&mut s, &mut buf).await.unwrap_or(0) == 0 {
                                    return;
                                }
                            }
                            body.extend(buf.drain(..body_len));
                        }
                        let (answer, then_close): (Vec<u8>, bool) = match path.as_str() {
                            "/chunked" => {
                                let mut a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n".to_vec();
                                a.extend_from_slice(CHUNKED);
                                (a, false)
                            }
                            "/to-the-close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true),
                            "/early" => (
                                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                                false,
                            ),
                            "/bye" => (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye".to_vec(), true),
                            // Closes its end of a kept-alive connection after answering.
                            "/hang-up" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), true),
                            "/big" => {
                                let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CAPTURE_BYTES + 1).into_bytes();
                                a.resize(a.len() + CAPTURE_BYTES + 1, b'b');
                                (a, false)
                            }
                            _ => {
                                let text = format!("{method} {path} {}", body.len());
                                let mut a = format!(
                                    "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: {}\r\n\r\n",
                                    text.len()
                                )
                                .into_bytes();
                                if method != "HEAD" {
                                    a.extend_from_slice(text.as_bytes());
                                }
                                (a, false)
                            }
                        };
                        if s.write_all(&answer).await.is_err() || then_close {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    async fn proxy_in_front(url: &str) -> (std::net::SocketAddr, Arc<Proxy>, RecordReceiver) {
        proxy_in_front_with(url, Timeouts::default()).await
    }

    async fn proxy_in_front_with(url: &str, t: Timeouts) -> (std::net::SocketAddr, Arc<Proxy>, RecordReceiver) {
        let (proxy, rx) = proxy_with(url, t);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let p = Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(serve_connection(Arc::clone(&p), s));
            }
        });
        (addr, proxy, rx)
    }

    /// Sends `request` and reads `want.len()` bytes of answer, which must be `want`.
    async fn call(c: &mut TcpStream, request: &str, want: &str) {
        c.write_all(request.as_bytes()).await.unwrap();
        let mut got = vec![0; want.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
    }

    #[tokio::test]
    async fn answers_pass_as_they_came_however_their_bodies_end() {
        let (url, accepted) = scripted_upstream().await;
        let (addr, proxy, mut rx) = proxy_in_front(&url).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Chunked, trailers and all.
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n{}",
            std::str::from_utf8(CHUNKED).unwrap()
        );
        call(&mut c, "GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n", &chunked).await;
        // Two requests in one write, and a body.
        call(
            &mut c,
            "POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcHEAD /echo HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nPOST /echo 3HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
        )
        .await;
        // An informational answer first.
        call(
            &mut c,
            "GET /early HTTP/1.1\r\n\r\n",
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        // A body larger than one read, both ways; the copy of the answer stops at the cap.
        let big = "x".repeat(100_000);
        c.write_all(format!("POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n{big}", big.len()).as_bytes())
            .await
            .unwrap();
        let mut got = vec![0; "HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nPOST /echo 100000".len()];
        c.read_exact(&mut got).await.unwrap();
        assert!(got.ends_with(b"POST /echo 100000"));
        c.write_all(b"GET /big HTTP/1.1\r\n\r\n").await.unwrap();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", CAPTURE_BYTES + 1);
        let mut got = vec![0; head.len() + CAPTURE_BYTES + 1];
        c.read_exact(&mut got).await.unwrap();
        assert!(got.starts_with(head.as_bytes()) && got.ends_with(b"bbb"));
        // All of that on one upstream connection.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A body up to the close: the client's connection closes after it too.
        c.write_all(b"GET /to-the-close HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
        );

        proxy.hand_off();
        let mut seen = Vec::new();
        while seen.len() < 7 {
            seen.push(rx.recv().await.unwrap());
        }
        let bodies: Vec<(&str, &[u8], bool, usize)> = seen
            .iter()
            .map(|e| {
                (
                    e.path.as_str(),
                    &e.response_body.bytes[..e.response_body.bytes.len().min(20)],
                    e.response_body.complete,
                    e.request_body.bytes.len(),
                )
            })
            .collect();
        assert_eq!(
            bodies,
            [
                ("/chunked", &b"hello world"[..], true, 0),
                ("/echo", b"POST /echo 3", true, 3),
                ("/echo", b"", true, 0),
                ("/early", b"ok", true, 0),
                ("/echo", b"POST /echo 100000", true, 100_000),
                ("/big", b"bbbbbbbbbbbbbbbbbbbb", false, 0),
                ("/to-the-close", b"until the end", true, 0),
            ]
        );
        assert!(seen.iter().all(|e| e.request_body.complete));
        assert_eq!(seen[2].method, Method::HEAD);
    }

    #[tokio::test]
    async fn closed_upstream_connections_are_not_reused() {
        let (url, accepted) = scripted_upstream().await;
        let (addr, _proxy, _rx) = proxy_in_front(&url).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // The upstream says it closes: a new connection for the next request.
        call(
            &mut c,
            "GET /bye HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        )
        .await;
        call(
            &mut c,
            "GET /echo HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nGET /echo 0",
        )
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The upstream hangs up without saying so; a POST (never sent twice) finds out before
        // it goes, and goes on a new connection.
        call(
            &mut c,
            "GET /hang-up HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        call(
            &mut c,
            "POST /echo HTTP/1.1\r\nContent-Length: 1\r\n\r\nz",
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nPOST /echo 1",
        )
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn what_this_path_leaves_hyper_serves() {
        let (url, _accepted) = scripted_upstream().await;
        let (addr, _proxy, _rx) = proxy_in_front(&url).await;
        // A chunked request after a request served here, on the same connection.
        let mut c = TcpStream::connect(addr).await.unwrap();
        call(
            &mut c,
            "GET /echo HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nGET /echo 0",
        )
        .await;
        c.write_all(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0; 200];
        let n = c.read(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got[..n]).to_lowercase();
        assert!(
            got.starts_with("http/1.1 200 ok\r\n") && got.ends_with("post /echo 3"),
            "{got}"
        );
        // HTTP/1.0.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /echo HTTP/1.0\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got).to_lowercase();
        assert!(
            got.starts_with("http/1.0 200 ok\r\n") && got.ends_with("get /echo 0"),
            "{got}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_gets_a_502() {
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let (addr, proxy, _rx) = proxy_in_front(&url).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /echo HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8(got).unwrap();
        assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got}");
        assert!(
            got.contains("keytrail proxy: upstream unavailable: connecting to"),
            "{got}"
        );
        assert_eq!(proxy.metrics.errors.total(), 1);
    }

    #[tokio::test]
    async fn hyper_closes_on_clients_that_leave_a_head_unfinished() {
        let (url, _accepted) = scripted_upstream().await;
        let short = Duration::from_millis(200);
        let t = Timeouts {
            idle: Duration::from_secs(300),
            client: short,
            upstream: Duration::from_secs(60),
        };
        let (addr, _proxy, _rx) = proxy_in_front_with(&url, t).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // A chunked request: the connection is hyper's from here on.
        c.write_all(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0; 200];
        let n = c.read(&mut got).await.unwrap();
        assert!(String::from_utf8_lossy(&got[..n]).ends_with("POST /echo 3"));
        // hyper's deadline for the next head runs from here: half a head does not reset it.
        c.write_all(b"GET /echo HTTP/1.1\r\nHo").await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
            .await
            .expect("the proxy closes the connection")
            .ok();
        assert!(
            got.is_empty(),
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
    }

    #[tokio::test]
    async fn clients_that_stall_inside_the_http2_preface_are_closed() {
        let (url, _accepted) = scripted_upstream().await;
        let t = Timeouts {
            idle: Duration::from_secs(300),
            client: Duration::from_millis(200),
            upstream: Duration::from_secs(60),
        };
        let (addr, _proxy, _rx) = proxy_in_front_with(&url, t).await;
        // hyper's version sniffing would wait for the rest of the preface forever.
        for part in ["PRI ", "PRI * HTTP/2.0\r\n\r\nSM\r\n"] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(part.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("the proxy closes a connection stalled after {part:?}"))
                .ok();
            assert!(
                got.is_empty(),
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }

    #[tokio::test]
    async fn http2_connections_close_once_no_byte_moves_for_the_idle_limit() {
        let (url, _accepted) = scripted_upstream().await;
        let t = Timeouts {
            idle: Duration::from_millis(300),
            client: Duration::from_secs(60),
            // hyper's connections get the longer of the idle limit and this plus 1 s.
            upstream: Duration::from_millis(200),
        };
        let (addr, _proxy, _rx) = proxy_in_front_with(&url, t).await;
        // A connection that goes quiet after its preface and settings: hyper alone would keep
        // it forever.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
            .await
            .expect("the proxy closes an idle HTTP/2 connection")
            .ok();
        // hyper answered with its own settings before the connection went quiet.
        assert!(got.len() >= 9, "{got:?}");
    }

    #[tokio::test]
    async fn silent_peers_are_given_up_on() {
        // An upstream that reads requests and never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    while read_more(&mut s, &mut sink).await.unwrap_or(0) > 0 {}
                });
            }
        });
        let short = Duration::from_millis(200);
        let t = Timeouts {
            idle: short,
            client: short,
            upstream: short,
        };
        let (addr, proxy, _rx) = proxy_in_front_with(&url, t).await;
        // This path, then hyper's (HTTP/1.0 goes there).
        for (failures, version) in [(1, "HTTP/1.1"), (2, "HTTP/1.0")] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET /echo {version}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            let got = String::from_utf8(got).unwrap();
            assert!(got.starts_with(&format!("{version} 504 Gateway Timeout\r\n")), "{got}");
            assert!(got.ends_with("no answer within 0 s"), "{got}");
            assert_eq!(proxy.metrics.errors.total(), failures);
        }
        // A client that sends nothing, or half a head, is closed on.
        for sent in [&b""[..], b"GET /echo HTTP/1.1\r\nHo"] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(sent).await.unwrap();
            let mut got = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
                .await
                .expect("the proxy closes the connection")
                .unwrap();
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn staged_exchanges_are_capped_in_bytes_too() {
        let (proxy, _rx) = proxy_to("http://127.0.0.1:1");
        let big = Exchange {
            path: "/x".into(),
            response_body: Capture {
                bytes: vec![b'a'; CAPTURE_BYTES],
                complete: true,
            },
            ..Default::default()
        };
        for _ in 0..70 {
            proxy.stage(big.clone());
        }
        let staged = proxy.staged.lock().unwrap().list.len();
        assert_eq!(staged, super::super::RECORD_QUEUE_BYTES / (CAPTURE_BYTES + 2));
        assert_eq!(proxy.metrics.proxy_unrecorded.get(&["queue_full"]), 70 - staged as u64);
    }

    #[test]
    fn chunked_bodies_of_any_shape_decode_to_what_was_sent() {
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..2_000 {
            let mut sent = Vec::new();
            let mut body = Vec::new();
            for _ in 0..rng.usize(0..6) {
                let n = rng.usize(1..300);
                let data: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                let size = if rng.bool() { format!("{n:x}") } else { format!("{n:X}") };
                let ext = if rng.bool() { ";a=b" } else { "" };
                body.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
                body.extend_from_slice(&data);
                body.extend_from_slice(b"\r\n");
                sent.extend_from_slice(&data);
            }
            body.extend_from_slice(b"0\r\n");
            for _ in 0..rng.usize(0..3) {
                body.extend_from_slice(b"X-Trailer: v\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let mut input = body.clone();
            input.extend_from_slice(b"next message");
            let mut c = Chunked::default();
            let mut got = Vec::new();
            let mut used = 0;
            let mut at = 0;
            while !c.is_done() {
                let end = (at + rng.usize(1..64)).min(input.len());
                let n = feed_all(&mut c, &input[at..end], &mut got).unwrap();
                assert!(n <= end - at);
                used += n;
                at += n;
                assert!(at < input.len(), "ran past the body");
            }
            assert_eq!((used, got), (body.len(), sent));
        }
    }

    #[test]
    fn heads_of_random_bytes_are_refused_or_read_never_a_panic() {
        let (proxy, _rx) = proxy_to("http://license.example/base");
        let seeds: [&[u8]; 4] = [
            b"POST /v1/x?a=1 HTTP/1.1\r\nHost: a\r\nConnection: close, X\r\nContent-Length: 12\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.0 204 No Content\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"4;x\r\nabcd\r\n0\r\nT: 1\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(4);
        let mut out = Vec::new();
        for i in 0..20_000 {
            let mut input = seeds[i % seeds.len()].to_vec();
            for _ in 0..rng.usize(1..6) {
                let at = rng.usize(..=input.len());
                match rng.u8(..3) {
                    0 if at < input.len() => input[at] = rng.u8(..),
                    1 => {
                        let pick = b"\r\n:;, 0aZ\t";
                        input.insert(at, pick[rng.usize(..pick.len())]);
                    }
                    _ => input.truncate(at.max(1)),
                }
            }
            if let Parsed::Request(p) = parse_request(&proxy, &input, &mut out) {
                assert!(p.head_len <= input.len());
                assert!(out.starts_with(p.method.as_str().as_bytes()) && out.ends_with(b"\r\n\r\n"));
            }
            if let Ok(Some(a)) = parse_answer(&input, rng.bool(), rng.bool(), &mut out) {
                assert!(a.head_len <= input.len());
                assert!(out.starts_with(b"HTTP/1.1 ") && out.ends_with(b"\r\n\r\n"));
            }
            let mut c = Chunked::default();
            if let Ok(n) = feed_all(&mut c, &input, &mut Vec::new()) {
                assert!(n <= input.len());
            }
        }
    }
}
