//! envd, served by the daemon for each sandbox over its guest agent: the
//! Connect RPC services `process.Process` ([`process`]) and
//! `filesystem.Filesystem` ([`filesystem`]), `/files` ([`files`]) and
//! `/health`, authenticated by the sandbox's `X-Access-Token`.
//!
//! Who may call: whoever holds the sandbox's envd access token (given to
//! the creator by the control plane, compared in constant time), or a URL
//! signed with it (`/files` only). What a hostile guest can do: answer its
//! own agent's requests wrongly or slowly — every stream to the client is
//! bounded (a slow client is dropped, never the daemon's memory), messages
//! are size-checked, and nothing a guest sends is trusted beyond its own
//! sandbox.

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod process;

use std::sync::Arc;

use agentenv_api::VmState;
use agentenv_core::config::E2bConfig;
use agentenv_core::EngineError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use subtle::ConstantTimeEq;

use super::error::{Code, ConnectError, E2bError};
use super::state::SandboxRecord;
use super::E2bState;

/// What envd keeps per daemon: the processes started through
/// `process.Process/Start` and the watchers of `CreateWatcher`, by sandbox.
#[derive(Default)]
pub struct Envd {
    processes: process::Table,
    watchers: filesystem::Watchers,
}

/// Forgets everything envd holds for sandbox `sandbox_id` (it was killed
/// or paused): its processes' open streams end with `unavailable`, its
/// watchers stop.
pub fn forget(state: &E2bState, sandbox_id: &str) {
    state.envd.processes.forget(sandbox_id);
    state.envd.watchers.forget(sandbox_id);
}

/// The sandbox (and port) an envd request is for, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The sandbox id.
    pub sandbox_id: String,
    /// The port asked for (`E2b-Sandbox-Port`, or the Host's prefix).
    pub port: u16,
}

/// The sandbox a request names: the `E2b-Sandbox-Id` header (port from
/// `E2b-Sandbox-Port`, default 49983), or, with `[e2b] domain`, a `Host`
/// of `<port>-<id>.<domain>`. None: a control-plane request.
pub fn target_of(config: &E2bConfig, headers: &HeaderMap) -> Option<Target> {
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        let port = headers
            .get("e2b-sandbox-port")
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(super::ENVD_PORT);
        return Some(Target {
            sandbox_id: id.trim().to_string(),
            port,
        });
    }
    let domain = config.domain.as_deref()?;
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let label = super::below_domain(host, domain)?;
    let (port, id) = label.split_once('-')?;
    Some(Target {
        sandbox_id: id.to_string(),
        port: port.parse().ok()?,
    })
}

/// The sandbox a signed `/files` URL without `E2b-Sandbox-Id` is for (the
/// SDK's `download_url`/`upload_url` when `E2B_SANDBOX_URL` is set): the one
/// whose token the signature checks out against.
pub fn signed_target(state: &E2bState, method: &Method, uri: &axum::http::Uri) -> Option<Target> {
    if uri.path() != "/files" {
        return None;
    }
    let q = files::FilesQuery::parse(uri.query()).ok()?;
    q.signature.as_ref()?;
    let op = files::op_of(method)?;
    state
        .sandboxes
        .all()
        .into_iter()
        .find(|r| q.signature_ok(op, &r.envd_access_token, &state.config.default_user))
        .map(|r| Target {
            sandbox_id: r.sandbox_id.clone(),
            port: super::ENVD_PORT,
        })
}

/// One authenticated envd request: the sandbox and who acts in it.
pub struct Call {
    /// The handlers' shared state.
    pub state: Arc<E2bState>,
    /// The sandbox's record.
    pub record: Arc<SandboxRecord>,
    /// The guest user the request acts as.
    pub user: String,
}

impl Call {
    /// The sandbox (VM) id.
    pub fn sandbox_id(&self) -> &str {
        &self.record.sandbox_id
    }
}

/// The 502 the SDK reads as "the sandbox is not running".
pub fn sandbox_gone(id: &str) -> E2bError {
    E2bError::new(
        StatusCode::BAD_GATEWAY,
        format!("The sandbox {id} was not found"),
    )
}

/// True when `given` is the record's access token (constant time).
fn token_ok(record: &SandboxRecord, given: &[u8]) -> bool {
    let want = record.envd_access_token.as_bytes();
    !want.is_empty() && bool::from(want.ct_eq(given))
}

/// The user of an RPC: `Authorization: Basic base64("user:")`, else the
/// default user.
fn rpc_user(headers: &HeaderMap, default: &str) -> Result<String, ConnectError> {
    let Some(v) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(default.to_string());
    };
    let bad = |why: &str| ConnectError::new(Code::Unauthenticated, format!("authorization: {why}"));
    let v = v.to_str().map_err(|_| bad("not ASCII"))?;
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Err(bad("expected Basic base64(user:)"));
    };
    let raw = agentenv_api::base64::decode(b64.trim()).ok_or_else(|| bad("not base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
    let user = text.split(':').next().unwrap_or("");
    if user.is_empty() {
        return Ok(default.to_string());
    }
    check_user(user).map_err(|m| bad(&m))?;
    Ok(user.to_string())
}

/// A guest user name: what `useradd` takes.
pub fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("user {user:?} is not a valid user name"))
    }
}

/// The envd routes.
pub fn router(state: Arc<E2bState>) -> Router {
    Router::new().fallback(move |req: Request| {
        let state = state.clone();
        async move { handle(state, req).await }
    })
}

async fn handle(state: Arc<E2bState>, req: Request) -> Response {
    let Some(target) = req.extensions().get::<Target>().cloned() else {
        return E2bError::new(StatusCode::NOT_FOUND, "no sandbox named").into_response();
    };
    if target.port != super::ENVD_PORT {
        return E2bError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "The sandbox {} is running but port is not open: {} (only envd's port {} is served)",
                target.sandbox_id,
                target.port,
                super::ENVD_PORT
            ),
        )
        .into_response();
    }
    let Some(record) = state.sandboxes.get(&target.sandbox_id) else {
        return sandbox_gone(&target.sandbox_id).into_response();
    };
    // A paused (or stopped) sandbox is not running: the SDK reads the 502
    // as such and `connect` resumes it.
    let running = state.engine.get(&target.sandbox_id).is_ok_and(|vm| {
        matches!(
            vm.state,
            VmState::Running | VmState::Creating | VmState::Snapshotting
        )
    });
    if !running {
        return sandbox_gone(&target.sandbox_id).into_response();
    }
    let path = req.uri().path().to_string();
    let is_rpc =
        path.starts_with("/process.Process/") || path.starts_with("/filesystem.Filesystem/");
    let header_token = req
        .headers()
        .get("x-access-token")
        .map(|v| v.as_bytes().to_vec());
    let token_valid = header_token
        .as_deref()
        .is_some_and(|t| token_ok(&record, t));
    if is_rpc {
        if !token_valid {
            return ConnectError::new(
                Code::Unauthenticated,
                "x-access-token: missing or not this sandbox's envd access token",
            )
            .into_response();
        }
        if req.method() != Method::POST {
            return ConnectError::new(
                Code::Unimplemented,
                format!("{} {path}: Connect calls are POSTs", req.method()),
            )
            .into_response();
        }
        let user = match rpc_user(req.headers(), &state.config.default_user) {
            Ok(u) => u,
            Err(e) => return e.into_response(),
        };
        let call = Call {
            state,
            record,
            user,
        };
        let (parts, body) = req.into_parts();
        return rpc(call, &path, parts.headers, body).await;
    }
    match path.as_str() {
        "/health" => {
            if !token_valid {
                return unauthorized();
            }
            StatusCode::NO_CONTENT.into_response()
        }
        "/files" => files::handle(state, record, token_valid, req).await,
        _ => {
            ConnectError::new(Code::Unimplemented, format!("{path} is not served")).into_response()
        }
    }
}

fn unauthorized() -> Response {
    E2bError::new(
        StatusCode::UNAUTHORIZED,
        "x-access-token: missing or not this sandbox's envd access token",
    )
    .into_response()
}

async fn rpc(call: Call, path: &str, headers: HeaderMap, body: Body) -> Response {
    if let Some(method) = path.strip_prefix("/process.Process/") {
        return process::serve(call, method, headers, body).await;
    }
    if let Some(method) = path.strip_prefix("/filesystem.Filesystem/") {
        return filesystem::serve(call, method, headers, body).await;
    }
    ConnectError::new(Code::Unimplemented, format!("{path} is not served")).into_response()
}

/// Runs a unary method: checks the content type, reads the message, runs
/// `f` within the call's `Connect-Timeout-Ms`, answers its message.
pub async fn unary<F, Fut>(headers: &HeaderMap, body: Body, f: F) -> Response
where
    F: FnOnce(serde_json::Value) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, ConnectError>>,
{
    if let Err(e) = connect::check_content_type(headers, connect::Shape::Unary) {
        return connect::unsupported_media(e);
    }
    let run = async {
        let deadline = connect::timeout_of(headers)?;
        let msg = connect::read_unary(body).await?;
        match deadline {
            None => f(msg).await,
            Some(d) => tokio::time::timeout(d, f(msg)).await.unwrap_or_else(|_| {
                Err(ConnectError::new(
                    Code::DeadlineExceeded,
                    format!("the call took longer than its {} ms", d.as_millis()),
                ))
            }),
        }
    };
    match run.await {
        Ok(v) => connect::unary_ok(v),
        Err(e) => e.into_response(),
    }
}

/// The Connect error for an engine error: the agent's not-found, bad
/// request, permission and timeout map to theirs; a VM that is not running
/// (or whose agent is gone) is `unavailable`.
pub fn engine_error(e: EngineError) -> ConnectError {
    let msg = e.to_string();
    let code = match e {
        EngineError::BadRequest { .. } => Code::InvalidArgument,
        // envd: a missing cwd is a bad argument, an unknown user is not
        // authenticated.
        EngineError::NotFound { field, .. } if field == "cwd" => Code::InvalidArgument,
        EngineError::NotFound { field, .. } if field == "user" => Code::Unauthenticated,
        EngineError::NotFound { .. } => Code::NotFound,
        // The agent's `already_exists`.
        EngineError::Conflict { state: None, .. } => Code::AlreadyExists,
        EngineError::Forbidden { .. } => Code::PermissionDenied,
        EngineError::Timeout(_) => Code::DeadlineExceeded,
        EngineError::Exhausted(_) => Code::ResourceExhausted,
        EngineError::Conflict { .. } | EngineError::AgentUnavailable(_) => Code::Unavailable,
        _ => Code::Internal,
    };
    ConnectError::new(code, msg)
}

/// A stream's idle keepalive and deadline timers.
pub struct Timers {
    /// Send a keepalive after this much silence.
    pub keepalive: Option<std::time::Duration>,
    /// End the stream with `deadline_exceeded` then.
    pub deadline: Option<tokio::time::Instant>,
}

impl Timers {
    /// Sleeps until the keepalive is due (forever without one).
    pub async fn keepalive(&self) {
        match self.keepalive {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    }

    /// Sleeps until the deadline (forever without one).
    pub async fn deadline(&self) {
        match self.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }
}

/// What a stream's source gives next.
pub enum Step {
    /// Messages to send.
    Msgs(Vec<serde_json::Value>),
    /// The last message (if any), then the end of the stream (with an
    /// error or successfully).
    End(Option<serde_json::Value>, Option<ConnectError>),
}

/// Feeds a streaming response from `source` (`step` pulls its next
/// [`Step`]; it must be cancel-safe), sending `keepalive` when idle and
/// ending with `deadline_exceeded` at the deadline. Returns when the stream
/// ends or the client goes; `source` is dropped then.
pub async fn run_stream<S>(
    tx: connect::StreamSender,
    timers: Timers,
    keepalive: serde_json::Value,
    mut source: S,
    step: for<'a> fn(&'a mut S) -> futures_util::future::BoxFuture<'a, Step>,
) {
    loop {
        tokio::select! {
            next = step(&mut source) => match next {
                Step::Msgs(msgs) => {
                    for m in &msgs {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Step::End(last, err) => {
                    if let Some(m) = last {
                        if tx.send(&m).await.is_err() {
                            return;
                        }
                    }
                    tx.finish(err).await;
                    return;
                }
            },
            () = timers.keepalive() => {
                if tx.send(&keepalive).await.is_err() {
                    return;
                }
            }
            () = timers.deadline() => {
                tx.finish(Some(deadline_error())).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}

/// The `deadline_exceeded` that ends a stream at its `Connect-Timeout-Ms`.
pub fn deadline_error() -> ConnectError {
    ConnectError::new(
        Code::DeadlineExceeded,
        "the call's connect-timeout-ms passed",
    )
}
