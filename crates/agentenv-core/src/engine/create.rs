//! `POST /v1/vm`: validate, reserve, prepare disks, launch — or roll back all of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::{
    CreateVmRequest, DiskInfo, DiskSpec, ShareInfo, ShareSpec, SnapshotStatus, VmInfo, VmState,
};
use chrono::Utc;

use super::host_paths::check_host_path;
use super::validate::{check_boot_args, check_network, check_share_guest_path};
use super::{Engine, VmSlot, AGENT_SOCKET, CONSOLE_LOG};
use crate::backend::{DriveSpec, LaunchSpec, NetAttachment, RestoreSpec, VmmInstance};
use crate::config::MAX_SLOTS;
use crate::error::EngineError;
use crate::host::FileKind;
use crate::ids::{checked_join, validate_id};
use crate::net::NetLease;

/// Longest path a Unix socket address holds.
const MAX_SOCKET_PATH: usize = 107;

/// Largest overlay disk, in GiB.
const MAX_DISK_GIB: u64 = 16 * 1024;

/// Most shares one VM may have (devices `vdc` … `vdj`).
const MAX_SHARES: usize = 8;

/// Where a new VM's writable disk comes from.
enum DiskSource {
    /// A fresh, empty ext4 disk of this size.
    Fresh(PathBuf, u64),
    /// A copy of a snapshot's disk.
    Restore(String, PathBuf),
    /// The user's own disk, used in place.
    InPlace,
    /// A copy of a full snapshot's disk; the VMM is restored from the
    /// snapshot, not booted.
    Full(String, PathBuf),
}

/// The disk part of a plan.
struct DiskPlan {
    info: DiskInfo,
    drives: Vec<DriveSpec>,
    source: DiskSource,
    has_overlay: bool,
}

/// A create request checked and resolved against the configuration.
struct Plan {
    info: VmInfo,
    launch: LaunchSpec,
    /// How the writable disk comes to be.
    disk_source: DiskSource,
    /// Share images to build: (host dir, image, size).
    shares: Vec<(PathBuf, PathBuf, u64)>,
    /// The network lease, assigned at reservation (automatic networking).
    lease: Option<NetLease>,
    /// The VM gets a network interface (automatic networking gives it a
    /// lease): not a VM restored from a snapshot of a VM without one.
    wants_network: bool,
}

impl Engine {
    /// Creates and boots a VM. On any failure everything made so far is undone.
    pub async fn create(self: &Arc<Self>, req: CreateVmRequest) -> Result<VmInfo, EngineError> {
        self.check_request(&req)?;
        let mut plan = match &req.restore {
            Some(r) => {
                check_restore_fields(&req)?;
                // What a restore must match is checked before anything is made.
                let (snap, full, base) = self
                    .restorable("restore.snapshot_id", &r.snapshot_id)
                    .await?;
                self.plan_restore(&req, snap, full, base)?
            }
            None => self.plan(&req)?,
        };
        let _hold = match &plan.disk_source {
            DiskSource::Restore(id, _) | DiskSource::Full(id, _) => Some(self.hold_snapshot(id)),
            _ => None,
        };
        let slot = self.reserve(&mut plan)?;
        let result = self.build(&slot, &plan).await;
        match result {
            Ok(inst) => {
                self.spawn_exit_monitor(plan.info.vm_id.clone(), inst.clone());
                self.spawn_agent_watch(plan.info.vm_id.clone(), inst);
                if req.wait_ready {
                    let timeout = req
                        .wait_ready_timeout_s
                        .unwrap_or(self.cfg.agent.ready_timeout_s);
                    return self
                        .wait_ready(&plan.info.vm_id, Duration::from_secs(timeout))
                        .await;
                }
                Ok(slot.info())
            }
            Err(e) => {
                self.rollback(&plan).await;
                Err(e)
            }
        }
    }

    /// The checks every create request gets: its id and `wait_ready`.
    fn check_request(&self, req: &CreateVmRequest) -> Result<(), EngineError> {
        validate_id("vm_id", &req.vm_id)?;
        if req.wait_ready && !self.cfg.agent.enable {
            return Err(EngineError::bad(
                "wait_ready",
                "wait_ready needs the guest agent, which is disabled (agent.enable = false)",
            ));
        }
        if let Some(t) = req.wait_ready_timeout_s {
            if !req.wait_ready {
                return Err(EngineError::bad(
                    "wait_ready_timeout_s",
                    "wait_ready_timeout_s is given without wait_ready: true",
                ));
            }
            if t == 0 || t > 3600 {
                return Err(EngineError::bad(
                    "wait_ready_timeout_s",
                    format!("wait_ready_timeout_s must be 1 to 3600, got {t}"),
                ));
            }
        }
        Ok(())
    }

    /// Validates a boot's request and resolves every path. No file-system
    /// writes.
    fn plan(&self, req: &CreateVmRequest) -> Result<Plan, EngineError> {
        let cfg = &self.cfg;
        let vm_id = req.vm_id.clone();
        let slots = req.slots.unwrap_or(cfg.default_slots);
        if slots == 0 || slots > MAX_SLOTS {
            return Err(EngineError::bad(
                "slots",
                format!("slots must be between 1 and {MAX_SLOTS}, got {slots}"),
            ));
        }
        let memory_mib = u64::from(slots)
            .checked_mul(cfg.memory_mib_per_slot)
            .ok_or_else(|| EngineError::bad("slots", "slots × memory_mib_per_slot overflows"))?;

        let kernel_name = req.kernel.as_deref().unwrap_or(&cfg.default_kernel);
        let kernel = self.existing_file(&cfg.kernel_root, "kernel", kernel_name, "kernel_root")?;
        let initrd = match req.initrd.as_deref().or(cfg.default_initrd.as_deref()) {
            Some(name) => {
                Some(self.existing_file(&cfg.initramfs_root, "initrd", name, "initramfs_root")?)
            }
            None => None,
        };

        let base_args = match &req.boot_args {
            Some(a) => {
                check_boot_args(a)?;
                a.trim().to_string()
            }
            None => cfg.default_boot_args.clone(),
        };

        let session_dir = checked_join(&cfg.session_root, "vm_id", &vm_id)?;
        let socket = self.control_socket(&vm_id)?;

        let DiskPlan {
            info: disk,
            mut drives,
            source: disk_source,
            has_overlay,
        } = self.plan_disk(
            req.disk
                .as_ref()
                .ok_or_else(|| EngineError::bad("disk", "disk is required"))?,
            &session_dir,
        )?;
        let (share_infos, shares, share_args) =
            self.plan_shares(&req.shares, &session_dir, &mut drives)?;

        let mut warnings = Vec::new();
        let net = match &req.network {
            Some(_) if self.net.is_some() => {
                warnings.push(
                    "`network` was ignored: automatic networking is enabled, so agentenv assigned the TAP, MAC and addresses".to_string(),
                );
                None
            }
            Some(n) => {
                check_network(n)?;
                Some(NetAttachment {
                    tap_name: n.tap_name.clone(),
                    guest_mac: n.guest_mac.to_ascii_lowercase(),
                })
            }
            None => None,
        };

        let mut boot_args = format!("{base_args} agentenv.vm_id={vm_id} agentenv.root=/dev/vda");
        if has_overlay {
            boot_args.push_str(" agentenv.overlay=/dev/vdb");
        }
        boot_args.push_str(&share_args);
        let console_log = session_dir.join(CONSOLE_LOG);
        let agent_socket = session_dir.join(AGENT_SOCKET);
        let now = Utc::now();
        let info = VmInfo {
            restored_from: None,
            limits: None,
            vm_id: vm_id.clone(),
            state: VmState::Creating,
            backend: self.vmm.kind(),
            api_socket: socket.display().to_string(),
            vcpus: slots,
            memory_mib,
            disk,
            shares: share_infos,
            kernel: kernel.display().to_string(),
            initrd: initrd.as_ref().map(|p| p.display().to_string()),
            boot_args: boot_args.clone(),
            tap_name: net.as_ref().map(|n| n.tap_name.clone()),
            guest_mac: net.as_ref().map(|n| n.guest_mac.clone()),
            host_ip: None,
            guest_ip: None,
            session_dir: session_dir.display().to_string(),
            console_log: console_log.display().to_string(),
            pid: None,
            created_at: now,
            updated_at: now,
            exit: None,
            warnings,
            ready: false,
            agent: None,
        };
        let launch = LaunchSpec {
            memory_file: Some(self.memory_file(&vm_id)?),
            cgroup_procs: Vec::new(),
            vm_id,
            session_dir,
            control_socket: socket,
            console_log,
            console_log_max_bytes: cfg.console_log_max_bytes,
            vcpus: slots,
            memory_mib,
            kernel,
            initrd,
            boot_args,
            drives,
            net,
            agent_socket: cfg.agent.enable.then_some(agent_socket),
            startup_timeout: Duration::from_millis(cfg.startup_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        };
        Ok(Plan {
            info,
            launch,
            disk_source,
            shares,
            lease: None,
            wants_network: true,
        })
    }

    /// The plan of a VM restored from the full snapshot `snap` (checked by
    /// [`Engine::restorable`]): what the snapshot records, with the new VM's
    /// own id, session directory, disk copy, sockets and network.
    fn plan_restore(
        &self,
        req: &CreateVmRequest,
        snap: agentenv_api::SnapshotInfo,
        full: agentenv_api::FullSnapshotInfo,
        base: PathBuf,
    ) -> Result<Plan, EngineError> {
        let vm_id = req.vm_id.clone();
        let session_dir = checked_join(&self.cfg.session_root, "vm_id", &vm_id)?;
        let socket = self.control_socket(&vm_id)?;
        let mut warnings = Vec::new();
        let given = match &req.network {
            Some(n) if self.net.is_none() => {
                check_network(n)?;
                Some(NetAttachment {
                    tap_name: n.tap_name.clone(),
                    guest_mac: n.guest_mac.to_ascii_lowercase(),
                })
            }
            _ => None,
        };
        let net = match given {
            Some(_) if !full.network => {
                warnings.push(
                    "`network` was ignored: the snapshot's vm had no network interface".into(),
                );
                None
            }
            given => given,
        };
        if full.network && self.net.is_none() && net.is_none() {
            return Err(EngineError::Conflict {
                message: format!(
                    "restore.snapshot_id: snapshot {} was taken of a vm with a network interface; \
                     networking is disabled, so give network {{tap_name, guest_mac}}",
                    snap.snapshot_id
                ),
                state: None,
            });
        }
        if full.agent && !self.cfg.agent.enable {
            warnings.push(
                "the guest agent is disabled (agent.enable = false): the restored vm keeps its source's host name, random state and clock".into(),
            );
        }
        let overlay = session_dir.join("overlay.ext4");
        let now = Utc::now();
        let info = VmInfo {
            vm_id: vm_id.clone(),
            state: VmState::Creating,
            backend: self.vmm.kind(),
            api_socket: socket.display().to_string(),
            vcpus: full.vcpus,
            memory_mib: full.memory_mib,
            disk: DiskInfo {
                kind: "snapshot".into(),
                rootfs_path: Some(base.display().to_string()),
                writable_path: overlay.display().to_string(),
                rootfs_id: snap.rootfs_id.clone(),
                snapshot_id: Some(snap.snapshot_id.clone()),
                size_bytes: snap.logical_bytes,
            },
            shares: Vec::new(),
            kernel: full.kernel.clone(),
            initrd: full.initrd.clone(),
            boot_args: full.boot_args.clone(),
            tap_name: net.as_ref().map(|n| n.tap_name.clone()),
            guest_mac: net.as_ref().map(|n| n.guest_mac.clone()),
            host_ip: None,
            guest_ip: None,
            session_dir: session_dir.display().to_string(),
            console_log: session_dir.join(CONSOLE_LOG).display().to_string(),
            pid: None,
            created_at: now,
            updated_at: now,
            exit: None,
            warnings,
            ready: false,
            agent: None,
            restored_from: Some(snap.snapshot_id.clone()),
            limits: None,
        };
        let agent_socket = full.agent.then(|| session_dir.join(AGENT_SOCKET));
        let launch = self.restore_launch(&info, &full, base, agent_socket, net);
        Ok(Plan {
            info,
            launch,
            disk_source: DiskSource::Full(snap.snapshot_id, overlay),
            shares: Vec::new(),
            lease: None,
            // No interface, so no lease either.
            wants_network: full.network,
        })
    }

    /// The control socket of VM `vm_id`, or 400 when its path would be too
    /// long for a Unix socket.
    fn control_socket(&self, vm_id: &str) -> Result<PathBuf, EngineError> {
        let socket = self.cfg.socket_root.join(format!("{vm_id}.sock"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(EngineError::bad(
                "vm_id",
                format!(
                    "vm_id {vm_id:?} is too long for socket_root: {} exceeds {MAX_SOCKET_PATH} bytes",
                    socket.display()
                ),
            ));
        }
        Ok(socket)
    }

    /// A regular file `root/name`, or 404 naming the field.
    fn existing_file(
        &self,
        root: &Path,
        field: &str,
        name: &str,
        root_key: &str,
    ) -> Result<PathBuf, EngineError> {
        let path = checked_join(root, field, name)?;
        match self.host.files.inspect(&path) {
            Ok(i) if i.kind == FileKind::File => Ok(path),
            Ok(_) => Err(EngineError::bad(
                field,
                format!("{field} {name:?} in {root_key} is not a regular file"),
            )),
            Err(_) => Err(EngineError::not_found(
                field,
                format!(
                    "{field} {name:?} not found in {root_key} ({})",
                    root.display()
                ),
            )),
        }
    }

    fn plan_disk(&self, spec: &DiskSpec, session_dir: &Path) -> Result<DiskPlan, EngineError> {
        let cfg = &self.cfg;
        let overlay = session_dir.join("overlay.ext4");
        match spec {
            DiskSpec::Overlay {
                rootfs_id,
                disk_size_gib,
            } => {
                let base = self.existing_file(
                    &cfg.rootfs_root,
                    "disk.rootfs_id",
                    rootfs_id,
                    "rootfs_root",
                )?;
                let gib = disk_size_gib.unwrap_or(cfg.default_disk_size_gib);
                if gib == 0 || gib > MAX_DISK_GIB {
                    return Err(EngineError::bad(
                        "disk.disk_size_gib",
                        format!(
                            "disk.disk_size_gib must be between 1 and {MAX_DISK_GIB}, got {gib}"
                        ),
                    ));
                }
                let size = gib << 30;
                Ok(DiskPlan {
                    info: DiskInfo {
                        kind: "overlay".into(),
                        rootfs_path: Some(base.display().to_string()),
                        writable_path: overlay.display().to_string(),
                        rootfs_id: Some(rootfs_id.clone()),
                        snapshot_id: None,
                        size_bytes: size,
                    },
                    drives: overlay_drives(base, &overlay),
                    source: DiskSource::Fresh(overlay.clone(), size),
                    has_overlay: true,
                })
            }
            DiskSpec::Snapshot { snapshot_id } => {
                const F: &str = "disk.snapshot_id";
                validate_id(F, snapshot_id)?;
                let snap = self
                    .snapshots
                    .get(snapshot_id)
                    .map_err(|e| EngineError::snapshot(F, e))?;
                if snap.status == SnapshotStatus::Corrupt {
                    return Err(EngineError::snapshot(
                        F,
                        crate::snapshot::SnapshotError::Corrupt {
                            id: snapshot_id.clone(),
                            why: "its checksum no longer matches".into(),
                        },
                    ));
                }
                match &snap.rootfs_id {
                    Some(rootfs_id) => {
                        let base = self
                            .existing_file(&cfg.rootfs_root, F, rootfs_id, "rootfs_root")
                            .map_err(|e| match e {
                                EngineError::NotFound { field, .. } => EngineError::NotFound {
                                    field,
                                    message: format!(
                                        "snapshot {snapshot_id} needs base image {rootfs_id:?}, which is gone from rootfs_root"
                                    ),
                                },
                                other => other,
                            })?;
                        Ok(DiskPlan {
                            info: DiskInfo {
                                kind: "snapshot".into(),
                                rootfs_path: Some(base.display().to_string()),
                                writable_path: overlay.display().to_string(),
                                rootfs_id: Some(rootfs_id.clone()),
                                snapshot_id: Some(snapshot_id.clone()),
                                size_bytes: snap.logical_bytes,
                            },
                            drives: overlay_drives(base, &overlay),
                            source: DiskSource::Restore(snapshot_id.clone(), overlay.clone()),
                            has_overlay: true,
                        })
                    }
                    None => {
                        // A snapshot of a direct disk is a whole root disk.
                        let root = session_dir.join("root.ext4");
                        Ok(DiskPlan {
                            info: DiskInfo {
                                kind: "snapshot".into(),
                                rootfs_path: None,
                                writable_path: root.display().to_string(),
                                rootfs_id: None,
                                snapshot_id: Some(snapshot_id.clone()),
                                size_bytes: snap.logical_bytes,
                            },
                            drives: vec![DriveSpec {
                                id: "rootfs".into(),
                                path: root.clone(),
                                read_only: false,
                                is_root: true,
                            }],
                            source: DiskSource::Restore(snapshot_id.clone(), root),
                            has_overlay: false,
                        })
                    }
                }
            }
            DiskSpec::Direct { path } => {
                let path = check_host_path(
                    &*self.host.files,
                    &cfg.direct_disk_roots,
                    "disk.path",
                    path,
                    false,
                )?;
                let size = self.host.files.inspect(&path).map(|i| i.len).unwrap_or(0);
                Ok(DiskPlan {
                    info: DiskInfo {
                        kind: "direct".into(),
                        rootfs_path: None,
                        writable_path: path.display().to_string(),
                        rootfs_id: None,
                        snapshot_id: None,
                        size_bytes: size,
                    },
                    drives: vec![DriveSpec {
                        id: "rootfs".into(),
                        path,
                        read_only: false,
                        is_root: true,
                    }],
                    source: DiskSource::InPlace,
                    has_overlay: false,
                })
            }
        }
    }

    /// Checks shares and adds their drives; returns what the VM shows, the
    /// images to build, and the boot args that tell overlay-init where to mount.
    #[allow(clippy::type_complexity)]
    fn plan_shares(
        &self,
        shares: &[ShareSpec],
        session_dir: &Path,
        drives: &mut Vec<DriveSpec>,
    ) -> Result<(Vec<ShareInfo>, Vec<(PathBuf, PathBuf, u64)>, String), EngineError> {
        if shares.len() > MAX_SHARES {
            return Err(EngineError::bad(
                "shares",
                format!("at most {MAX_SHARES} shares, got {}", shares.len()),
            ));
        }
        let mut infos = Vec::new();
        let mut builds = Vec::new();
        let mut args = String::new();
        let mut seen = std::collections::HashSet::new();
        for (i, share) in shares.iter().enumerate() {
            let field = format!("shares[{i}]");
            let host = check_host_path(
                &*self.host.files,
                &self.cfg.direct_disk_roots,
                &format!("{field}.host_path"),
                &share.host_path,
                true,
            )?;
            let g = &share.guest_path;
            let gfield = format!("{field}.guest_path");
            check_share_guest_path(&gfield, g)?;
            // `/mnt`, `/mnt/` and `//mnt` are one mount point.
            let key: Vec<&str> = g.split('/').filter(|c| !c.is_empty()).collect();
            if !seen.insert(key.join("/")) {
                return Err(EngineError::bad(
                    &gfield,
                    format!("{gfield} {g:?} is used twice"),
                ));
            }
            let used = self
                .host
                .files
                .dir_usage(&host)
                .map_err(|e| EngineError::bad(&format!("{field}.host_path"), e.to_string()))?;
            // Room for the data, its metadata and the journal.
            let size = (used + used / 2 + (64 << 20)).next_multiple_of(1 << 20);
            let image = session_dir.join(format!("share{i}.ext4"));
            let device = format!("/dev/vd{}", (b'a' + drives.len() as u8) as char);
            drives.push(DriveSpec {
                id: format!("share{i}"),
                path: image.clone(),
                read_only: share.read_only,
                is_root: false,
            });
            args.push_str(&format!(
                " agentenv.share={device}:{g}:{}",
                if share.read_only { "ro" } else { "rw" }
            ));
            infos.push(ShareInfo {
                host_path: host.display().to_string(),
                guest_path: g.clone(),
                read_only: share.read_only,
                image_path: image.display().to_string(),
                device,
            });
            builds.push((host, image, size));
        }
        Ok((infos, builds, args))
    }

    /// Inserts the VM in `creating`, checking the id is free and memory suffices,
    /// and assigns its network lease.
    fn reserve(&self, plan: &mut Plan) -> Result<Arc<VmSlot>, EngineError> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let id = plan.info.vm_id.clone();
        if let Some(existing) = vms.get(&id) {
            let state = existing.state();
            return Err(EngineError::Conflict {
                message: format!("vm {id} already exists (state {state})"),
                state: Some(state),
            });
        }
        let mut committed = 0u64;
        for s in vms.values() {
            let rt = s.rt();
            let info = &rt.info;
            if info.state.has_vmm() {
                committed += info.memory_mib;
                // Two VMs never share a direct disk.
                if plan.info.disk.kind == "direct"
                    && info.disk.kind == "direct"
                    && info.disk.writable_path == plan.info.disk.writable_path
                {
                    return Err(EngineError::Conflict {
                        message: format!(
                            "disk.path {} is already used by vm {}",
                            info.disk.writable_path, info.vm_id
                        ),
                        state: None,
                    });
                }
            }
        }
        let limit = self
            .cfg
            .max_memory_mib
            .unwrap_or_else(|| self.host.facts.memory_total_mib());
        let want = plan.info.memory_mib;
        if committed.saturating_add(want) > limit {
            return Err(EngineError::InsufficientMemory {
                message: format!(
                    "not enough memory for vm {id}: it needs {want} MiB, {committed} MiB of {limit} MiB are committed to running vms"
                ),
            });
        }
        if let (Some((_, netplan)), true) = (&self.net, plan.wants_network) {
            let used = vms.values().filter_map(|s| s.lease()).map(|l| l.index);
            let lease = netplan.next_free(used).ok_or_else(|| {
                EngineError::Exhausted(format!(
                    "no free vm subnet: all {} are in use",
                    netplan.capacity()
                ))
            })?;
            apply_lease(plan, lease);
        }
        let slot = VmSlot::new(
            plan.info.clone(),
            plan.lease.clone(),
            plan.launch.agent_socket.clone(),
        );
        vms.insert(id.clone(), slot.clone());
        Ok(slot)
    }

    /// The steps that make files and processes, in order.
    async fn build(
        &self,
        slot: &Arc<VmSlot>,
        plan: &Plan,
    ) -> Result<Arc<dyn VmmInstance>, EngineError> {
        let _op = slot.op.lock().await;
        let fp = &self.failpoints;
        let dir = &plan.launch.session_dir;
        if self.host.files.inspect(dir).is_ok() {
            return Err(EngineError::Conflict {
                message: format!(
                    "session directory {} already exists without a vm record",
                    dir.display()
                ),
                state: None,
            });
        }
        // A socket (or file) left at the control socket path by a dead VMM is
        // replaced at launch; anything that cannot simply be removed is not
        // ours to touch, and would only make the VMM fail later.
        let sock = &plan.launch.control_socket;
        if let Ok(f) = self.host.files.inspect(sock) {
            if matches!(f.kind, FileKind::Dir | FileKind::Device) {
                return Err(EngineError::Conflict {
                    message: format!(
                        "the control socket path {} is taken by a {}; remove it",
                        sock.display(),
                        if f.kind == FileKind::Dir {
                            "directory"
                        } else {
                            "device node"
                        }
                    ),
                    state: None,
                });
            }
        }
        self.host
            .files
            .probe_new_entry(&self.cfg.socket_root)
            .map_err(|mut e| {
                e.context = format!("socket_root: {}", e.context);
                e
            })?;
        self.host.files.create_dir(dir)?;
        fp.point("create.session_dir").await?;
        if let (Some((net, _)), Some(lease)) = (&self.net, &plan.lease) {
            net.setup(lease)
                .await
                .map_err(|e| EngineError::Network(e.to_string()))?;
        }
        fp.point("create.network").await?;
        let mut restore = None;
        match &plan.disk_source {
            DiskSource::Fresh(path, size) => self.host.images.create_ext4_disk(path, *size).await?,
            DiskSource::Restore(id, path) => {
                self.snapshots
                    .restore(id, path)
                    .await
                    .map_err(|e| EngineError::snapshot("disk.snapshot_id", e))?;
            }
            DiskSource::InPlace => {}
            DiskSource::Full(id, path) => {
                let files = self
                    .snapshots
                    .open_full(id, path)
                    .await
                    .map_err(|e| EngineError::snapshot("restore.snapshot_id", e))?;
                restore = Some(files);
            }
        }
        for (dir, image, size) in &plan.shares {
            self.host
                .images
                .create_ext4_from_dir(dir, image, *size)
                .await?;
        }
        fp.point("create.disk").await?;
        let mut launch = plan.launch.clone();
        launch.cgroup_procs =
            self.place_in_cgroup(slot, plan.info.vcpus, plan.info.memory_mib, None)?;
        self.write_record(slot)?;
        fp.point("create.record").await?;
        let started = match restore {
            Some(files) => {
                self.vmm
                    .restore(&RestoreSpec {
                        launch,
                        state: files.state,
                        memory: files.memory,
                    })
                    .await
            }
            None => self.vmm.launch(&launch).await,
        };
        let inst: Arc<dyn VmmInstance> = Arc::from(started.map_err(|source| EngineError::Vmm {
            vm_id: plan.info.vm_id.clone(),
            source,
        })?);
        if let Err(e) = fp.point("create.launch").await {
            let _ = inst.kill().await;
            return Err(e);
        }
        let _ = slot.update(|info| {
            info.pid = inst.pid();
            Ok::<(), std::convert::Infallible>(())
        });
        slot.set_process(inst.identity());
        let settled = match fp.point("create.running").await {
            Ok(()) => self.set_state(slot, VmState::Running),
            Err(e) => Err(e),
        };
        if let Err(e) = settled {
            let _ = inst.kill().await;
            return Err(e);
        }
        if plan.info.restored_from.is_some() {
            // Its agent gives it its own identity before it counts as ready.
            slot.set_identity(Some(self.identity_for(slot)));
        }
        // Still under the operation lock: an operation that waited for it (a
        // delete) must find the VMM to stop, not a running VM without one.
        slot.set_instance(Some(inst.clone()));
        Ok(inst)
    }

    /// Undoes a failed create: session directory, socket, cgroup, table entry.
    async fn rollback(&self, plan: &Plan) {
        let id = &plan.info.vm_id;
        if let (Some((net, _)), Some(lease)) = (&self.net, &plan.lease) {
            if let Err(e) = net.teardown(lease).await {
                tracing::error!("vm {id}: rollback: {e}");
            }
        }
        if let Err(e) = self.host.files.remove_dir_all(&plan.launch.session_dir) {
            tracing::error!("vm {id}: rollback: {e}");
        }
        if let Err(e) = self.host.files.remove_file(&plan.launch.control_socket) {
            tracing::error!("vm {id}: rollback: {e}");
        }
        if let Some(mem) = &plan.launch.memory_file {
            if let Err(e) = self.host.files.remove_file(mem) {
                tracing::error!("vm {id}: rollback: {e}");
            }
        }
        if let Err(e) = self.remove_cgroup(id).await {
            tracing::error!("vm {id}: rollback: {e}");
        }
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Puts a lease's TAP, MAC and addresses into the plan.
fn apply_lease(plan: &mut Plan, lease: NetLease) {
    let info = &mut plan.info;
    info.tap_name = Some(lease.tap_name.clone());
    info.guest_mac = Some(lease.guest_mac.clone());
    info.host_ip = Some(lease.host_ip.to_string());
    info.guest_ip = Some(lease.guest_ip.to_string());
    info.boot_args = format!("{} {}", info.boot_args, lease.boot_args());
    plan.launch.boot_args = info.boot_args.clone();
    plan.launch.net = Some(NetAttachment {
        tap_name: lease.tap_name.clone(),
        guest_mac: lease.guest_mac.clone(),
    });
    plan.lease = Some(lease);
}

/// Refuses what a restore takes from its snapshot, naming the field.
fn check_restore_fields(req: &CreateVmRequest) -> Result<(), EngineError> {
    let given = [
        ("disk", req.disk.is_some()),
        ("slots", req.slots.is_some()),
        ("kernel", req.kernel.is_some()),
        ("initrd", req.initrd.is_some()),
        ("boot_args", req.boot_args.is_some()),
        ("shares", !req.shares.is_empty()),
    ];
    match given.iter().find(|(_, g)| *g) {
        Some((field, _)) => Err(EngineError::bad(
            field,
            format!("{field} cannot be given with restore: the snapshot decides it"),
        )),
        None => Ok(()),
    }
}

/// The drives of an overlay VM: the read-only base image it boots from, then
/// its writable overlay (`/dev/vda`, `/dev/vdb`).
pub(super) fn overlay_drives(base: PathBuf, overlay: &Path) -> Vec<DriveSpec> {
    vec![
        DriveSpec {
            id: "rootfs".into(),
            path: base,
            read_only: true,
            is_root: true,
        },
        DriveSpec {
            id: "overlay".into(),
            path: overlay.to_path_buf(),
            read_only: false,
            is_root: false,
        },
    ]
}
