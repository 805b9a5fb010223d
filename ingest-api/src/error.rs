//! The one HTTP error boundary: every failure of a request becomes a status and a JSON body
//! with a stable code, and never leaks internals.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A request-level failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or a key that matches none configured; why, without the key.
    #[error("missing or invalid API key: {0}")]
    Unauthorized(String),
    /// The key may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The body (wire or decompressed) or the event count is over a limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Unsupported content type or encoding.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body cannot be read as events at all (not JSON, not UTF-8, corrupt compression).
    #[error("{0}")]
    BadBody(String),
    /// The key's rate limit is exhausted.
    #[error("rate limit exceeded; retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// How long until the request would pass.
        retry_after: Duration,
    },
    /// The memory budget of the requests in flight is full; nothing of the request was
    /// accepted.
    #[error("the server is holding as many requests as its memory budget allows; nothing was accepted, retry after {} s", retry_after_secs(*.retry_after))]
    Overloaded {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The broker did not acknowledge after the retries; nothing of the request was accepted.
    #[error("the events could not be published; nothing was accepted, retry later")]
    PublishFailed {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. } | Self::PublishFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine code in the body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BadBody(_) => "invalid_body",
            Self::RateLimited { .. } => "rate_limited",
            Self::Overloaded { .. } => "overloaded",
            Self::PublishFailed { .. } => "publish_failed",
        }
    }
}

fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "accepted": 0,
            "rejected": [],
            "error": {"code": self.code(), "message": self.to_string()},
        });
        let mut resp = (self.status(), Json(body)).into_response();
        match self {
            Self::RateLimited { retry_after }
            | Self::Overloaded { retry_after }
            | Self::PublishFailed { retry_after } => {
                let secs = retry_after_secs(retry_after).max(1);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::Unauthorized(_) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}
