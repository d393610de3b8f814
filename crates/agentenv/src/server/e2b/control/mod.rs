//! The E2B control plane: `/sandboxes`, `/v2/sandboxes`, `/snapshots`,
//! `/templates`, authenticated by `X-API-KEY` (docs/e2b.md).
//!
//! Who may call it: a holder of a token of the tokens file, sent as
//! `X-API-KEY` (or a transport principal: a Unix socket peer, an mTLS
//! client), else 401. A `user`-scope token sees and touches only the
//! sandboxes and snapshots it created: anything else answers exactly as an
//! absent id does (404, the same bytes). An admin sees everything.
//! Every error is `{"code": <status>, "message": "…"}` ([`E2bError`]):
//! axum's own plain-text rejections are rewritten into that shape here.
//!
//! Layers, outermost first: the rewrite of non-E2B error bodies, the
//! authentication (and the audit line of each mutating request, target
//! `agentenv::audit`), the daemon's in-flight limit shared with the native
//! API, then the routes. The `Host` check ([`host`]) runs before the
//! request is routed to either plane (`e2b::dispatch`).

mod deadlines;
pub mod host;
mod metrics;
mod query;
mod sandboxes;
mod snapshots;

use std::sync::Arc;

use agentenv_core::config::AuthMode;
use agentenv_core::principal::Principal;
use agentenv_core::EngineError;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use super::error::E2bError;
use super::state::SandboxRecord;
use super::E2bState;
use crate::server::auth::{AuditLine, AuditTarget};
use crate::server::error::ApiError;

/// The control plane's routes, with their layers (see the module doc).
pub fn router(state: Arc<E2bState>) -> Router {
    Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route(
            "/v2/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/sandboxes/{id}",
            get(sandboxes::info).delete(sandboxes::kill),
        )
        .route("/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/sandboxes/{id}/connect", post(sandboxes::connect))
        .route("/v2/sandboxes/{id}/connect", post(sandboxes::connect))
        .route("/sandboxes/{id}/fork", post(sandboxes::fork))
        .route("/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/sandboxes/{id}/metrics", get(metrics::get))
        .route("/snapshots", get(snapshots::list))
        .route("/templates/{id}", delete(snapshots::delete))
        .fallback(|uri: axum::http::Uri| async move {
            E2bError::new(
                StatusCode::NOT_FOUND,
                format!("no route for {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            E2bError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.limits.clone(),
            crate::server::limits::limit,
        ))
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
        .layer(axum::middleware::map_response(e2b_shaped))
}

/// Arms the deadlines of the sandboxes loaded at startup and starts the
/// daemon's one timer task.
pub fn start(state: &Arc<E2bState>) {
    deadlines::start(state);
}

/// Stops the deadline timer (the sandboxes stay, their deadlines in their
/// records: the next start re-arms them).
pub async fn stop(state: &Arc<E2bState>) {
    deadlines::stop(state).await;
}

/// The caller as the authentication layer found it.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Principal);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = E2bError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| unauthorized(MISSING_KEY))
    }
}

const MISSING_KEY: &str = "authentication required: send X-API-KEY (agentenv token create)";

fn unauthorized(message: &str) -> E2bError {
    E2bError::new(StatusCode::UNAUTHORIZED, message)
}

/// Who a request's `X-API-KEY` stands for (any case of the header name;
/// `Authorization` is not looked at).
fn key_principal(state: &E2bState, headers: &HeaderMap) -> Result<Principal, E2bError> {
    if state.auth.mode() == AuthMode::None {
        return Ok(Principal::admin("anonymous"));
    }
    let key = headers
        .get("x-api-key")
        .ok_or_else(|| unauthorized(MISSING_KEY))?;
    let key = key
        .to_str()
        .map_err(|_| unauthorized("malformed X-API-KEY header: not text"))?
        .trim();
    if key.is_empty() {
        return Err(unauthorized(MISSING_KEY));
    }
    state
        .auth
        .principal_of(key)
        .ok_or_else(|| unauthorized("unknown or revoked API key (X-API-KEY)"))
}

/// The authentication layer, with the audit line of mutating requests
/// (same fields as the native API's).
async fn authenticate(
    State(state): State<Arc<E2bState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let audit = AuditLine::begin(&req);
    let who = match req.extensions().get::<Principal>().cloned() {
        Some(p) => Ok(p),
        None => key_principal(&state, req.headers()),
    };
    let (name, resp) = match who {
        Err(e) => ("-".to_string(), e.into_response()),
        Ok(p) => {
            let name = p.name.clone();
            req.extensions_mut().insert(p);
            (name, next.run(req).await)
        }
    };
    if let Some(audit) = audit {
        audit.write(&name, &resp, audit_target);
    }
    resp
}

/// The sandbox or snapshot an E2B path names, for the audit log.
fn audit_target(path: &str) -> String {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["sandboxes", id, ..] | ["v2", "sandboxes", id, ..] => format!("vm={id}"),
        ["templates", id] => format!("snapshot={id}"),
        _ => "-".to_string(),
    }
}

/// Rewrites an error response that is not E2B-shaped (axum's plain-text
/// rejections, the native API's `{"error": …}` of the shared in-flight
/// limit) into an [`E2bError`] with the same status and headers.
async fn e2b_shaped(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if json.as_ref().is_some_and(|v| v["code"].is_u64()) {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let message = match json.as_ref().and_then(|v| v["error"].as_str()) {
        Some(m) => m.to_string(),
        None => {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_lowercase()
            } else {
                text
            }
        }
    };
    let mut out = E2bError::new(status, message).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// A JSON body (at most 64 KiB; empty means `T::default()`), its errors as
/// 400 [`E2bError`]s naming the field (`invalid field `timeout`: …`).
pub(crate) struct E2bJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for E2bJson<T> {
    type Rejection = E2bError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        crate::server::json::OptionalJsonBody::<T>::from_request(req, state)
            .await
            .map(|b| E2bJson(b.0))
            .map_err(api_error)
    }
}

/// An error of the native layer (body parsing, a detached operation) in
/// the E2B shape, its field named in the message.
pub(crate) fn api_error(e: ApiError) -> E2bError {
    let message = match &e.body.field {
        Some(f) if !e.body.error.contains(f.as_str()) => format!("{f}: {}", e.body.error),
        _ => e.body.error,
    };
    E2bError::new(e.status, message)
}

/// An engine error in the E2B shape (status as the native API decides it).
pub(crate) fn engine_error(e: EngineError) -> E2bError {
    api_error(ApiError::from(e))
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, milliseconds) of unix milliseconds `ms`.
pub(crate) fn rfc3339(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `n` random characters of `[a-z0-9]` from the kernel's generator.
pub(crate) fn random_alnum(n: usize) -> Result<String, E2bError> {
    use std::io::Read;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(n);
    let mut f = std::fs::File::open("/dev/urandom").map_err(internal)?;
    let mut buf = [0u8; 64];
    while out.len() < n {
        f.read_exact(&mut buf).map_err(internal)?;
        // 252 = 7 × 36: larger bytes are dropped so every character is as likely.
        for b in buf.iter().filter(|b| **b < 252) {
            if out.len() == n {
                break;
            }
            out.push(ALPHABET[usize::from(*b % 36)] as char);
        }
    }
    Ok(out)
}

/// A 500 for a host failure (a record that cannot be written, …).
pub(crate) fn internal(e: impl std::fmt::Display) -> E2bError {
    E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Whether a sandbox is over because its VM ended by itself (powered off,
/// crashed, OOM-killed: `stopped` or `failed`, no VMM). E2B has no stopped
/// sandbox: such a sandbox is gone. [`end_ended`] ends it.
pub(crate) fn has_ended(vm: &agentenv_api::VmInfo) -> bool {
    !vm.state.has_vmm()
}

/// Ends a sandbox whose VM ended by itself ([`has_ended`]): its record goes
/// now (it is not found from here on), its VM is deleted in a task of its
/// own (overlay, session directory; a failure is logged and the VM stays
/// for the native API).
pub(crate) fn end_ended(state: &E2bState, record: &SandboxRecord, vm: &agentenv_api::VmInfo) {
    // Calls that see it at once (two lists, say) delete it once.
    if !forget(state, record) {
        return;
    }
    let engine = state.engine.clone();
    let id = record.sandbox_id.clone();
    let why = vm.state;
    tokio::spawn(async move {
        match engine.delete(&id).await {
            Ok(()) | Err(agentenv_core::EngineError::NotFound { .. }) => {
                tracing::info!("e2b: sandbox {id} ended by itself (its vm is {why}); deleted");
            }
            Err(e) => tracing::warn!("e2b: sandbox {id} ended by itself, its vm stays: {e}"),
        }
    });
}

/// The record of sandbox `id` when `who` may see it, else the 404 an absent
/// id gets. A record whose VM went (deleted through the native API) is
/// dropped on the way, and one whose VM ended by itself is ended.
pub(crate) fn visible(
    state: &E2bState,
    who: &Principal,
    id: &str,
) -> Result<(Arc<SandboxRecord>, agentenv_api::VmInfo), E2bError> {
    let record = state
        .sandboxes
        .get(id)
        .filter(|r| who.may_see(Some(&r.owner)))
        .ok_or_else(|| E2bError::sandbox_not_found(id))?;
    match state.engine.get(id) {
        Ok(vm) if has_ended(&vm) => {
            end_ended(state, &record, &vm);
            Err(E2bError::sandbox_not_found(id))
        }
        Ok(vm) => Ok((record, vm)),
        Err(_) => {
            forget(state, &record);
            Err(E2bError::sandbox_not_found(id))
        }
    }
}

/// Forgets a sandbox whose VM is gone: its record, its deadline, and what
/// envd holds for it (open streams end with `unavailable`). True when this
/// call removed the record (false: another did first).
pub(crate) fn forget(state: &E2bState, record: &SandboxRecord) -> bool {
    state
        .sandboxes
        .deadlines
        .disarm(&record.sandbox_id, record.end_at_ms);
    let removed = state.sandboxes.remove(&record.sandbox_id).is_some();
    // Ends the sandbox's open streams and forgets its processes and watchers.
    super::envd::forget(state, &record.sandbox_id);
    removed
}

/// Adds `target` to `resp` for the audit line.
pub(crate) fn with_target(mut resp: Response, target: AuditTarget) -> Response {
    resp.extensions_mut().insert(target);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_targets() {
        assert_eq!(audit_target("/sandboxes/i1/pause"), "vm=i1");
        assert_eq!(audit_target("/sandboxes/i1"), "vm=i1");
        assert_eq!(audit_target("/v2/sandboxes/i1/connect"), "vm=i1");
        assert_eq!(audit_target("/templates/s1"), "snapshot=s1");
        assert_eq!(audit_target("/v2/sandboxes"), "-");
    }

    #[test]
    fn random_ids() {
        let a = random_alnum(19).unwrap();
        assert_eq!(a.len(), 19);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(a, random_alnum(19).unwrap());
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
