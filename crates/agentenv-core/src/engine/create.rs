//! `POST /v1/vm`: validate, reserve, prepare disks, launch — or roll back all of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::{CreateVmRequest, DiskInfo, DiskSpec, NetworkSpec, VmInfo, VmState};
use chrono::Utc;

use super::{Engine, VmSlot, CONSOLE_LOG};
use crate::backend::{DriveSpec, LaunchSpec, NetAttachment, VmmInstance};
use crate::config::MAX_SLOTS;
use crate::error::EngineError;
use crate::host::FileKind;
use crate::ids::{checked_join, validate_id};
use crate::net::NetLease;

/// Longest path a Unix socket address holds.
const MAX_SOCKET_PATH: usize = 107;

/// Longest kernel command line accepted from a request.
const MAX_BOOT_ARGS: usize = 2048;

/// Largest overlay disk, in GiB.
const MAX_DISK_GIB: u64 = 16 * 1024;

/// A create request checked and resolved against the configuration.
struct Plan {
    info: VmInfo,
    launch: LaunchSpec,
    /// The overlay disk to create, with its size.
    new_disk: Option<(PathBuf, u64)>,
    /// The network lease, assigned at reservation (automatic networking).
    lease: Option<NetLease>,
}

impl Engine {
    /// Creates and boots a VM. On any failure everything made so far is undone.
    pub async fn create(self: &Arc<Self>, req: CreateVmRequest) -> Result<VmInfo, EngineError> {
        let mut plan = self.plan(&req)?;
        let slot = self.reserve(&mut plan)?;
        let result = self.build(&slot, &plan).await;
        match result {
            Ok(inst) => {
                slot.set_instance(Some(inst.clone()));
                self.spawn_exit_monitor(plan.info.vm_id.clone(), inst);
                Ok(slot.info())
            }
            Err(e) => {
                self.rollback(&plan).await;
                Err(e)
            }
        }
    }

    /// Validates the request and resolves every path. No file-system writes.
    fn plan(&self, req: &CreateVmRequest) -> Result<Plan, EngineError> {
        let cfg = &self.cfg;
        validate_id("vm_id", &req.vm_id)?;
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
            Some(name) => Some(self.existing_file(
                &cfg.initramfs_root,
                "initrd",
                name,
                "initramfs_root",
            )?),
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
        let socket = cfg.socket_root.join(format!("{vm_id}.sock"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(EngineError::bad(
                "vm_id",
                format!(
                    "vm_id {vm_id:?} is too long for socket_root: {} exceeds {MAX_SOCKET_PATH} bytes",
                    socket.display()
                ),
            ));
        }

        let (disk, drives, new_disk, has_overlay) = self.plan_disk(&req.disk, &session_dir)?;

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
        let console_log = session_dir.join(CONSOLE_LOG);
        let now = Utc::now();
        let info = VmInfo {
            vm_id: vm_id.clone(),
            state: VmState::Creating,
            backend: self.vmm.kind(),
            api_socket: socket.display().to_string(),
            vcpus: slots,
            memory_mib,
            disk,
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
        };
        let launch = LaunchSpec {
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
            startup_timeout: Duration::from_millis(cfg.startup_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        };
        Ok(Plan {
            info,
            launch,
            new_disk,
            lease: None,
        })
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
        match self.host.inspect(&path) {
            Ok(i) if i.kind == FileKind::File => Ok(path),
            Ok(_) => Err(EngineError::bad(
                field,
                format!("{field} {name:?} in {root_key} is not a regular file"),
            )),
            Err(_) => Err(EngineError::not_found(
                field,
                format!("{field} {name:?} not found in {root_key} ({})", root.display()),
            )),
        }
    }

    #[allow(clippy::type_complexity)]
    fn plan_disk(
        &self,
        spec: &DiskSpec,
        session_dir: &Path,
    ) -> Result<(DiskInfo, Vec<DriveSpec>, Option<(PathBuf, u64)>, bool), EngineError> {
        let cfg = &self.cfg;
        match spec {
            DiskSpec::Overlay {
                rootfs_id,
                disk_size_gib,
            } => {
                let base =
                    self.existing_file(&cfg.rootfs_root, "disk.rootfs_id", rootfs_id, "rootfs_root")?;
                let gib = disk_size_gib.unwrap_or(cfg.default_disk_size_gib);
                if gib == 0 || gib > MAX_DISK_GIB {
                    return Err(EngineError::bad(
                        "disk.disk_size_gib",
                        format!("disk.disk_size_gib must be between 1 and {MAX_DISK_GIB}, got {gib}"),
                    ));
                }
                let size = gib << 30;
                let overlay = session_dir.join("overlay.ext4");
                let info = DiskInfo {
                    kind: "overlay".into(),
                    rootfs_path: Some(base.display().to_string()),
                    writable_path: overlay.display().to_string(),
                    rootfs_id: Some(rootfs_id.clone()),
                    snapshot_id: None,
                    size_bytes: size,
                };
                let drives = vec![
                    DriveSpec {
                        id: "rootfs".into(),
                        path: base,
                        read_only: true,
                        is_root: true,
                    },
                    DriveSpec {
                        id: "overlay".into(),
                        path: overlay.clone(),
                        read_only: false,
                        is_root: false,
                    },
                ];
                Ok((info, drives, Some((overlay, size)), true))
            }
            DiskSpec::Snapshot { snapshot_id } => {
                validate_id("disk.snapshot_id", snapshot_id)?;
                Err(EngineError::not_found(
                    "disk.snapshot_id",
                    format!("snapshot {snapshot_id:?} not found"),
                ))
            }
            DiskSpec::Direct { path } => {
                let path = self.check_direct_disk(path)?;
                let size = self.host.inspect(&path).map(|i| i.len).unwrap_or(0);
                let info = DiskInfo {
                    kind: "direct".into(),
                    rootfs_path: None,
                    writable_path: path.display().to_string(),
                    rootfs_id: None,
                    snapshot_id: None,
                    size_bytes: size,
                };
                let drives = vec![DriveSpec {
                    id: "rootfs".into(),
                    path,
                    read_only: false,
                    is_root: true,
                }];
                Ok((info, drives, None, false))
            }
        }
    }

    /// A direct disk must be an absolute path to a regular, singly-linked,
    /// symlink-free file under one of `direct_disk_roots`.
    fn check_direct_disk(&self, raw: &str) -> Result<PathBuf, EngineError> {
        const F: &str = "disk.path";
        if raw.contains('\0') {
            return Err(EngineError::bad(F, "disk.path must not contain NUL"));
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(EngineError::bad(
                F,
                format!("disk.path {raw:?} must be an absolute path"),
            ));
        }
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(EngineError::bad(F, format!("disk.path {raw:?} must not contain `..`")));
        }
        if self.cfg.direct_disk_roots.is_empty() {
            return Err(EngineError::Forbidden {
                field: F.into(),
                message: "direct disks are disabled: no direct_disk_roots are configured".into(),
            });
        }
        let info = self.host.inspect(&path).map_err(|_| {
            EngineError::not_found(F, format!("disk.path {raw:?} does not exist"))
        })?;
        let kind_err = |what: &str| EngineError::bad(F, format!("disk.path {raw:?} is {what}"));
        match info.kind {
            FileKind::File => {}
            FileKind::Symlink => return Err(kind_err("a symlink")),
            FileKind::Dir => return Err(kind_err("a directory")),
            FileKind::Device => return Err(kind_err("a device")),
            FileKind::Special => return Err(kind_err("a FIFO or socket")),
        }
        if info.nlink > 1 {
            return Err(kind_err("a file with more than one hard link"));
        }
        let canonical = self
            .host
            .canonicalize(&path)
            .map_err(|e| EngineError::bad(F, format!("disk.path {raw:?}: {e}")))?;
        if canonical != path {
            return Err(kind_err("reached through a symlink"));
        }
        let allowed = self.cfg.direct_disk_roots.iter().any(|root| {
            self.host
                .canonicalize(root)
                .is_ok_and(|r| canonical.starts_with(&r) && canonical != r)
        });
        if !allowed {
            return Err(EngineError::Forbidden {
                field: F.into(),
                message: format!("disk.path {raw:?} is not under any of direct_disk_roots"),
            });
        }
        Ok(canonical)
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
            let info = s.info.lock().unwrap_or_else(|p| p.into_inner());
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
            .unwrap_or_else(|| self.host.memory_total_mib());
        let want = plan.info.memory_mib;
        if committed.saturating_add(want) > limit {
            return Err(EngineError::InsufficientMemory {
                message: format!(
                    "not enough memory for vm {id}: it needs {want} MiB, {committed} MiB of {limit} MiB are committed to running vms"
                ),
            });
        }
        if let Some((_, netplan)) = &self.net {
            let used = vms.values().filter_map(|s| s.lease()).map(|l| l.index);
            let lease = netplan.next_free(used).ok_or_else(|| {
                EngineError::Exhausted(format!(
                    "no free vm subnet: all {} are in use",
                    netplan.capacity()
                ))
            })?;
            apply_lease(plan, lease);
        }
        let slot = VmSlot::new(plan.info.clone(), plan.lease.clone());
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
        if self.host.inspect(dir).is_ok() {
            return Err(EngineError::Conflict {
                message: format!(
                    "session directory {} already exists without a vm record",
                    dir.display()
                ),
                state: None,
            });
        }
        self.host.create_dir(dir)?;
        fp.check("create.session_dir")?;
        if let (Some((net, _)), Some(lease)) = (&self.net, &plan.lease) {
            net.setup(lease)
                .await
                .map_err(|e| EngineError::Network(e.to_string()))?;
        }
        fp.check("create.network")?;
        if let Some((path, size)) = &plan.new_disk {
            self.host.create_ext4_disk(path, *size).await?;
        }
        fp.check("create.disk")?;
        self.persist(&plan.info, plan.lease.clone())?;
        fp.check("create.record")?;
        let inst: Arc<dyn VmmInstance> =
            Arc::from(self.vmm.launch(&plan.launch).await.map_err(|source| {
                EngineError::Vmm {
                    vm_id: plan.info.vm_id.clone(),
                    source,
                }
            })?);
        if let Err(e) = fp.check("create.launch") {
            let _ = inst.kill().await;
            return Err(e);
        }
        {
            let mut info = slot.info.lock().unwrap_or_else(|p| p.into_inner());
            info.pid = inst.pid();
        }
        let settled = fp
            .check("create.running")
            .and_then(|_| self.set_state(slot, VmState::Running));
        if let Err(e) = settled {
            let _ = inst.kill().await;
            return Err(e);
        }
        Ok(inst)
    }

    /// Undoes a failed create: session directory, socket, table entry.
    async fn rollback(&self, plan: &Plan) {
        let id = &plan.info.vm_id;
        if let (Some((net, _)), Some(lease)) = (&self.net, &plan.lease) {
            if let Err(e) = net.teardown(lease).await {
                tracing::error!("vm {id}: rollback: {e}");
            }
        }
        if let Err(e) = self.host.remove_dir_all(&plan.launch.session_dir) {
            tracing::error!("vm {id}: rollback: {e}");
        }
        if let Err(e) = self.host.remove_file(&plan.launch.control_socket) {
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

fn check_boot_args(args: &str) -> Result<(), EngineError> {
    const F: &str = "boot_args";
    if args.trim().is_empty() {
        return Err(EngineError::bad(F, "boot_args must not be empty"));
    }
    if args.len() > MAX_BOOT_ARGS {
        return Err(EngineError::bad(
            F,
            format!("boot_args is {} bytes, at most {MAX_BOOT_ARGS}", args.len()),
        ));
    }
    if args.chars().any(|c| c.is_control()) {
        return Err(EngineError::bad(
            F,
            "boot_args must not contain control characters",
        ));
    }
    if args.split_whitespace().any(|w| w.starts_with("agentenv.")) {
        return Err(EngineError::bad(
            F,
            "boot_args must not set agentenv.* parameters (agentenv adds them)",
        ));
    }
    Ok(())
}

fn check_network(n: &NetworkSpec) -> Result<(), EngineError> {
    let t = &n.tap_name;
    if t.is_empty()
        || t.len() > 15
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(EngineError::bad(
            "network.tap_name",
            format!("network.tap_name {t:?} must be 1 to 15 ASCII letters, digits, `-`, `_` or `.`"),
        ));
    }
    if !is_unicast_mac(&n.guest_mac) {
        return Err(EngineError::bad(
            "network.guest_mac",
            format!(
                "network.guest_mac {:?} must be a unicast MAC written as xx:xx:xx:xx:xx:xx",
                n.guest_mac
            ),
        ));
    }
    Ok(())
}

fn is_unicast_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return false;
    }
    let mut bytes = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return false;
        }
        match u8::from_str_radix(p, 16) {
            Ok(b) => bytes[i] = b,
            Err(_) => return false,
        }
    }
    bytes[0] & 1 == 0 && bytes != [0; 6]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert!(is_unicast_mac("06:00:ac:10:00:02"));
        assert!(is_unicast_mac("AA:BB:CC:DD:EE:FE"));
        assert!(!is_unicast_mac("01:00:5e:00:00:01"), "multicast");
        assert!(!is_unicast_mac("00:00:00:00:00:00"));
        assert!(!is_unicast_mac("06:00:ac:10:00"));
        assert!(!is_unicast_mac("06-00-ac-10-00-02"));
        assert!(!is_unicast_mac("06:00:ac:10:00:0g"));
    }

    #[test]
    fn boot_args_rules() {
        assert!(check_boot_args("console=ttyS0 panic=1").is_ok());
        for bad in ["", "  ", "a\nb", "x agentenv.root=/dev/sda", &"a".repeat(3000)] {
            let e = check_boot_args(bad).unwrap_err();
            assert_eq!(e.field(), Some("boot_args"), "{bad:?}");
        }
    }

    #[test]
    fn tap_names() {
        let ok = NetworkSpec {
            tap_name: "tap0".into(),
            guest_mac: "06:00:00:00:00:01".into(),
        };
        assert!(check_network(&ok).is_ok());
        for bad in ["", "a/b", "way-too-long-name0", "tap 0"] {
            let n = NetworkSpec {
                tap_name: bad.into(),
                ..ok.clone()
            };
            assert_eq!(
                check_network(&n).unwrap_err().field(),
                Some("network.tap_name")
            );
        }
    }
}
