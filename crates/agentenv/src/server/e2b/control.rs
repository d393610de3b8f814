//! The E2B control plane: `/sandboxes`, `/v2/sandboxes`, `/snapshots`,
//! `/templates`, authenticated by `X-API-KEY`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;

use super::error::E2bError;
use super::E2bState;

/// The control plane's routes.
pub fn router(state: Arc<E2bState>) -> Router {
    Router::new()
        .fallback(|uri: axum::http::Uri| async move {
            E2bError::new(
                StatusCode::NOT_FOUND,
                format!("no route for {}", uri.path()),
            )
        })
        .with_state(state)
}

/// Arms the deadlines of the sandboxes loaded at startup.
pub fn start(_state: &Arc<E2bState>) {}

/// Stops the deadline timers.
pub async fn stop(_state: &Arc<E2bState>) {}
