//! The one table from errors that cross HTTP to a status code, a machine-readable code, and
//! whether the agent should retry (contract §6: 400/413 permanent, 401/403 configuration,
//! 429/5xx retryable). The agent's classifier keys off the same status codes.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use keytrail_common::wire::WireError;

use crate::store::StoreError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn retryable(&self) -> bool {
        self.status == StatusCode::TOO_MANY_REQUESTS || self.status.is_server_error()
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({"error": {
            "code": self.code, "message": self.message, "retryable": self.retryable(),
        }});
        let mut r = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid response");
        if self.retryable() {
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let (status, code) = match &e {
            WireError::FrameTooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, "frame_too_large"),
            WireError::UncompressedTooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"),
            WireError::TooManyEvents(..) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events"),
            WireError::UnsupportedVersion(_) => (StatusCode::BAD_REQUEST, "unsupported_version"),
            WireError::Checksum => (StatusCode::BAD_REQUEST, "checksum_mismatch"),
            WireError::BadEvent { .. } => (StatusCode::BAD_REQUEST, "invalid_event"),
            _ => (StatusCode::BAD_REQUEST, "invalid_frame"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_contract_classes() {
        assert_eq!(ApiError::from(WireError::Checksum).status, StatusCode::BAD_REQUEST);
        assert_eq!(
            ApiError::from(WireError::UncompressedTooLarge(2, 1)).status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let e = ApiError::from(StoreError::Closed);
        assert!(e.retryable());
        assert!(!ApiError::from(WireError::BadMagic).retryable());
    }
}
