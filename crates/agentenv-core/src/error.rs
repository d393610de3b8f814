//! The engine's errors. The daemon maps each variant to one HTTP status in one place.

use agentenv_api::VmState;

use crate::backend::VmmError;
use crate::host::HostError;
use crate::ids::IdError;
use crate::snapshot::SnapshotError;
use crate::state::TransitionError;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request field is malformed or out of range.
    #[error("{message}")]
    BadRequest {
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The request is well-formed but not allowed by the configuration.
    #[error("{message}")]
    Forbidden {
        /// The field at fault.
        field: String,
        /// Why it is refused.
        message: String,
    },
    /// A named thing does not exist.
    #[error("{message}")]
    NotFound {
        /// The field that named it (`vm_id`, `rootfs_id`, `kernel`, …).
        field: String,
        /// What was not found.
        message: String,
    },
    /// The VM exists but is in the wrong state, or the id is taken.
    #[error("{message}")]
    Conflict {
        /// What conflicts.
        message: String,
        /// The VM's current state, when there is a VM.
        state: Option<VmState>,
    },
    /// Admitting the VM would commit more memory than the host has.
    #[error("{message}")]
    InsufficientMemory {
        /// The figures.
        message: String,
    },
    /// A finite resource (VM subnets) is used up.
    #[error("{0}")]
    Exhausted(String),
    /// A storage root is full.
    #[error("{0}")]
    NoSpace(String),
    /// The VMM failed or refused.
    #[error("vm {vm_id}: {source}")]
    Vmm {
        /// The VM.
        vm_id: String,
        /// The backend's error.
        #[source]
        source: VmmError,
    },
    /// A host operation failed.
    #[error("{0}")]
    Host(HostError),
    /// A snapshot operation failed.
    #[error("{source}")]
    Snapshot {
        /// The request field that named the snapshot, if any.
        field: Option<String>,
        /// The store's error.
        #[source]
        source: SnapshotError,
    },
    /// Host networking failed.
    #[error("network: {0}")]
    Network(String),
    /// The guest agent cannot be reached (not started yet, or its connection broke).
    #[error("{0}")]
    AgentUnavailable(String),
    /// The guest failed to carry out a request (an I/O error inside the VM).
    #[error("{0}")]
    Guest(String),
    /// Something did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// The VM's cgroup (its resource limits) could not be set up.
    #[error("{0}")]
    Cgroup(String),
    /// An injected failure (tests only).
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

impl EngineError {
    /// A 400 naming the field.
    pub fn bad(field: &str, message: impl Into<String>) -> EngineError {
        EngineError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A 404 naming the field.
    pub fn not_found(field: &str, message: impl Into<String>) -> EngineError {
        EngineError::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A snapshot error attributed to a request field.
    pub fn snapshot(field: &str, source: SnapshotError) -> EngineError {
        EngineError::Snapshot {
            field: Some(field.into()),
            source,
        }
    }

    /// The request field at fault, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            EngineError::BadRequest { field, .. }
            | EngineError::Forbidden { field, .. }
            | EngineError::NotFound { field, .. } => Some(field),
            EngineError::Snapshot { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// The VM's state, for conflicts.
    pub fn state(&self) -> Option<VmState> {
        match self {
            EngineError::Conflict { state, .. } => *state,
            _ => None,
        }
    }
}

impl From<IdError> for EngineError {
    fn from(e: IdError) -> Self {
        EngineError::BadRequest {
            field: e.field.clone(),
            message: e.to_string(),
        }
    }
}

impl From<TransitionError> for EngineError {
    fn from(e: TransitionError) -> Self {
        EngineError::Conflict {
            message: e.to_string(),
            state: Some(e.from),
        }
    }
}

impl From<HostError> for EngineError {
    fn from(e: HostError) -> Self {
        if e.no_space {
            EngineError::NoSpace(e.to_string())
        } else {
            EngineError::Host(e)
        }
    }
}

impl From<SnapshotError> for EngineError {
    fn from(source: SnapshotError) -> Self {
        EngineError::Snapshot {
            field: None,
            source,
        }
    }
}
