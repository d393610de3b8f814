//! `POST /v1/vm`: validate, reserve, prepare disks, launch — or roll back all of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::{
    CreateVmRequest, DiskInfo, DiskSpec, ShareInfo, ShareSpec, SnapshotStatus, VmInfo, VmState,
};
use chrono::Utc;

use super::host_paths::open_host_path;
use super::validate::{
    check_boot_args, check_egress, check_firecracker_cmdline, check_network, check_share_guest_path,
};
use super::{Engine, VmSlot, AGENT_SOCKET, CONSOLE_LOG};
use crate::backend::{DriveSpec, LaunchSpec, NetAttachment, RestoreSpec, VmmInstance};
use crate::config::MAX_SLOTS;
use crate::error::EngineError;
use crate::host::{FileKind, StageShareError};
use crate::ids::{checked_join, validate_id};
use crate::net::{EgressPolicy, NetLease};

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
    /// A direct disk, opened.
    direct: Option<crate::host::OpenedPath>,
}

/// One share image to build: the opened host directory is copied into a
/// private directory in the session, and the image made from that copy.
struct ShareBuild {
    /// The request's field (`shares[i].host_path`).
    field: String,
    /// The share's directory, opened.
    dir: crate::host::OpenedPath,
    /// The private copy (removed once the image is built).
    staging: PathBuf,
    /// The image.
    image: PathBuf,
}

/// A create request checked and resolved against the configuration.
struct Plan {
    info: VmInfo,
    launch: LaunchSpec,
    /// How the writable disk comes to be.
    disk_source: DiskSource,
    /// Share images to build.
    shares: Vec<ShareBuild>,
    /// The direct disk the daemon opened.
    direct_disk: Option<crate::host::OpenedPath>,
    /// The network lease, assigned at reservation (automatic networking).
    lease: Option<NetLease>,
    /// The VM gets a network interface (automatic networking gives it a
    /// lease): not a VM restored from a snapshot of a VM without one.
    wants_network: bool,
    /// What the guest may reach (given to its lease).
    egress: EgressPolicy,
}

impl Engine {
    /// Creates and boots a VM without an owner (visible to admins only). On
    /// any failure everything made so far is undone.
    pub async fn create(self: &Arc<Self>, req: CreateVmRequest) -> Result<VmInfo, EngineError> {
        self.create_owned(req, None).await
    }

    /// [`Engine::create`], the VM recorded as `owner`'s.
    pub(super) async fn create_owned(
        self: &Arc<Self>,
        req: CreateVmRequest,
        owner: Option<String>,
    ) -> Result<VmInfo, EngineError> {
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
        plan.info.owner = owner;
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

        let acpi_warning = self.check_acpi_off(&kernel, &base_args, req.boot_args.is_none())?;

        let session_dir = checked_join(&cfg.session_root, "vm_id", &vm_id)?;
        let socket = self.control_socket(&vm_id)?;

        let DiskPlan {
            info: disk,
            mut drives,
            source: disk_source,
            has_overlay,
            direct: direct_disk,
        } = self.plan_disk(
            req.disk
                .as_ref()
                .ok_or_else(|| EngineError::bad("disk", "disk is required"))?,
            &session_dir,
        )?;
        let (share_infos, shares, share_args) =
            self.plan_shares(&req.shares, &session_dir, &mut drives)?;

        let mut warnings: Vec<String> = acpi_warning.into_iter().collect();
        let egress = check_egress(req.network.as_ref(), self.net.is_some())?;
        let net = match &req.network {
            Some(n) if self.net.is_some() => {
                if n.tap_name.is_some() || n.guest_mac.is_some() {
                    warnings.push(
                        "`network` tap_name and guest_mac were ignored: automatic networking is enabled, so agentenv assigned the TAP, MAC and addresses".to_string(),
                    );
                }
                None
            }
            Some(n) => Some(check_network(n)?),
            None => None,
        };

        let mut boot_args = format!("{base_args} agentenv.vm_id={vm_id} agentenv.root=/dev/vda");
        if has_overlay {
            boot_args.push_str(" agentenv.overlay=/dev/vdb");
        }
        boot_args.push_str(&share_args);
        if self.vmm.kind() == agentenv_api::BackendKind::Firecracker {
            // A lease's parameters come later (at reserve): counted at their
            // longest, " agentenv.ip=255.255.255.255/30 agentenv.gw=255.255.255.255".
            let lease = if self.net.is_some() { 59 } else { 0 };
            let root_ro = drives.first().filter(|d| d.is_root).map(|d| d.read_only);
            let devices = drives.len()
                + usize::from(net.is_some() || self.net.is_some())
                + usize::from(cfg.agent.enable);
            check_firecracker_cmdline(&boot_args, lease, root_ro, devices)?;
        }
        let console_log = session_dir.join(CONSOLE_LOG);
        let agent_socket = session_dir.join(AGENT_SOCKET);
        let now = Utc::now();
        let info = VmInfo {
            restored_from: None,
            owner: None,
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
            egress: None,
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
            direct_disk,
            lease: None,
            wants_network: true,
            egress,
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
        let egress = check_egress(req.network.as_ref(), self.net.is_some())?;
        let given = match &req.network {
            Some(n) if self.net.is_none() => Some(check_network(n)?),
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
        if !full.network && req.network.as_ref().is_some_and(|n| n.has_egress()) {
            warnings.push(
                "`network` allow and internet were ignored: the snapshot's vm had no network interface".into(),
            );
        }
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
            egress: None,
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
            owner: None,
            limits: None,
        };
        let agent_socket = full.agent.then(|| session_dir.join(AGENT_SOCKET));
        let launch = self.restore_launch(&info, &full, base, agent_socket, net);
        Ok(Plan {
            info,
            launch,
            disk_source: DiskSource::Full(snap.snapshot_id, overlay),
            shares: Vec::new(),
            direct_disk: None,
            lease: None,
            // No interface, so no lease either.
            wants_network: full.network,
            egress,
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
    /// With `acpi=off` in the boot args the guest finds its virtio-mmio
    /// devices only through `virtio_mmio.device=` on its command line (QEMU
    /// microvm without ACPI and Firecracker both put them there), which a
    /// kernel reads only when built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y.
    /// The kernel's config is read from a sidecar (`<kernel>.config`, or
    /// Debian's `config-<version>` beside `vmlinuz-<version>`): a kernel that
    /// says no is refused (400 naming `boot_args`) instead of a guest that
    /// never finds its disks; without a sidecar the create goes on with a
    /// warning.
    fn check_acpi_off(
        &self,
        kernel: &Path,
        args: &str,
        from_config: bool,
    ) -> Result<Option<String>, EngineError> {
        if !crate::backend::boot_args_turn_acpi_off(args) {
            return Ok(None);
        }
        let name = kernel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = kernel.parent().unwrap_or(Path::new("/"));
        let mut sidecars = vec![dir.join(format!("{name}.config"))];
        if let Some(v) = name
            .strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
        {
            sidecars.push(dir.join(format!("config-{v}")));
        }
        let Some((sidecar, text)) = sidecars
            .iter()
            .find_map(|p| Some((p, self.host.files.read(p).ok()?)))
        else {
            return Ok(Some(format!(
                "boot_args has acpi=off: the guest finds its disks only if the kernel at {} was built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y, which agentenv cannot tell (no {} beside it); without it the guest never gets ready",
                kernel.display(),
                sidecars[0].display()
            )));
        };
        let text = String::from_utf8_lossy(&text);
        if text
            .lines()
            .any(|l| l.trim() == "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y")
        {
            return Ok(None);
        }
        Err(EngineError::bad(
            "boot_args",
            format!(
                "boot_args{} has acpi=off, but the kernel at {} cannot find virtio-mmio devices without ACPI (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is off in {}); drop acpi=off or use a kernel built with resources/kernel/firecracker.fragment (scripts/build-kernel.sh --fragment)",
                if from_config { " (the config's default_boot_args)" } else { "" },
                kernel.display(),
                sidecar.display()
            ),
        ))
    }

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
                    direct: None,
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
                        // The overlay holds block-level changes to the base
                        // as it was: over a changed base they are garbage.
                        if let Some(want) = &snap.rootfs_fingerprint {
                            let changed = match self.host.files.fingerprint(&base) {
                                Ok(fp) if &fp == want => None,
                                Ok(_) => Some("that file has changed since".to_string()),
                                Err(e) => Some(e.to_string()),
                            };
                            if let Some(why) = changed {
                                return Err(EngineError::Conflict {
                                    message: format!(
                                        "{F}: snapshot {snapshot_id} needs the base image (rootfs) {} as it was; {why}",
                                        base.display()
                                    ),
                                    state: None,
                                });
                            }
                        }
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
                            direct: None,
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
                                fd: None,
                            }],
                            source: DiskSource::Restore(snapshot_id.clone(), root),
                            has_overlay: false,
                            direct: None,
                        })
                    }
                }
            }
            DiskSpec::Direct { path } => {
                let opened = open_host_path(&*self.host.files, cfg, "disk.path", path, false)?;
                Ok(DiskPlan {
                    info: DiskInfo {
                        kind: "direct".into(),
                        rootfs_path: None,
                        writable_path: opened.path.display().to_string(),
                        rootfs_id: None,
                        snapshot_id: None,
                        size_bytes: opened.info.len,
                    },
                    drives: vec![DriveSpec {
                        id: "rootfs".into(),
                        path: opened.path.clone(),
                        read_only: false,
                        is_root: true,
                        fd: opened.fd.clone(),
                    }],
                    source: DiskSource::InPlace,
                    has_overlay: false,
                    direct: Some(opened),
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
    ) -> Result<(Vec<ShareInfo>, Vec<ShareBuild>, String), EngineError> {
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
            let hfield = format!("{field}.host_path");
            let dir = open_host_path(
                &*self.host.files,
                &self.cfg,
                &hfield,
                &share.host_path,
                true,
            )?;
            let host = dir.path.clone();
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
            // A first look, for a quick answer; the copy counts again.
            let used = self
                .host
                .files
                .dir_usage(&host)
                .map_err(|e| EngineError::bad(&hfield, e.to_string()))?;
            if used > self.max_share_bytes() {
                return Err(share_too_big(
                    &hfield,
                    &share.host_path,
                    self.cfg.max_share_mib,
                ));
            }
            let image = session_dir.join(format!("share{i}.ext4"));
            let device = format!("/dev/vd{}", (b'a' + drives.len() as u8) as char);
            drives.push(DriveSpec {
                id: format!("share{i}"),
                path: image.clone(),
                read_only: share.read_only,
                is_root: false,
                fd: None,
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
            builds.push(ShareBuild {
                field: hfield,
                dir,
                staging: session_dir.join(format!("share{i}.staging")),
                image,
            });
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
                // Two VMs never share a direct disk: not by its path, and
                // not by its inode (the file the daemon opened).
                let file = |o: &crate::host::OpenedPath| (o.dev, o.ino);
                let same_file = plan
                    .direct_disk
                    .as_ref()
                    .is_some_and(|mine| s.direct_disk.get().map(file) == Some(file(mine)));
                if same_file
                    || plan.info.disk.kind == "direct"
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
            apply_lease(plan, lease, netplan.deny_private());
        }
        let slot = VmSlot::new(
            plan.info.clone(),
            plan.lease.clone(),
            plan.launch.agent_socket.clone(),
        );
        if let Some(file) = &plan.direct_disk {
            let _ = slot.direct_disk.set(file.clone());
        }
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
        for share in &plan.shares {
            self.build_share(share).await?;
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

    /// The share's image: its opened directory is copied (within
    /// `max_share_mib`) into a private directory, the image built from the
    /// copy, and the copy removed.
    async fn build_share(&self, share: &ShareBuild) -> Result<(), EngineError> {
        let f = &share.field;
        let used = self
            .host
            .images
            .stage_share(&share.dir, &share.staging, self.max_share_bytes())
            .await
            .map_err(|e| match e {
                StageShareError::TooBig { path, limit_mib } => {
                    share_too_big(f, &path.display().to_string(), limit_mib)
                }
                StageShareError::TooDeep { .. } => EngineError::bad(f, format!("{f}: {e}")),
                StageShareError::Host(e) => e.into(),
            })?;
        // Room for the data, its metadata and the journal.
        let size = (used + used / 2 + (64 << 20)).next_multiple_of(1 << 20);
        let built = self
            .host
            .images
            .create_ext4_from_dir(&share.staging, &share.image, size)
            .await;
        let removed = self.host.files.remove_dir_all(&share.staging);
        built?;
        removed?;
        Ok(())
    }

    fn max_share_bytes(&self) -> u64 {
        self.cfg.max_share_mib.saturating_mul(1 << 20)
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

/// Puts a lease's TAP, MAC, addresses and egress policy into the plan, and
/// the VM's id into the lease (its TAP is marked with it).
fn apply_lease(plan: &mut Plan, lease: NetLease, deny_private: bool) {
    let info = &mut plan.info;
    info.tap_name = Some(lease.tap_name.clone());
    info.guest_mac = Some(lease.guest_mac.clone());
    info.host_ip = Some(lease.host_ip.to_string());
    info.guest_ip = Some(lease.guest_ip.to_string());
    let mut lease = lease;
    lease.vm_id = info.vm_id.clone();
    lease.egress = plan.egress.clone();
    info.egress = Some(agentenv_api::EgressInfo {
        internet: lease.egress.internet,
        allow: lease.egress.allow_strings(),
        deny_private,
    });
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
            fd: None,
        },
        DriveSpec {
            id: "overlay".into(),
            path: overlay.to_path_buf(),
            read_only: false,
            is_root: false,
            fd: None,
        },
    ]
}

/// A share over `max_share_mib`: 400 naming the field.
fn share_too_big(field: &str, path: &str, limit_mib: u64) -> EngineError {
    EngineError::bad(
        field,
        format!("{field} {path:?} holds more than max_share_mib ({limit_mib} MiB)"),
    )
}
