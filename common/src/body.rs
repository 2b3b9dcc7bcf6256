//! Reading request bodies under a cap, without turning a refusal into a connection reset.
//!
//! A server that answers 413 and closes while the client is still sending makes the client's
//! kernel see a reset, and the client may never read the 413: an agent would then take a
//! permanent refusal for a network error and retry forever. So an over-cap body is read and
//! discarded up to `drain_limit` bytes (within the same timeout) before the answer goes out.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("the body is over the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("reading the body failed: {0}")]
    Read(String),
}

/// Reads at most `cap` bytes within `timeout`. Over the cap, keeps reading and discarding up
/// to `drain_limit` bytes in total so the client gets to read the refusal.
pub async fn read_capped(body: Incoming, cap: u64, drain_limit: u64, timeout: Duration) -> Result<Bytes, BodyError> {
    let mut body = body;
    // The declared length (capped) up front: no regrowing, and no doubled capacity held.
    let declared = hyper::body::Body::size_hint(&body).exact().unwrap_or(0).min(cap);
    let mut buf = BytesMut::with_capacity(declared as usize);
    let mut seen: u64 = 0;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else { continue };
            seen += data.len() as u64;
            if seen <= cap {
                buf.extend_from_slice(&data);
            } else if seen > drain_limit {
                break;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) if seen > cap => Err(BodyError::TooLarge(cap)),
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) if seen > cap => Err(BodyError::TooLarge(cap)),
        Ok(Ok(())) => Ok(buf.freeze()),
    }
}
