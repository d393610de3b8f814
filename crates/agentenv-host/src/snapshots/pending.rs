//! Snapshots made in steps, so the VM is paused only for the copies:
//! `begin` (tier, `.partial-*` directory) → `copy_disk` / `copy_memory` (and
//! the VMM's own files) while the VM is paused → `seal` once it runs again
//! (checksums, record, rename into place), or `abort`.
//!
//! The reserved index entry (not listed, busy "being created") stands in
//! for the snapshot between `begin` and `seal`/`abort`.

use std::path::Path;
use std::sync::Arc;

use agentenv_api::{BackendKind, SnapshotKind, SnapshotStatus, SnapshotTier};
use agentenv_core::backend::FullSnapshotFiles;
use agentenv_core::snapshot::{NewSnapshot, PendingSnapshot, SnapshotError};
use chrono::Utc;

use super::create::{classify, reserve, tmpfs_room, CopyError};
use super::meta::{
    FullRecord, MemoryRecord, SnapshotMeta, SCHEMA_VERSION, STATE_CHECKSUM_ALGORITHM,
};
use super::quick::{sha256_file, QuickCheck};
use super::{io_err, Hold, HoldKind, Inner, DISK_FILE, MEMORY_FILE, PARTIAL_PREFIX, STATE_FILE};
use crate::disk;

const MIB: u64 = 1 << 20;

/// The bytes a snapshot of `new` needs in a tier, and the disk's part.
pub(super) fn needed_bytes(inner: &Inner, new: &NewSnapshot) -> Result<(u64, u64), SnapshotError> {
    let src = std::fs::File::open(&new.source)
        .and_then(|f| f.metadata())
        .map_err(io_err(format!("cannot read {}", new.source.display())))?;
    let allocated = src
        .len()
        .min(disk::allocated_bytes(&new.source).unwrap_or(src.len()));
    let memory = new
        .full
        .as_ref()
        .map_or(0, |f| f.memory_mib.saturating_mul(MIB));
    Ok((
        allocated
            .saturating_add(memory)
            .saturating_add(inner.overhead_bytes),
        allocated,
    ))
}

/// Neither tier holds a directory under the id.
pub(super) fn check_free_id(inner: &Inner, id: &str) -> Result<(), SnapshotError> {
    for tier in [SnapshotTier::Tmpfs, SnapshotTier::Durable] {
        let dir = inner.dir(tier, id)?;
        if dir.exists() {
            return Err(SnapshotError::Exists(format!(
                "{id} (at {})",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Makes a `.partial-*` directory in `tier`.
pub(super) fn make_partial(
    inner: &Inner,
    tier: SnapshotTier,
    id: &str,
) -> Result<std::path::PathBuf, CopyError> {
    let partial = inner.partial_dir(tier, id)?;
    crate::private::create_dir(&partial).map_err(|e| {
        classify(
            inner.root(tier),
            format!("cannot create {}", partial.display()),
            e,
        )
    })?;
    Ok(partial)
}

pub(super) fn begin(
    inner: &Arc<Inner>,
    new: NewSnapshot,
) -> Result<PendingSnapshot, SnapshotError> {
    let id = new.snapshot_id.clone();
    let hold = reserve(inner, &id)?;
    check_free_id(inner, &id)?;
    let (need, _) = needed_bytes(inner, &new)?;
    let tier = match tmpfs_room(inner, need) {
        Ok(()) => SnapshotTier::Tmpfs,
        Err(why) => {
            tracing::info!("snapshot {id} goes to the durable tier: {why}");
            inner.durable_ready()?;
            if new.full.is_some() {
                // The VMM writes into the chosen tier: no fallback once it
                // has, so refuse now rather than mid-snapshot.
                let free = disk::free_bytes(&inner.durable_root).unwrap_or(u64::MAX);
                if free < need {
                    return Err(SnapshotError::NoSpace {
                        id,
                        why: format!(
                            "needs about {need} bytes; {why}; durable tier {} has {free} bytes free",
                            inner.durable_root.display()
                        ),
                    });
                }
            }
            SnapshotTier::Durable
        }
    };
    let dir = make_partial(inner, tier, &id).map_err(|e| e.into_error(&id))?;
    // A QEMU guest's RAM is copied while it is stopped: the memory file is
    // allocated now, before the pause, so that the copy only fills pages
    // (Firecracker writes its memory file itself).
    if let (Some(full), BackendKind::Qemu) = (&new.full, new.backend) {
        let memory = dir.join(MEMORY_FILE);
        if let Err(e) = disk::preallocate(&memory, full.memory_mib << 20) {
            remove_partial(&dir);
            return Err(classify(inner.root(tier), String::new(), e).into_error(&id));
        }
    }
    hold.keep();
    Ok(PendingSnapshot {
        disk: dir.join(DISK_FILE),
        files: FullSnapshotFiles {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
        },
        dir,
        tier,
        new,
        memory_in_state: false,
    })
}

/// Refuses a pending snapshot this store did not begin (or already ended),
/// before any of its paths is written or removed.
pub(super) fn check_pending(inner: &Inner, p: &PendingSnapshot) -> Result<(), SnapshotError> {
    let id = &p.new.snapshot_id;
    let ours = p.dir.parent() == Some(inner.root(p.tier))
        && p.dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{PARTIAL_PREFIX}{id}-")))
        && p.disk == p.dir.join(DISK_FILE)
        && p.files.state == p.dir.join(STATE_FILE)
        && p.files.memory == p.dir.join(MEMORY_FILE)
        && inner
            .index()
            .get(id)
            .is_some_and(|e| e.meta.is_none() && e.busy == Some("being created"));
    if ours {
        Ok(())
    } else {
        Err(SnapshotError::Io {
            context: format!(
                "snapshot {id}: {} is not a pending snapshot",
                p.dir.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })
    }
}

/// Copies `src` into a pending snapshot's `dst`, sparse, no hash.
pub(super) fn copy_in(
    inner: &Inner,
    p: &PendingSnapshot,
    src: &Path,
    dst: &Path,
) -> Result<(), SnapshotError> {
    check_pending(inner, p)?;
    let id = &p.new.snapshot_id;
    // Over a file `begin` allocated (a QEMU guest's memory), else a new one.
    let copied = if dst.exists() {
        disk::copy_sparse_over(src, dst)
    } else {
        disk::copy_sparse(src, dst)
    };
    let stats = copied.map_err(|e| {
        classify(
            inner.root(p.tier),
            format!("cannot copy {}", src.display()),
            e,
        )
        .into_error(id)
    })?;
    tracing::debug!(
        "snapshot {id}: {} of {} bytes of {} by {}",
        stats.bytes_copied,
        stats.logical_bytes,
        src.display(),
        stats.method.as_str()
    );
    Ok(())
}

/// A hold that removes the reserved entry unless the snapshot got its record.
pub(super) fn hold_for(inner: &Arc<Inner>, p: &PendingSnapshot) -> Hold {
    Hold {
        inner: inner.clone(),
        id: p.new.snapshot_id.clone(),
        kind: HoldKind::Create,
    }
}

pub(super) fn seal(
    pending: PendingSnapshot,
    hold: Hold,
) -> Result<agentenv_api::SnapshotInfo, SnapshotError> {
    let inner = &*hold.inner;
    let id = pending.new.snapshot_id.clone();
    let result = finish(
        inner,
        pending.tier,
        &pending.new,
        &pending.dir,
        None,
        pending.memory_in_state,
    );
    match result {
        Ok(meta) => Ok(super::create::publish(inner, meta)),
        Err(e) => {
            remove_partial(&pending.dir);
            Err(e.into_error(&id))
        }
    }
}

pub(super) fn remove_partial(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Completes a partial directory holding the copied files: flushes them,
/// computes what the record needs (the disk's checksum unless the copy
/// computed it: `disk_sha256`), writes the record and renames the directory
/// into place. The caller removes the directory on error.
pub(super) fn finish(
    inner: &Inner,
    tier: SnapshotTier,
    new: &NewSnapshot,
    partial: &Path,
    disk_sha256: Option<String>,
    memory_in_state: bool,
) -> Result<SnapshotMeta, CopyError> {
    let root = inner.root(tier);
    let tmp_disk = partial.join(DISK_FILE);
    let fail = |e: std::io::Error| classify(root, String::new(), e);
    disk::sync_file(&tmp_disk).map_err(fail)?;
    let logical = std::fs::metadata(&tmp_disk)
        .map_err(|e| classify(root, format!("cannot stat {}", tmp_disk.display()), e))?
        .len();
    let allocated = disk::allocated_bytes(&tmp_disk).map_err(fail)?;
    let sha256 = match disk_sha256 {
        Some(s) => s,
        None => disk::sparse_sha256(&tmp_disk).map_err(fail)?,
    };
    let full = match &new.full {
        None => None,
        Some(info) => Some(full_record(tier, info, partial, memory_in_state).map_err(fail)?),
    };
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
        logical_bytes: logical,
        allocated_bytes: allocated,
        checksum_algorithm: disk::CHECKSUM_ALGORITHM.to_string(),
        sha256,
        created_at: Utc::now(),
        persisted_at,
        fs_frozen: new.fs_frozen,
        kind: if full.is_some() {
            SnapshotKind::Full
        } else {
            SnapshotKind::Disk
        },
        rootfs_fingerprint: new.rootfs_fingerprint.clone(),
        full,
        owner: new.owner.clone(),
    };
    match inner.write_meta(partial, &meta) {
        Ok(()) => {}
        Err(SnapshotError::Io { context, source }) => return Err(classify(root, context, source)),
        Err(e) => return Err(e.into()),
    }
    inner.failpoint("snapshot_store.recorded")?;
    disk::rename_durably(partial, &final_dir, root).map_err(fail)?;
    tracing::info!(
        "snapshot {} ({:?}) of vm {}: {:?} tier, disk {} bytes ({} allocated)",
        meta.snapshot_id,
        meta.kind,
        meta.vm_id,
        tier,
        meta.logical_bytes,
        meta.allocated_bytes,
    );
    Ok(meta)
}

/// The checks of a full snapshot's state and memory files in `partial`.
fn full_record(
    tier: SnapshotTier,
    info: &agentenv_api::FullSnapshotInfo,
    partial: &Path,
    memory_in_state: bool,
) -> std::io::Result<FullRecord> {
    let state = partial.join(STATE_FILE);
    let memory_path = partial.join(MEMORY_FILE);
    disk::sync_file(&state)?;
    let mut info = info.clone();
    info.state_bytes = std::fs::metadata(&state)?.len();
    let state_sha256 = sha256_file(&state)?;
    let memory = if memory_in_state {
        if memory_path.exists() {
            std::fs::remove_file(&memory_path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot remove {}: {e}", memory_path.display()),
                )
            })?;
        }
        info.memory_bytes = 0;
        None
    } else {
        disk::sync_file(&memory_path)?;
        let sha256 = disk::sparse_sha256(&memory_path)?;
        let quick = QuickCheck::of(&memory_path, tier)?;
        info.memory_bytes = quick.size;
        Some(MemoryRecord { sha256, quick })
    };
    Ok(FullRecord {
        info,
        state_checksum_algorithm: STATE_CHECKSUM_ALGORITHM.into(),
        state_sha256,
        memory,
    })
}
