//! The one mapping from engine errors to HTTP statuses and JSON error bodies.

use agentenv_api::ErrorBody;
use agentenv_core::backend::VmmError;
use agentenv_core::snapshot::SnapshotError;
use agentenv_core::EngineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with a message and no field.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: message.into(),
                field: None,
                state: None,
            },
        }
    }

    /// A 400 naming the field.
    pub fn bad_field(field: Option<String>, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, message);
        e.body.field = field;
        e
    }
}

/// A request refused by the daemon's own limits, before or while it reaches
/// the engine (see `limits.rs` and `json.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// Too many mutating requests are being served.
    TooManyOps {
        /// `max_inflight_ops`.
        limit: u32,
    },
    /// A JSON body did not arrive whole within `body_timeout_ms`.
    BodyTimeout {
        /// `body_timeout_ms`.
        timeout_ms: u64,
    },
    /// A streamed body (a file upload) sent nothing for `body_timeout_ms`.
    BodyIdle {
        /// `body_timeout_ms`.
        timeout_ms: u64,
    },
    /// A JSON body is larger than allowed.
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitError::TooManyOps { limit } => write!(
                f,
                "too many operations in flight: the limit is {limit} (max_inflight_ops); retry later"
            ),
            LimitError::BodyTimeout { timeout_ms } => write!(
                f,
                "the request body did not arrive within {timeout_ms} ms (body_timeout_ms)"
            ),
            LimitError::BodyIdle { timeout_ms } => write!(
                f,
                "the request body stalled: no bytes for {timeout_ms} ms (body_timeout_ms)"
            ),
            LimitError::BodyTooLarge { limit } => {
                write!(f, "request body is larger than {limit} bytes")
            }
        }
    }
}

/// The HTTP status of each limit. Decided here and nowhere else.
pub fn limit_status(e: &LimitError) -> StatusCode {
    match e {
        LimitError::TooManyOps { .. } => StatusCode::TOO_MANY_REQUESTS,
        LimitError::BodyTimeout { .. } | LimitError::BodyIdle { .. } => StatusCode::REQUEST_TIMEOUT,
        LimitError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        ApiError::new(limit_status(&e), e.to_string())
    }
}

impl From<super::auth::AuthError> for ApiError {
    /// Every authentication failure is a 401 (`auth.rs` adds
    /// `WWW-Authenticate`).
    fn from(e: super::auth::AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())
    }
}

/// The HTTP status of each engine error. Decided here and nowhere else.
pub fn status_of(e: &EngineError) -> StatusCode {
    match e {
        EngineError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        EngineError::Forbidden { .. } => StatusCode::FORBIDDEN,
        EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
        EngineError::Conflict { .. } => StatusCode::CONFLICT,
        EngineError::InsufficientMemory { .. }
        | EngineError::NoSpace(_)
        | EngineError::Exhausted(_) => StatusCode::INSUFFICIENT_STORAGE,
        EngineError::Vmm {
            source: VmmError::Timeout { .. },
            ..
        } => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Vmm {
            source: VmmError::Jail(_),
            ..
        } => StatusCode::SERVICE_UNAVAILABLE,
        EngineError::Vmm { .. } => StatusCode::BAD_GATEWAY,
        EngineError::Snapshot { source, .. } => match source {
            SnapshotError::NotFound(_) => StatusCode::NOT_FOUND,
            SnapshotError::Exists(_) | SnapshotError::Busy { .. } => StatusCode::CONFLICT,
            SnapshotError::Corrupt { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            SnapshotError::TierUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            SnapshotError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            SnapshotError::Io { .. } | SnapshotError::Injected(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        },
        EngineError::AgentUnavailable(_) | EngineError::Cgroup(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        EngineError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Guest(_) => StatusCode::BAD_GATEWAY,
        EngineError::Host(_) | EngineError::Network(_) | EngineError::Injected(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError {
            status: status_of(&e),
            body: ErrorBody {
                error: e.to_string(),
                field: e.field().map(str::to_string),
                state: e.state(),
            },
        }
    }
}

/// Rewrites the plain-text 4xx answers axum's own extractors give (a path
/// segment that is not UTF-8, a malformed query) into the API's JSON error
/// body, naming the parameter when the message does (in backquotes).
pub async fn json_rejections(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !resp.status().is_client_error() || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_lowercase()
    } else {
        text
    };
    let mut e = ApiError::new(parts.status, message);
    e.body.field = e.body.error.split('`').nth(1).map(str::to_string);
    let mut resp = e.into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), "{}", self.body.error);
        }
        let mut resp = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body was never read: the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (EngineError::bad("slots", "x"), 400),
            (EngineError::not_found("vm_id", "x"), 404),
            (
                EngineError::Conflict {
                    message: "x".into(),
                    state: None,
                },
                409,
            ),
            (
                EngineError::InsufficientMemory {
                    message: "x".into(),
                },
                507,
            ),
            (
                EngineError::Vmm {
                    vm_id: "a".into(),
                    source: VmmError::Timeout {
                        request: "x".into(),
                        timeout_ms: 1,
                    },
                },
                504,
            ),
            (
                EngineError::Vmm {
                    vm_id: "a".into(),
                    source: VmmError::NotRunning,
                },
                502,
            ),
            (
                EngineError::Vmm {
                    vm_id: "a".into(),
                    source: VmmError::Jail("x".into()),
                },
                503,
            ),
            (EngineError::AgentUnavailable("x".into()), 503),
            (EngineError::Cgroup("x".into()), 503),
            (EngineError::Timeout("x".into()), 504),
            (EngineError::Guest("x".into()), 502),
            (EngineError::Injected("x"), 500),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(&e).as_u16(), code, "{e}");
        }
    }

    #[test]
    fn limits() {
        let cases = [
            (
                LimitError::TooManyOps { limit: 3 },
                429,
                "3 (max_inflight_ops)",
            ),
            (LimitError::BodyTimeout { timeout_ms: 7 }, 408, "7 ms"),
            (
                LimitError::BodyIdle { timeout_ms: 7 },
                408,
                "no bytes for 7 ms",
            ),
            (LimitError::BodyTooLarge { limit: 9 }, 413, "9 bytes"),
        ];
        for (e, code, words) in cases {
            let resp = ApiError::from(e.clone()).into_response();
            assert_eq!(resp.status().as_u16(), code, "{e}");
            assert!(e.to_string().contains(words), "{e}");
            let retry = resp.headers().get(header::RETRY_AFTER);
            assert_eq!(retry.is_some(), code == 429, "{e}");
        }
    }
}
