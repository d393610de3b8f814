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

/// A restore under way: the record it started from and the copies' files,
/// opened while the index was locked, fastest copy first.
pub(super) struct Started {
    pub(super) meta: SnapshotMeta,
    pub(super) copies: Vec<Copy>,
    pub(super) hold: Hold,
}

/// One tier's copy, its files open in the order they were asked for (the
/// disk first).
pub(super) struct Copy {
    pub(super) tier: SnapshotTier,
    pub(super) files: Vec<(PathBuf, File)>,
}

pub(super) fn start(inner: &Arc<Inner>, id: &str) -> Result<Started, SnapshotError> {
    start_with(inner, id, |_| Ok(vec![DISK_FILE]))
}

/// Opens the files `names` gives for the snapshot (the disk first) in each
/// of its copies and counts a restore, which blocks `delete`.
pub(super) fn start_with(
    inner: &Arc<Inner>,
    id: &str,
    names: impl FnOnce(&SnapshotMeta) -> Result<Vec<&'static str>, SnapshotError>,
) -> Result<Started, SnapshotError> {
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
    let names = names(&meta)?;
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
        // The paths are rebuilt from the root, not taken from the record.
        let dir = inner.dir(tier, id)?;
        let opened: Result<Vec<_>, _> = names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                File::open(&p).map(|f| (p.clone(), f)).map_err(|err| {
                    tracing::warn!("snapshot {id}: cannot open {}: {err}", p.display());
                    io_err(format!("cannot open {}", p.display()))(err)
                })
            })
            .collect();
        match opened {
            Ok(files) => copies.push(Copy { tier, files }),
            Err(err) => last_err = Some(err),
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
    run_with(started, dest, |_| Ok(Ok(()))).map(|(info, _)| info)
}

/// Copies the disk of the first copy that passes `check` (its other files,
/// `Ok(Err(why))` when they do not match) and whose disk matches its
/// checksum while it is copied to `dest`. A bad tmpfs copy is dropped when
/// a later one is good; when all are bad the snapshot is marked corrupt and
/// nothing is left at `dest`. Returns the paths of the files of the copy
/// used.
pub(super) fn run_with(
    started: Started,
    dest: &Path,
    check: impl Fn(&Copy) -> Result<Result<(), String>, SnapshotError>,
) -> Result<(SnapshotInfo, Vec<PathBuf>), SnapshotError> {
    let Started { meta, copies, hold } = started;
    let inner = &*hold.inner;
    #[cfg(test)]
    super::tests::pass_gate(inner);
    let id = &meta.snapshot_id;
    let mut mismatches = Vec::new();
    let n = copies.len();
    for (i, copy) in copies.iter().enumerate() {
        let tier = copy.tier;
        let verdict = match check(copy)? {
            Err(why) => Err(why),
            Ok(()) => copy_disk_checked(&meta, &copy.files[0], dest)?,
        };
        match verdict {
            Ok(()) => {
                if !mismatches.is_empty() {
                    drop_bad_tmpfs_copy(inner, id);
                }
                let current = inner.index().get(id).and_then(|e| e.meta.clone());
                let paths = copy.files.iter().map(|(p, _)| p.clone()).collect();
                return Ok((current.unwrap_or(meta).to_info(), paths));
            }
            Err(why) => {
                tracing::warn!("snapshot {id}: {why}");
                mismatches.push(why);
                if i + 1 < n {
                    tracing::warn!("snapshot {id}: the {tier:?} copy is bad, trying the next copy");
                }
            }
        }
    }
    let why = mismatches.join("; ");
    mark_corrupt(inner, id, &why);
    Err(SnapshotError::Corrupt {
        id: id.clone(),
        why,
    })
}

/// Copies one copy's disk to `dest`, checking its checksum on the way;
/// `Ok(Err(why))` (and `dest` removed) on a mismatch.
fn copy_disk_checked(
    meta: &SnapshotMeta,
    (path, file): &(PathBuf, File),
    dest: &Path,
) -> Result<Result<(), String>, SnapshotError> {
    let id = &meta.snapshot_id;
    let (stats, sum) = disk::copy_sparse_from(file, path, dest, CopyOptions::COPY_AND_HASH)
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
        return Ok(Ok(()));
    }
    let _ = std::fs::remove_file(dest);
    Ok(Err(format!(
        "{} has sha256 {sum}, recorded {}",
        path.display(),
        meta.sha256
    )))
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
