//! Wire types of the agentenv HTTP API.
//!
//! Everything the daemon sends or accepts over HTTP is defined here, so that the
//! daemon, the CLI and the OpenAPI document agree by construction. This crate has
//! no runtime: no tokio, no axum, no I/O.

pub mod base64;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// Largest request body the daemon accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where a VM is in its life.
///
/// The in-between states (`creating`, `pausing`, …) are visible while an
/// operation runs; every change goes through one transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Resources are being prepared and the VMM is being started.
    Creating,
    /// The guest runs.
    Running,
    /// A pause request is in flight.
    Pausing,
    /// The guest's vCPUs are stopped; memory is kept.
    Paused,
    /// A resume request is in flight.
    Resuming,
    /// A snapshot is being taken.
    Snapshotting,
    /// A shutdown request is in flight.
    Stopping,
    /// The VMM exited normally; its resources are freed, the record stays.
    Stopped,
    /// The VMM died or could not be started; the cause is recorded.
    Failed,
    /// The VM is being removed.
    Deleting,
    /// The VM is going back to a full snapshot in place (`reset`).
    Resetting,
}

impl VmState {
    /// Every state, in declaration order.
    pub const ALL: [VmState; 11] = [
        VmState::Creating,
        VmState::Running,
        VmState::Pausing,
        VmState::Paused,
        VmState::Resuming,
        VmState::Snapshotting,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
        VmState::Deleting,
        VmState::Resetting,
    ];

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Pausing => "pausing",
            VmState::Paused => "paused",
            VmState::Resuming => "resuming",
            VmState::Snapshotting => "snapshotting",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Resetting => "resetting",
        }
    }

    /// True while a VMM process is (supposed to be) alive.
    pub fn has_vmm(self) -> bool {
        !matches!(self, VmState::Stopped | VmState::Failed)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Firecracker, configured over its Unix-socket API.
    Firecracker,
    /// QEMU's `microvm` machine, controlled over QMP.
    Qemu,
}

impl BackendKind {
    /// The name used on the wire and in config.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/vm` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`, not `.` or `..`; becomes a directory name.
    pub vm_id: String,
    /// One slot is `memory_mib_per_slot` MiB and one vCPU; 1 to 32. Default from config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// The VM's disk. Required unless `restore` is given (then refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,
    /// Start from a full (memory) snapshot instead of booting: the VM runs on
    /// from the instant of the snapshot, with its own id, disk copy and
    /// network identity. `slots`, `kernel`, `initrd`, `boot_args` and
    /// `shares` come from the snapshot (giving them is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
    /// TAP and MAC to use when automatic networking is disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// Kernel file name under `kernel_root`. Default: `default_kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initramfs file name under `initramfs_root`. Default: `default_initrd`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line; replaces `default_boot_args`. agentenv appends its own
    /// `agentenv.*` parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host directories copied into ext4 images and mounted in the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareSpec>,
    /// Answer only once the guest agent answers (`ready`), so the VM is usable at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_ready: bool,
    /// Seconds `wait_ready` waits (default: config `agent.ready_timeout_s`). On
    /// timeout the answer is 504 and the VM stays, running, for inspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ready_timeout_s: Option<u64>,
}

impl CreateVmRequest {
    /// A request that restores `vm_id` from the full snapshot `snapshot_id`,
    /// leaving everything the snapshot decides to it.
    pub fn restore(vm_id: &str, snapshot_id: &str) -> CreateVmRequest {
        CreateVmRequest {
            vm_id: vm_id.into(),
            slots: None,
            disk: None,
            restore: Some(RestoreSpec {
                snapshot_id: snapshot_id.into(),
            }),
            network: None,
            kernel: None,
            initrd: None,
            boot_args: None,
            shares: Vec::new(),
            wait_ready: false,
            wait_ready_timeout_s: None,
        }
    }
}

/// `restore` in a create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// A full snapshot (`"kind": "full"`).
    pub snapshot_id: String,
}

/// `POST /v1/vm/{vm_id}/fork` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many clones: 1 to the configured `max_fork`.
    pub count: u32,
    /// Their ids, `count` of them; default `{vm_id}-fork-{n}` with the first
    /// free numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_ids: Option<Vec<String>>,
}

/// `POST /v1/vm/{vm_id}/fork` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    /// The clones, running, in the order of `vm_ids`.
    pub vms: Vec<VmInfo>,
}

/// `POST /v1/vm/{vm_id}/reset` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// A full snapshot of a compatible VM; the VM goes back to it in place.
    pub snapshot_id: String,
}

/// A host directory shared with the guest as an extra disk.
///
/// The directory's content is copied into an ext4 image in the session
/// directory when the VM is created; guest writes stay in that image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    /// Absolute host directory under one of `direct_disk_roots`.
    pub host_path: String,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// Attach the image read-only (default true).
    #[serde(default = "default_true")]
    pub read_only: bool,
}

fn default_true() -> bool {
    true
}

/// A share as attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShareInfo {
    /// The host directory it was built from.
    pub host_path: String,
    /// Where the guest mounts it.
    pub guest_path: String,
    /// Attached read-only.
    pub read_only: bool,
    /// The ext4 image in the session directory.
    pub image_path: String,
    /// The guest block device (`/dev/vdc`, …).
    pub device: String,
}

/// What the VM boots from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSpec {
    /// The read-only base `rootfs_root/{rootfs_id}` plus a fresh writable overlay disk.
    Overlay {
        /// File name of the base image under `rootfs_root`.
        rootfs_id: String,
        /// Size of the writable overlay disk; default `default_disk_size_gib`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_size_gib: Option<u64>,
    },
    /// A copy of a disk snapshot's overlay, on the base it was taken from.
    Snapshot {
        /// The snapshot to start from.
        snapshot_id: String,
    },
    /// A host disk image used as is (read-write), under one of `direct_disk_roots`.
    Direct {
        /// Absolute path of the image.
        path: String,
    },
}

impl DiskSpec {
    /// The `kind` tag used on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            DiskSpec::Overlay { .. } => "overlay",
            DiskSpec::Snapshot { .. } => "snapshot",
            DiskSpec::Direct { .. } => "direct",
        }
    }
}

/// The VM's network: its egress policy (automatic networking), or a
/// caller-chosen TAP device and guest MAC (only when networking is disabled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Existing TAP device on the host, at most 15 bytes. Required when
    /// automatic networking is disabled; ignored (with a warning) when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    /// `xx:xx:xx:xx:xx:xx`, unicast. Required with `tap_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Destinations opened for this guest whatever `internet` and the
    /// daemon's `[network] deny_private` say: `CIDR` (every protocol and
    /// port) or `CIDR:port` (that TCP and UDP port), IPv4, e.g.
    /// `"10.1.2.0/24:443"`; a bare address is a /32. At most 64 entries.
    /// Needs automatic networking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// `false`: no egress at all except `allow`. Default `true` (public
    /// addresses are reachable). Needs automatic networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internet: Option<bool>,
}

impl NetworkSpec {
    /// True when the egress fields (`allow`, `internet`) are given.
    pub fn has_egress(&self) -> bool {
        !self.allow.is_empty() || self.internet.is_some()
    }
}

/// A VM's egress policy as `GET /v1/vm/{vm_id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressInfo {
    /// Public addresses are reachable.
    pub internet: bool,
    /// Destinations opened in addition (normalised: entries another covers
    /// are dropped; bare addresses shown as /32).
    pub allow: Vec<String>,
    /// Private and other non-public ranges are closed except `allow`
    /// (the daemon's `[network] deny_private`, as of its last start).
    pub deny_private: bool,
}

/// The disks a VM was given, as host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskInfo {
    /// `overlay`, `snapshot` or `direct`.
    pub kind: String,
    /// Read-only base image (overlay and snapshot kinds).
    pub rootfs_path: Option<String>,
    /// The VM's writable disk: the overlay, or the direct disk.
    pub writable_path: String,
    /// Base image id (overlay and snapshot kinds).
    pub rootfs_id: Option<String>,
    /// Snapshot the writable disk was copied from (snapshot kind).
    pub snapshot_id: Option<String>,
    /// Logical size of the writable disk in bytes.
    pub size_bytes: u64,
}

/// How a VM that is no longer running ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    /// Exit status of the VMM process, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the VMM process, when one did.
    pub signal: Option<i32>,
    /// What happened, for people.
    pub cause: String,
    /// When the exit was noticed.
    pub at: DateTime<Utc>,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// The VM's id.
    pub vm_id: String,
    /// Current state.
    pub state: VmState,
    /// Which VMM runs it.
    pub backend: BackendKind,
    /// The VMM's control socket, a Unix socket path: Firecracker's HTTP API
    /// socket when `backend` is `firecracker`, QEMU's QMP (QEMU Machine
    /// Protocol, JSON) socket when it is `qemu`. The field keeps its name
    /// for existing clients.
    pub api_socket: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Disks.
    pub disk: DiskInfo,
    /// Host shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareInfo>,
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path, when one is used.
    pub initrd: Option<String>,
    /// Full kernel command line given to the guest.
    pub boot_args: String,
    /// TAP device, when the VM has a network interface.
    pub tap_name: Option<String>,
    /// Guest MAC, when the VM has a network interface.
    pub guest_mac: Option<String>,
    /// Host side address of the VM's subnet (automatic networking).
    pub host_ip: Option<String>,
    /// Guest address (automatic networking).
    pub guest_ip: Option<String>,
    /// What the guest may reach (automatic networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressInfo>,
    /// Session directory holding config, disks, logs and the metadata record.
    pub session_dir: String,
    /// Console and VMM log file (bounded in size).
    pub console_log: String,
    /// VMM process id while it runs.
    pub pid: Option<u32>,
    /// When the VM was created.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
    /// How it ended, once stopped or failed.
    pub exit: Option<ExitInfo>,
    /// Notes about how the request was applied (e.g. an ignored field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The guest agent answers: exec and file calls work.
    #[serde(default)]
    pub ready: bool,
    /// The guest agent, once it has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// The full snapshot the VM was restored (or last reset) from: its memory
    /// maps that snapshot's memory file, which cannot be deleted meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The name of the token (or `uid:N` of the Unix peer) that created it: a
    /// `user` token sees only what it owns. `None`: made before owners were
    /// recorded, visible to `admin` tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The resource limits its VMM runs under (its cgroup), when the daemon
    /// confines VMMs with cgroups (`[cgroup]` in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<VmLimitsInfo>,
}

/// The resource limits of a VM's VMM: one cgroup per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmLimitsInfo {
    /// The cgroup version the host has: 1 (one hierarchy per controller) or 2 (unified).
    pub cgroup_version: u8,
    /// The VM's cgroup directories (one per hierarchy on cgroup v1).
    pub cgroup_paths: Vec<String>,
    /// CPU time the VMM may use per `cpu_period_us`, in microseconds
    /// (`cpu.max` on v2, `cpu.cfs_quota_us` on v1): its vCPUs plus a small
    /// allowance for the VMM's own threads.
    pub cpu_quota_us: u64,
    /// The CPU accounting period, in microseconds.
    pub cpu_period_us: u64,
    /// Memory the VMM may use, guest memory included, in bytes (`memory.max` /
    /// `memory.limit_in_bytes`); no swap on top. Above it the kernel's
    /// out-of-memory killer ends the VMM and the VM fails with that cause.
    pub memory_bytes: u64,
    /// Most processes and threads the VMM may have (`pids.max`).
    pub pids_max: u64,
    /// Its I/O weight (`io.weight` / `blkio.weight`); absent when the host
    /// cannot weigh I/O (see `unsupported`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// Limits the host cannot apply, each with the reason (e.g. `io_weight:
    /// blkio.weight does not exist`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
}

/// The guest agent of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentInfo {
    /// Its name and version, e.g. `agentenv-guest 0.1.0`.
    pub version: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// When it first answered (for this VMM process).
    pub ready_at: DateTime<Utc>,
}

/// `POST /v1/vm/{vm_id}/exec` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (the program is looked up in the guest's `PATH`).
    pub cmd: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory in the guest (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Text fed to the command's stdin (at most 48 KiB; else stdin is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Like `stdin`, base64-encoded, for binary input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Seconds after which the command's process group is killed (default: config
    /// `agent.default_exec_timeout_s`). Fractions allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Answer with `application/x-ndjson`: one [`ExecEvent`] per line as output comes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// `POST /v1/vm/{vm_id}/exec` answer (non-streaming).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Exit status, when the command exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Its stdout (invalid UTF-8 replaced), at most `agent.max_output_bytes`.
    pub stdout: String,
    /// Its stderr, likewise.
    pub stderr: String,
    /// Either output went past the cap.
    pub truncated: bool,
    /// The timeout killed it.
    pub timed_out: bool,
    /// Wall time in the guest.
    pub duration_ms: u64,
    /// Bytes written to stdout (kept or not).
    pub stdout_bytes: u64,
    /// Bytes written to stderr (kept or not).
    pub stderr_bytes: u64,
}

/// One line of a streaming exec answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The command started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Output on stdout.
    Stdout {
        /// The bytes, base64.
        data: String,
    },
    /// Output on stderr.
    Stderr {
        /// The bytes, base64.
        data: String,
    },
    /// The command ended; the last line.
    Exit {
        /// Exit status, when it exited.
        exit_code: Option<i32>,
        /// Signal that ended it, when one did.
        signal: Option<i32>,
        /// The timeout killed it.
        timed_out: bool,
        /// Wall time in the guest.
        duration_ms: u64,
    },
    /// The exec failed after it started (e.g. the agent connection broke); the last line.
    Error {
        /// What went wrong.
        error: String,
    },
}

/// `PUT /v1/vm/{vm_id}/files` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    /// The guest path written.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// `GET /v1/vm` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    /// Every VM the daemon tracks, sorted by id.
    pub vms: Vec<VmInfo>,
}

/// Every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field or the state.
    pub error: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The VM's current state, for conflicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
}

/// `GET /v1/health` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
    /// agentenv's version.
    pub version: String,
    /// The VMM backend new VMs get.
    pub backend: BackendKind,
    /// Operations in flight now: mutating requests being served, and engine
    /// operations still running after their client went away. They count
    /// against `max_inflight_ops`; beyond it, operations get 429.
    #[serde(default)]
    pub ops_in_flight: u32,
}

/// Where a snapshot's disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotTier {
    /// The fast tier (`tmpfs_snapshot_root`): lost on reboot until persisted.
    Tmpfs,
    /// The durable tier (`durable_snapshot_root`, also spelt
    /// `hdfs_snapshot_root`): any mounted file system; survives reboots.
    Durable,
}

/// Whether a snapshot can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// Complete and verified when last checked.
    Ready,
    /// Its disk no longer matches its checksum; refused as a source (422).
    Corrupt,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// The writable disk only: new VMs boot from a copy of it.
    #[default]
    Disk,
    /// The whole VM: memory, vCPU and device state and the writable disk from
    /// one instant; VMs restored from it run on without booting.
    Full,
}

/// `POST /v1/vm/{vm_id}/snapshot` body (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Id of the new snapshot; default `{vm_id}-{UTC timestamp}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// A full snapshot (memory, vCPUs, devices and disk) instead of the disk only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// What a restore from a full snapshot must match, as the snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FullSnapshotInfo {
    /// The VMM and its version (`qemu 7.2.19`, `firecracker 1.13.1`).
    pub vmm_version: String,
    /// vCPUs of the source VM.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel image path.
    pub kernel: String,
    /// Fingerprint of the kernel file (see docs/snapshots.md).
    pub kernel_fingerprint: String,
    /// Initramfs path, when one was used.
    pub initrd: Option<String>,
    /// Fingerprint of the initramfs file.
    pub initrd_fingerprint: Option<String>,
    /// The kernel command line the guest booted with.
    pub boot_args: String,
    /// The source VM had a network interface.
    pub network: bool,
    /// The source VM had a guest agent channel.
    pub agent: bool,
    /// Bytes of the memory file (logical; 0 when the memory is in the state file).
    pub memory_bytes: u64,
    /// Bytes of the VMM's state file.
    pub state_bytes: u64,
    /// Made by `fork`: removed with the last VM restored from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

/// `POST /v1/snapshots/{snapshot_id}/persist` body (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistSnapshotRequest {
    /// Keep the tmpfs copy after persisting (default false: it is dropped).
    #[serde(default)]
    pub keep_tmpfs: bool,
}

/// A disk snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// The snapshot's id.
    pub snapshot_id: String,
    /// The VM it was taken from.
    pub vm_id: String,
    /// The base image the disk sits on (overlay and snapshot VMs).
    pub rootfs_id: Option<String>,
    /// The backend of the source VM.
    pub backend: BackendKind,
    /// Where the primary copy lives.
    pub tier: SnapshotTier,
    /// Usable or corrupt.
    pub status: SnapshotStatus,
    /// The tmpfs copy, if there is one.
    pub tmpfs_path: Option<String>,
    /// The durable copy, if there is one.
    pub durable_path: Option<String>,
    /// Logical size of the disk in bytes.
    pub logical_bytes: u64,
    /// Bytes actually allocated (data, not holes).
    pub allocated_bytes: u64,
    /// SHA-256 of the disk's content (see docs/snapshots.md for the sparse-aware definition).
    pub sha256: String,
    /// When it was taken.
    pub created_at: DateTime<Utc>,
    /// When it was copied to the durable tier.
    pub persisted_at: Option<DateTime<Utc>>,
    /// The guest's file systems were frozen by its agent for the copy (else the VM
    /// was only paused: consistent like a power cut).
    #[serde(default)]
    pub fs_frozen: bool,
    /// `disk` or `full`.
    #[serde(default)]
    pub kind: SnapshotKind,
    /// Fingerprint of the base image the disk sits on, when it has one: a VM
    /// is made from the snapshot only while the base image still matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_fingerprint: Option<String>,
    /// What a restore must match (full snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<FullSnapshotInfo>,
    /// VMs whose memory maps this snapshot's memory file (it cannot be
    /// deleted while there are any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped_by: Vec<String>,
    /// The name of the token (or `uid:N` of the Unix peer) that took it: a
    /// `user` token sees only what it owns. `None`: taken before owners were
    /// recorded, visible to `admin` tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `GET /v1/snapshots` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    /// Every complete snapshot, sorted by id.
    pub snapshots: Vec<SnapshotInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_is_tagged_by_kind() {
        let d: DiskSpec =
            serde_json::from_str(r#"{"kind":"overlay","rootfs_id":"base.ext4"}"#).unwrap();
        assert_eq!(
            d,
            DiskSpec::Overlay {
                rootfs_id: "base.ext4".into(),
                disk_size_gib: None
            }
        );
        let err = serde_json::from_str::<DiskSpec>(r#"{"kind":"overlay","rootfs_id":"a","x":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
    }

    #[test]
    fn create_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVmRequest>(
            r#"{"vm_id":"a","disk":{"kind":"direct","path":"/x"},"memory":5}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn states_round_trip_by_name() {
        for s in VmState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<VmState>(&json).unwrap(), s);
        }
    }
}
