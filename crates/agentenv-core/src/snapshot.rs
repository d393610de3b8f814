//! The snapshot seam: a store of disk and full (memory) snapshots in two tiers.
//!
//! `agentenv_host::snapshots::TieredStore` implements it on real file systems.

use std::path::{Path, PathBuf};

use agentenv_api::{BackendKind, FullSnapshotInfo, SnapshotInfo, SnapshotTier};
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
    /// Fingerprint of the source VM's base image (see [`crate::fingerprint`]).
    pub rootfs_fingerprint: Option<String>,
    /// A full snapshot: what a restore must match (`memory_bytes` and
    /// `state_bytes` are filled in by [`SnapshotStore::seal`]). `None`: disk only.
    pub full: Option<FullSnapshotInfo>,
    /// Who takes it (a token name, `uid:N`); kept in its record.
    pub owner: Option<String>,
}

/// A snapshot being made: a `.partial-*` directory in the tier chosen for it
/// by [`SnapshotStore::begin`], invisible until [`SnapshotStore::seal`].
#[derive(Debug)]
pub struct PendingSnapshot {
    /// What is being made.
    pub new: NewSnapshot,
    /// The tier it goes to.
    pub tier: SnapshotTier,
    /// The partial directory.
    pub dir: PathBuf,
    /// Where [`SnapshotStore::copy_disk`] puts the disk.
    pub disk: PathBuf,
    /// Where the VMM writes a full snapshot's state (and memory, when it
    /// writes it itself); [`SnapshotStore::copy_memory`] writes `memory` too.
    pub files: crate::backend::FullSnapshotFiles,
    /// Set by the engine when the guest's memory went into the state file:
    /// the snapshot then has no memory file.
    pub memory_in_state: bool,
}

/// The files a VM restored from a full snapshot is started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullSnapshotFiles {
    /// The snapshot.
    pub info: SnapshotInfo,
    /// Its state file (checked against its checksum).
    pub state: PathBuf,
    /// Its memory file, to map privately (its size and sampled fingerprint
    /// checked); `None` when the memory is in the state file.
    pub memory: Option<PathBuf>,
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

    /// Starts a snapshot (disk or full): picks the tmpfs tier when it has room
    /// for the disk's allocated bytes, the guest memory (full) and the
    /// overhead, else the durable tier, and makes the partial directory.
    async fn begin(&self, new: NewSnapshot) -> Result<PendingSnapshot, SnapshotError>;

    /// Copies the source disk into a pending snapshot, sparse, without
    /// hashing (the VM is paused meanwhile: only the copy is in its way).
    async fn copy_disk(&self, pending: &PendingSnapshot) -> Result<(), SnapshotError>;

    /// Copies a stopped guest's shared memory file into a pending full
    /// snapshot (`pending.files.memory`), sparse, without hashing.
    async fn copy_memory(
        &self,
        pending: &PendingSnapshot,
        source: &Path,
    ) -> Result<(), SnapshotError>;

    /// Finishes a pending snapshot once its VM runs again: checksums of its
    /// files, the record, the rename into place. On error nothing is left.
    async fn seal(&self, pending: PendingSnapshot) -> Result<SnapshotInfo, SnapshotError>;

    /// Drops a pending snapshot and its partial directory.
    async fn abort(&self, pending: PendingSnapshot);

    /// For a VM restored from a full snapshot: checks the state file against
    /// its checksum and the memory file's size and sampled fingerprint
    /// (`Corrupt` otherwise), copies the disk to `disk_dest` (checked while
    /// copying, as [`SnapshotStore::restore`]) and returns the files the VMM
    /// loads. A disk-only snapshot is `Busy`-free but refused by the engine
    /// before this is called.
    async fn open_full(
        &self,
        snapshot_id: &str,
        disk_dest: &Path,
    ) -> Result<FullSnapshotFiles, SnapshotError>;

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
