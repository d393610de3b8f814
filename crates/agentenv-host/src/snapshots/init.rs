//! `init`: load complete snapshots, remove what a crash left half made.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use agentenv_api::{SnapshotStatus, SnapshotTier};
use agentenv_core::snapshot::{Cleanup, SnapshotError};

use super::meta::SnapshotMeta;
use super::{io_err, Entry, Inner, DISK_FILE, META_FILE, PARTIAL_PREFIX};

/// A complete copy found in a tier.
struct Found {
    tier: SnapshotTier,
    disk: PathBuf,
    meta: SnapshotMeta,
}

pub(super) fn run(inner: &Inner) -> Result<Cleanup, SnapshotError> {
    let mut cleanup = Cleanup::default();
    let mut found: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for tier in [SnapshotTier::Tmpfs, SnapshotTier::Durable] {
        scan(inner.root(tier), tier, &mut found, &mut cleanup)?;
    }
    let mut index = BTreeMap::new();
    for (id, copies) in found {
        let meta = merge(copies);
        tracing::debug!("snapshot {id}: {:?} tier", meta.tier);
        index.insert(
            id,
            Entry {
                meta: Some(meta),
                ..Entry::default()
            },
        );
    }
    let mut current = inner.index();
    // Keep operations that started before this init (there should be none).
    for (id, e) in current.iter_mut() {
        if e.busy.is_some() || e.restores > 0 {
            if let Some(fresh) = index.remove(id) {
                e.meta = fresh.meta.or(e.meta.take());
            }
        }
    }
    current.retain(|_, e| e.busy.is_some() || e.restores > 0);
    current.extend(index);
    Ok(cleanup)
}

/// The merged record of a snapshot's copies.
fn merge(copies: Vec<Found>) -> SnapshotMeta {
    let corrupt = copies
        .iter()
        .any(|c| c.meta.status == SnapshotStatus::Corrupt);
    let tmpfs = copies.iter().find(|c| c.tier == SnapshotTier::Tmpfs);
    let durable = copies.iter().find(|c| c.tier == SnapshotTier::Durable);
    let base = durable.or(tmpfs).expect("at least one copy");
    let mut meta = base.meta.clone();
    meta.tmpfs_path = tmpfs.map(|c| c.disk.display().to_string());
    meta.durable_path = durable.map(|c| c.disk.display().to_string());
    meta.tier = if durable.is_some() {
        SnapshotTier::Durable
    } else {
        SnapshotTier::Tmpfs
    };
    if durable.is_none() {
        meta.persisted_at = None;
    }
    if corrupt {
        meta.status = SnapshotStatus::Corrupt;
    }
    // Each copy's memory file has its own mtime; its own record has it.
    if let Some(m) = meta.full.as_mut().and_then(|f| f.memory.as_mut()) {
        for c in [tmpfs, durable].into_iter().flatten() {
            let own = c.meta.full.as_ref().and_then(|f| f.memory.as_ref());
            if let Some(t) = own.and_then(|o| o.quick.mtime_ns.get(c.tier)) {
                m.quick.mtime_ns.set(c.tier, Some(t));
            }
        }
    }
    meta
}

fn scan(
    root: &Path,
    tier: SnapshotTier,
    found: &mut BTreeMap<String, Vec<Found>>,
    cleanup: &mut Cleanup,
) -> Result<(), SnapshotError> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!("snapshot tier {} does not exist yet", root.display());
            return Ok(());
        }
        Err(e) => return Err(io_err(format!("cannot list {}", root.display()))(e)),
    };
    for ent in rd {
        let ent = ent.map_err(io_err(format!("cannot list {}", root.display())))?;
        let path = ent.path();
        let Ok(name) = ent.file_name().into_string() else {
            tracing::warn!("ignoring {}: not a snapshot id", path.display());
            continue;
        };
        if name.starts_with(PARTIAL_PREFIX) {
            tracing::warn!("removing {}: left half made by a crash", path.display());
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(io_err(format!("cannot remove {}", path.display())))?;
            cleanup.removed.push(path);
            continue;
        }
        if agentenv_core::ids::validate_id("snapshot_id", &name).is_err() || !path.is_dir() {
            tracing::warn!("ignoring {}: not a snapshot directory", path.display());
            continue;
        }
        remove_meta_temps(&path, cleanup)?;
        let meta_path = path.join(META_FILE);
        let disk = path.join(DISK_FILE);
        if !meta_path.exists() {
            tracing::warn!(
                "ignoring {}: no {META_FILE}, so not a complete snapshot (left in place)",
                path.display()
            );
            continue;
        }
        let meta = match SnapshotMeta::load(&meta_path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("ignoring snapshot {}: {e}", path.display());
                continue;
            }
        };
        if meta.snapshot_id != name {
            tracing::warn!(
                "ignoring {}: its {META_FILE} names snapshot {:?}",
                path.display(),
                meta.snapshot_id
            );
            continue;
        }
        if let Some(missing) = meta.files().into_iter().find(|f| !path.join(f).is_file()) {
            tracing::warn!("ignoring snapshot {}: {missing} is missing", path.display());
            continue;
        }
        found
            .entry(name)
            .or_default()
            .push(Found { tier, disk, meta });
    }
    Ok(())
}

/// Removes the temp files of an interrupted `meta.json` write.
fn remove_meta_temps(dir: &Path, cleanup: &mut Cleanup) -> Result<(), SnapshotError> {
    let prefix = format!(".{META_FILE}.tmp.");
    let rd = std::fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))?;
    for ent in rd.flatten() {
        if ent.file_name().to_string_lossy().starts_with(&prefix) {
            let p = ent.path();
            tracing::warn!("removing {}: left by an interrupted write", p.display());
            std::fs::remove_file(&p).map_err(io_err(format!("cannot remove {}", p.display())))?;
            cleanup.removed.push(p);
        }
    }
    Ok(())
}
