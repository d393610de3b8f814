//! Test-only failure injection at named steps of multi-step operations.
//!
//! Every step listed in [`FAILPOINTS`] checks its point; an armed point makes
//! the step fail as a real error there would, so tests can check that each
//! operation rolls back (or stays retryable) and leaks nothing.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::EngineError;

/// Named points in multi-step operations where tests can inject a failure.
#[derive(Debug, Default)]
pub struct Failpoints {
    armed: Mutex<HashSet<String>>,
}

impl Failpoints {
    /// Makes the named step fail until [`Failpoints::clear`].
    pub fn arm(&self, name: &str) {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }

    /// Disarms every failpoint.
    pub fn clear(&self) {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// True when the named step is armed to fail.
    pub fn hit(&self, name: &str) -> bool {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    pub(crate) fn check(&self, name: &'static str) -> Result<(), EngineError> {
        if self.hit(name) {
            Err(EngineError::Injected(name))
        } else {
            Ok(())
        }
    }
}

/// Every failpoint name, in the order the steps run.
pub const FAILPOINTS: &[&str] = &[
    "create.session_dir",
    "create.network",
    "create.disk",
    "create.record",
    "create.launch",
    "create.running",
    "snapshot.frozen",
    "snapshot.paused",
    "snapshot.copied",
    "snapshot_store.copied",
    "snapshot_store.recorded",
    "persist.copied",
    "persist.recorded",
    "delete.vmm_stopped",
    "delete.marked",
    "delete.socket_removed",
];
