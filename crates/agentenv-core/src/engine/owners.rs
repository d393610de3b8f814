//! Owners: the engine's entry points for an authenticated [`Principal`].
//!
//! New VMs and snapshots are recorded as the caller's (`owner`, kept in
//! `vm.json` and the snapshot's `meta.json`, so it survives restarts). A
//! `user` principal sees only what it owns: everything else answers exactly
//! as if it did not exist (the same `not found` error, the same absence from
//! lists). The HTTP layer checks every `{vm_id}` and `{snapshot_id}` in a
//! request path with [`Engine::visible_vm`] / [`Engine::visible_snapshot`]
//! before any handler runs; the `*_as` methods here check the ids a request
//! names in its body (a restore's or a disk's snapshot, a reset's snapshot)
//! and stamp what they create.

use std::sync::Arc;

use agentenv_api::{CreateVmRequest, DiskSpec, ForkRequest, SnapshotInfo, VmInfo};

use super::Engine;
use crate::error::EngineError;
use crate::ids::validate_id;
use crate::principal::{Principal, Scope};
use crate::snapshot::SnapshotError;

impl Engine {
    /// For a `user`: `Ok` when the VM exists and is its own, otherwise the
    /// very error an absent VM gives. An admin sees everything: `Ok` without
    /// a lookup (the operation itself then reports an absent VM, in its usual
    /// order of checks).
    pub fn visible_vm(&self, who: &Principal, vm_id: &str) -> Result<(), EngineError> {
        if who.scope == Scope::Admin {
            return Ok(());
        }
        let slot = self.slot(vm_id)?;
        if slot.with_info(|i| who.may_see(i.owner.as_deref())) {
            return Ok(());
        }
        Err(EngineError::not_found(
            "vm_id",
            format!("vm {vm_id} not found"),
        ))
    }

    /// For a `user`: `Ok` when the snapshot exists and is its own, otherwise
    /// the very error an absent snapshot gives (naming `field`). An admin
    /// sees everything: `Ok` without a lookup.
    pub fn visible_snapshot(
        &self,
        who: &Principal,
        field: &str,
        snapshot_id: &str,
    ) -> Result<(), EngineError> {
        if who.scope == Scope::Admin {
            return Ok(());
        }
        validate_id(field, snapshot_id)?;
        let absent =
            || EngineError::snapshot(field, SnapshotError::NotFound(snapshot_id.to_string()));
        match self.snapshots.get(snapshot_id) {
            Ok(s) if who.may_see(s.owner.as_deref()) => Ok(()),
            Ok(_) => Err(absent()),
            Err(e) => Err(EngineError::snapshot(field, e)),
        }
    }

    /// The VMs `who` may see, as the JSON of a `VmList` (see
    /// [`Engine::list_json`]).
    pub fn list_json_as(&self, who: &Principal) -> String {
        let parts: Vec<Arc<str>> = self
            .slots()
            .iter()
            .filter(|s| s.with_info(|i| who.may_see(i.owner.as_deref())))
            .map(|s| s.json())
            .collect();
        super::vm_list_json(&parts)
    }

    /// The snapshots `who` may see.
    pub fn snapshots_as(&self, who: &Principal) -> Vec<SnapshotInfo> {
        let mut list = self.snapshots();
        list.retain(|s| who.may_see(s.owner.as_deref()));
        list
    }

    /// [`Engine::create`] for `who`: the VM is `who`'s; a snapshot it is
    /// restored or booted from must be visible to `who`.
    pub async fn create_as(
        self: &Arc<Self>,
        who: &Principal,
        req: CreateVmRequest,
    ) -> Result<VmInfo, EngineError> {
        if let Some(r) = &req.restore {
            self.visible_snapshot(who, "restore.snapshot_id", &r.snapshot_id)?;
        }
        if let Some(DiskSpec::Snapshot { snapshot_id }) = &req.disk {
            self.visible_snapshot(who, "disk.snapshot_id", snapshot_id)?;
        }
        self.create_owned(req, Some(who.name.clone())).await
    }

    /// [`Engine::create_as`] for a create whose restore snapshot the daemon
    /// chose for `who` (an E2B template's warm snapshot, kept by the daemon as
    /// `snapshot_owner`'s): that snapshot may be `snapshot_owner`'s as well as
    /// `who`'s; every other check is [`Engine::create_as`]'s. The VM is `who`'s.
    pub async fn create_as_from(
        self: &Arc<Self>,
        who: &Principal,
        req: CreateVmRequest,
        snapshot_owner: &str,
    ) -> Result<VmInfo, EngineError> {
        if let Some(r) = &req.restore {
            validate_id("restore.snapshot_id", &r.snapshot_id)?;
            let daemons = self
                .snapshots
                .get(&r.snapshot_id)
                .is_ok_and(|s| s.owner.as_deref() == Some(snapshot_owner));
            if !daemons {
                self.visible_snapshot(who, "restore.snapshot_id", &r.snapshot_id)?;
            }
        }
        if let Some(DiskSpec::Snapshot { snapshot_id }) = &req.disk {
            self.visible_snapshot(who, "disk.snapshot_id", snapshot_id)?;
        }
        self.create_owned(req, Some(who.name.clone())).await
    }

    /// [`Engine::fork`] for `who`: the clones are `who`'s.
    pub async fn fork_as(
        self: &Arc<Self>,
        who: &Principal,
        vm_id: &str,
        req: ForkRequest,
    ) -> Result<Vec<VmInfo>, EngineError> {
        self.visible_vm(who, vm_id)?;
        self.fork_owned(vm_id, req, Some(who.name.clone())).await
    }

    /// [`Engine::snapshot`] for `who`: the snapshot is `who`'s.
    pub async fn snapshot_as(
        &self,
        who: &Principal,
        vm_id: &str,
        snapshot_id: Option<String>,
        memory: bool,
    ) -> Result<SnapshotInfo, EngineError> {
        self.visible_vm(who, vm_id)?;
        self.take_snapshot(vm_id, snapshot_id, memory, false, Some(who.name.clone()))
            .await
    }

    /// [`Engine::reset`] for `who`: the snapshot must be visible to `who`.
    pub async fn reset_as(
        self: &Arc<Self>,
        who: &Principal,
        vm_id: &str,
        snapshot_id: &str,
    ) -> Result<VmInfo, EngineError> {
        self.visible_vm(who, vm_id)?;
        self.visible_snapshot(who, "snapshot_id", snapshot_id)?;
        self.reset(vm_id, snapshot_id).await
    }
}
