//! The two error shapes of the E2B API. The SDK crashes on any other body.
//!
//! - Control plane: HTTP status + JSON `{"code": <status>, "message": "…"}`
//!   (optional machine `error_code`).
//! - envd (Connect RPC): a Connect code (`not_found`, `invalid_argument`, …)
//!   as `{"code": "not_found", "message": "…"}` with the code's HTTP status on
//!   unary calls, or in the end-stream envelope of a streaming call. The
//!   `/files` and `/health` endpoints use the control plane's shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A control-plane (or envd HTTP) error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2bError {
    /// The HTTP status, also the body's `code`.
    pub status: StatusCode,
    /// What went wrong, naming the field or id.
    pub message: String,
    /// A machine-readable code the SDK looks for (e.g.
    /// `sandbox_snapshot_guest_agent_unresponsive`).
    pub error_code: Option<&'static str>,
}

impl E2bError {
    /// An error of `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
            error_code: None,
        }
    }

    /// 400 naming `field`.
    pub fn bad_field(field: &str, message: impl std::fmt::Display) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, format!("{field}: {message}"))
    }

    /// 404 for sandbox `id`.
    pub fn sandbox_not_found(id: &str) -> E2bError {
        E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
    }
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    code: u16,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'static str>,
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorJson {
            code: self.status.as_u16(),
            message: &self.message,
            error_code: self.error_code,
        })
        .expect("error bodies serialise");
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// A Connect RPC error code (connectrpc.com/docs/protocol#error-codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `canceled` (499).
    Canceled,
    /// `unknown` (500).
    Unknown,
    /// `invalid_argument` (400).
    InvalidArgument,
    /// `deadline_exceeded` (504).
    DeadlineExceeded,
    /// `not_found` (404).
    NotFound,
    /// `already_exists` (409).
    AlreadyExists,
    /// `permission_denied` (403).
    PermissionDenied,
    /// `resource_exhausted` (429).
    ResourceExhausted,
    /// `failed_precondition` (400).
    FailedPrecondition,
    /// `aborted` (409).
    Aborted,
    /// `out_of_range` (400).
    OutOfRange,
    /// `unimplemented` (501).
    Unimplemented,
    /// `internal` (500).
    Internal,
    /// `unavailable` (503).
    Unavailable,
    /// `data_loss` (500).
    DataLoss,
    /// `unauthenticated` (401).
    Unauthenticated,
}

impl Code {
    /// The code's wire name.
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).expect("499 is a status"),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A Connect RPC error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    /// Its code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl ConnectError {
    /// An error of `code`.
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The JSON object of the error (`{"code","message"}`), as a unary body
    /// or inside an end-stream envelope's `error`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.name(), "message": self.message })
    }
}

impl IntoResponse for ConnectError {
    /// The unary form: the code's status, `application/json`.
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_json()).expect("error bodies serialise");
        let mut resp = (self.code.status(), body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}
