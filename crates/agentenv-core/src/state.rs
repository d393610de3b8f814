//! The VM state machine: one table decides every change.

use agentenv_api::VmState;

/// True when a VM may move from `from` to `to`.
///
/// This is the only place that decides; the engine calls it for every change.
pub fn valid_transition(from: VmState, to: VmState) -> bool {
    use VmState::*;
    matches!(
        (from, to),
        (Creating, Running)
            | (Creating, Failed)
            | (Running, Pausing)
            | (Pausing, Paused)
            | (Pausing, Running)
            | (Paused, Resuming)
            | (Resuming, Running)
            | (Resuming, Paused)
            | (Running, Snapshotting)
            | (Paused, Snapshotting)
            | (Snapshotting, Running)
            | (Snapshotting, Paused)
            | (Running, Stopping)
            | (Paused, Stopping)
            | (Stopping, Stopped)
            | (Stopping, Failed)
            // The VMM exited on its own.
            | (Running, Stopped)
            | (Running, Failed)
            | (Paused, Stopped)
            | (Paused, Failed)
            | (Pausing, Failed)
            | (Resuming, Failed)
            | (Snapshotting, Failed)
            // Reset to a full snapshot, in place, from any settled state.
            | (Running, Resetting)
            | (Paused, Resetting)
            | (Stopped, Resetting)
            | (Failed, Resetting)
            | (Resetting, Running)
            | (Resetting, Failed)
            // Deletion from any settled state.
            | (Running, Deleting)
            | (Paused, Deleting)
            | (Stopped, Deleting)
            | (Failed, Deleting)
    )
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vm {vm_id} is {from}: cannot go to {to}")]
pub struct TransitionError {
    /// The VM.
    pub vm_id: String,
    /// Its current state.
    pub from: VmState,
    /// The state asked for.
    pub to: VmState,
}

/// Checks a change through [`valid_transition`].
pub fn transition(vm_id: &str, from: VmState, to: VmState) -> Result<VmState, TransitionError> {
    if valid_transition(from, to) {
        Ok(to)
    } else {
        Err(TransitionError {
            vm_id: vm_id.to_string(),
            from,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    #[test]
    fn lifecycle_path_is_allowed() {
        let path = [
            Creating, Running, Pausing, Paused, Resuming, Running, Stopping, Stopped, Deleting,
        ];
        for w in path.windows(2) {
            assert!(valid_transition(w[0], w[1]), "{} -> {}", w[0], w[1]);
        }
    }

    #[test]
    fn settled_states_cannot_be_operated() {
        for to in [Pausing, Resuming, Stopping, Snapshotting, Running] {
            assert!(!valid_transition(Stopped, to), "stopped -> {to}");
            assert!(!valid_transition(Failed, to), "failed -> {to}");
        }
        assert!(!valid_transition(Paused, Pausing));
        assert!(!valid_transition(Running, Resuming));
        assert!(!valid_transition(Creating, Deleting));
        assert!(!valid_transition(Deleting, Running));
    }

    #[test]
    fn nothing_leaves_deleting_and_no_self_loops() {
        for s in VmState::ALL {
            assert!(!valid_transition(Deleting, s));
            assert!(!valid_transition(s, s), "{s} -> {s}");
        }
    }

    #[test]
    fn error_names_both_states() {
        let e = transition("vm1", Stopped, Pausing).unwrap_err();
        assert_eq!(e.to_string(), "vm vm1 is stopped: cannot go to pausing");
    }
}
