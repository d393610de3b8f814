//! The one mapping from engine errors to HTTP statuses and JSON error bodies.

use agentenv_api::ErrorBody;
use agentenv_core::backend::VmmError;
use agentenv_core::snapshot::SnapshotError;
use agentenv_core::EngineError;
use axum::http::StatusCode;
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
        EngineError::Vmm { .. } => StatusCode::BAD_GATEWAY,
        EngineError::Snapshot { source, .. } => match source {
            SnapshotError::NotFound(_) => StatusCode::NOT_FOUND,
            SnapshotError::Exists(_) | SnapshotError::Busy { .. } => StatusCode::CONFLICT,
            SnapshotError::Corrupt { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            SnapshotError::TierUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            SnapshotError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            SnapshotError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        },
        EngineError::AgentUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), "{}", self.body.error);
        }
        (self.status, Json(self.body)).into_response()
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
            (EngineError::AgentUnavailable("x".into()), 503),
            (EngineError::Timeout("x".into()), 504),
            (EngineError::Guest("x".into()), 502),
            (EngineError::Injected("x"), 500),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(&e).as_u16(), code, "{e}");
        }
    }
}
