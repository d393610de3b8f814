//! [`TieredStore`]: disk and full snapshots in a tmpfs tier and a durable
//! tier, on real file systems.
//!
//! Layout, in each tier root:
//!
//! ```text
//! {tier_root}/{snapshot_id}/disk.ext4    sparse copy of the VM's writable disk
//! {tier_root}/{snapshot_id}/state        full snapshots: the VMM's state
//! {tier_root}/{snapshot_id}/memory       full snapshots: guest memory (sparse;
//!                                        absent when it is inside `state`)
//! {tier_root}/{snapshot_id}/meta.json    SnapshotMeta, schema_version 2
//! {tier_root}/.partial-{id}-{pid}-{n}/   a snapshot being made or removed
//! ```
//!
//! Invariants:
//! - A snapshot directory appears under its id only complete: data copied
//!   and flushed, `meta.json` written, then the directory renamed into place
//!   and the tier root flushed. Removal renames it to a `.partial-*` name
//!   first. So after a crash only `.partial-*` directories can be half made;
//!   [`init`](agentenv_core::snapshot::SnapshotStore::init) removes them.
//! - Every copy's `meta.json` holds the same record; on load the copies'
//!   paths come from what exists, the tier is durable when a durable copy
//!   exists, and a snapshot is corrupt when any record says so.
//! - The in-memory index is the only thing `list`/`get` read; every change
//!   on disk updates it before the call returns.
//! - One operation at a time changes a snapshot (create, begin…seal/abort,
//!   persist, delete mark it busy); restores and `open_full` only read,
//!   count themselves, and block `delete`.
//!
//! One file per verb: [`init`], [`create`], [`pending`] (begin, copy_disk,
//! copy_memory, seal, abort), [`open_full`], [`persist`], [`restore`],
//! [`delete`]; the record is in [`meta`], the memory file's quick check in
//! [`quick`].

mod create;
mod delete;
mod init;
pub mod meta;
mod open_full;
mod pending;
mod persist;
pub mod quick;
mod restore;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use agentenv_api::{SnapshotInfo, SnapshotTier};
use agentenv_core::config::Config;
use agentenv_core::snapshot::{
    Cleanup, FullSnapshotFiles, NewSnapshot, PendingSnapshot, SnapshotError, SnapshotStore,
};
use async_trait::async_trait;

use crate::disk;
use meta::SnapshotMeta;

/// File name of a snapshot's disk inside its directory.
pub const DISK_FILE: &str = "disk.ext4";
/// File name of a full snapshot's VMM state inside its directory.
pub const STATE_FILE: &str = "state";
/// File name of a full snapshot's guest memory inside its directory.
pub const MEMORY_FILE: &str = "memory";
/// File name of a snapshot's record inside its directory.
pub const META_FILE: &str = "meta.json";
/// Prefix of directories being made or removed.
pub const PARTIAL_PREFIX: &str = ".partial-";
/// Directory under `snapshots_root` for the ext4 overlay templates.
pub const TEMPLATES_DIR: &str = "templates";

/// Snapshots in a tmpfs tier and a durable tier.
#[derive(Debug, Clone)]
pub struct TieredStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    snapshots_root: PathBuf,
    tmpfs_root: PathBuf,
    durable_root: PathBuf,
    overhead_bytes: u64,
    index: Mutex<BTreeMap<String, Entry>>,
    /// Serialises `meta.json` writes (their temp name is per process).
    meta_lock: Mutex<()>,
    seq: AtomicU64,
    /// Test-only failure injection, shared with the engine.
    failpoints: std::sync::OnceLock<Arc<agentenv_core::failpoints::Failpoints>>,
    #[cfg(test)]
    restore_gate: Mutex<Option<tests::Gate>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// `None` while the snapshot is being created (not listed).
    meta: Option<SnapshotMeta>,
    /// Restores reading it now.
    restores: u32,
    /// What changes it now, if anything.
    busy: Option<&'static str>,
}

impl TieredStore {
    /// A store over the given roots. `overhead_bytes` is the room kept free
    /// beside a disk in the tmpfs tier. Nothing is read until `init`.
    pub fn new(
        snapshots_root: impl Into<PathBuf>,
        tmpfs_root: impl Into<PathBuf>,
        durable_root: impl Into<PathBuf>,
        overhead_bytes: u64,
    ) -> TieredStore {
        TieredStore {
            inner: Arc::new(Inner {
                snapshots_root: snapshots_root.into(),
                tmpfs_root: tmpfs_root.into(),
                durable_root: durable_root.into(),
                overhead_bytes,
                index: Mutex::new(BTreeMap::new()),
                meta_lock: Mutex::new(()),
                seq: AtomicU64::new(0),
                failpoints: std::sync::OnceLock::new(),
                #[cfg(test)]
                restore_gate: Mutex::new(None),
            }),
        }
    }

    /// The store the daemon's config describes.
    pub fn from_config(cfg: &Config) -> TieredStore {
        TieredStore::new(
            &cfg.snapshots_root,
            &cfg.tmpfs_snapshot_root,
            &cfg.hdfs_snapshot_root,
            cfg.snapshot_state_overhead_mib.saturating_mul(1 << 20),
        )
    }

    /// Where `LocalHost::with_templates` should keep its ext4 templates.
    pub fn templates_dir(&self) -> PathBuf {
        self.inner.snapshots_root.join(TEMPLATES_DIR)
    }

    /// The root of a tier.
    pub fn tier_root(&self, tier: SnapshotTier) -> &Path {
        self.inner.root(tier)
    }
}

impl Inner {
    /// Fails when a test armed the named step.
    fn failpoint(&self, name: &'static str) -> Result<(), SnapshotError> {
        match self.failpoints.get() {
            Some(f) if f.hit(name) => Err(SnapshotError::Injected(name)),
            _ => Ok(()),
        }
    }

    fn root(&self, tier: SnapshotTier) -> &Path {
        match tier {
            SnapshotTier::Tmpfs => &self.tmpfs_root,
            SnapshotTier::Durable => &self.durable_root,
        }
    }

    /// `{tier_root}/{id}`, through the one checked join.
    fn dir(&self, tier: SnapshotTier, id: &str) -> Result<PathBuf, SnapshotError> {
        agentenv_core::ids::checked_join(self.root(tier), "snapshot_id", id).map_err(|e| {
            SnapshotError::Io {
                context: format!("cannot place snapshot {id:?}"),
                source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
            }
        })
    }

    /// A fresh `.partial-*` name in a tier root (the id is validated first).
    fn partial_dir(&self, tier: SnapshotTier, id: &str) -> Result<PathBuf, SnapshotError> {
        self.dir(tier, id)?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .root(tier)
            .join(format!("{PARTIAL_PREFIX}{id}-{}-{n}", std::process::id())))
    }

    fn index(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `meta` into a snapshot directory atomically.
    fn write_meta(&self, dir: &Path, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        let _g = self.meta_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = dir.join(META_FILE);
        crate::local::write_atomic(&path, &meta.to_json())
            .map_err(io_err(format!("cannot write {}", path.display())))
    }

    /// Writes `meta` into every copy it names.
    fn write_meta_everywhere(&self, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        for (tier, present) in [
            (SnapshotTier::Tmpfs, meta.tmpfs_path.is_some()),
            (SnapshotTier::Durable, meta.durable_path.is_some()),
        ] {
            if present {
                self.write_meta(&self.dir(tier, &meta.snapshot_id)?, meta)?;
            }
        }
        Ok(())
    }

    /// Takes a complete snapshot directory out of its tier: rename to a
    /// `.partial-*` name (so a crash leaves nothing listed), then remove.
    fn remove_copy(&self, tier: SnapshotTier, id: &str) -> Result<(), SnapshotError> {
        let dir = self.dir(tier, id)?;
        // Look first: renaming nothing on a read-only tier fails with EROFS.
        if std::fs::symlink_metadata(&dir).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
            return Ok(());
        }
        let doomed = self.partial_dir(tier, id)?;
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(tier_error(
                    self.root(tier),
                    format!("cannot remove {}", dir.display()),
                    e,
                ))
            }
        }
        let _ = disk::sync_dir(self.root(tier));
        std::fs::remove_dir_all(&doomed)
            .map_err(io_err(format!("cannot remove {}", doomed.display())))
    }

    /// The durable root exists, is a directory and is writable.
    fn durable_ready(&self) -> Result<(), SnapshotError> {
        writable_dir(&self.durable_root)
    }
}

/// A directory that can take new entries, or why not.
fn writable_dir(root: &Path) -> Result<(), SnapshotError> {
    let unavailable = |why: String| SnapshotError::TierUnavailable {
        path: root.to_path_buf(),
        why,
    };
    match std::fs::metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(unavailable("does not exist".into()))
        }
        Err(e) => return Err(unavailable(e.to_string())),
        Ok(m) if !m.is_dir() => return Err(unavailable("is not a directory".into())),
        Ok(_) => {}
    }
    match nix::unistd::access(root, nix::unistd::AccessFlags::W_OK) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EROFS) => Err(unavailable("read-only file system".into())),
        Err(e) => Err(unavailable(format!("not writable: {}", e.desc()))),
    }
}

/// An I/O error with its context.
fn io_err(context: String) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { context, source }
}

/// An I/O error in a tier: a read-only or unwritable tier is unavailable,
/// anything else is plain I/O.
fn tier_error(root: &Path, context: String, e: io::Error) -> SnapshotError {
    if disk::is_read_only(&e) {
        SnapshotError::TierUnavailable {
            path: root.to_path_buf(),
            why: e.to_string(),
        }
    } else {
        SnapshotError::Io { context, source: e }
    }
}

/// Clears what a running operation set on its index entry, on every way out.
struct Hold {
    inner: Arc<Inner>,
    id: String,
    kind: HoldKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HoldKind {
    /// A create: a reserved entry without meta is dropped.
    Create,
    /// Persist or delete: the busy mark is cleared.
    Busy,
    /// A restore: the count goes down.
    Restore,
    /// Nothing: the entry outlives the hold (see [`Hold::keep`]).
    Kept,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut index = self.inner.index();
        let Some(e) = index.get_mut(&self.id) else {
            return;
        };
        match self.kind {
            HoldKind::Create if e.meta.is_none() => {
                index.remove(&self.id);
            }
            HoldKind::Create | HoldKind::Busy => e.busy = None,
            HoldKind::Restore => e.restores = e.restores.saturating_sub(1),
            HoldKind::Kept => {}
        }
    }
}

impl Hold {
    /// Leaves the entry as it is when this hold goes (a pending snapshot
    /// keeps its reservation until `seal` or `abort`).
    fn keep(mut self) {
        self.kind = HoldKind::Kept;
    }
}

/// A copy of a pending snapshot's description for a blocking task (the
/// caller keeps the original).
fn shallow(p: &PendingSnapshot) -> PendingSnapshot {
    PendingSnapshot {
        new: p.new.clone(),
        tier: p.tier,
        dir: p.dir.clone(),
        disk: p.disk.clone(),
        files: p.files.clone(),
        memory_in_state: p.memory_in_state,
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T, F>(f: F) -> Result<T, SnapshotError>
where
    F: FnOnce() -> Result<T, SnapshotError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::Io {
            context: "snapshot task failed".into(),
            source: io::Error::other(e.to_string()),
        })?
}

#[async_trait]
impl SnapshotStore for TieredStore {
    async fn begin(&self, new: NewSnapshot) -> Result<PendingSnapshot, SnapshotError> {
        let inner = self.inner.clone();
        blocking(move || pending::begin(&inner, new)).await
    }

    async fn copy_disk(&self, pending: &PendingSnapshot) -> Result<(), SnapshotError> {
        let inner = self.inner.clone();
        let (src, dst) = (pending.new.source.clone(), pending.disk.clone());
        let p = shallow(pending);
        blocking(move || pending::copy_in(&inner, &p, &src, &dst)).await
    }

    async fn copy_memory(
        &self,
        pending: &PendingSnapshot,
        source: &Path,
    ) -> Result<(), SnapshotError> {
        let inner = self.inner.clone();
        let (src, dst) = (source.to_path_buf(), pending.files.memory.clone());
        let p = shallow(pending);
        blocking(move || pending::copy_in(&inner, &p, &src, &dst)).await
    }

    async fn seal(&self, pending: PendingSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        pending::check_pending(&self.inner, &pending)?;
        let hold = pending::hold_for(&self.inner, &pending);
        blocking(move || pending::seal(pending, hold)).await
    }

    async fn abort(&self, pending: PendingSnapshot) {
        if let Err(e) = pending::check_pending(&self.inner, &pending) {
            tracing::warn!("not aborting: {e}");
            return;
        }
        let hold = pending::hold_for(&self.inner, &pending);
        let dir = pending.dir.clone();
        let _ = blocking(move || {
            pending::remove_partial(&dir);
            drop(hold);
            Ok(())
        })
        .await;
        tracing::info!("snapshot {} aborted", pending.new.snapshot_id);
    }

    async fn open_full(
        &self,
        snapshot_id: &str,
        disk_dest: &Path,
    ) -> Result<FullSnapshotFiles, SnapshotError> {
        let started = open_full::start(&self.inner, snapshot_id)?;
        let dest = disk_dest.to_path_buf();
        blocking(move || open_full::run(started, &dest)).await
    }

    async fn init(&self) -> Result<Cleanup, SnapshotError> {
        let inner = self.inner.clone();
        blocking(move || init::run(&inner)).await
    }

    async fn create(&self, new: NewSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let hold = create::reserve(&self.inner, &new.snapshot_id)?;
        blocking(move || create::run(&new, hold)).await
    }

    fn list(&self) -> Vec<SnapshotInfo> {
        self.inner
            .index()
            .values()
            .filter_map(|e| e.meta.as_ref().map(SnapshotMeta::to_info))
            .collect()
    }

    fn get(&self, snapshot_id: &str) -> Result<SnapshotInfo, SnapshotError> {
        self.inner
            .index()
            .get(snapshot_id)
            .and_then(|e| e.meta.as_ref())
            .map(SnapshotMeta::to_info)
            .ok_or_else(|| SnapshotError::NotFound(snapshot_id.to_string()))
    }

    async fn persist(
        &self,
        snapshot_id: &str,
        keep_tmpfs: bool,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let (meta, hold) = match persist::start(&self.inner, snapshot_id)? {
            persist::Start::AlreadyDurable(info) => return Ok(*info),
            persist::Start::Copy(meta, hold) => (meta, hold),
        };
        blocking(move || persist::run(*meta, keep_tmpfs, hold)).await
    }

    async fn restore(&self, snapshot_id: &str, dest: &Path) -> Result<SnapshotInfo, SnapshotError> {
        let started = restore::start(&self.inner, snapshot_id)?;
        let dest = dest.to_path_buf();
        blocking(move || restore::run(started, &dest)).await
    }

    async fn delete(&self, snapshot_id: &str) -> Result<(), SnapshotError> {
        let hold = delete::start(&self.inner, snapshot_id)?;
        blocking(move || delete::run(hold)).await
    }

    fn set_failpoints(&self, failpoints: Arc<agentenv_core::failpoints::Failpoints>) {
        let _ = self.inner.failpoints.set(failpoints);
    }
}

#[cfg(test)]
mod tests;
