//! Who may call the API, what they may see, and the audit log.
//!
//! - [`authenticate`], the outermost layer: every request but `GET /v1/health`
//!   carries `Authorization: Bearer TOKEN` with a token of the tokens file,
//!   or is answered 401 (`WWW-Authenticate: Bearer`) before it reaches the
//!   in-flight limit (`limits.rs`) — an unauthenticated flood takes no slot.
//!   The caller becomes a [`Principal`] in the request's extensions. A
//!   transport that authenticates by other means (a Unix socket's peer
//!   credentials) inserts the `Principal` itself (e.g. admin `uid:1000`);
//!   this layer then leaves it as it is. With `[auth] mode = "none"` every
//!   request is the admin `anonymous`. The same layer writes the audit line
//!   of each mutating request (target `agentenv::audit`).
//! - [`owns`], a route layer on every route: each `{vm_id}` and
//!   `{snapshot_id}` in the path must be visible to a `user` caller
//!   (`Engine::visible_vm`/`visible_snapshot`), else 404 exactly as if it
//!   did not exist. No handler can forget it; handlers that create or list
//!   take a [`Caller`] and use the engine's `*_as` methods.
//! - [`Auth`]: the tokens in force, reloaded by SIGHUP (`daemon.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use agentenv_core::config::{AuthMode, Config};
use agentenv_core::principal::Principal;
use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::tokens::{Tokens, TokensError};

/// The authentication in force, shared by every connection and the SIGHUP
/// handler.
#[derive(Clone)]
pub struct Auth {
    mode: AuthMode,
    path: PathBuf,
    tokens: Arc<RwLock<Arc<Tokens>>>,
}

impl Auth {
    /// Loads the tokens file the config names (not read with `mode = "none"`).
    pub fn from_config(cfg: &Config) -> Result<Auth, TokensError> {
        let tokens = match cfg.auth.mode {
            AuthMode::Token => Tokens::load(&cfg.auth.tokens_file)?,
            AuthMode::None => Tokens::default(),
        };
        Ok(Auth {
            mode: cfg.auth.mode,
            path: cfg.auth.tokens_file.clone(),
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    /// Reads the tokens file again. On any error the tokens in force stay
    /// and the error is returned (the SIGHUP handler logs it). Returns the
    /// number of tokens now in force.
    pub fn reload(&self) -> Result<usize, TokensError> {
        if self.mode == AuthMode::None {
            return Ok(0);
        }
        let fresh = Tokens::load(&self.path)?;
        let n = fresh.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(n)
    }

    /// The tokens file.
    pub fn tokens_file(&self) -> &Path {
        &self.path
    }

    /// The mode in force.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who `token` stands for (constant-time comparison), if anyone; with
    /// `mode = "none"` every caller is an admin named `anonymous`. The E2B
    /// API's `X-API-KEY` is checked with this.
    pub fn principal_of(&self, token: &str) -> Option<Principal> {
        match self.mode {
            AuthMode::None => Some(Principal::admin("anonymous")),
            AuthMode::Token => self.current().find(token),
        }
    }

    fn current(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Why a request was not authenticated (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer TOKEN`.
    Malformed,
    /// A bearer token that is not in the tokens file.
    Unknown,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => {
                "authentication required: send Authorization: Bearer TOKEN (agentenv token create)"
            }
            AuthError::Malformed => "malformed Authorization header: expected Bearer TOKEN",
            AuthError::Unknown => "unknown or revoked token",
        })
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let mut resp = ApiError::from(self).into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(match self {
                AuthError::Missing => "Bearer realm=\"agentenv\"",
                _ => "Bearer realm=\"agentenv\", error=\"invalid_token\"",
            }),
        );
        resp
    }
}

/// The client's address as the transport knows it (`127.0.0.1:40000`,
/// `unix`), put in the request's extensions by `server::run`, for the audit
/// log.
#[derive(Debug, Clone)]
pub struct ClientAddr(pub String);

/// What a response is about, for the audit log, when the path does not say
/// it (a create names its VM in the body; a snapshot gets its id on the way).
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

impl AuditTarget {
    /// A VM.
    pub fn vm(id: &str) -> AuditTarget {
        AuditTarget(format!("vm={id}"))
    }

    /// A snapshot.
    pub fn snapshot(id: &str) -> AuditTarget {
        AuditTarget(format!("snapshot={id}"))
    }
}

fn is_open(req: &Request) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD) && req.uri().path() == "/v1/health"
}

/// The principal a request's `Authorization` header stands for.
fn bearer(auth: &Auth, req: &Request) -> Result<Principal, AuthError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::Malformed);
    }
    auth.current().find(token).ok_or(AuthError::Unknown)
}

/// The authentication layer (see the module doc), with the audit line.
pub async fn authenticate(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    let audit = AuditLine::begin(&req);
    let who: Result<Option<Principal>, AuthError> =
        match req.extensions().get::<Principal>().cloned() {
            Some(p) => Ok(Some(p)),
            None if auth.mode == AuthMode::None => Ok(Some(Principal::admin("anonymous"))),
            None if is_open(&req) => Ok(None),
            None => bearer(&auth, &req).map(Some),
        };
    let (name, resp) = match who {
        Err(e) => ("-".to_string(), e.into_response()),
        Ok(p) => {
            let name = p
                .as_ref()
                .map_or_else(|| "-".to_string(), |p| p.name.clone());
            if let Some(p) = p {
                req.extensions_mut().insert(p);
            }
            (name, next.run(req).await)
        }
    };
    if let Some(audit) = audit {
        audit.write(&name, &resp, target_of);
    }
    resp
}

/// The audit line of a mutating request (target `agentenv::audit`), begun
/// when it arrives and written with its answer. The E2B API writes the
/// same lines.
pub struct AuditLine {
    started: Instant,
    method: Method,
    path: String,
    client: String,
}

impl AuditLine {
    /// The line of `req`; None for a read (`GET`, `HEAD`, `OPTIONS`).
    pub fn begin(req: &Request) -> Option<AuditLine> {
        let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        mutating.then(|| AuditLine {
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            client: req
                .extensions()
                .get::<ClientAddr>()
                .map_or_else(|| "-".to_string(), |a| a.0.clone()),
        })
    }

    /// Writes the line: `principal` answered `resp`, about the
    /// [`AuditTarget`] the response carries, else what `target_of` makes
    /// of the path.
    pub fn write(self, principal: &str, resp: &Response, target_of: fn(&str) -> String) {
        let target = resp
            .extensions()
            .get::<AuditTarget>()
            .map(|t| t.0.clone())
            .unwrap_or_else(|| target_of(&self.path));
        tracing::info!(
            target: "agentenv::audit",
            principal = %principal,
            client = %self.client,
            request = %format_args!("{} {}", self.method, self.path),
            target = %target,
            status = resp.status().as_u16(),
            duration_ms = format_args!("{:.3}", self.started.elapsed().as_secs_f64() * 1e3),
            "audit"
        );
    }
}

/// The VM or snapshot a path names, for the audit log.
fn target_of(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some("vm"), Some(id)) => format!("vm={id}"),
        (Some("v1"), Some("snapshots"), Some(id)) => format!("snapshot={id}"),
        _ => "-".to_string(),
    }
}

/// The route layer: every `{vm_id}` / `{snapshot_id}` of the path must be
/// visible to the caller, else the answer is the one an absent one gets.
/// Admins see everything, so their requests pass untouched (the engine's
/// `visible_*` answer `Ok` for them at once).
pub async fn owns(
    State(engine): State<AppState>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let Some(who) = req.extensions().get::<Principal>() else {
        // Only `GET /v1/health` comes without a principal, and it names nothing.
        if params.as_ref().is_ok_and(|p| p.iter().next().is_some()) {
            return AuthError::Missing.into_response();
        }
        return next.run(req).await;
    };
    for (key, value) in params.iter().flat_map(|p| p.iter()) {
        let visible = match key {
            "vm_id" => engine.visible_vm(who, value),
            "snapshot_id" => engine.visible_snapshot(who, "snapshot_id", value),
            _ => Ok(()),
        };
        if let Err(e) = visible {
            return ApiError::from(e).into_response();
        }
    }
    next.run(req).await
}

/// The authenticated caller, for the handlers that create or list. A request
/// without one (which the layers never let through) is refused with 401.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or(AuthError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_targets_come_from_the_path() {
        assert_eq!(target_of("/v1/vm/a1/pause"), "vm=a1");
        assert_eq!(target_of("/v1/vm/a1"), "vm=a1");
        assert_eq!(target_of("/v1/snapshots/s1/persist"), "snapshot=s1");
        assert_eq!(target_of("/v1/vm"), "-");
    }
}
