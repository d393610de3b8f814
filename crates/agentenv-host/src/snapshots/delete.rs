//! `delete`: remove a snapshot and all its copies.

use std::sync::Arc;

use agentenv_api::SnapshotTier;
use agentenv_core::snapshot::SnapshotError;

use super::{Hold, HoldKind, Inner};

pub(super) fn start(inner: &Arc<Inner>, id: &str) -> Result<Hold, SnapshotError> {
    let mut index = inner.index();
    let e = index
        .get_mut(id)
        .filter(|e| e.meta.is_some())
        .ok_or_else(|| SnapshotError::NotFound(id.to_string()))?;
    if e.restores > 0 {
        return Err(SnapshotError::Busy {
            id: id.to_string(),
            why: format!("{} restore(s) of it are running", e.restores),
        });
    }
    if let Some(why) = e.busy {
        return Err(SnapshotError::Busy {
            id: id.to_string(),
            why: why.to_string(),
        });
    }
    e.busy = Some("being deleted");
    Ok(Hold {
        inner: inner.clone(),
        id: id.to_string(),
        kind: HoldKind::Busy,
    })
}

pub(super) fn run(hold: Hold) -> Result<(), SnapshotError> {
    let inner = &*hold.inner;
    let id = hold.id.clone();
    // Durable first: if that fails the snapshot stays whole where it matters.
    for tier in [SnapshotTier::Durable, SnapshotTier::Tmpfs] {
        inner.remove_copy(tier, &id)?;
        if let Some(m) = inner.index().get_mut(&id).and_then(|e| e.meta.as_mut()) {
            match tier {
                SnapshotTier::Durable => {
                    m.durable_path = None;
                    m.tier = SnapshotTier::Tmpfs;
                }
                SnapshotTier::Tmpfs => m.tmpfs_path = None,
            }
        }
    }
    inner.index().remove(&id);
    tracing::info!("snapshot {id} deleted");
    Ok(())
}
