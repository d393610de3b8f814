//! E2B templates (`[e2b.templates.NAME]`): a base image, and a full snapshot
//! of it booted and idle, so that a create is a restore, not a boot.

use std::sync::Arc;

use agentenv_core::Engine;

use super::E2bState;

/// The configured templates and their warm snapshots.
pub struct Templates {}

impl Templates {
    /// The templates of `engine`'s config.
    pub fn new(_engine: &Engine) -> Templates {
        Templates {}
    }
}

/// Starts warming the templates that keep a snapshot.
pub fn start(_state: &Arc<E2bState>) {}

/// Stops the warmers.
pub async fn stop(_state: &Arc<E2bState>) {}
