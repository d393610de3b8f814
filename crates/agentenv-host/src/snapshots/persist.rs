//! `persist`: copy a tmpfs snapshot to the durable tier, verified.

use std::path::Path;
use std::sync::Arc;

use agentenv_api::{SnapshotInfo, SnapshotStatus, SnapshotTier};
use agentenv_core::snapshot::SnapshotError;
use chrono::Utc;

use super::meta::SnapshotMeta;
use super::quick::sha256_file;
use super::{io_err, tier_error, Hold, HoldKind, Inner, DISK_FILE, MEMORY_FILE, STATE_FILE};
use crate::disk;

pub(super) enum Start {
    /// Nothing to do: the snapshot has a durable copy.
    AlreadyDurable(Box<SnapshotInfo>),
    /// Copy it; the snapshot is marked busy until the hold drops.
    Copy(Box<SnapshotMeta>, Hold),
}

pub(super) fn start(inner: &Arc<Inner>, id: &str) -> Result<Start, SnapshotError> {
    let mut index = inner.index();
    let e = index
        .get_mut(id)
        .filter(|e| e.meta.is_some())
        .ok_or_else(|| SnapshotError::NotFound(id.to_string()))?;
    let meta = e.meta.clone().expect("checked above");
    if meta.durable_path.is_some() {
        return Ok(Start::AlreadyDurable(Box::new(meta.to_info())));
    }
    if let Some(why) = e.busy {
        return Err(SnapshotError::Busy {
            id: id.to_string(),
            why: why.to_string(),
        });
    }
    if meta.status == SnapshotStatus::Corrupt {
        return Err(SnapshotError::Corrupt {
            id: id.to_string(),
            why: "it was found corrupt earlier".into(),
        });
    }
    e.busy = Some("being persisted");
    Ok(Start::Copy(
        Box::new(meta),
        Hold {
            inner: inner.clone(),
            id: id.to_string(),
            kind: HoldKind::Busy,
        },
    ))
}

pub(super) fn run(
    meta: SnapshotMeta,
    keep_tmpfs: bool,
    hold: Hold,
) -> Result<SnapshotInfo, SnapshotError> {
    let inner = &*hold.inner;
    let id = meta.snapshot_id.clone();
    inner.durable_ready()?;
    let root = &inner.durable_root;
    let src_dir = inner.dir(SnapshotTier::Tmpfs, &id)?;
    let final_dir = inner.dir(SnapshotTier::Durable, &id)?;
    if final_dir.exists() {
        return Err(SnapshotError::Exists(format!(
            "{id} (at {})",
            final_dir.display()
        )));
    }
    let partial = inner.partial_dir(SnapshotTier::Durable, &id)?;
    crate::private::create_dir(&partial)
        .map_err(|e| tier_error(root, format!("cannot create {}", partial.display()), e))?;
    let copied = copy_verified(inner, &meta, &src_dir, &partial);
    let mut new_meta = match copied {
        Ok(m) => m,
        Err(e) => {
            if let Err(re) = std::fs::remove_dir_all(&partial) {
                tracing::warn!("cannot remove {}: {re}", partial.display());
            }
            return Err(e);
        }
    };
    if let Err(e) = inner.failpoint("persist.copied") {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let durable_disk = final_dir.join(DISK_FILE).display().to_string();
    new_meta.durable_path = Some(durable_disk);
    if !keep_tmpfs {
        new_meta.tmpfs_path = None;
    }
    let publish = (|| {
        inner.write_meta(&partial, &new_meta)?;
        inner.failpoint("persist.recorded")?;
        disk::rename_durably(&partial, &final_dir, root)
            .map_err(|e| tier_error(root, format!("cannot persist snapshot {id}"), e))
    })();
    if let Err(e) = publish {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    // The durable copy is complete. Show it before touching the tmpfs copy,
    // so a restore that starts now reads the durable one.
    set_meta(inner, &new_meta);
    if keep_tmpfs {
        let tmpfs_dir = inner.dir(SnapshotTier::Tmpfs, &id)?;
        if let Err(e) = inner.write_meta(&tmpfs_dir, &new_meta) {
            // The durable record wins on load; this copy's record is stale.
            tracing::warn!("snapshot {id}: cannot update the tmpfs record: {e}");
        }
    } else if let Err(e) = inner.remove_copy(SnapshotTier::Tmpfs, &id) {
        tracing::warn!("snapshot {id}: persisted, but the tmpfs copy stays: {e}");
        new_meta.tmpfs_path = Some(src_dir.join(DISK_FILE).display().to_string());
        set_meta(inner, &new_meta);
    }
    tracing::info!("snapshot {id} persisted to {}", root.display());
    Ok(new_meta.to_info())
}

fn set_meta(inner: &Inner, meta: &SnapshotMeta) {
    if let Some(e) = inner.index().get_mut(&meta.snapshot_id) {
        e.meta = Some(meta.clone());
    }
}

/// Copies the tmpfs copy's files into `partial`, flushes them and checks
/// the durable copies against the record (every byte, memory included).
/// On a mismatch, checks the tmpfs file to tell a bad source (corrupt
/// snapshot) from a bad write.
fn copy_verified(
    inner: &Inner,
    meta: &SnapshotMeta,
    src_dir: &Path,
    partial: &Path,
) -> Result<SnapshotMeta, SnapshotError> {
    let id = &meta.snapshot_id;
    let root = &inner.durable_root;
    let full_space = |e: std::io::Error| {
        if disk::is_no_space(&e) {
            SnapshotError::NoSpace {
                id: id.clone(),
                why: format!("durable tier {}: {e}", root.display()),
            }
        } else {
            tier_error(root, format!("cannot persist snapshot {id}"), e)
        }
    };
    let mut m = meta.clone();
    for name in meta.files() {
        let src = src_dir.join(name);
        let dst = partial.join(name);
        let stats = disk::copy_sparse(&src, &dst).map_err(full_space)?;
        disk::sync_file(&dst).map_err(full_space)?;
        let (expected, sum): (&str, fn(&Path) -> std::io::Result<String>) = match name {
            STATE_FILE => (
                &meta
                    .full
                    .as_ref()
                    .expect("full snapshots have a state file")
                    .state_sha256,
                sha256_file,
            ),
            MEMORY_FILE => (
                &meta
                    .full
                    .as_ref()
                    .and_then(|f| f.memory.as_ref())
                    .expect("files() lists it")
                    .sha256,
                disk::sparse_sha256,
            ),
            _ => (&meta.sha256, disk::sparse_sha256),
        };
        let verify = |p: &Path| sum(p).map_err(io_err(format!("cannot verify snapshot {id}")));
        let got = verify(&dst)?;
        if got != expected {
            let source_sum = verify(&src)?;
            if source_sum != expected {
                let why = format!(
                    "{} has sha256 {source_sum}, recorded {expected}",
                    src.display()
                );
                super::restore::mark_corrupt(inner, id, &why);
                return Err(SnapshotError::Corrupt {
                    id: id.clone(),
                    why,
                });
            }
            return Err(SnapshotError::Io {
                context: format!("cannot persist snapshot {id}"),
                source: std::io::Error::other(format!(
                    "the durable copy {} reads back as sha256 {got}, expected {expected}",
                    dst.display()
                )),
            });
        }
        if name == MEMORY_FILE {
            let t = std::fs::metadata(&dst)
                .map_err(io_err(format!("cannot stat {}", dst.display())))?;
            if let Some(mem) = m.full.as_mut().and_then(|f| f.memory.as_mut()) {
                mem.quick
                    .mtime_ns
                    .set(SnapshotTier::Durable, Some(super::quick::mtime_ns(&t)));
            }
        }
        if name == DISK_FILE {
            m.allocated_bytes = disk::allocated_bytes(&dst)
                .map_err(io_err(format!("cannot persist snapshot {id}")))?;
        }
        tracing::debug!(
            "snapshot {id}: {} bytes of {name} to the durable tier by {}",
            stats.bytes_copied,
            stats.method.as_str()
        );
    }
    m.tier = SnapshotTier::Durable;
    m.persisted_at = Some(Utc::now());
    Ok(m)
}
