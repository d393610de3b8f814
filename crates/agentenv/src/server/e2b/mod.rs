//! The E2B-compatible API (docs/e2b.md): what the official `e2b` SDK calls,
//! served on its own listeners (`[e2b] listen`, `--e2b-listen`) so the native
//! `/v1` API keeps its own rules.
//!
//! One listener carries both of the SDK's planes, as E2B's own
//! `sandbox.<domain>` front does:
//! - a request naming a sandbox — header `E2b-Sandbox-Id` (with
//!   `E2b-Sandbox-Port: 49983`), or `Host: 49983-<id>.<domain>` when
//!   `[e2b] domain` is set — goes to that sandbox's envd ([`envd`]): Connect
//!   RPC (`process.Process`, `filesystem.Filesystem`), `/files`, `/health`,
//!   served by the daemon over the guest agent, authenticated by the
//!   sandbox's `X-Access-Token` (or a signed URL);
//! - everything else is the control plane ([`control`]): `/sandboxes`,
//!   `/v2/sandboxes`, `/snapshots`, `/templates`, authenticated by
//!   `X-API-KEY` (a token of the tokens file).
//!
//! Sandboxes are agentenv VMs; [`state`] keeps what E2B adds to them
//! (template, metadata, envVars, access token, deadline) and
//! [`templates`] turns a `templateID` into a create.

pub mod control;
pub mod envd;
pub mod error;
pub mod state;
pub mod templates;

use std::sync::Arc;

use agentenv_core::config::E2bConfig;
use agentenv_core::Engine;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Router;

use super::auth::Auth;
use super::limits::Limits;

/// The port envd listens on in an E2B sandbox: the only one served.
pub const ENVD_PORT: u16 = 49983;

/// The envd version reported to the SDK: the features below it are served.
pub const ENVD_VERSION: &str = "0.5.7";

/// Everything the E2B handlers share.
pub struct E2bState {
    /// The engine the sandboxes live in.
    pub engine: Arc<Engine>,
    /// The daemon's tokens (`X-API-KEY`).
    pub auth: Auth,
    /// The daemon's in-flight limit, shared with the native API.
    pub limits: Limits,
    /// `[e2b]`.
    pub config: E2bConfig,
    /// The sandboxes and what E2B knows of them.
    pub sandboxes: state::Sandboxes,
    /// The templates, and their warm snapshots.
    pub templates: templates::Templates,
    /// envd's processes and watchers.
    pub envd: envd::Envd,
}

/// The E2B API of a running daemon.
pub struct E2bApi {
    state: Arc<E2bState>,
}

impl E2bApi {
    /// Loads the sandboxes' records (those whose VM is gone are dropped),
    /// arms their deadlines and starts warming the templates.
    pub async fn start(engine: Arc<Engine>, auth: Auth, limits: Limits) -> std::io::Result<E2bApi> {
        let config = engine.config().e2b.clone();
        let sandboxes = state::Sandboxes::load(&engine)?;
        let templates = templates::Templates::new(&engine);
        let state = Arc::new(E2bState {
            engine,
            auth,
            limits,
            config,
            sandboxes,
            templates,
            envd: envd::Envd::default(),
        });
        control::start(&state);
        templates::start(&state);
        Ok(E2bApi { state })
    }

    /// What the handlers share (the templates, the sandboxes' records).
    pub fn state(&self) -> &Arc<E2bState> {
        &self.state
    }

    /// The router of the E2B listeners.
    pub fn router(&self) -> Router {
        let control = control::router(self.state.clone());
        let envd = envd::router(self.state.clone());
        let state = self.state.clone();
        Router::new().fallback(move |req: Request| {
            let control = control.clone();
            let envd = envd.clone();
            let state = state.clone();
            async move { dispatch(&state, control, envd, req).await }
        })
    }

    /// Stops the deadlines and the template warmers (the sandboxes stay).
    pub async fn stop(&self) {
        control::stop(&self.state).await;
        templates::stop(&self.state).await;
    }
}

/// What `host` (a `Host` header value) names below `domain`, lower-case,
/// without the port: `49983-<id>` for `49983-<id>.<domain>`, `api` for
/// `api.<domain>`. None when it is not below `domain`.
pub(crate) fn below_domain(host: &str, domain: &str) -> Option<String> {
    let host = host.trim().to_ascii_lowercase();
    let name = super::guard::strip_port(&host);
    let label = name.strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))?;
    (!label.is_empty()).then(|| label.to_string())
}

/// Refuses a `Host` that does not name this daemon (421, see
/// [`control::host`]), then sends `req` to the envd router when it names a
/// sandbox, else to the control plane's.
async fn dispatch(state: &E2bState, control: Router, envd: Router, mut req: Request) -> Response {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    if let Err(e) = control::host::check(state.engine.config(), &req) {
        return e.into_response();
    }
    let target = envd::target_of(&state.config, req.headers())
        .or_else(|| envd::signed_target(state, req.method(), req.uri()));
    let router = match target {
        Some(target) => {
            req.extensions_mut().insert(target);
            envd
        }
        None => control,
    };
    // An error answered before the request's body was read ends the
    // connection (hyper cannot reuse it); say so, or the SDK's connection
    // pool writes its next request into a closed socket ("Broken pipe").
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut resp = match router.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    if has_body && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
