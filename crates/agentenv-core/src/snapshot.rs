//! The snapshot seam: a store of disk snapshots in two tiers.
//!
//! `agentenv_host::snapshots::TieredStore` implements it on real file systems.

use std::path::{Path, PathBuf};

use agentenv_api::{BackendKind, SnapshotInfo};
use async_trait::async_trait;

/// What the engine hands the store to take a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Validated id of the new snapshot.
    pub snapshot_id: String,
    /// Source VM.
    pub vm_id: String,
    /// Base image of the source VM, when it has one.
    pub rootfs_id: Option<String>,
    /// Backend of the source VM.
    pub backend: BackendKind,
    /// The VM's writable disk (the VM is paused while this is read).
    pub source: PathBuf,
    /// The guest's file systems are frozen by its agent during the copy.
    pub fs_frozen: bool,
}

/// Why a snapshot operation failed. The daemon maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such snapshot (404).
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// The id is taken (409).
    #[error("snapshot {0} already exists")]
    Exists(String),
    /// The snapshot is in use, e.g. a VM is being created from it (409).
    #[error("snapshot {id} is busy: {why}")]
    Busy {
        /// The snapshot.
        id: String,
        /// What holds it.
        why: String,
    },
    /// Its disk no longer matches its checksum (422).
    #[error("snapshot {id} is corrupt: {why}")]
    Corrupt {
        /// The snapshot.
        id: String,
        /// What did not match.
        why: String,
    },
    /// A tier is missing or read-only (503, names the path).
    #[error("snapshot tier {path} is unavailable: {why}")]
    TierUnavailable {
        /// The tier's root.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Every tier is full (507).
    #[error("no room for snapshot {id}: {why}")]
    NoSpace {
        /// The snapshot.
        id: String,
        /// The figures.
        why: String,
    },
    /// A failure injected by a test at the named step (500).
    #[error("injected failure at {0}")]
    Injected(&'static str),
    /// Any other I/O failure (500, names the path).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Leftovers found and removed when the store started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Paths removed (partial copies, orphan files).
    pub removed: Vec<PathBuf>,
}

/// Disk snapshots in a fast tmpfs tier and a durable tier.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Loads the complete snapshots and removes partial leftovers of a crash.
    async fn init(&self) -> Result<Cleanup, SnapshotError>;

    /// Copies `new.source` into the tmpfs tier when it has room for the disk's
    /// allocated bytes plus the configured overhead, else into the durable tier;
    /// falls back to the durable tier if tmpfs fills up during the copy. The
    /// snapshot becomes visible only once complete (data, metadata, checksum).
    async fn create(&self, new: NewSnapshot) -> Result<SnapshotInfo, SnapshotError>;

    /// Every complete snapshot, sorted by id.
    fn list(&self) -> Vec<SnapshotInfo>;

    /// One snapshot.
    fn get(&self, snapshot_id: &str) -> Result<SnapshotInfo, SnapshotError>;

    /// Copies a tmpfs snapshot to the durable tier (temp name, fsync, verify the
    /// checksum, rename, fsync the directory), then marks it durable, keeping or
    /// dropping the tmpfs copy. Persisting a durable snapshot does nothing.
    async fn persist(
        &self,
        snapshot_id: &str,
        keep_tmpfs: bool,
    ) -> Result<SnapshotInfo, SnapshotError>;

    /// Verifies the snapshot's checksum and copies its disk (sparse-aware) to
    /// `dest`, which must not exist. A mismatch marks it corrupt and fails.
    async fn restore(&self, snapshot_id: &str, dest: &Path) -> Result<SnapshotInfo, SnapshotError>;

    /// Removes a snapshot and all its copies.
    async fn delete(&self, snapshot_id: &str) -> Result<(), SnapshotError>;

    /// Lets tests inject failures at the store's steps (`snapshot_store.*`,
    /// `persist.*` in [`crate::failpoints::FAILPOINTS`]).
    fn set_failpoints(&self, failpoints: std::sync::Arc<crate::failpoints::Failpoints>) {
        let _ = failpoints;
    }
}
