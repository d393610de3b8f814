//! envd, served by the daemon for each sandbox over its guest agent: the
//! Connect RPC services `process.Process` and `filesystem.Filesystem`,
//! `/files` and `/health`, authenticated by the sandbox's `X-Access-Token`.

use std::sync::Arc;

use agentenv_core::config::E2bConfig;
use axum::http::HeaderMap;
use axum::Router;

use super::error::ConnectError;
use super::E2bState;

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
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let label = host
        .to_ascii_lowercase()
        .strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))?
        .to_string();
    let (port, id) = label.split_once('-')?;
    Some(Target {
        sandbox_id: id.to_string(),
        port: port.parse().ok()?,
    })
}

/// The envd routes.
pub fn router(state: Arc<E2bState>) -> Router {
    Router::new()
        .fallback(|uri: axum::http::Uri| async move {
            ConnectError::new(
                super::error::Code::Unimplemented,
                format!("{} is not served", uri.path()),
            )
        })
        .with_state(state)
}
