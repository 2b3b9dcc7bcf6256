//! Receiving batches from agents (contract §6): TLS always, mTLS when `client_ca` is set.
//!
//! Owns: the TLS listener, the agent's identity (the certificate's CN under mTLS; the frame's
//! agent id otherwise), body caps before and after decompression, and mapping every failure
//! to a classified answer through `errors`. Does not own: dedup or storage — a decoded batch
//! goes to the store writer, and the answer waits for it to be durable.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keytrail_common::body::{read_capped, BodyError};
use keytrail_common::time::now_ns;
use keytrail_common::tls::Reloading;
use keytrail_common::wire::{self, DecodeLimits};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::errors::ApiError;
use crate::store::{IncomingBatch, StoreWriter};
use crate::telemetry::CollectorMetrics;

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole body must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Shared state of the receive side.
pub struct Receiver {
    pub writer: StoreWriter,
    pub limits: DecodeLimits,
    /// Whether agents authenticate with a certificate (their id is its CN).
    pub mtls: bool,
    /// Batches wait while the data directory's disk is nearly full ([`crate::store::Store::room_for`]).
    pub store: Arc<crate::store::Store>,
    pub metrics: Arc<CollectorMetrics>,
}

impl Receiver {
    /// Frame cap derived from the uncompressed cap: zstd never expands by more than a small
    /// fraction, and the header adds at most 64 KiB.
    pub fn frame_cap(max_batch_bytes: u64) -> usize {
        (max_batch_bytes + max_batch_bytes / 64 + (64 << 10)) as usize
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<Reloading<rustls::ServerConfig>>,
    receiver: Arc<Receiver>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    keytrail_common::serve::accept_loop(listener, shutdown, move |tcp, peer| {
        // Each connection takes the TLS material current at accept: rotation needs no restart.
        let acceptor = TlsAcceptor::from(tls.current());
        let receiver = Arc::clone(&receiver);
        async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    receiver.metrics.errors.add(&["receive", "tls_handshake"], 1);
                    tracing::warn!(%peer, error = %e, "TLS handshake with an agent failed");
                    return;
                }
                Err(_) => {
                    receiver.metrics.errors.add(&["receive", "tls_handshake_timeout"], 1);
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(keytrail_common::tls::common_name);
            let identity = Arc::new(identity);
            let service = service_fn(move |req| {
                let receiver = Arc::clone(&receiver);
                let identity = Arc::clone(&identity);
                async move {
                    let arrived = now_ns();
                    let mut resp = match route(&receiver, identity.as_deref(), req).await {
                        Ok(r) => r,
                        Err(e) => {
                            receiver.metrics.errors.add(&["receive", e.code], 1);
                            if e.status.is_client_error() {
                                tracing::warn!(%peer, agent = ?identity, status = e.status.as_u16(), error = %e.message, "batch refused");
                            }
                            e.into_response()
                        }
                    };
                    // The collector's clock, for the agent to measure its own against.
                    if let Ok(v) = http::HeaderValue::from_str(&(arrived / 1_000_000).to_string()) {
                        resp.headers_mut().insert(wire::RECEIVED_AT_HEADER, v);
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = keytrail_common::serve::http1().serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "agent connection ended with an error");
            }
        }
    })
    .await
}

/// The agent's clock header, when present and readable.
fn sent_at(req: &Request<Incoming>) -> Option<&str> {
    req.headers().get(wire::SENT_AT_HEADER).and_then(|v| v.to_str().ok())
}

fn ok_json(value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

async fn route(
    r: &Receiver,
    identity: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/ping") => {
            if let Some(id) = identity {
                r.metrics.clocks.observe(id, sent_at(&req), now_ns());
            }
            Ok(ok_json(serde_json::json!({"ok": true, "agent_id": identity})))
        }
        (&Method::POST, "/v1/batches") => receive(r, identity, req).await,
        (_, "/v1/ping" | "/v1/batches") => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route on the receive port",
        )),
    }
}

async fn receive(
    r: &Receiver,
    identity: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if r.mtls && identity.is_none() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_client_certificate",
            "a client certificate is required",
        ));
    }
    let arrived = now_ns();
    let sent_at = sent_at(&req).map(str::to_owned);
    let cap = r.limits.max_frame_bytes as u64;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "frame_too_large",
            format!("body over {cap} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A body far beyond the cap is refused without reading it; one moderately over is read
    // and discarded so the agent sees the 413 (permanent) rather than a reset (retryable).
    let drain_limit = cap.saturating_mul(4);
    if declared.is_some_and(|n| n > drain_limit) {
        return Err(too_large());
    }
    let body = match read_capped(req.into_body(), cap, drain_limit, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(_)) => return Err(too_large()),
        Err(BodyError::Timeout(_)) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive in time",
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_read_failed",
                e.to_string(),
            ))
        }
    };
    // Cheap checks first: who is this, before spending CPU on decompression.
    let header = wire::read_header(&body, &r.limits)?;
    // Room to store it (the events log and sled, with margin for the decompressed size):
    // otherwise the agent keeps the batch and retries.
    let room = (header.uncompressed_len as u64).saturating_mul(2);
    if let Some((free, reserve)) = r.store.room_for(room) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "disk_low",
            format!("the collector's disk is nearly full: {free} bytes free, {reserve} kept in reserve; retry later"),
        ));
    }
    if let Some(id) = identity {
        if id != header.agent_id {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "agent_id_mismatch",
                format!(
                    "the batch claims agent id {:?} but the client certificate is for {id:?}",
                    header.agent_id
                ),
            ));
        }
    }
    let limits = r.limits;
    let decoded = tokio::task::spawn_blocking(move || {
        let crc = u32::from_be_bytes(body[body.len() - 4..].try_into().expect("frame has a trailer"));
        wire::decode_frame(&body, &limits).map(|b| (b, crc))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("decode task: {e}"),
        )
    })?;
    let (batch, frame_crc) = match decoded {
        Ok(x) => x,
        Err(e) => {
            r.metrics.batches.add(&["rejected"], 1);
            return Err(e.into());
        }
    };
    r.metrics
        .clocks
        .observe(&batch.header.agent_id, sent_at.as_deref(), arrived);
    let incoming = IncomingBatch {
        agent_id: batch.header.agent_id,
        seq: batch.header.seq,
        frame_crc,
        events: batch.events,
    };
    let outcome = r.writer.ingest(incoming).await?;
    r.metrics
        .batches
        .add(&[if outcome.duplicate_batch { "duplicate" } else { "stored" }], 1);
    Ok(ok_json(serde_json::to_value(outcome).expect("serializable")))
}
