//! `create`: copy a paused VM's disk into the tmpfs tier when it fits, else
//! into the durable tier.

use std::path::Path;
use std::sync::Arc;

use agentenv_api::{SnapshotInfo, SnapshotTier};
use agentenv_core::snapshot::{NewSnapshot, SnapshotError};

use super::meta::SnapshotMeta;
use super::pending::{check_free_id, finish, make_partial, needed_bytes, remove_partial};
use super::{tier_error, Entry, Hold, HoldKind, Inner, DISK_FILE};
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
    check_free_id(inner, id)?;
    // Reading the source first keeps its errors apart from the tiers'.
    let (need, allocated) = needed_bytes(inner, new)?;

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

/// The tmpfs tier can take `need` bytes, or why not.
pub(super) fn tmpfs_room(inner: &Inner, need: u64) -> Result<(), String> {
    let root = &inner.tmpfs_root;
    let free = disk::free_bytes(root).map_err(|e| format!("tmpfs tier unusable: {e}"))?;
    if free < need {
        return Err(format!(
            "tmpfs tier {} has {free} bytes free, needs {need} (allocated bytes of the disk, the guest memory of a full snapshot, {} overhead)",
            root.display(),
            inner.overhead_bytes
        ));
    }
    super::writable_dir(root).map_err(|e| e.to_string())
}

fn try_tmpfs(inner: &Inner, new: &NewSnapshot, need: u64) -> Result<TmpfsOutcome, SnapshotError> {
    if let Err(why) = tmpfs_room(inner, need) {
        return Ok(TmpfsOutcome::Skipped(why));
    }
    let root = &inner.tmpfs_root;
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

pub(super) enum CopyError {
    /// The tier filled up.
    NoSpace(String),
    Other(SnapshotError),
}

impl From<SnapshotError> for CopyError {
    fn from(e: SnapshotError) -> Self {
        CopyError::Other(e)
    }
}

impl CopyError {
    /// The error of a snapshot step that has no other tier to try.
    pub(super) fn into_error(self, id: &str) -> SnapshotError {
        match self {
            CopyError::NoSpace(why) => SnapshotError::NoSpace {
                id: id.to_string(),
                why,
            },
            CopyError::Other(e) => e,
        }
    }
}

/// Copies the disk into a `.partial-*` directory of `tier`, hashing it on
/// the way, and finishes the snapshot there. Leaves nothing on failure.
fn copy_into(
    inner: &Inner,
    tier: SnapshotTier,
    new: &NewSnapshot,
) -> Result<SnapshotMeta, CopyError> {
    let partial = make_partial(inner, tier, &new.snapshot_id)?;
    let result = disk::copy_sparse_hashed(&new.source, &partial.join(DISK_FILE))
        .map_err(|e| {
            classify(
                inner.root(tier),
                format!("cannot copy {}", new.source.display()),
                e,
            )
        })
        .and_then(|(stats, sha256)| {
            tracing::debug!(
                "snapshot {}: {} of {} bytes by {}",
                new.snapshot_id,
                stats.bytes_copied,
                stats.logical_bytes,
                stats.method.as_str()
            );
            finish(inner, tier, new, &partial, Some(sha256), false)
        });
    if result.is_err() {
        remove_partial(&partial);
    }
    result
}

/// Sorts an error in a tier: full, unusable, or other.
pub(super) fn classify(root: &Path, context: String, e: std::io::Error) -> CopyError {
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
pub(super) fn publish(inner: &Inner, meta: SnapshotMeta) -> SnapshotInfo {
    let info = meta.to_info();
    let mut index = inner.index();
    let e = index.entry(meta.snapshot_id.clone()).or_default();
    e.meta = Some(meta);
    e.busy = None;
    info
}
