//! The double's "VMM": the configured resources, the microVM's state, and
//! the handling of each API request.
//!
//! A request goes through the same two stages as in Firecracker: first the
//! path and the body are parsed with the driver's typed API objects (errors
//! there are answered without looking at the state), then the action runs
//! against the state (pre-boot-only and post-boot-only actions are refused in
//! the wrong phase, then the resource is validated).
//!
//! Only the endpoints agentenv's driver calls are modelled; the others of
//! Firecracker's API answer 400 `fc-double does not model …`. The effort goes
//! to what decides real outcomes: the kernel command-line budget at
//! `InstanceStart`, Ctrl-Alt-Del lost before the guest's keyboard driver is
//! up, and the snapshot endpoints with their errors (see the module docs of
//! [`super`]).

use std::fs::File;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::*;
use super::vsock::Mux;
use super::Options;

/// The application name in `GET /`.
pub const APP_NAME: &str = "Firecracker";

const NOT_SUPPORTED_POST_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_SUPPORTED_PRE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
const MAX_VCPUS: u8 = 32;
/// The capacity of Firecracker's kernel command line, its final NUL included.
pub const CMDLINE_CAPACITY: usize = 2048;
/// Where Firecracker (x86_64) maps its first virtio-mmio device, the size of
/// each device's window, and the first device's interrupt.
const MMIO_MEM_START: u64 = 0xd000_0000;
const MMIO_LEN: u64 = 0x1000;
const IRQ_BASE: u64 = 5;

/// The Firecracker version the double emulates (`--fc-version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FcVersion {
    /// What `get-firecracker.sh` fetches.
    #[default]
    V1_13,
    /// Adds `vsock_override` and `clock_realtime` to `PUT /snapshot/load`.
    V1_16,
}

impl FcVersion {
    pub fn parse(text: &str) -> Result<FcVersion, String> {
        match text.trim_start_matches('v') {
            "1.13" | "1.13.1" => Ok(FcVersion::V1_13),
            "1.16" | "1.16.0" | "1.16.1" => Ok(FcVersion::V1_16),
            other => Err(format!(
                "'--fc-version' expects 1.13.1 or 1.16.1, got {other:?}"
            )),
        }
    }

    /// The version string `GET /version` and `GET /` report.
    pub fn label(self) -> &'static str {
        match self {
            FcVersion::V1_13 => "1.13.1",
            FcVersion::V1_16 => "1.16.1",
        }
    }
}

/// The microVM's state, as `GET /` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    NotStarted,
    Running,
    Paused,
}

impl Phase {
    fn instance_state(self) -> InstanceState {
        match self {
            Phase::NotStarted => InstanceState::NotStarted,
            Phase::Running => InstanceState::Running,
            Phase::Paused => InstanceState::Paused,
        }
    }
}

/// Everything the API can configure or observe.
pub struct VmmState {
    pub phase: Phase,
    /// A boot-specific resource was configured: loading a snapshot is no
    /// longer allowed.
    boot_path: bool,
    machine: MachineConfiguration,
    boot_source: Option<BootSource>,
    drives: Vec<Drive>,
    /// The drives' backing files by drive id, held open as Firecracker
    /// holds them (so `/proc/PID/fd` shows which files a VMM uses).
    backing: Vec<(String, File)>,
    /// A loaded snapshot's memory file, held open (Firecracker maps it).
    memory: Option<File>,
    nets: Vec<NetworkInterface>,
    vsock: Option<Vsock>,
    /// From when the guest's keyboard driver (i8042) takes Ctrl-Alt-Del.
    keyboard_up_at: Option<Instant>,
    /// The last heartbeat number the fake guest printed.
    pub heartbeat: u64,
}

impl VmmState {
    pub fn new() -> Self {
        VmmState {
            phase: Phase::NotStarted,
            boot_path: false,
            machine: MachineConfiguration::default(),
            boot_source: None,
            drives: Vec::new(),
            backing: Vec::new(),
            memory: None,
            nets: Vec::new(),
            vsock: None,
            keyboard_up_at: None,
            heartbeat: 0,
        }
    }

    /// The kernel command line of the configured boot source.
    pub fn boot_args(&self) -> Option<String> {
        self.boot_source.as_ref().and_then(|b| b.boot_args.clone())
    }

    /// The configured number of vCPUs.
    pub fn machine_vcpus(&self) -> u8 {
        self.machine.vcpu_count
    }

    fn preboot_only(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Ok(())
        } else {
            Err(Reply::bad(NOT_SUPPORTED_POST_BOOT))
        }
    }

    fn postboot_only(&self) -> Result<(), Reply> {
        if self.phase == Phase::NotStarted {
            Err(Reply::bad(NOT_SUPPORTED_PRE_BOOT))
        } else {
            Ok(())
        }
    }

    /// The command line the guest kernel gets: the boot arguments, then what
    /// Firecracker appends at `InstanceStart` — `pci=off` (no `--enable-pci`;
    /// even when the boot arguments have it), `root=/dev/vda ro|rw` for a
    /// root drive and one `virtio_mmio.device=4K@0x…:IRQ` per virtio device
    /// (drives, network interfaces, vsock) — within [`CMDLINE_CAPACITY`]
    /// (its final NUL included), as linux-loader's `Cmdline` counts it.
    fn kernel_cmdline(&self) -> Result<String, Reply> {
        let mut line = self.boot_args().unwrap_or_default();
        let mut insert = |s: &str| {
            let extra = if line.is_empty() {
                s.len()
            } else {
                s.len() + 1
            };
            if line.len() + extra >= CMDLINE_CAPACITY {
                return Err(Reply::bad(
                    "Start microvm error: Invalid kernel command line: Inserting string would \
                     make command line too long.",
                ));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(s);
            Ok(())
        };
        insert("pci=off")?;
        if let Some(root) = self.drives.first().filter(|d| d.is_root_device) {
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            match &root.partuuid {
                Some(id) => insert(&format!("root=PARTUUID={id} {mode}"))?,
                None => insert(&format!("root=/dev/vda {mode}"))?,
            }
        }
        let devices = self.drives.len() + self.nets.len() + usize::from(self.vsock.is_some());
        for i in 0..devices as u64 {
            insert(&format!(
                "virtio_mmio.device=4K@0x{:x}:{}",
                MMIO_MEM_START + i * MMIO_LEN,
                IRQ_BASE + i
            ))?;
        }
        Ok(line)
    }
}

impl Default for VmmState {
    fn default() -> Self {
        VmmState::new()
    }
}

/// The options and the state shared by the connection threads.
pub struct Shared {
    pub opts: Options,
    pub state: Mutex<VmmState>,
    /// The vsock device's host side (serves its socket once the guest runs).
    pub vsock: Arc<Mux>,
}

impl Shared {
    /// Locks the state (a poisoned lock is still used: the double never
    /// gives up on a request because another thread died).
    pub fn lock(&self) -> MutexGuard<'_, VmmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What to do once the response has been written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// `InstanceStart` succeeded.
    Started,
    /// `SendCtrlAltDel` was accepted.
    CtrlAltDel,
    /// A snapshot was loaded.
    Restored,
    /// An unrecoverable error (a failed snapshot load): exit with this code.
    Fatal(i32),
}

/// An answer to a request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Option<String>,
    pub deprecation: bool,
    pub after: After,
}

impl Reply {
    fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            deprecation: false,
            after: After::Nothing,
        }
    }

    fn json<T: Serialize>(value: &T) -> Reply {
        match serde_json::to_string(value) {
            Ok(body) => Reply {
                status: 200,
                body: Some(body),
                deprecation: false,
                after: After::Nothing,
            },
            Err(e) => Reply::error(500, format!("Cannot serialize the response: {e}")),
        }
    }

    /// An error answer with `{"fault_message": …}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        let body = serde_json::to_string(&ApiError {
            fault_message: message.into(),
        })
        .unwrap_or_default();
        Reply {
            status,
            body: Some(body),
            deprecation: false,
            after: After::Nothing,
        }
    }

    fn bad(message: impl Into<String>) -> Reply {
        Reply::error(400, message)
    }

    /// Marks the answer with `Deprecation: true` when `yes`.
    fn deprecated(mut self, yes: bool) -> Reply {
        self.deprecation |= yes;
        self
    }

    fn then(mut self, after: After) -> Reply {
        self.after = after;
        self
    }

    /// The fault message, if this is an error answer.
    pub fn fault_message(&self) -> Option<String> {
        if self.status < 400 {
            return None;
        }
        let body: ApiError = serde_json::from_str(self.body.as_deref()?).ok()?;
        Some(body.fault_message)
    }
}

type Outcome = Result<Reply, Reply>;

/// Runs the stage after parsing. As in Firecracker, a request whose body
/// used a deprecated field is answered with `Deprecation: true` whatever the
/// outcome of that stage (refusals included); errors in parsing the body are
/// not marked.
fn deprecating(yes: bool, stage: impl FnOnce() -> Outcome) -> Outcome {
    match stage() {
        Ok(reply) => Ok(reply.deprecated(yes)),
        Err(reply) => Err(reply.deprecated(yes)),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        Reply::bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Checks a resource id taken from the path, as Firecracker does.
fn checked_id(id: Option<&str>) -> Result<&str, Reply> {
    let id = id.unwrap_or("");
    if id.is_empty() {
        return Err(Reply::bad("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(Reply::bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id)
}

/// Answers one request. `body` is `None` when the request had no body.
pub fn handle(shared: &Shared, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    match route(shared, method, path, body) {
        Ok(reply) | Err(reply) => reply,
    }
}

/// Firecracker's endpoints the double does not model (agentenv's driver
/// never calls them): `(method, first path segment)`.
const NOT_MODELLED: &[(&str, &str)] = &[
    ("GET", "balloon"),
    ("PUT", "balloon"),
    ("PATCH", "balloon"),
    ("PUT", "cpu-config"),
    ("PUT", "entropy"),
    ("GET", "hotplug"),
    ("PUT", "hotplug"),
    ("PATCH", "hotplug"),
    ("PUT", "logger"),
    ("GET", "machine-config"),
    ("PATCH", "machine-config"),
    ("PUT", "metrics"),
    ("GET", "mmds"),
    ("PUT", "mmds"),
    ("PATCH", "mmds"),
    ("PATCH", "drives"),
    ("PATCH", "network-interfaces"),
    ("PUT", "pmem"),
    ("PATCH", "pmem"),
    ("PUT", "serial"),
];

fn route(shared: &Shared, method: &str, path: &str, body: Option<&[u8]>) -> Outcome {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    match (method, first, body) {
        ("GET", "", None) => Ok(instance_info(shared)),
        ("GET", "version", None) => Ok(Reply::json(&FirecrackerVersion {
            firecracker_version: shared.opts.fc_version.label().to_string(),
        })),
        ("GET", "vm", None) if tokens.next() == Some("config") => Ok(full_config(shared)),
        ("GET", _, Some(_)) => Err(Reply::bad("GET request cannot have a body.")),
        ("PUT", "actions", Some(b)) => put_actions(shared, b),
        ("PUT", "boot-source", Some(b)) => put_boot_source(shared, b),
        ("PUT", "drives", Some(b)) => put_drive(shared, b, tokens.next()),
        ("PUT", "machine-config", Some(b)) => put_machine_config(shared, b),
        ("PUT", "network-interfaces", Some(b)) => put_net(shared, b, tokens.next()),
        ("PUT", "snapshot", Some(b)) => match tokens.next() {
            Some("create") => snapshot_create(shared, b),
            Some("load") => snapshot_load(shared, b),
            Some(other) => Err(Reply::bad(format!(
                "Invalid request method and/or path: PUT /snapshot/{other}."
            ))),
            None => Err(Reply::bad("Missing snapshot operation type.")),
        },
        ("PUT", "vsock", Some(b)) => put_vsock(shared, b),
        ("PUT", _, None) => Err(Reply::bad("Empty PUT request.")),
        ("PATCH", "vm", Some(b)) => patch_vm(shared, b),
        ("PATCH", _, None) => Err(Reply::bad("Empty PATCH request.")),
        (method, first, _) if NOT_MODELLED.contains(&(method, first)) => Err(Reply::bad(format!(
            "fc-double does not model {method} /{first} (agentenv's driver never calls it)"
        ))),
        (method, first, _) => Err(Reply::bad(format!(
            "Invalid request method and/or path: {method} {first}."
        ))),
    }
}

// ------------------------------------------------------------------ GETs

fn instance_info(shared: &Shared) -> Reply {
    let st = shared.lock();
    Reply::json(&InstanceInfo {
        id: shared.opts.id.clone(),
        state: st.phase.instance_state(),
        vmm_version: shared.opts.fc_version.label().to_string(),
        app_name: APP_NAME.to_string(),
    })
}

fn full_config(shared: &Shared) -> Reply {
    let st = shared.lock();
    Reply::json(&FullVmConfiguration {
        boot_source: st.boot_source.clone().unwrap_or_default(),
        drives: st.drives.clone(),
        machine_config: st.machine.clone(),
        network_interfaces: Some(st.nets.clone()),
        vsock: st.vsock.clone(),
    })
}

// --------------------------------------------------------------- actions

fn put_actions(shared: &Shared, body: &[u8]) -> Outcome {
    let action: InstanceActionInfo = parse(body)?;
    let mut st = shared.lock();
    match action.action_type {
        ActionType::FlushMetrics => {
            // No metrics are modelled: nothing to flush.
            st.postboot_only()?;
            Ok(Reply::no_content())
        }
        ActionType::InstanceStart => {
            st.preboot_only()?;
            if st.boot_source.is_none() {
                return Err(Reply::bad(
                    "Start microvm error: Cannot start microvm without kernel configuration.",
                ));
            }
            st.kernel_cmdline()?;
            st.phase = Phase::Running;
            st.keyboard_up_at =
                Some(Instant::now() + Duration::from_millis(shared.opts.i8042_delay_ms));
            shared.vsock.start();
            Ok(Reply::no_content().then(After::Started))
        }
        ActionType::SendCtrlAltDel => {
            st.postboot_only()?;
            if st.keyboard_up_at.is_some_and(|at| Instant::now() < at) {
                super::log("The guest's keyboard driver is not up yet: Ctrl-Alt-Del is lost.");
                return Ok(Reply::no_content());
            }
            Ok(Reply::no_content().then(After::CtrlAltDel))
        }
    }
}

fn patch_vm(shared: &Shared, body: &[u8]) -> Outcome {
    let vm: Vm = parse(body)?;
    let mut st = shared.lock();
    st.postboot_only()?;
    st.phase = match vm.state {
        VmState::Paused => Phase::Paused,
        VmState::Resumed => Phase::Running,
    };
    Ok(Reply::no_content())
}

// ------------------------------------------------------- machine config

fn put_machine_config(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: MachineConfiguration = parse(body)?;
    let deprecated = cfg.cpu_template.is_some();
    deprecating(deprecated, || {
        let mut st = shared.lock();
        st.preboot_only()?;
        st.boot_path = true;
        let smt = cfg.smt;
        let vcpus = cfg.vcpu_count;
        if vcpus == 0 || vcpus > MAX_VCPUS || (smt && vcpus > 1 && vcpus % 2 == 1) {
            return Err(Reply::bad(format!(
                "Machine config error: The number of vCPUs must be greater than 0, less than \
                 {MAX_VCPUS} and must be 1 or an even number if SMT is enabled."
            )));
        }
        let page_multiple = match cfg.huge_pages.unwrap_or_default() {
            HugePages::None => 1,
            HugePages::Hugetlbfs2M => 2,
        };
        if cfg.mem_size_mib == 0 || cfg.mem_size_mib % page_multiple != 0 {
            return Err(Reply::bad(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of \
                 the configured page size.",
            ));
        }
        // Reported back as Firecracker does: no template when `None`, the
        // page size always.
        st.machine = MachineConfiguration {
            cpu_template: cfg.cpu_template.filter(|t| *t != CpuTemplate::None),
            huge_pages: Some(cfg.huge_pages.unwrap_or_default()),
            ..cfg
        };
        Ok(Reply::no_content())
    })
}

// ------------------------------------------------------------ boot source

fn put_boot_source(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: BootSource = parse(body)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    File::open(&cfg.kernel_image_path).map_err(|e| {
        Reply::bad(format!(
            "Boot source error: The kernel file cannot be opened: {e}"
        ))
    })?;
    if let Some(initrd) = &cfg.initrd_path {
        File::open(initrd).map_err(|e| {
            Reply::bad(format!(
                "Boot source error: The initrd file cannot be opened due to invalid path or \
                 invalid permissions. {e}"
            ))
        })?;
    }
    if let Some(args) = &cfg.boot_args {
        check_cmdline(args)?;
    }
    st.boot_source = Some(cfg);
    Ok(Reply::no_content())
}

/// The check of `boot_args` at `PUT /boot-source` (what Firecracker appends
/// is checked at `InstanceStart`, see [`VmmState::kernel_cmdline`]).
fn check_cmdline(args: &str) -> Result<(), Reply> {
    let reason = if !args.chars().all(|c| (' '..='~').contains(&c)) {
        Some("String contains an invalid character")
    } else if args.len() >= CMDLINE_CAPACITY {
        Some("Command line overflowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Reply::bad(format!(
            "Boot source error: The kernel command line is invalid: {reason}"
        ))),
        None => Ok(()),
    }
}

// ----------------------------------------------------------------- drives

fn put_drive(shared: &Shared, body: &[u8], path_id: Option<&str>) -> Outcome {
    let id = checked_id(path_id)?;
    let cfg: Drive = parse(body)?;
    same_drive_id(id, &cfg.drive_id)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    insert_drive(&mut st, cfg)?;
    Ok(Reply::no_content())
}

const BLOCK_ERR: &str = "Drive config error: Unable to create the virtio block device";

/// Checks a drive the way creating its block device would, and returns it
/// as Firecracker reports it back, with its open backing file (virtio-block).
fn build_drive(cfg: Drive) -> Result<(Drive, Option<File>), Reply> {
    let virtio = cfg.path_on_host.is_some() && cfg.socket.is_none();
    let vhost_user = cfg.socket.is_some()
        && cfg.is_read_only.is_none()
        && cfg.path_on_host.is_none()
        && cfg.rate_limiter.is_none()
        && cfg.io_engine.is_none();
    if virtio {
        let path = cfg.path_on_host.clone().unwrap_or_default();
        let read_only = cfg.is_read_only.unwrap_or(false);
        let file = open_backing_file(&path, read_only).map_err(|e| {
            Reply::bad(format!(
                "{BLOCK_ERR}: Virtio backend error: Error manipulating the backing file: {e} \
                 {}",
                path.display()
            ))
        })?;
        let drive = Drive {
            is_read_only: Some(read_only),
            rate_limiter: normalize_rate_limiter(cfg.rate_limiter),
            cache_type: Some(cfg.cache_type.unwrap_or_default()),
            io_engine: Some(cfg.io_engine.unwrap_or_default()),
            socket: None,
            ..cfg
        };
        Ok((drive, Some(file)))
    } else if vhost_user {
        let socket = cfg.socket.clone().unwrap_or_default();
        UnixStream::connect(&socket).map_err(|e| {
            Reply::bad(format!(
                "{BLOCK_ERR}: Vhost user backend error: Vhost-user error: Failed to connect to \
                 UDS Unix stream: {e}"
            ))
        })?;
        Ok((cfg, None))
    } else {
        Err(Reply::bad(format!("{BLOCK_ERR}: Invalid block config.")))
    }
}

fn open_backing_file(path: &Path, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

fn insert_drive(st: &mut VmmState, cfg: Drive) -> Result<(), Reply> {
    let drives = &mut st.drives;
    let position = drives.iter().position(|d| d.drive_id == cfg.drive_id);
    let has_root = drives.first().is_some_and(|d| d.is_root_device);
    let as_root = cfg.is_root_device;
    if as_root && has_root && position != Some(0) {
        return Err(Reply::bad(
            "Drive config error: A root block device already exists!",
        ));
    }
    let (drive, file) = build_drive(cfg)?;
    st.backing.retain(|(id, _)| *id != drive.drive_id);
    if let Some(file) = file {
        st.backing.push((drive.drive_id.clone(), file));
    }
    let drives = &mut st.drives;
    match position {
        None if as_root => drives.insert(0, drive),
        None => drives.push(drive),
        Some(index) => {
            drives[index] = drive;
            if index != 0 && as_root {
                drives.swap(0, index);
            }
        }
    }
    Ok(())
}

/// A drive's id in the path must be the one in the body (Firecracker's wording).
fn same_drive_id(path_id: &str, body_id: &str) -> Result<(), Reply> {
    if body_id == path_id {
        Ok(())
    } else {
        Err(Reply::bad(
            "The id from the path does not match the id from the body!",
        ))
    }
}

/// A network interface's id in the path must be the one in the body
/// (Firecracker's wording, which, unlike the drives', names both).
fn same_iface_id(path_id: &str, body_id: &str) -> Result<(), Reply> {
    if body_id == path_id {
        Ok(())
    } else {
        Err(Reply::bad(format!(
            "The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
        )))
    }
}

// ------------------------------------------------------ network interfaces

fn put_net(shared: &Shared, body: &[u8], path_id: Option<&str>) -> Outcome {
    let id = checked_id(path_id)?;
    let cfg: NetworkInterface = parse(body)?;
    let mac = match &cfg.guest_mac {
        None => None,
        Some(text) => Some(MacAddr::parse(text).ok_or_else(|| {
            Reply::bad(
                "An error occurred when deserializing the json body of a request: The provided \
                 MAC address is invalid.",
            )
        })?),
    };
    same_iface_id(id, &cfg.iface_id)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    if let Some(mac) = mac {
        let in_use = st.nets.iter().any(|n| {
            n.iface_id != cfg.iface_id
                && n.guest_mac.as_deref().and_then(MacAddr::parse) == Some(mac)
        });
        if in_use {
            return Err(Reply::bad(format!(
                "Network config error: The MAC address is already in use: {mac}"
            )));
        }
    }
    if let Some(index) = st.nets.iter().position(|n| n.iface_id == cfg.iface_id) {
        st.nets.swap_remove(index);
    }
    if cfg.host_dev_name.len() >= 16 {
        return Err(Reply::bad(
            "Network config error: Could not create the network device: Open tap device \
             failed: Invalid interface name",
        ));
    }
    st.nets.push(NetworkInterface {
        guest_mac: mac.map(|m| m.to_string()),
        rx_rate_limiter: normalize_rate_limiter(cfg.rx_rate_limiter),
        tx_rate_limiter: normalize_rate_limiter(cfg.tx_rate_limiter),
        ..cfg
    });
    Ok(Reply::no_content())
}

// ------------------------------------------------------------------ vsock

fn vsock_err(e: std::io::Error) -> Reply {
    Reply::bad(format!(
        "Vsock config error: Cannot create backend for vsock device: Error binding to the \
         host-side Unix socket: {e}"
    ))
}

/// Binds the host side of the vsock device, as Firecracker does at
/// configuration time; host-initiated connections are served once the guest
/// runs (see [`super::vsock`]).
fn bind_vsock(shared: &Shared, path: &Path) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    super::set_vsock_path(Some(path));
    super::vsock::serve(listener, Arc::clone(&shared.vsock));
    Ok(())
}

fn put_vsock(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: Vsock = parse(body)?;
    let deprecated = cfg.vsock_id.is_some();
    deprecating(deprecated, || {
        let mut st = shared.lock();
        st.preboot_only()?;
        st.boot_path = true;
        if let Some(old) = st.vsock.take() {
            std::fs::remove_file(&old.uds_path).map_err(vsock_err)?;
            super::set_vsock_path(None);
        }
        bind_vsock(shared, &cfg.uds_path).map_err(vsock_err)?;
        st.vsock = Some(Vsock {
            vsock_id: None,
            ..cfg
        });
        Ok(Reply::no_content())
    })
}

// -------------------------------------------------------------- snapshots

const MIB: u64 = 1024 * 1024;

fn snapshot_create(shared: &Shared, body: &[u8]) -> Outcome {
    let params: SnapshotCreateParams = parse(body)?;
    let st = shared.lock();
    st.postboot_only()?;
    if st.phase == Phase::Running {
        return Err(Reply::bad(
            "Create snapshot error: Cannot save the microVM state: Operation not allowed: \
             save/restore unavailable while running",
        ));
    }
    if params.snapshot_type == Some(SnapshotType::Diff) && !st.machine.track_dirty_pages {
        return Err(Reply::bad(
            "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page \
             tracking disabled.",
        ));
    }
    let state = SnapshotState {
        format: SNAPSHOT_FORMAT,
        vmm_version: shared.opts.fc_version.label().to_string(),
        vm_id: shared.opts.id.clone(),
        machine_config: st.machine.clone(),
        drives: st.drives.clone(),
        network_interfaces: st.nets.clone(),
        vsock: st.vsock.clone(),
        heartbeat: st.heartbeat,
    };
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    let state_err = |op: &str, e: std::io::Error| {
        Reply::bad(format!(
            "Create snapshot error: Cannot perform {op} on the snapshot backing file: {e}"
        ))
    };
    let mut file = File::create(&params.snapshot_path).map_err(|e| state_err("open", e))?;
    writeln!(file, "{SNAPSHOT_MAGIC}\n{text}").map_err(|e| state_err("write", e))?;
    // The memory file gets the guest memory's size; it stays sparse.
    let mem_err = |op: &str, e: std::io::Error| {
        Reply::bad(format!(
            "Create snapshot error: Cannot perform {op} on the memory backing file: {e}"
        ))
    };
    let mem = File::create(&params.mem_file_path).map_err(|e| mem_err("open", e))?;
    mem.set_len(st.machine.mem_size_mib as u64 * MIB)
        .map_err(|e| mem_err("set_len", e))?;
    Ok(Reply::no_content())
}

/// The v1.16 fields of `SnapshotLoadParams`, which v1.13.1 refuses as unknown.
const SNAPSHOT_LOAD_V1_16_ONLY: &[&str] = &["vsock_override", "clock_realtime"];

fn snapshot_load(shared: &Shared, body: &[u8]) -> Outcome {
    if shared.opts.fc_version == FcVersion::V1_13 {
        // v1.13.1's parser knows neither field: the same error as for any
        // unknown one.
        let fields: serde_json::Map<String, serde_json::Value> = parse(body)?;
        if let Some(field) = SNAPSHOT_LOAD_V1_16_ONLY
            .iter()
            .find(|f| fields.contains_key(**f))
        {
            let expected: Vec<String> = SNAPSHOT_LOAD_FIELDS_V1_13
                .iter()
                .map(|f| format!("`{f}`"))
                .collect();
            return Err(Reply::bad(format!(
                "An error occurred when deserializing the json body of a request: unknown field \
                 `{field}`, expected one of {}.",
                expected.join(", ")
            )));
        }
    }
    let params: SnapshotLoadParams = parse(body)?;
    let deprecated = params.mem_file_path.is_some() || params.enable_diff_snapshots;
    let (mem_path, uffd) = match (&params.mem_backend, &params.mem_file_path) {
        (Some(_), Some(_)) => {
            return Err(Reply::bad(
                "An error occurred when deserializing the json body of a request: too many \
                 fields: either `mem_backend` or `mem_file_path` exclusively is required.",
            ))
        }
        (None, None) => {
            return Err(Reply::bad(
                "An error occurred when deserializing the json body of a request: missing \
                 field: either `mem_backend` or `mem_file_path` is required.",
            ))
        }
        (Some(backend), None) => (
            backend.backend_path.clone(),
            backend.backend_type == MemBackendType::Uffd,
        ),
        (None, Some(path)) => (path.clone(), false),
    };
    deprecating(deprecated, || {
        load_snapshot(shared, &params, &mem_path, uffd)
    })
}

/// Reads a state file the double wrote; the error says what is wrong.
fn read_state(path: &Path) -> Result<SnapshotState, String> {
    let from_file = "Failed to get snapshot state from file";
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| format!("{from_file}: Failed to open snapshot file: {e}"))?;
    let corrupt = |detail: String| {
        format!(
            "{from_file}: Failed to load snapshot state from file: {}: {detail}",
            path.display()
        )
    };
    let json = text
        .strip_prefix(SNAPSHOT_MAGIC)
        .and_then(|rest| rest.strip_prefix('\n'))
        .ok_or_else(|| corrupt("not a snapshot made by this VMM".into()))?;
    let state: SnapshotState =
        serde_json::from_str(json).map_err(|e| corrupt(format!("corrupt state ({e})")))?;
    if state.format != SNAPSHOT_FORMAT {
        return Err(corrupt(format!(
            "unsupported snapshot format {} (this VMM reads {SNAPSHOT_FORMAT})",
            state.format
        )));
    }
    Ok(state)
}

/// The stage of `PUT /snapshot/load` after parsing.
fn load_snapshot(
    shared: &Shared,
    params: &SnapshotLoadParams,
    mem_path: &Path,
    uffd: bool,
) -> Outcome {
    let mut st = shared.lock();
    st.preboot_only()?;
    if st.boot_path {
        return Err(Reply::bad(
            "Load snapshot error: Loading a microVM snapshot not allowed after configuring \
             boot-specific resources.",
        ));
    }
    // From here on a failure is fatal: Firecracker exits after answering.
    let fatal = |detail: String| {
        Reply::bad(format!(
            "Load snapshot error: Failed to restore from snapshot: {detail}"
        ))
        .then(After::Fatal(1))
    };
    let mut state = read_state(&params.snapshot_path).map_err(fatal)?;
    let version = shared.opts.fc_version.label();
    if state.vmm_version != version {
        return Err(fatal(format!(
            "Failed to get snapshot state from file: Invalid snapshot version: the snapshot was \
             made by Firecracker v{}, this is v{version}",
            state.vmm_version
        )));
    }
    for entry in &params.network_overrides {
        let net = state
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == entry.iface_id)
            .ok_or_else(|| {
                fatal(format!(
                    "Invalid network override: no network interface {}",
                    entry.iface_id
                ))
            })?;
        if entry.host_dev_name.len() >= 16 {
            return Err(fatal(format!(
                "Failed to build microVM from snapshot: Cannot restore devices: Net: Open tap \
                 device failed: Invalid interface name {}",
                entry.host_dev_name
            )));
        }
        net.host_dev_name = entry.host_dev_name.clone();
    }
    if let Some(over) = &params.vsock_override {
        let vsock = state.vsock.as_mut().ok_or_else(|| {
            fatal("Invalid vsock override: the snapshot has no vsock device".into())
        })?;
        vsock.uds_path = over.uds_path.clone();
    }
    let memory = "Failed to load guest memory";
    let mem_size = state.machine_config.mem_size_mib as u64 * MIB;
    let mut memory_file = None;
    if uffd {
        UnixStream::connect(mem_path).map_err(|e| {
            fatal(format!(
                "{memory}: Error creating guest memory from uffd: Failed to connect to UDS Unix \
                 stream: {e}"
            ))
        })?;
    } else {
        let (file, len) = File::open(mem_path)
            .and_then(|f| f.metadata().map(|m| (f, m.len())))
            .map_err(|e| {
                fatal(format!(
                    "{memory}: Error creating guest memory from file: Failed to load guest \
                     memory: {e}"
                ))
            })?;
        memory_file = Some(file);
        if len < mem_size {
            return Err(fatal(format!(
                "{memory}: Error creating guest memory from file: {} holds {len} bytes, the \
                 guest has {mem_size}",
                mem_path.display()
            )));
        }
    }
    let build = "Failed to build microVM from snapshot";
    // Relative paths (as saved) resolve in this process's working directory,
    // as in Firecracker.
    let mut backing = Vec::new();
    for drive in &state.drives {
        if let Some(path) = &drive.path_on_host {
            let file =
                open_backing_file(path, drive.is_read_only.unwrap_or(false)).map_err(|e| {
                    fatal(format!(
                        "{build}: Cannot restore devices: Block: Virtio backend error: Error \
                     manipulating the backing file: {e} {}",
                        path.display()
                    ))
                })?;
            backing.push((drive.drive_id.clone(), file));
        }
    }
    if let Some(vsock) = &state.vsock {
        bind_vsock(shared, &vsock.uds_path).map_err(|e| {
            fatal(format!(
                "{build}: Cannot restore devices: Vsock: Error binding to the host-side Unix \
                 socket: {e}"
            ))
        })?;
    }
    if params.clock_realtime {
        super::log("clock_realtime: the guest clock is advanced to the host's (no effect here).");
    }

    st.machine = MachineConfiguration {
        track_dirty_pages: params.track_dirty_pages || params.enable_diff_snapshots,
        ..state.machine_config
    };
    st.drives = state.drives;
    st.backing = backing;
    st.memory = memory_file;
    st.nets = state.network_interfaces;
    st.vsock = state.vsock;
    st.heartbeat = state.heartbeat;
    // The restored guest is past its boot: its keyboard driver is up.
    st.keyboard_up_at = Some(Instant::now());
    shared.vsock.start();
    st.phase = if params.resume_vm {
        Phase::Running
    } else {
        Phase::Paused
    };
    Ok(Reply::no_content().then(After::Restored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(checked_id(Some("root_fs1")).is_ok());
        assert!(checked_id(Some("")).is_err());
        assert!(checked_id(None).is_err());
        assert!(checked_id(Some("root-fs")).is_err());
    }

    #[test]
    fn cmdline_is_checked() {
        assert!(check_cmdline("console=ttyS0 reboot=k").is_ok());
        assert!(check_cmdline("bad\u{7}char").is_err());
        assert!(check_cmdline(&"a".repeat(CMDLINE_CAPACITY)).is_err());
    }

    fn drive(id: &str, root: bool) -> Drive {
        Drive::file(id, format!("/d/{id}").into(), root, root)
    }

    #[test]
    fn firecracker_appends_root_and_one_mmio_device_each() {
        let mut st = VmmState::new();
        st.boot_source = Some(BootSource {
            boot_args: Some("console=ttyS0".into()),
            ..Default::default()
        });
        st.drives = vec![drive("rootfs", true), drive("overlay", false)];
        st.vsock = Some(Vsock {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/v".into(),
        });
        assert_eq!(
            st.kernel_cmdline().unwrap(),
            "console=ttyS0 pci=off root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
        );
        // The budget is what is left of 2048 bytes (NUL included) after
        // the appended parts.
        let appended = st.kernel_cmdline().unwrap().len() - "console=ttyS0".len();
        let fits = "a".repeat(CMDLINE_CAPACITY - 1 - appended);
        st.boot_source.as_mut().unwrap().boot_args = Some(fits.clone());
        assert_eq!(st.kernel_cmdline().unwrap().len(), CMDLINE_CAPACITY - 1);
        st.boot_source.as_mut().unwrap().boot_args = Some(format!("{fits}a"));
        let err = st.kernel_cmdline().unwrap_err();
        assert_eq!(
            err.fault_message().unwrap(),
            "Start microvm error: Invalid kernel command line: Inserting string would make \
             command line too long."
        );
    }
}
