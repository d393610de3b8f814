//! Disk snapshots: take one from a VM, list, persist, delete.

use std::path::PathBuf;

use agentenv_api::{SnapshotInfo, VmState};
use chrono::Utc;

use super::agent::{freeze_for_snapshot, thaw_after_snapshot};
use super::{Engine, SnapshotInProgress};
use crate::backend::SavedMemory;
use crate::error::EngineError;
use crate::ids::{validate_id, MAX_ID_LEN};
use crate::snapshot::{NewSnapshot, SnapshotError};

/// Releases a snapshot hold when a create from it ends, however it ends.
pub(super) struct SnapshotHold<'a> {
    engine: &'a Engine,
    id: String,
}

impl Drop for SnapshotHold<'_> {
    fn drop(&mut self) {
        let mut holds = self
            .engine
            .snapshot_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = holds.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&self.id);
            }
        }
    }
}

impl Engine {
    /// Marks a snapshot as being copied into a new VM until the guard drops.
    pub(super) fn hold_snapshot(&self, id: &str) -> SnapshotHold<'_> {
        *self
            .snapshot_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default() += 1;
        SnapshotHold {
            engine: self,
            id: id.to_string(),
        }
    }

    /// Takes a snapshot of a VM: its writable disk, or with `memory` the
    /// whole VM (memory, vCPUs, devices and disk from one instant). A running
    /// VM is paused only while the files are copied, and resumed on every
    /// path, success or error; the checksums are computed after it runs again.
    pub async fn snapshot(
        &self,
        vm_id: &str,
        snapshot_id: Option<String>,
        memory: bool,
    ) -> Result<SnapshotInfo, EngineError> {
        self.take_snapshot(vm_id, snapshot_id, memory, false, None)
            .await
    }

    /// [`Engine::snapshot`]; `ephemeral` marks a fork's snapshot, removed
    /// with the last VM restored from it; `owner` is recorded in it.
    pub(super) async fn take_snapshot(
        &self,
        vm_id: &str,
        snapshot_id: Option<String>,
        memory: bool,
        ephemeral: bool,
        owner: Option<String>,
    ) -> Result<SnapshotInfo, EngineError> {
        let slot = self.slot(vm_id)?;
        let snapshot_id = match snapshot_id {
            Some(id) => {
                validate_id("snapshot_id", &id)?;
                id
            }
            None => generated_id(vm_id),
        };
        if self.snapshots.get(&snapshot_id).is_ok() {
            return Err(EngineError::snapshot(
                "snapshot_id",
                SnapshotError::Exists(snapshot_id),
            ));
        }
        let _op = slot.op.lock().await;
        let was = slot.state();
        self.check_transition(&slot, VmState::Snapshotting)?;
        let inst = self.live_instance(&slot)?;
        let info = slot.info();
        let full = match memory {
            true => {
                let mut f = self.full_record(&info, slot.agent_socket.is_some()).await?;
                f.ephemeral = ephemeral;
                Some(f)
            }
            false => None,
        };
        let rootfs_fingerprint = self.rootfs_fingerprint(&info)?;
        // The record says a snapshot is under way before anything is frozen or
        // paused, so that a crash from here on is finished at the next start
        // (`restore.rs`): the VM runs again and a partial copy is removed.
        slot.set_snapshot(Some(SnapshotInProgress {
            snapshot_id: snapshot_id.clone(),
            resume: was == VmState::Running,
        }));
        let marked = self
            .set_state(&slot, VmState::Snapshotting)
            .and_then(|_| self.write_record(&slot));
        if let Err(e) = marked {
            slot.set_snapshot(None);
            if slot.state() != was {
                if let Err(e) = self.set_state(&slot, was) {
                    tracing::error!("vm {vm_id}: {e}");
                }
            }
            return Err(e);
        }
        // A direct disk is read through the file the daemon opened for the
        // VM, not by its path (which may name another file by now).
        let disk = slot
            .direct_disk
            .get()
            .and_then(|d| d.reopen.clone())
            .unwrap_or_else(|| PathBuf::from(&info.disk.writable_path));
        let begun = self
            .snapshots
            .begin(NewSnapshot {
                snapshot_id: snapshot_id.clone(),
                vm_id: vm_id.into(),
                rootfs_id: info.disk.rootfs_id.clone(),
                backend: info.backend,
                source: disk.clone(),
                fs_frozen: false,
                rootfs_fingerprint,
                full,
                owner,
            })
            .await;
        let mut pending = match begun {
            Ok(p) => p,
            Err(e) => {
                slot.set_snapshot(None);
                self.set_state(&slot, was)?;
                return Err(EngineError::snapshot("snapshot_id", e));
            }
        };
        // A disk snapshot of a guest with an agent freezes its file systems
        // first (a paused guest cannot freeze), so the copy holds no
        // half-written metadata. A full snapshot needs no freeze: the page
        // cache and the disk are taken at the same instant.
        let frozen = if was == VmState::Running && !memory {
            freeze_for_snapshot(&slot).await
        } else {
            None
        };
        pending.new.fs_frozen = frozen.is_some();
        let fp = &self.failpoints;
        let mut paused = false;
        let copied = async {
            fp.point("snapshot.frozen").await?;
            if was == VmState::Running {
                inst.pause().await.map_err(|source| EngineError::Vmm {
                    vm_id: vm_id.into(),
                    source,
                })?;
                paused = true;
            }
            fp.point("snapshot.paused").await?;
            if memory {
                let saved =
                    inst.save_full(&pending.files)
                        .await
                        .map_err(|source| EngineError::Vmm {
                            vm_id: vm_id.into(),
                            source,
                        })?;
                match saved {
                    SavedMemory::Written => {}
                    SavedMemory::InFile(ram) => self
                        .snapshots
                        .copy_memory(&pending, &ram)
                        .await
                        .map_err(|e| EngineError::snapshot("snapshot_id", e))?,
                    SavedMemory::InState => pending.memory_in_state = true,
                }
            }
            self.host.files.sync_file(&disk)?;
            self.snapshots
                .copy_disk(&pending)
                .await
                .map_err(|e| EngineError::snapshot("snapshot_id", e))?;
            fp.point("snapshot.saved").await
        }
        .await;
        let mut back = was;
        if paused {
            if let Err(e) = inst.resume().await {
                tracing::error!("vm {vm_id}: resume after snapshot failed: {e}");
                back = VmState::Paused;
            }
        }
        thaw_after_snapshot(vm_id, frozen).await;
        // The seal (checksums, record, rename) runs while the VM runs again.
        let sealed = match copied {
            Ok(()) => match fp.point("snapshot.resumed").await {
                Ok(()) => self
                    .snapshots
                    .seal(pending)
                    .await
                    .map_err(|e| EngineError::snapshot("snapshot_id", e)),
                Err(e) => {
                    self.snapshots.abort(pending).await;
                    Err(e)
                }
            },
            Err(e) => {
                self.snapshots.abort(pending).await;
                Err(e)
            }
        };
        let sealed = match sealed {
            Ok(snap) => match fp.point("snapshot.copied").await {
                Ok(()) => Ok(snap),
                Err(e) => {
                    if let Err(de) = self.snapshots.delete(&snapshot_id).await {
                        tracing::error!("snapshot {snapshot_id}: rollback: {de}");
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        slot.set_snapshot(None);
        self.set_state(&slot, back)?;
        sealed
    }

    /// Every complete snapshot.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots
            .list()
            .into_iter()
            .map(|s| self.with_mappers(s))
            .collect()
    }

    /// One snapshot.
    pub fn snapshot_info(&self, snapshot_id: &str) -> Result<SnapshotInfo, EngineError> {
        validate_id("snapshot_id", snapshot_id)?;
        self.snapshots
            .get(snapshot_id)
            .map(|s| self.with_mappers(s))
            .map_err(|e| EngineError::snapshot("snapshot_id", e))
    }

    /// Copies a tmpfs snapshot to the durable tier.
    pub async fn persist_snapshot(
        &self,
        snapshot_id: &str,
        keep_tmpfs: bool,
    ) -> Result<SnapshotInfo, EngineError> {
        validate_id("snapshot_id", snapshot_id)?;
        // VMs that map the tmpfs copy's memory file keep it where it is.
        let keep_tmpfs = keep_tmpfs || !self.mapped_by(snapshot_id).is_empty();
        self.snapshots
            .persist(snapshot_id, keep_tmpfs)
            .await
            .map_err(|e| EngineError::snapshot("snapshot_id", e))
    }

    /// Removes a snapshot; refused while a VM is being created from it.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), EngineError> {
        validate_id("snapshot_id", snapshot_id)?;
        let held = self
            .snapshot_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(snapshot_id)
            .copied()
            .unwrap_or(0);
        if held > 0 {
            return Err(EngineError::snapshot(
                "snapshot_id",
                SnapshotError::Busy {
                    id: snapshot_id.into(),
                    why: format!("{held} vm(s) are being created from it"),
                },
            ));
        }
        let mappers = self.mapped_by(snapshot_id);
        if !mappers.is_empty() {
            return Err(EngineError::snapshot(
                "snapshot_id",
                SnapshotError::Busy {
                    id: snapshot_id.into(),
                    why: format!(
                        "the memory of vm(s) {} maps it; delete or reset them first",
                        mappers.join(", ")
                    ),
                },
            ));
        }
        self.snapshots
            .delete(snapshot_id)
            .await
            .map_err(|e| EngineError::snapshot("snapshot_id", e))
    }
}

/// `{vm_id}-{UTC timestamp}`, shortening the vm id so the result is a valid id.
fn generated_id(vm_id: &str) -> String {
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let keep = MAX_ID_LEN - stamp.len() - 1;
    let prefix: String = vm_id.chars().take(keep).collect();
    format!("{prefix}-{stamp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid() {
        for vm in ["vm1", &"v".repeat(63)] {
            let id = generated_id(vm);
            validate_id("snapshot_id", &id).unwrap();
            assert!(id.ends_with('Z'), "{id}");
        }
    }
}
