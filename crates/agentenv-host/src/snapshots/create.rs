//! `create`: copy a paused VM's disk into the tmpfs tier when it fits, else
//! into the durable tier.

use std::path::Path;
use std::sync::Arc;

use agentenv_api::{SnapshotInfo, SnapshotStatus, SnapshotTier};
use agentenv_core::snapshot::{NewSnapshot, SnapshotError};
use chrono::Utc;

use super::meta::{SnapshotMeta, SCHEMA_VERSION};
use super::{io_err, tier_error, Entry, Hold, HoldKind, Inner, DISK_FILE};
use crate::disk;

/// Reserves the id in the index (not listed until complete).
pub(super) fn reserve(inner: &Arc<Inner>, id: &str) -> Result<Hold, SnapshotError> {
    for tier in [SnapshotTier::Tmpfs, SnapshotTier::Durable] {
        inner.dir(tier, id)?;
    }
    let mut index = inner.index();
    if index.contains_key(id) {
        return Err(SnapshotError::Exists(id.to_string()));
    }
    index.insert(
        id.to_string(),
        Entry {
            busy: Some("being created"),
            ..Entry::default()
        },
    );
    Ok(Hold {
        inner: inner.clone(),
        id: id.to_string(),
        kind: HoldKind::Create,
    })
}

/// Why the tmpfs tier was passed over, for the log and for `NoSpace`.
enum TmpfsOutcome {
    Done(Box<SnapshotMeta>),
    Skipped(String),
}

pub(super) fn run(new: &NewSnapshot, hold: Hold) -> Result<SnapshotInfo, SnapshotError> {
    let inner = &*hold.inner;
    let id = &new.snapshot_id;
    for tier in [SnapshotTier::Tmpfs, SnapshotTier::Durable] {
        let dir = inner.dir(tier, id)?;
        if dir.exists() {
            return Err(SnapshotError::Exists(format!(
                "{id} (at {})",
                dir.display()
            )));
        }
    }
    // Opening the source first keeps its errors apart from the tiers'.
    let src = std::fs::File::open(&new.source)
        .and_then(|f| f.metadata())
        .map_err(io_err(format!("cannot read {}", new.source.display())))?;
    let allocated = src
        .len()
        .min(disk::allocated_bytes(&new.source).unwrap_or(src.len()));
    let need = allocated.saturating_add(inner.overhead_bytes);

    let why_not_tmpfs = match try_tmpfs(inner, new, need)? {
        TmpfsOutcome::Done(meta) => return Ok(publish(inner, *meta)),
        TmpfsOutcome::Skipped(why) => why,
    };
    tracing::info!("snapshot {id} goes to the durable tier: {why_not_tmpfs}");
    inner.durable_ready()?;
    match copy_into(inner, SnapshotTier::Durable, new) {
        Ok(meta) => Ok(publish(inner, meta)),
        Err(CopyError::NoSpace(e)) => Err(SnapshotError::NoSpace {
            id: id.clone(),
            why: format!(
                "needs about {allocated} bytes; {why_not_tmpfs}; durable tier {}: {e}",
                inner.durable_root.display()
            ),
        }),
        Err(CopyError::Other(e)) => Err(e),
    }
}

fn try_tmpfs(inner: &Inner, new: &NewSnapshot, need: u64) -> Result<TmpfsOutcome, SnapshotError> {
    let root = &inner.tmpfs_root;
    let free = match disk::free_bytes(root) {
        Ok(f) => f,
        Err(e) => return Ok(TmpfsOutcome::Skipped(format!("tmpfs tier unusable: {e}"))),
    };
    if free < need {
        return Ok(TmpfsOutcome::Skipped(format!(
            "tmpfs tier {} has {free} bytes free, needs {need} (disk's allocated bytes + {} overhead)",
            root.display(),
            inner.overhead_bytes
        )));
    }
    if let Err(e) = super::writable_dir(root) {
        return Ok(TmpfsOutcome::Skipped(e.to_string()));
    }
    match copy_into(inner, SnapshotTier::Tmpfs, new) {
        Ok(meta) => Ok(TmpfsOutcome::Done(Box::new(meta))),
        Err(CopyError::NoSpace(e)) => {
            tracing::warn!(
                "snapshot {}: tmpfs tier filled up during the copy, falling back: {e}",
                new.snapshot_id
            );
            Ok(TmpfsOutcome::Skipped(format!(
                "tmpfs tier {} filled up during the copy ({e})",
                root.display()
            )))
        }
        Err(CopyError::Other(e @ SnapshotError::TierUnavailable { .. })) => {
            Ok(TmpfsOutcome::Skipped(e.to_string()))
        }
        Err(CopyError::Other(e)) => Err(e),
    }
}

enum CopyError {
    /// The tier filled up; nothing is left behind.
    NoSpace(String),
    Other(SnapshotError),
}

impl From<SnapshotError> for CopyError {
    fn from(e: SnapshotError) -> Self {
        CopyError::Other(e)
    }
}

/// Copies the disk into a `.partial-*` directory of `tier`, writes the
/// record, renames the directory into place. Leaves nothing on failure.
fn copy_into(
    inner: &Inner,
    tier: SnapshotTier,
    new: &NewSnapshot,
) -> Result<SnapshotMeta, CopyError> {
    let root = inner.root(tier);
    let partial = inner.partial_dir(tier, &new.snapshot_id)?;
    if let Err(e) = std::fs::create_dir(&partial) {
        return Err(classify(
            root,
            format!("cannot create {}", partial.display()),
            e,
        ));
    }
    let result = fill(inner, tier, new, &partial);
    if result.is_err() {
        if let Err(e) = std::fs::remove_dir_all(&partial) {
            tracing::warn!("cannot remove {}: {e}", partial.display());
        }
    }
    result
}

fn fill(
    inner: &Inner,
    tier: SnapshotTier,
    new: &NewSnapshot,
    partial: &Path,
) -> Result<SnapshotMeta, CopyError> {
    let root = inner.root(tier);
    let tmp_disk = partial.join(DISK_FILE);
    let (stats, sha256) = disk::copy_sparse_hashed(&new.source, &tmp_disk)
        .map_err(|e| classify(root, format!("cannot copy {}", new.source.display()), e))?;
    disk::sync_file(&tmp_disk).map_err(|e| classify(root, String::new(), e))?;
    let allocated =
        disk::allocated_bytes(&tmp_disk).map_err(|e| classify(root, String::new(), e))?;
    inner.failpoint("snapshot_store.copied")?;
    let final_dir = inner.dir(tier, &new.snapshot_id)?;
    let final_disk = final_dir.join(DISK_FILE).display().to_string();
    let (tmpfs_path, durable_path, persisted_at) = match tier {
        SnapshotTier::Tmpfs => (Some(final_disk), None, None),
        SnapshotTier::Durable => (None, Some(final_disk), Some(Utc::now())),
    };
    let meta = SnapshotMeta {
        schema_version: SCHEMA_VERSION,
        snapshot_id: new.snapshot_id.clone(),
        vm_id: new.vm_id.clone(),
        rootfs_id: new.rootfs_id.clone(),
        backend: new.backend,
        tier,
        status: SnapshotStatus::Ready,
        tmpfs_path,
        durable_path,
        logical_bytes: stats.logical_bytes,
        allocated_bytes: allocated,
        checksum_algorithm: disk::CHECKSUM_ALGORITHM.to_string(),
        sha256,
        created_at: Utc::now(),
        persisted_at,
        fs_frozen: new.fs_frozen,
    };
    match inner.write_meta(partial, &meta) {
        Ok(()) => {}
        Err(SnapshotError::Io { context, source }) => return Err(classify(root, context, source)),
        Err(e) => return Err(e.into()),
    }
    inner.failpoint("snapshot_store.recorded")?;
    std::fs::rename(partial, &final_dir).map_err(|e| {
        classify(
            root,
            format!(
                "cannot rename {} to {}",
                partial.display(),
                final_dir.display()
            ),
            e,
        )
    })?;
    disk::sync_dir(root).map_err(|e| classify(root, String::new(), e))?;
    tracing::info!(
        "snapshot {} of vm {}: {:?} tier, {} of {} bytes by {}",
        meta.snapshot_id,
        meta.vm_id,
        tier,
        stats.bytes_copied,
        stats.logical_bytes,
        stats.method.as_str()
    );
    Ok(meta)
}

/// Sorts an error in a tier: full, unusable, or other.
fn classify(root: &Path, context: String, e: std::io::Error) -> CopyError {
    if disk::is_no_space(&e) {
        return CopyError::NoSpace(e.to_string());
    }
    let context = if context.is_empty() {
        format!("snapshot tier {}", root.display())
    } else {
        context
    };
    CopyError::Other(tier_error(root, context, e))
}

/// Makes the snapshot visible.
fn publish(inner: &Inner, meta: SnapshotMeta) -> SnapshotInfo {
    let info = meta.to_info();
    let mut index = inner.index();
    let e = index.entry(meta.snapshot_id.clone()).or_default();
    e.meta = Some(meta);
    e.busy = None;
    info
}
