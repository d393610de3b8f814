//! `filesystem.Filesystem`: stat, list, mkdir, move, remove and directory
//! watches in a sandbox, over the guest agent's file-system operations.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::Call;
use crate::server::e2b::error::{Code, ConnectError};

/// The watchers of `CreateWatcher`, by sandbox.
#[derive(Default)]
pub struct Watchers {
    sandboxes: Mutex<HashMap<String, HashMap<String, ()>>>,
}

impl Watchers {
    /// Stops every watcher of `sandbox`.
    pub fn forget(&self, sandbox: &str) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox);
    }
}

/// Serves `filesystem.Filesystem/<method>`.
pub async fn serve(_call: Call, method: &str, _headers: HeaderMap, _body: Body) -> Response {
    ConnectError::new(
        Code::Unimplemented,
        format!("filesystem.Filesystem/{method} is not served yet"),
    )
    .into_response()
}
