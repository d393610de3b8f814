//! Test-only failure injection at named steps of multi-step operations.
//!
//! Every step listed in [`FAILPOINTS`] checks its point; an armed point makes
//! the step fail as a real error there would, so tests can check that each
//! operation rolls back (or stays retryable) and leaks nothing. An engine
//! point can instead be armed to hang ([`Failpoints::arm_hang`]), so a test can
//! stop the daemon in the middle of an operation, as a crash would, and check
//! what the next start makes of it.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::EngineError;

/// Named points in multi-step operations where tests can inject a failure.
#[derive(Debug, Default)]
pub struct Failpoints {
    armed: Mutex<HashSet<String>>,
    hanging: Mutex<HashSet<String>>,
    /// Counts the points reached while armed to hang.
    hung: tokio::sync::watch::Sender<u64>,
    /// Bumped by [`Failpoints::clear`], which lets hanging operations go on.
    released: tokio::sync::watch::Sender<u64>,
}

impl Failpoints {
    /// Makes the named step fail until [`Failpoints::clear`].
    pub fn arm(&self, name: &str) {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }

    /// Makes the named engine step (one of `create.*`, `snapshot.*`,
    /// `restore.*`, `fork.*`, `reset.*`, `delete.*`) wait when it is
    /// reached, until [`Failpoints::clear`] lets it go on.
    pub fn arm_hang(&self, name: &str) {
        self.hanging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }

    /// How many operations in all have reached a point armed to hang.
    pub fn hung(&self) -> u64 {
        *self.hung.borrow()
    }

    /// Disarms every failpoint and lets hanging operations go on.
    pub fn clear(&self) {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.hanging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.released.send_modify(|n| *n += 1);
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

    /// An engine step: fails when armed, waits for [`Failpoints::clear`] when
    /// armed to hang.
    pub(crate) async fn point(&self, name: &'static str) -> Result<(), EngineError> {
        let mut released = self.released.subscribe();
        let hang = self
            .hanging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        if hang {
            tracing::warn!("failpoint {name}: hanging here");
            self.hung.send_modify(|n| *n += 1);
            let _ = released.changed().await;
        }
        self.check(name)
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
    "snapshot.saved",
    "snapshot.resumed",
    "snapshot.copied",
    "snapshot_store.copied",
    "snapshot_store.recorded",
    "persist.copied",
    "persist.recorded",
    "fork.snapshot",
    "fork.clone",
    "reset.killed",
    "reset.disk",
    "delete.vmm_stopped",
    "delete.marked",
    "delete.socket_removed",
];
