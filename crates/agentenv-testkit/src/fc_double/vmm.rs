//! The double's "VMM": the configured resources, the microVM's state, and
//! the handling of each API request.
//!
//! A request goes through the same two stages as in Firecracker: first the
//! path and the body are parsed (errors there are answered without looking
//! at the state), then the action runs against the state (pre-boot-only and
//! post-boot-only actions are refused in the wrong phase, then the resource
//! is validated).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::model::*;
use super::vsock::Mux;
use super::Options;

/// The Firecracker version the double answers as.
pub const VMM_VERSION: &str = "1.13.1";
/// The application name in `GET /`.
pub const APP_NAME: &str = "Firecracker";

const NOT_SUPPORTED_POST_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_SUPPORTED_PRE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
const MAX_VCPUS: u8 = 32;
const CMDLINE_CAPACITY: usize = 2048;

/// The microVM's state, as `GET /` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    NotStarted,
    Running,
    Paused,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::NotStarted => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        }
    }
}

struct NetEntry {
    cfg: NetworkInterface,
    /// MMDS requests are answered on this interface.
    mmds: bool,
}

struct MmdsStore {
    data: Value,
    initialized: bool,
    version: MmdsVersion,
    imds_compat: bool,
    ipv4: Ipv4Addr,
}

impl MmdsStore {
    fn new() -> Self {
        MmdsStore {
            data: Value::Null,
            initialized: false,
            version: MmdsVersion::V1,
            imds_compat: false,
            ipv4: Ipv4Addr::new(169, 254, 169, 254),
        }
    }
}

/// Everything the API can configure or observe.
pub struct VmmState {
    pub phase: Phase,
    /// A boot-specific resource was configured: loading a snapshot is no
    /// longer allowed.
    boot_path: bool,
    machine: MachineConfig,
    boot_source: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetEntry>,
    vsock: Option<Vsock>,
    balloon: Option<Balloon>,
    entropy: Option<Entropy>,
    mmds: Option<MmdsStore>,
    metrics: Option<File>,
    metrics_flushes: u64,
    /// The last heartbeat number the fake guest printed.
    pub heartbeat: u64,
}

impl VmmState {
    pub fn new() -> Self {
        VmmState {
            phase: Phase::NotStarted,
            boot_path: false,
            machine: MachineConfig::default(),
            boot_source: None,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            balloon: None,
            entropy: None,
            mmds: None,
            metrics: None,
            metrics_flushes: 0,
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

    /// Puts data into the MMDS store (used for `--metadata`).
    pub fn put_mmds_data(&mut self, data: Value) {
        let store = self.mmds.get_or_insert_with(MmdsStore::new);
        store.data = data;
        store.initialized = true;
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
        let body = serde_json::json!({ "fault_message": message.into() }).to_string();
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
        let body: Value = serde_json::from_str(self.body.as_deref()?).ok()?;
        body.get("fault_message")?.as_str().map(str::to_string)
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

fn route(shared: &Shared, method: &str, path: &str, body: Option<&[u8]>) -> Outcome {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    match (method, first, body) {
        ("GET", "", None) => Ok(instance_info(shared)),
        ("GET", "balloon", None) => match tokens.next() {
            Some("statistics") => get_balloon_stats(shared),
            Some(other) => Err(Reply::bad(format!(
                "Unrecognized GET request path `{other}`."
            ))),
            None => get_balloon(shared),
        },
        ("GET", "version", None) => Ok(Reply::json(
            &serde_json::json!({ "firecracker_version": VMM_VERSION }),
        )),
        ("GET", "vm", None) if tokens.next() == Some("config") => Ok(full_config(shared)),
        ("GET", "machine-config", None) => Ok(Reply::json(&shared.lock().machine)),
        ("GET", "mmds", None) => Ok(get_mmds(shared)),
        ("GET", _, Some(_)) => Err(Reply::bad("GET request cannot have a body.")),
        ("PUT", "actions", Some(b)) => put_actions(shared, b),
        ("PUT", "balloon", Some(b)) => put_balloon(shared, b),
        ("PUT", "boot-source", Some(b)) => put_boot_source(shared, b),
        ("PUT", "cpu-config", Some(b)) => put_cpu_config(shared, b),
        ("PUT", "drives", Some(b)) => put_drive(shared, b, tokens.next()),
        ("PUT", "logger", Some(b)) => put_logger(shared, b),
        ("PUT", "machine-config", Some(b)) => put_machine_config(shared, b),
        ("PUT", "metrics", Some(b)) => put_metrics(shared, b),
        ("PUT", "mmds", Some(b)) => put_mmds(shared, b, tokens.next()),
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
        ("PUT", "entropy", Some(b)) => put_entropy(shared, b),
        ("PUT", _, None) => Err(Reply::bad("Empty PUT request.")),
        ("PATCH", "balloon", Some(b)) => patch_balloon(shared, b, tokens.next()),
        ("PATCH", "drives", Some(b)) => patch_drive(shared, b, tokens.next()),
        ("PATCH", "machine-config", Some(b)) => patch_machine_config(shared, b),
        ("PATCH", "mmds", Some(b)) => patch_mmds(shared, b),
        ("PATCH", "network-interfaces", Some(b)) => patch_net(shared, b, tokens.next()),
        ("PATCH", "vm", Some(b)) => patch_vm(shared, b),
        ("PATCH", _, None) => Err(Reply::bad("Empty PATCH request.")),
        (method, first, _) => Err(Reply::bad(format!(
            "Invalid request method and/or path: {method} {first}."
        ))),
    }
}

// ------------------------------------------------------------------ GETs

fn instance_info(shared: &Shared) -> Reply {
    let st = shared.lock();
    Reply::json(&InstanceInfo {
        id: &shared.opts.id,
        state: st.phase.label(),
        vmm_version: VMM_VERSION,
        app_name: APP_NAME,
    })
}

fn full_config(shared: &Shared) -> Reply {
    let st = shared.lock();
    let mmds_config = st.mmds.as_ref().and_then(|store| {
        let ifaces: Vec<String> = st
            .nets
            .iter()
            .filter(|n| n.mmds)
            .map(|n| n.cfg.iface_id.clone())
            .collect();
        if ifaces.is_empty() {
            return None;
        }
        Some(MmdsConfig {
            version: store.version,
            network_interfaces: ifaces,
            ipv4_address: Some(store.ipv4),
            imds_compat: store.imds_compat,
        })
    });
    Reply::json(&FullVmConfig {
        balloon: st.balloon.clone(),
        drives: st.drives.clone(),
        boot_source: st.boot_source.clone().unwrap_or_default(),
        cpu_config: None,
        logger: None,
        machine_config: Some(st.machine.clone()),
        metrics: None,
        mmds_config,
        network_interfaces: st.nets.iter().map(|n| n.cfg.clone()).collect(),
        vsock: st.vsock.clone(),
        entropy: st.entropy.clone(),
    })
}

fn get_mmds(shared: &Shared) -> Reply {
    let mut st = shared.lock();
    let store = st.mmds.get_or_insert_with(MmdsStore::new);
    let body = match &store.data {
        Value::Null => "{}".to_string(),
        other => other.to_string(),
    };
    Reply {
        status: 200,
        body: Some(body),
        deprecation: false,
        after: After::Nothing,
    }
}

fn get_balloon(shared: &Shared) -> Outcome {
    let st = shared.lock();
    match (&st.balloon, st.phase) {
        (Some(b), _) => Ok(Reply::json(b)),
        (None, Phase::NotStarted) => {
            Err(Reply::bad("Balloon config error: No balloon device found."))
        }
        (None, _) => Err(Reply::bad(
            "Internal VMM error: Failed perform action on device: Device not found",
        )),
    }
}

fn get_balloon_stats(shared: &Shared) -> Outcome {
    let st = shared.lock();
    st.postboot_only()?;
    let Some(b) = &st.balloon else {
        return Err(Reply::bad(
            "Internal VMM error: Failed perform action on device: Device not found",
        ));
    };
    if b.stats_polling_interval_s == 0 {
        return Err(Reply::bad(
            "Internal VMM error: Failed perform action on device: Internal Device error: \
             Received stats query when stats are disabled.",
        ));
    }
    let pages = b.amount_mib.saturating_mul(256);
    Ok(Reply::json(&BalloonStats {
        target_pages: pages,
        actual_pages: pages,
        target_mib: b.amount_mib,
        actual_mib: b.amount_mib,
    }))
}

// --------------------------------------------------------------- actions

fn put_actions(shared: &Shared, body: &[u8]) -> Outcome {
    let action: ActionBody = parse(body)?;
    let mut st = shared.lock();
    match action.action_type {
        ActionType::FlushMetrics => {
            st.postboot_only()?;
            flush_metrics(&mut st);
            Ok(Reply::no_content())
        }
        ActionType::InstanceStart => {
            st.preboot_only()?;
            if st.boot_source.is_none() {
                return Err(Reply::bad(
                    "Start microvm error: Cannot start microvm without kernel configuration.",
                ));
            }
            st.phase = Phase::Running;
            shared.vsock.start();
            Ok(Reply::no_content().then(After::Started))
        }
        ActionType::SendCtrlAltDel => {
            st.postboot_only()?;
            Ok(Reply::no_content().then(After::CtrlAltDel))
        }
    }
}

fn flush_metrics(st: &mut VmmState) {
    st.metrics_flushes += 1;
    let flushes = st.metrics_flushes;
    if let Some(file) = st.metrics.as_mut() {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let line = serde_json::json!({
            "utc_timestamp_ms": ms,
            "fc_double": { "flushes": flushes },
        });
        let _ = writeln!(file, "{line}");
    }
}

fn patch_vm(shared: &Shared, body: &[u8]) -> Outcome {
    let vm: VmBody = parse(body)?;
    let mut st = shared.lock();
    st.postboot_only()?;
    st.phase = match vm.state {
        VmStateRequest::Paused => Phase::Paused,
        VmStateRequest::Resumed => Phase::Running,
    };
    Ok(Reply::no_content())
}

// ------------------------------------------------------- machine config

fn put_machine_config(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: MachineConfig = parse(body)?;
    let deprecated = cfg.cpu_template.is_some();
    let update = MachineConfigUpdate::from(cfg);
    deprecating(deprecated, || {
        let mut st = shared.lock();
        st.preboot_only()?;
        st.boot_path = true;
        apply_machine_update(&mut st, &update)?;
        Ok(Reply::no_content())
    })
}

fn patch_machine_config(shared: &Shared, body: &[u8]) -> Outcome {
    let update: MachineConfigUpdate = parse(body)?;
    if update.is_empty() {
        return Err(Reply::bad("Empty PATCH request."));
    }
    let deprecated = update.cpu_template.is_some();
    deprecating(deprecated, || {
        let mut st = shared.lock();
        st.preboot_only()?;
        st.boot_path = true;
        apply_machine_update(&mut st, &update)?;
        Ok(Reply::no_content())
    })
}

fn apply_machine_update(st: &mut VmmState, update: &MachineConfigUpdate) -> Result<(), Reply> {
    let old = &st.machine;
    let vcpu_count = update.vcpu_count.unwrap_or(old.vcpu_count);
    let smt = update.smt.unwrap_or(old.smt);
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS || (smt && vcpu_count > 1 && vcpu_count % 2 == 1) {
        return Err(Reply::bad(format!(
            "Machine config error: The number of vCPUs must be greater than 0, less than \
             {MAX_VCPUS} and must be 1 or an even number if SMT is enabled."
        )));
    }
    let mem_size_mib = update.mem_size_mib.unwrap_or(old.mem_size_mib);
    let huge_pages = update.huge_pages.unwrap_or(old.huge_pages);
    let page_multiple = match huge_pages {
        HugePages::None => 1,
        HugePages::Hugetlbfs2M => 2,
    };
    if mem_size_mib == 0 || mem_size_mib % page_multiple != 0 {
        return Err(Reply::bad(
            "Machine config error: The memory size (MiB) is either 0, or not a multiple of the \
             configured page size.",
        ));
    }
    let cpu_template = match update.cpu_template {
        None => old.cpu_template,
        Some(CpuTemplate::None) => None,
        Some(other) => Some(other),
    };
    if let Some(balloon) = &st.balloon {
        if mem_size_mib < balloon.amount_mib as usize {
            return Err(Reply::bad(
                "Machine config error: The memory size (MiB) is smaller than the previously set \
                 balloon device target size.",
            ));
        }
        if huge_pages != HugePages::None {
            return Err(Reply::bad(
                "Machine config error: Firecracker's huge pages support is incompatible with \
                 memory ballooning.",
            ));
        }
    }
    st.machine = MachineConfig {
        vcpu_count,
        mem_size_mib,
        smt,
        cpu_template,
        track_dirty_pages: update.track_dirty_pages.unwrap_or(old.track_dirty_pages),
        huge_pages,
    };
    Ok(())
}

fn put_cpu_config(shared: &Shared, body: &[u8]) -> Outcome {
    let _template: CustomCpuTemplate = parse(body)?;
    let st = shared.lock();
    st.preboot_only()?;
    Ok(Reply::no_content())
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
    insert_drive(&mut st.drives, cfg)?;
    Ok(Reply::no_content())
}

const BLOCK_ERR: &str = "Drive config error: Unable to create the virtio block device";

/// Checks a drive the way creating its block device would, and returns it
/// as Firecracker reports it back.
fn build_drive(cfg: Drive) -> Result<Drive, Reply> {
    let virtio = cfg.path_on_host.is_some() && cfg.socket.is_none();
    let vhost_user = cfg.socket.is_some()
        && cfg.is_read_only.is_none()
        && cfg.path_on_host.is_none()
        && cfg.rate_limiter.is_none()
        && cfg.io_engine.is_none();
    if virtio {
        let path = cfg.path_on_host.clone().unwrap_or_default();
        let read_only = cfg.is_read_only.unwrap_or(false);
        open_backing_file(&path, read_only).map_err(|e| {
            Reply::bad(format!(
                "{BLOCK_ERR}: Virtio backend error: Error manipulating the backing file: {e} \
                 {path}"
            ))
        })?;
        Ok(Drive {
            is_read_only: Some(read_only),
            rate_limiter: normalize_rate_limiter(cfg.rate_limiter),
            io_engine: Some(cfg.io_engine.unwrap_or_default()),
            socket: None,
            ..cfg
        })
    } else if vhost_user {
        let socket = cfg.socket.clone().unwrap_or_default();
        UnixStream::connect(&socket).map_err(|e| {
            Reply::bad(format!(
                "{BLOCK_ERR}: Vhost user backend error: Vhost-user error: Failed to connect to \
                 UDS Unix stream: {e}"
            ))
        })?;
        Ok(cfg)
    } else {
        Err(Reply::bad(format!("{BLOCK_ERR}: Invalid block config.")))
    }
}

fn open_backing_file(path: &str, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

fn insert_drive(drives: &mut Vec<Drive>, cfg: Drive) -> Result<(), Reply> {
    let position = drives.iter().position(|d| d.drive_id == cfg.drive_id);
    let has_root = drives.first().is_some_and(|d| d.is_root_device);
    let as_root = cfg.is_root_device;
    if as_root && has_root && position != Some(0) {
        return Err(Reply::bad(
            "Drive config error: A root block device already exists!",
        ));
    }
    let drive = build_drive(cfg)?;
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

/// Updating a drive in a way only the other kind of block device (virtio or
/// vhost-user) supports.
const WRONG_BACKEND: &str =
    "Failed perform action on device: Internal Device error: Running method expected different \
     backend.";

fn patch_drive(shared: &Shared, body: &[u8], path_id: Option<&str>) -> Outcome {
    let id = checked_id(path_id)?;
    let update: PartialDrive = parse(body)?;
    same_drive_id(id, &update.drive_id)?;
    let mut st = shared.lock();
    st.postboot_only()?;
    let patch_err = |detail: &str| {
        Reply::bad(format!(
            "Drive config error: Unable to patch the block device: {detail} Please verify the \
             request arguments."
        ))
    };
    let Some(drive) = st.drives.iter_mut().find(|d| d.drive_id == update.drive_id) else {
        return Err(patch_err(
            "Failed perform action on device: Device not found",
        ));
    };
    let is_vhost_user = drive.socket.is_some();
    if update.path_on_host.is_none() && update.rate_limiter.is_none() {
        if !is_vhost_user {
            return Err(patch_err(WRONG_BACKEND));
        }
        return Ok(Reply::no_content());
    }
    if is_vhost_user {
        return Err(patch_err(WRONG_BACKEND));
    }
    if let Some(path) = &update.path_on_host {
        let read_only = drive.is_read_only.unwrap_or(false);
        open_backing_file(path, read_only).map_err(|e| {
            patch_err(&format!(
                "Failed perform action on device: Internal Device error: Virtio backend error: \
                 Error manipulating the backing file: {e} {path}"
            ))
        })?;
        drive.path_on_host = Some(path.clone());
    }
    if update.rate_limiter.is_some() {
        drive.rate_limiter = update_rate_limiter(drive.rate_limiter, update.rate_limiter);
    }
    Ok(Reply::no_content())
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
    same_iface_id(id, &cfg.iface_id)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    if let Some(mac) = cfg.guest_mac {
        let in_use = st
            .nets
            .iter()
            .any(|n| n.cfg.guest_mac == Some(mac) && n.cfg.iface_id != cfg.iface_id);
        if in_use {
            return Err(Reply::bad(format!(
                "Network config error: The MAC address is already in use: {mac}"
            )));
        }
    }
    if let Some(index) = st.nets.iter().position(|n| n.cfg.iface_id == cfg.iface_id) {
        st.nets.swap_remove(index);
    }
    if cfg.host_dev_name.len() >= 16 {
        return Err(Reply::bad(
            "Network config error: Could not create the network device: Open tap device \
             failed: Invalid interface name",
        ));
    }
    let cfg = NetworkInterface {
        rx_rate_limiter: normalize_rate_limiter(cfg.rx_rate_limiter),
        tx_rate_limiter: normalize_rate_limiter(cfg.tx_rate_limiter),
        ..cfg
    };
    st.nets.push(NetEntry { cfg, mmds: false });
    Ok(Reply::no_content())
}

fn patch_net(shared: &Shared, body: &[u8], path_id: Option<&str>) -> Outcome {
    let id = checked_id(path_id)?;
    let update: PartialNetworkInterface = parse(body)?;
    same_iface_id(id, &update.iface_id)?;
    let mut st = shared.lock();
    st.postboot_only()?;
    let Some(net) = st
        .nets
        .iter_mut()
        .find(|n| n.cfg.iface_id == update.iface_id)
    else {
        return Err(Reply::bad(
            "Network config error: Unable to update the net device: Failed perform action on \
             device: Device not found",
        ));
    };
    net.cfg.rx_rate_limiter = update_rate_limiter(net.cfg.rx_rate_limiter, update.rx_rate_limiter);
    net.cfg.tx_rate_limiter = update_rate_limiter(net.cfg.tx_rate_limiter, update.tx_rate_limiter);
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
fn bind_vsock(shared: &Shared, path: &str) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    super::set_vsock_path(Some(Path::new(path)));
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

// ---------------------------------------------------------------- balloon

fn put_balloon(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: Balloon = parse(body)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    if cfg.amount_mib as usize > st.machine.mem_size_mib {
        return Err(Reply::bad(
            "Balloon config error: Amount of pages requested is too large.",
        ));
    }
    if st.machine.huge_pages != HugePages::None {
        return Err(Reply::bad(
            "Balloon config error: Firecracker's huge pages support is incompatible with memory \
             ballooning.",
        ));
    }
    st.balloon = Some(cfg);
    Ok(Reply::no_content())
}

fn patch_balloon(shared: &Shared, body: &[u8], second: Option<&str>) -> Outcome {
    enum Update {
        Amount(u32),
        Stats(u16),
    }
    let update = match second {
        Some("statistics") => {
            Update::Stats(parse::<BalloonStatsUpdate>(body)?.stats_polling_interval_s)
        }
        Some(other) => {
            return Err(Reply::bad(format!(
                "Unrecognized PATCH request path `{other}`."
            )))
        }
        None => Update::Amount(parse::<BalloonUpdate>(body)?.amount_mib),
    };
    let mut st = shared.lock();
    st.postboot_only()?;
    let mem_size_mib = st.machine.mem_size_mib;
    let Some(balloon) = st.balloon.as_mut() else {
        return Err(Reply::bad(
            "Balloon update error: Failed perform action on device: Device not found",
        ));
    };
    match update {
        Update::Amount(amount) => {
            if amount as usize > mem_size_mib {
                return Err(Reply::bad(format!(
                    "Balloon update error: Failed perform action on device: Internal Device \
                     error: Requested memory should be less than {amount}MiB"
                )));
            }
            balloon.amount_mib = amount;
        }
        Update::Stats(interval) => {
            if interval != balloon.stats_polling_interval_s
                && (interval == 0 || balloon.stats_polling_interval_s == 0)
            {
                return Err(Reply::bad(
                    "Balloon update error: Failed perform action on device: Internal Device \
                     error: Statistics cannot be enabled/disabled after activation.",
                ));
            }
            balloon.stats_polling_interval_s = interval;
        }
    }
    Ok(Reply::no_content())
}

// ---------------------------------------------------------------- entropy

fn put_entropy(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: Entropy = parse(body)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    st.entropy = Some(Entropy {
        rate_limiter: normalize_rate_limiter(cfg.rate_limiter),
    });
    Ok(Reply::no_content())
}

// -------------------------------------------------------- logger, metrics

/// Opens a log or metrics destination the way Firecracker does: it must
/// exist already (a file or a named pipe).
fn open_destination(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

fn put_logger(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: Logger = parse(body)?;
    let st = shared.lock();
    st.preboot_only()?;
    if let Some(path) = &cfg.log_path {
        let file = open_destination(path)
            .map_err(|e| Reply::bad(format!("Logger error: Failed to open target file: {e}")))?;
        super::set_log_target(file);
    }
    Ok(Reply::no_content())
}

fn put_metrics(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: Metrics = parse(body)?;
    let mut st = shared.lock();
    st.preboot_only()?;
    let prefix = "Metrics error: Cannot initialize the metrics system due to bad user input";
    let file =
        open_destination(&cfg.metrics_path).map_err(|e| Reply::bad(format!("{prefix}: {e}")))?;
    if st.metrics.is_some() {
        return Err(Reply::bad(format!(
            "{prefix}: Reinitialization of metrics not allowed."
        )));
    }
    st.metrics = Some(file);
    Ok(Reply::no_content())
}

// ------------------------------------------------------------------- mmds

fn mmds_too_large() -> Reply {
    Reply::error(
        413,
        "MMDS limit exceeded error: The MMDS patch request doesn't fit.",
    )
}

fn put_mmds(shared: &Shared, body: &[u8], second: Option<&str>) -> Outcome {
    match second {
        None => {
            let data: Value = parse(body)?;
            let limit = shared.opts.mmds_size_limit;
            let mut st = shared.lock();
            let store = st.mmds.get_or_insert_with(MmdsStore::new);
            if data.to_string().len() > limit {
                return Err(mmds_too_large());
            }
            store.data = data;
            store.initialized = true;
            Ok(Reply::no_content())
        }
        Some("config") => put_mmds_config(shared, body),
        Some(other) => Err(Reply::bad(format!(
            "Unrecognized PUT request path `{other}`."
        ))),
    }
}

fn put_mmds_config(shared: &Shared, body: &[u8]) -> Outcome {
    let cfg: MmdsConfig = parse(body)?;
    let deprecated = cfg.version == MmdsVersion::V1;
    deprecating(deprecated, || set_mmds_config(shared, cfg))
}

fn set_mmds_config(shared: &Shared, cfg: MmdsConfig) -> Outcome {
    let mut st = shared.lock();
    st.preboot_only()?;
    st.boot_path = true;
    let prefix = "MMMDS config error";
    let ipv4 = match cfg.ipv4_address {
        None => Ipv4Addr::new(169, 254, 169, 254),
        Some(addr) => match addr.octets() {
            [169, 254, third, _] if third != 0 && third != 255 => addr,
            _ => {
                return Err(Reply::bad(format!(
                    "{prefix}: The MMDS IPv4 address is not link local."
                )))
            }
        },
    };
    if cfg.network_interfaces.is_empty() {
        return Err(Reply::bad(format!(
            "{prefix}: The list of network interface IDs that allow forwarding MMDS requests is \
             empty."
        )));
    }
    let all_known = cfg
        .network_interfaces
        .iter()
        .all(|id| st.nets.iter().any(|n| &n.cfg.iface_id == id));
    if !all_known {
        return Err(Reply::bad(format!(
            "{prefix}: The list of network interface IDs provided contains at least one ID that \
             does not correspond to any existing network interface."
        )));
    }
    for net in st.nets.iter_mut() {
        net.mmds = cfg.network_interfaces.contains(&net.cfg.iface_id);
    }
    let store = st.mmds.get_or_insert_with(MmdsStore::new);
    store.version = cfg.version;
    store.imds_compat = cfg.imds_compat;
    store.ipv4 = ipv4;
    Ok(Reply::no_content())
}

/// Applies a JSON merge patch (RFC 7396).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn patch_mmds(shared: &Shared, body: &[u8]) -> Outcome {
    let patch: Value = parse(body)?;
    let limit = shared.opts.mmds_size_limit;
    let mut st = shared.lock();
    let store = st.mmds.get_or_insert_with(MmdsStore::new);
    if !store.initialized {
        return Err(Reply::bad(
            "MMDS error: The MMDS data store is not initialized.",
        ));
    }
    let mut data = store.data.clone();
    merge_patch(&mut data, &patch);
    if data.to_string().len() > limit {
        return Err(mmds_too_large());
    }
    store.data = data;
    Ok(Reply::no_content())
}

// -------------------------------------------------------------- snapshots

const MIB: u64 = 1024 * 1024;

fn snapshot_create(shared: &Shared, body: &[u8]) -> Outcome {
    let params: SnapshotCreate = parse(body)?;
    let st = shared.lock();
    st.postboot_only()?;
    if st.phase == Phase::Running {
        return Err(Reply::bad(
            "Create snapshot error: Cannot save the microVM state: Operation not allowed: \
             save/restore unavailable while running",
        ));
    }
    let state = SnapshotState {
        fc_double_snapshot: 1,
        vmm_version: VMM_VERSION.to_string(),
        vm_id: shared.opts.id.clone(),
        machine_config: st.machine.clone(),
        drives: st.drives.clone(),
        network_interfaces: st.nets.iter().map(|n| (n.cfg.clone(), n.mmds)).collect(),
        vsock: st.vsock.clone(),
        balloon: st.balloon.clone(),
        entropy: st.entropy.clone(),
        mmds_version: st.mmds.as_ref().map(|m| m.version),
        heartbeat: st.heartbeat,
    };
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    let state_err = |op: &str, e: std::io::Error| {
        Reply::bad(format!(
            "Create snapshot error: Cannot perform {op} on the snapshot backing file: {e}"
        ))
    };
    let mut file = File::create(&params.snapshot_path).map_err(|e| state_err("open", e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(|e| state_err("write", e))?;
    // The memory file gets the guest memory's size; it stays sparse.
    let mem_err = |op: &str, e: std::io::Error| {
        Reply::bad(format!(
            "Create snapshot error: Cannot perform {op} on the memory backing file: {e}"
        ))
    };
    let mem = File::create(&params.mem_file_path).map_err(|e| mem_err("open", e))?;
    mem.set_len(st.machine.mem_size_mib as u64 * MIB)
        .map_err(|e| mem_err("set_len", e))?;
    let _ = params.snapshot_type;
    Ok(Reply::no_content())
}

fn snapshot_load(shared: &Shared, body: &[u8]) -> Outcome {
    let params: SnapshotLoad = parse(body)?;
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

/// The stage of `PUT /snapshot/load` after parsing.
fn load_snapshot(shared: &Shared, params: &SnapshotLoad, mem_path: &Path, uffd: bool) -> Outcome {
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
    let from_file = "Failed to get snapshot state from file";
    let text = std::fs::read_to_string(&params.snapshot_path)
        .map_err(|e| fatal(format!("{from_file}: Failed to open snapshot file: {e}")))?;
    let mut state: SnapshotState = serde_json::from_str(&text).map_err(|e| {
        fatal(format!(
            "{from_file}: Failed to load snapshot state from file: not a snapshot made by \
             this VMM ({e})"
        ))
    })?;
    for entry in &params.network_overrides {
        let net = state
            .network_interfaces
            .iter_mut()
            .find(|(n, _)| n.iface_id == entry.iface_id)
            .ok_or_else(|| fatal(format!("{from_file}: Unknown Network Device.")))?;
        net.0.host_dev_name = entry.host_dev_name.clone();
    }
    let memory = "Failed to load guest memory";
    if uffd {
        UnixStream::connect(mem_path).map_err(|e| {
            fatal(format!(
                "{memory}: Error creating guest memory from uffd: Failed to connect to UDS Unix \
                 stream: {e}"
            ))
        })?;
    } else {
        File::open(mem_path).map_err(|e| {
            fatal(format!(
                "{memory}: Error creating guest memory from file: Failed to load guest memory: \
                 {e}"
            ))
        })?;
    }
    let build = "Failed to build microVM from snapshot";
    for drive in &state.drives {
        if let Some(path) = &drive.path_on_host {
            open_backing_file(path, drive.is_read_only.unwrap_or(false)).map_err(|e| {
                fatal(format!(
                    "{build}: Cannot restore devices: Block: Virtio backend error: Error \
                     manipulating the backing file: {e} {path}"
                ))
            })?;
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

    st.machine = MachineConfig {
        smt: false,
        cpu_template: None,
        track_dirty_pages: params.track_dirty_pages || params.enable_diff_snapshots,
        ..state.machine_config
    };
    st.drives = state.drives;
    st.nets = state
        .network_interfaces
        .into_iter()
        .map(|(cfg, mmds)| NetEntry { cfg, mmds })
        .collect();
    st.vsock = state.vsock;
    st.balloon = state.balloon;
    st.entropy = state.entropy;
    if let Some(version) = state.mmds_version {
        st.mmds.get_or_insert_with(MmdsStore::new).version = version;
    }
    st.heartbeat = state.heartbeat;
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
    fn merge_patch_follows_rfc7396() {
        let mut target = serde_json::json!({"a": "b", "c": {"d": "e", "f": "g"}});
        let patch = serde_json::json!({"a": "z", "c": {"f": null}});
        merge_patch(&mut target, &patch);
        assert_eq!(target, serde_json::json!({"a": "z", "c": {"d": "e"}}));
    }

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
}
