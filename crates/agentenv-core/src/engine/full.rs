//! Full (memory) snapshots: what one records and what a restore must match,
//! the identity a restored VM is given, `fork` and `reset`.
//!
//! A full snapshot is taken by [`Engine::snapshot`] with `memory`; a VM is
//! restored from one by a create with `restore` (`create.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::{
    CreateVmRequest, ForkRequest, FullSnapshotInfo, SnapshotInfo, SnapshotKind, SnapshotStatus,
    VmInfo, VmState,
};
use agentenv_proto::{Identity, IdentityNet};
use chrono::Utc;

use super::{Engine, VmSlot};
use crate::backend::{LaunchSpec, NetAttachment, RestoreSpec as VmmRestore};
use crate::error::EngineError;
use crate::ids::{checked_join, validate_id, MAX_ID_LEN};
use crate::snapshot::SnapshotError;

/// Bytes of host entropy a restored VM is given.
const IDENTITY_ENTROPY: usize = 64;

/// Clones restored at once by a fork (each restore is mostly waiting for a
/// new VMM to load its state).
const FORK_PARALLEL: usize = 4;

impl Engine {
    /// What a full snapshot of the VM `info` records for its restores, or 409
    /// when the VM cannot have one.
    pub(super) async fn full_record(
        &self,
        info: &VmInfo,
        agent: bool,
    ) -> Result<FullSnapshotInfo, EngineError> {
        let refuse = |why: String| EngineError::Conflict {
            message: format!("vm {} cannot have a full snapshot: {why}", info.vm_id),
            state: None,
        };
        if info.disk.rootfs_id.is_none() {
            return Err(refuse(format!(
                "its disk is a {} disk; full snapshots are of overlay VMs (a base image plus a writable overlay)",
                info.disk.kind
            )));
        }
        if !info.shares.is_empty() {
            return Err(refuse(
                "it has shares, whose host directories a restore could not bring back as they were"
                    .into(),
            ));
        }
        let kernel = PathBuf::from(&info.kernel);
        let initrd = info.initrd.as_ref().map(PathBuf::from);
        Ok(FullSnapshotInfo {
            vmm_version: self.vmm_version_of(info.backend).await?,
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            kernel_fingerprint: self.host.files.fingerprint(&kernel)?,
            kernel: info.kernel.clone(),
            initrd_fingerprint: match &initrd {
                Some(p) => Some(self.host.files.fingerprint(p)?),
                None => None,
            },
            initrd: info.initrd.clone(),
            boot_args: info.boot_args.clone(),
            network: info.tap_name.is_some(),
            agent,
            memory_bytes: 0,
            state_bytes: 0,
            ephemeral: false,
        })
    }

    /// The VMM's version, as snapshots record it.
    async fn vmm_version(&self) -> Result<String, EngineError> {
        self.vmm.version().await.map_err(|source| EngineError::Vmm {
            vm_id: String::new(),
            source,
        })
    }

    /// The version of backend `kind`'s VMM (a VM re-adopted with another
    /// backend than new VMs get is snapshotted with its own).
    async fn vmm_version_of(&self, kind: agentenv_api::BackendKind) -> Result<String, EngineError> {
        let vmm = self.vmm_for(kind).map_err(|why| EngineError::Vmm {
            vm_id: String::new(),
            source: crate::backend::VmmError::Transport {
                request: "version".into(),
                message: why,
            },
        })?;
        vmm.version().await.map_err(|source| EngineError::Vmm {
            vm_id: String::new(),
            source,
        })
    }

    /// The fingerprint of a VM's base image, when it has one.
    pub(super) fn rootfs_fingerprint(&self, info: &VmInfo) -> Result<Option<String>, EngineError> {
        match &info.disk.rootfs_path {
            Some(p) if info.disk.rootfs_id.is_some() => {
                Ok(Some(self.host.files.fingerprint(&PathBuf::from(p))?))
            }
            _ => Ok(None),
        }
    }

    /// A full snapshot this daemon can restore, or why not: 404 unknown, 409
    /// a disk snapshot or one from another backend, VMM version, kernel,
    /// initramfs or base image (naming the mismatch), 422 corrupt.
    pub(super) async fn restorable(
        &self,
        field: &str,
        snapshot_id: &str,
    ) -> Result<(SnapshotInfo, FullSnapshotInfo, PathBuf), EngineError> {
        validate_id(field, snapshot_id)?;
        let snap = self
            .snapshots
            .get(snapshot_id)
            .map_err(|e| EngineError::snapshot(field, e))?;
        let conflict = |why: String| EngineError::Conflict {
            message: format!("{field}: snapshot {snapshot_id} {why}"),
            state: None,
        };
        let full = match (&snap.kind, &snap.full) {
            (SnapshotKind::Full, Some(f)) => f.clone(),
            _ => {
                return Err(conflict(
                    "is a disk snapshot (no memory): boot a VM from it with disk {\"kind\": \"snapshot\"} instead".into(),
                ))
            }
        };
        if snap.status == SnapshotStatus::Corrupt {
            return Err(EngineError::snapshot(
                field,
                SnapshotError::Corrupt {
                    id: snapshot_id.into(),
                    why: "its checksum no longer matches".into(),
                },
            ));
        }
        if snap.backend != self.vmm.kind() {
            return Err(conflict(format!(
                "was taken on {}, and this daemon runs {}",
                snap.backend,
                self.vmm.kind()
            )));
        }
        let version = self.vmm_version().await?;
        if version != full.vmm_version {
            return Err(conflict(format!(
                "was taken with {}, and this daemon runs {version}",
                full.vmm_version
            )));
        }
        let same = |what: &str, path: &str, want: &str| -> Result<(), EngineError> {
            match self.host.files.fingerprint(&PathBuf::from(path)) {
                Ok(fp) if fp == want => Ok(()),
                Ok(_) => Err(conflict(format!(
                    "needs the {what} {path} as it was; that file has changed since"
                ))),
                Err(e) => Err(conflict(format!("needs the {what} {path}: {e}"))),
            }
        };
        same("kernel", &full.kernel, &full.kernel_fingerprint)?;
        if let (Some(p), Some(fp)) = (&full.initrd, &full.initrd_fingerprint) {
            same("initramfs", p, fp)?;
        }
        let Some(rootfs_id) = &snap.rootfs_id else {
            return Err(conflict("records no base image".into()));
        };
        let base = checked_join(&self.cfg.rootfs_root, field, rootfs_id)?;
        if let Some(fp) = &snap.rootfs_fingerprint {
            same("base image (rootfs)", &base.display().to_string(), fp)?;
        }
        Ok((snap, full, base))
    }

    /// The guest RAM file of a VM booted by this daemon (QEMU keeps it shared
    /// there, so a full snapshot can copy it).
    pub(super) fn memory_file(&self, vm_id: &str) -> Result<PathBuf, EngineError> {
        Ok(checked_join(
            &self.cfg.guest_memory_dir(),
            "vm_id",
            &format!("{vm_id}.mem"),
        )?)
    }

    /// Who a VM restored from a memory snapshot is: its id as host name, its
    /// own address and MAC, fresh host entropy, the host's time.
    pub(super) fn identity_for(&self, slot: &VmSlot) -> Identity {
        let info = slot.info();
        let net = slot.lease().map(|l| IdentityNet {
            address: l.guest_ip.to_string(),
            prefix_len: l.prefix_len,
            gateway: l.host_ip.to_string(),
            mac: l.guest_mac.clone(),
        });
        let entropy_hex = self
            .host
            .facts
            .entropy(IDENTITY_ENTROPY)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let now = Utc::now();
        Identity {
            hostname: info.vm_id,
            net,
            entropy_hex,
            unix_time_ns: now.timestamp_nanos_opt().unwrap_or(0).max(0) as u64,
        }
    }

    /// The launch spec of a VM restored from `full` (the same devices, in the
    /// same order, as the snapshot's VM): the overlay drive layout of
    /// `create.rs`, this VM's own sockets, disk and TAP.
    pub(super) fn restore_launch(
        &self,
        info: &VmInfo,
        full: &FullSnapshotInfo,
        base: PathBuf,
        agent_socket: Option<PathBuf>,
        net: Option<NetAttachment>,
    ) -> LaunchSpec {
        let session_dir = PathBuf::from(&info.session_dir);
        LaunchSpec {
            vm_id: info.vm_id.clone(),
            control_socket: PathBuf::from(&info.api_socket),
            console_log: PathBuf::from(&info.console_log),
            console_log_max_bytes: self.cfg.console_log_max_bytes,
            vcpus: full.vcpus,
            memory_mib: full.memory_mib,
            kernel: PathBuf::from(&full.kernel),
            initrd: full.initrd.as_ref().map(PathBuf::from),
            boot_args: full.boot_args.clone(),
            drives: super::create::overlay_drives(base, Path::new(&info.disk.writable_path)),
            net,
            agent_socket,
            startup_timeout: Duration::from_millis(self.cfg.startup_timeout_ms),
            request_timeout: Duration::from_millis(self.cfg.request_timeout_ms),
            memory_file: None,
            cgroup_procs: Vec::new(),
            session_dir,
        }
    }

    /// VMs whose memory maps a snapshot's memory file.
    pub(super) fn mapped_by(&self, snapshot_id: &str) -> Vec<String> {
        self.slots()
            .iter()
            .filter_map(|s| {
                s.with_info(|i| {
                    (i.restored_from.as_deref() == Some(snapshot_id)).then(|| i.vm_id.clone())
                })
            })
            .collect()
    }

    /// A snapshot as the API shows it, with the VMs that map it.
    pub(super) fn with_mappers(&self, mut s: SnapshotInfo) -> SnapshotInfo {
        s.mapped_by = self.mapped_by(&s.snapshot_id);
        s
    }

    /// Removes a fork's snapshot once no VM maps it any more.
    pub(super) async fn drop_ephemeral(&self, snapshot_id: &str) {
        let ephemeral = self
            .snapshots
            .get(snapshot_id)
            .ok()
            .and_then(|s| s.full)
            .is_some_and(|f| f.ephemeral);
        if !ephemeral || !self.mapped_by(snapshot_id).is_empty() {
            return;
        }
        match self.snapshots.delete(snapshot_id).await {
            Ok(()) => tracing::info!("removed fork snapshot {snapshot_id}: no vm maps it any more"),
            Err(e) => tracing::warn!("fork snapshot {snapshot_id}: {e}"),
        }
    }

    /// `POST /v1/vm/{id}/fork`: `count` new running VMs from the VM's current
    /// state. The source is paused only for the snapshot; the clones share
    /// the snapshot's memory copy-on-write. All or nothing: on any failure
    /// the clones made so far are deleted.
    pub async fn fork(
        self: &Arc<Self>,
        vm_id: &str,
        req: ForkRequest,
    ) -> Result<Vec<VmInfo>, EngineError> {
        self.fork_owned(vm_id, req, None).await
    }

    /// [`Engine::fork`], the clones (and their snapshot) recorded as `owner`'s.
    pub(super) async fn fork_owned(
        self: &Arc<Self>,
        vm_id: &str,
        req: ForkRequest,
        owner: Option<String>,
    ) -> Result<Vec<VmInfo>, EngineError> {
        let source = self.slot(vm_id)?;
        let max = self.cfg.max_fork;
        if req.count == 0 || req.count > max {
            return Err(EngineError::bad(
                "count",
                format!(
                    "count must be between 1 and max_fork ({max}), got {}",
                    req.count
                ),
            ));
        }
        let ids = match req.vm_ids {
            Some(ids) => {
                if ids.len() != req.count as usize {
                    return Err(EngineError::bad(
                        "vm_ids",
                        format!("vm_ids has {} ids for count {}", ids.len(), req.count),
                    ));
                }
                for (i, id) in ids.iter().enumerate() {
                    validate_id(&format!("vm_ids[{i}]"), id)?;
                    if ids[..i].contains(id) {
                        return Err(EngineError::bad(
                            &format!("vm_ids[{i}]"),
                            format!("vm id {id} is given twice"),
                        ));
                    }
                }
                ids
            }
            None => self.fork_ids(vm_id, req.count as usize),
        };
        for id in &ids {
            if let Ok(s) = self.slot(id) {
                let state = s.state();
                return Err(EngineError::Conflict {
                    message: format!("vm {id} already exists (state {state})"),
                    state: Some(state),
                });
            }
        }
        // Clones keep their source's egress policy: a fork never widens it.
        let network = source
            .lease()
            .map(|l| l.egress)
            .filter(|e| !e.is_default())
            .map(|e| agentenv_api::NetworkSpec {
                allow: e.allow_strings(),
                internet: Some(e.internet),
                ..Default::default()
            });
        drop(source);
        let snap = self
            .take_snapshot(
                vm_id,
                Some(fork_snapshot_id(vm_id)),
                true,
                true,
                owner.clone(),
            )
            .await?;
        let snapshot_id = snap.snapshot_id.clone();
        let mut made: Vec<VmInfo> = Vec::with_capacity(ids.len());
        let outcome: Result<(), EngineError> = async {
            self.failpoints.point("fork.snapshot").await?;
            for chunk in ids.chunks(FORK_PARALLEL) {
                let mut tasks = tokio::task::JoinSet::new();
                for (i, id) in chunk.iter().enumerate() {
                    let engine = self.clone();
                    let mut req = CreateVmRequest::restore(id, &snapshot_id);
                    req.network = network.clone();
                    let owner = owner.clone();
                    tasks.spawn(async move { (i, engine.create_owned(req, owner).await) });
                }
                let mut done = Vec::with_capacity(chunk.len());
                while let Some(r) = tasks.join_next().await {
                    done.push(r.map_err(|e| EngineError::Guest(format!("fork task: {e}")))?);
                }
                done.sort_by_key(|(i, _)| *i);
                let mut first_err = None;
                for (_, r) in done {
                    match r {
                        Ok(info) => made.push(info),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
                self.failpoints.point("fork.clone").await?;
            }
            Ok(())
        }
        .await;
        let result = match outcome {
            Ok(()) => Ok(made),
            Err(e) => {
                for vm in made {
                    if let Err(de) = self.delete(&vm.vm_id).await {
                        tracing::error!("fork of {vm_id}: rollback of clone {}: {de}", vm.vm_id);
                    }
                }
                Err(e)
            }
        };
        if result.is_err() {
            self.drop_ephemeral(&snapshot_id).await;
        }
        result
    }

    /// `{vm_id}-fork-{n}` for the first `count` free numbers, the vm id cut
    /// so that the result is a valid id.
    fn fork_ids(&self, vm_id: &str, count: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(count);
        let mut n = 1u32;
        while out.len() < count {
            let suffix = format!("-fork-{n}");
            let keep = MAX_ID_LEN.saturating_sub(suffix.len());
            let id: String = vm_id.chars().take(keep).collect::<String>() + &suffix;
            if self.slot(&id).is_err() {
                out.push(id);
            }
            n += 1;
        }
        out
    }

    /// `POST /v1/vm/{id}/reset`: the VM goes back to a full snapshot in
    /// place — same id, address, TAP and sockets; its VMM is replaced by one
    /// restored from the snapshot, its writable disk by the snapshot's.
    pub async fn reset(
        self: &Arc<Self>,
        vm_id: &str,
        snapshot_id: &str,
    ) -> Result<VmInfo, EngineError> {
        let slot = self.slot(vm_id)?;
        let (snap, full, base) = self.restorable("snapshot_id", snapshot_id).await?;
        let op = slot.op.lock().await;
        self.check_transition(&slot, VmState::Resetting)?;
        let info = slot.info();
        if snap.rootfs_id != info.disk.rootfs_id || info.disk.rootfs_id.is_none() {
            return Err(EngineError::Conflict {
                message: format!(
                    "snapshot_id: snapshot {snapshot_id} is of base image {:?}, vm {vm_id} has {:?}",
                    snap.rootfs_id, info.disk.rootfs_id
                ),
                state: None,
            });
        }
        if full.network != info.tap_name.is_some() {
            return Err(EngineError::Conflict {
                message: format!(
                    "snapshot_id: snapshot {snapshot_id} was taken of a vm {} a network interface, and vm {vm_id} has {}",
                    if full.network { "with" } else { "without" },
                    if info.tap_name.is_some() { "one" } else { "none" }
                ),
                state: None,
            });
        }
        if full.agent != slot.agent_socket.is_some() {
            return Err(EngineError::Conflict {
                message: format!(
                    "snapshot_id: snapshot {snapshot_id} and vm {vm_id} differ in having a guest agent channel"
                ),
                state: None,
            });
        }
        // The record says a reset is under way before the VMM goes, so that a
        // crash from here on is finished at the next start.
        slot.set_reset(Some(snapshot_id.to_string()));
        self.set_state(&slot, VmState::Resetting)?;
        self.write_record(&slot)?;
        let result = self.reset_in_place(&slot, snapshot_id, &full, base).await;
        slot.set_reset(None);
        match result {
            Ok(inst) => {
                self.set_state(&slot, VmState::Running)?;
                self.spawn_exit_monitor(vm_id.to_string(), inst.clone());
                self.spawn_agent_watch(vm_id.to_string(), inst);
                if let Some(old) = info.restored_from.filter(|o| o != snapshot_id) {
                    self.drop_ephemeral(&old).await;
                }
                drop(op);
                // A reset of a VM whose agent answered answers with a usable
                // VM, as a create with wait_ready does: its agent answers
                // again and took its identity.
                if info.ready && self.cfg.agent.enable && slot.agent_socket.is_some() {
                    let timeout = Duration::from_secs(self.cfg.agent.ready_timeout_s);
                    return self.wait_ready(vm_id, timeout).await;
                }
                Ok(slot.info())
            }
            Err(e) => {
                let cause = format!("reset to snapshot {snapshot_id} failed: {e}");
                let _ = slot.update(|i| {
                    i.exit = Some(agentenv_api::ExitInfo {
                        exit_code: None,
                        signal: None,
                        cause: cause.clone(),
                        at: Utc::now(),
                    });
                    i.pid = None;
                    Ok::<(), std::convert::Infallible>(())
                });
                self.release_network(&slot).await;
                if let Err(e2) = self.set_state(&slot, VmState::Failed) {
                    tracing::error!("vm {vm_id}: {e2}");
                }
                Err(e)
            }
        }
    }

    /// The steps of a reset, under the VM's operation lock: the old VMM
    /// killed, the disk replaced, a VMM restored from the snapshot. Also what
    /// a restart runs to finish a reset a crash cut short.
    pub(super) async fn reset_in_place(
        &self,
        slot: &VmSlot,
        snapshot_id: &str,
        full: &FullSnapshotInfo,
        base: PathBuf,
    ) -> Result<Arc<dyn crate::backend::VmmInstance>, EngineError> {
        let info = slot.info();
        let vm_id = info.vm_id.clone();
        if let Some(inst) = slot.instance() {
            slot.set_instance(None);
            let _ = self.kill_instance(&inst).await;
        }
        if let Some(a) = slot.agent() {
            a.shutdown();
        }
        slot.set_agent(None);
        slot.ready.send_replace(false);
        slot.set_process(None);
        let _ = self.host.files.remove_file(&self.memory_file(&vm_id)?);
        self.failpoints.point("reset.killed").await?;
        let disk = PathBuf::from(&info.disk.writable_path);
        self.host.files.remove_file(&disk)?;
        let _hold = self.hold_snapshot(snapshot_id);
        let files = self
            .snapshots
            .open_full(snapshot_id, &disk)
            .await
            .map_err(|e| EngineError::snapshot("snapshot_id", e))?;
        self.failpoints.point("reset.disk").await?;
        let net = match (&info.tap_name, &info.guest_mac) {
            (Some(t), Some(m)) => Some(NetAttachment {
                tap_name: t.clone(),
                guest_mac: m.clone(),
            }),
            _ => None,
        };
        let mut launch = self.restore_launch(&info, full, base, slot.agent_socket.clone(), net);
        launch.cgroup_procs = self.place_in_cgroup(slot, full.vcpus, full.memory_mib, None)?;
        let inst: Arc<dyn crate::backend::VmmInstance> = Arc::from(
            self.vmm
                .restore(&VmmRestore {
                    launch,
                    state: files.state,
                    memory: files.memory,
                })
                .await
                .map_err(|source| EngineError::Vmm {
                    vm_id: vm_id.clone(),
                    source,
                })?,
        );
        let _ = slot.update(|i| {
            i.pid = inst.pid();
            i.restored_from = Some(snapshot_id.to_string());
            i.vcpus = full.vcpus;
            i.memory_mib = full.memory_mib;
            i.exit = None;
            i.ready = false;
            i.agent = None;
            i.updated_at = Utc::now();
            Ok::<(), std::convert::Infallible>(())
        });
        slot.set_process(inst.identity());
        slot.set_identity(Some(self.identity_for(slot)));
        slot.set_instance(Some(inst.clone()));
        Ok(inst)
    }
}

/// `{vm_id}-fork-{UTC timestamp}`, cut to a valid id.
fn fork_snapshot_id(vm_id: &str) -> String {
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.6fZ").to_string();
    let suffix = format!("-fork-{stamp}");
    let keep = MAX_ID_LEN.saturating_sub(suffix.len());
    vm_id.chars().take(keep).collect::<String>() + &suffix
}
