//! `restore`: copy a snapshot's disk to a new VM's writable disk, checking
//! the checksum on the way.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_api::{SnapshotInfo, SnapshotStatus, SnapshotTier};
use agentenv_core::snapshot::SnapshotError;

use super::meta::SnapshotMeta;
use super::{io_err, Hold, HoldKind, Inner, DISK_FILE};
use crate::disk::{self, CopyOptions};

/// A restore under way: the record it started from and the copies, opened
/// while the index was locked, fastest first.
pub(super) struct Started {
    meta: SnapshotMeta,
    copies: Vec<(SnapshotTier, PathBuf, File)>,
    hold: Hold,
}

pub(super) fn start(inner: &Arc<Inner>, id: &str) -> Result<Started, SnapshotError> {
    let mut index = inner.index();
    let e = index
        .get_mut(id)
        .filter(|e| e.meta.is_some())
        .ok_or_else(|| SnapshotError::NotFound(id.to_string()))?;
    if e.busy == Some("being deleted") {
        return Err(SnapshotError::Busy {
            id: id.to_string(),
            why: "being deleted".into(),
        });
    }
    let meta = e.meta.clone().expect("checked above");
    if meta.status == SnapshotStatus::Corrupt {
        return Err(SnapshotError::Corrupt {
            id: id.to_string(),
            why: "it was found corrupt earlier".into(),
        });
    }
    let mut copies = Vec::new();
    let mut last_err = None;
    for (tier, path) in [
        (SnapshotTier::Tmpfs, &meta.tmpfs_path),
        (SnapshotTier::Durable, &meta.durable_path),
    ] {
        if path.is_none() {
            continue;
        }
        // The path is rebuilt from the root, not taken from the record.
        let p = inner.dir(tier, id)?.join(DISK_FILE);
        match File::open(&p) {
            Ok(f) => copies.push((tier, p, f)),
            Err(err) => {
                tracing::warn!("snapshot {id}: cannot open {}: {err}", p.display());
                last_err = Some(io_err(format!("cannot open {}", p.display()))(err));
            }
        }
    }
    if copies.is_empty() {
        return Err(last_err.unwrap_or_else(|| SnapshotError::NotFound(id.to_string())));
    }
    e.restores += 1;
    Ok(Started {
        meta,
        copies,
        hold: Hold {
            inner: inner.clone(),
            id: id.to_string(),
            kind: HoldKind::Restore,
        },
    })
}

pub(super) fn run(started: Started, dest: &Path) -> Result<SnapshotInfo, SnapshotError> {
    let Started { meta, copies, hold } = started;
    let inner = &*hold.inner;
    #[cfg(test)]
    super::tests::pass_gate(inner);
    let id = &meta.snapshot_id;
    let mut mismatches = Vec::new();
    let n = copies.len();
    for (i, (tier, path, file)) in copies.into_iter().enumerate() {
        let (stats, sum) = disk::copy_sparse_from(&file, &path, dest, CopyOptions::COPY_AND_HASH)
            .map_err(|e| {
            if disk::is_no_space(&e) {
                SnapshotError::NoSpace {
                    id: id.clone(),
                    why: format!("cannot restore to {}: {e}", dest.display()),
                }
            } else {
                io_err(format!(
                    "cannot restore snapshot {id} to {}",
                    dest.display()
                ))(e)
            }
        })?;
        let sum = sum.unwrap_or_default();
        if sum == meta.sha256 {
            tracing::info!(
                "snapshot {id} restored to {} from {} by {} ({} bytes written)",
                dest.display(),
                path.display(),
                stats.method.as_str(),
                stats.bytes_copied
            );
            if !mismatches.is_empty() {
                drop_bad_tmpfs_copy(inner, id);
            }
            let current = inner.index().get(id).and_then(|e| e.meta.clone());
            return Ok(current.unwrap_or(meta).to_info());
        }
        let _ = std::fs::remove_file(dest);
        let why = format!(
            "{} has sha256 {sum}, recorded {}",
            path.display(),
            meta.sha256
        );
        tracing::warn!("snapshot {id}: {why}");
        mismatches.push(why);
        if i + 1 < n {
            tracing::warn!("snapshot {id}: the {tier:?} copy is bad, trying the next copy");
        }
    }
    let why = mismatches.join("; ");
    mark_corrupt(inner, id, &why);
    Err(SnapshotError::Corrupt {
        id: id.clone(),
        why,
    })
}

/// The tmpfs copy failed its check but the durable one passed: drop the
/// tmpfs copy so the next restore reads the good one.
fn drop_bad_tmpfs_copy(inner: &Inner, id: &str) {
    let meta = {
        let mut index = inner.index();
        let Some(m) = index.get_mut(id).and_then(|e| e.meta.as_mut()) else {
            return;
        };
        m.tmpfs_path = None;
        m.clone()
    };
    if let Err(e) = inner.write_meta_everywhere(&meta) {
        tracing::warn!("snapshot {id}: cannot update its record: {e}");
    }
    if let Err(e) = inner.remove_copy(SnapshotTier::Tmpfs, id) {
        tracing::warn!("snapshot {id}: cannot remove the bad tmpfs copy: {e}");
    }
}

/// Records that every copy of a snapshot failed its check, in the index and
/// in each copy's `meta.json`.
pub(super) fn mark_corrupt(inner: &Inner, id: &str, why: &str) {
    tracing::error!("snapshot {id} is corrupt: {why}");
    let meta = {
        let mut index = inner.index();
        let Some(m) = index.get_mut(id).and_then(|e| e.meta.as_mut()) else {
            return;
        };
        m.status = SnapshotStatus::Corrupt;
        m.clone()
    };
    if let Err(e) = inner.write_meta_everywhere(&meta) {
        tracing::warn!("snapshot {id}: cannot record that it is corrupt: {e}");
    }
}
