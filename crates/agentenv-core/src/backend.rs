//! The VMM backend seam: everything the engine needs from Firecracker or QEMU.
//!
//! A backend starts one VMM process per VM and hands back a [`VmmInstance`] to
//! control it. The engine never talks to a VMM any other way.

use std::path::PathBuf;
use std::time::Duration;

use agentenv_api::BackendKind;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// True when a kernel command line turns ACPI off (its last `acpi=` word
/// says `off`, as the kernel reads it). The guest then finds its virtio-mmio
/// devices only through `virtio_mmio.device=` on its command line.
pub fn boot_args_turn_acpi_off(boot_args: &str) -> bool {
    boot_args
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("acpi="))
        == Some("off")
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    /// The VM's id (also given to the VMM as its instance id).
    pub vm_id: String,
    /// The VM's session directory; the backend writes its generated config here.
    pub session_dir: PathBuf,
    /// Control socket the VMM must serve (Firecracker API socket or QMP socket).
    pub control_socket: PathBuf,
    /// File that receives the VMM's stdout/stderr (guest console and VMM log).
    pub console_log: PathBuf,
    /// Size at which `console_log` is rotated to `console_log.1` (so at most twice this is kept).
    pub console_log_max_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel image (an ELF vmlinux for Firecracker, a bzImage or vmlinux for QEMU).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub boot_args: String,
    /// Block devices in the order the guest sees them (`/dev/vda`, `/dev/vdb`, …).
    pub drives: Vec<DriveSpec>,
    /// Network interface, if any.
    pub net: Option<NetAttachment>,
    /// Host end of the guest agent channel, if the VM gets one: the Unix socket
    /// of Firecracker's vsock device (hybrid vsock: connect, then `CONNECT <port>`)
    /// or of QEMU's virtio-serial port (a socket chardev QEMU serves).
    pub agent_socket: Option<PathBuf>,
    /// How long the VMM may take to create its control socket and accept the configuration.
    pub startup_timeout: Duration,
    /// How long one control-socket request may take before it fails.
    pub request_timeout: Duration,
    /// A file (in a tmpfs) that holds the guest's RAM, mapped shared, so a
    /// full snapshot can copy it while the guest is stopped (QEMU). `None`:
    /// anonymous memory. Firecracker ignores it (it writes memory itself).
    pub memory_file: Option<PathBuf>,
    /// The `cgroup.procs` files of the VM's cgroup (one per hierarchy on
    /// cgroup v1): the VMM joins them before it executes, so all of it runs
    /// under the VM's limits. Empty: no cgroup.
    pub cgroup_procs: Vec<PathBuf>,
}

/// Where a VMM writes a full snapshot (inside the snapshot store's partial
/// directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullSnapshotFiles {
    /// The vCPU and device state.
    pub state: PathBuf,
    /// Guest memory, when the VMM writes it itself ([`SavedMemory::Written`]).
    pub memory: PathBuf,
}

/// Where a full snapshot's guest memory is after [`VmmInstance::save_full`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavedMemory {
    /// The VMM wrote it to [`FullSnapshotFiles::memory`] (Firecracker).
    Written,
    /// It is this shared memory file of the stopped guest (QEMU's
    /// [`LaunchSpec::memory_file`]): the caller copies it before the guest
    /// runs again.
    InFile(PathBuf),
    /// It went into the state file with the devices (QEMU, a guest whose RAM
    /// is a private mapping, i.e. one itself restored from a snapshot).
    InState,
}

/// How to start a VMM from a full snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreSpec {
    /// The VM as launched: the same devices, in the same order, as the
    /// snapshot's VM; the new VM's own sockets, disk copy, TAP and MAC.
    /// Its `memory_file` is not used.
    pub launch: LaunchSpec,
    /// The snapshot's state file.
    pub state: PathBuf,
    /// The snapshot's memory file, mapped privately (copy-on-write, so VMs
    /// restored from one snapshot share its pages until they write them);
    /// `None` when the memory is in the state file ([`SavedMemory::InState`]).
    pub memory: Option<PathBuf>,
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// Drive id (`rootfs`, `overlay`, …).
    pub id: String,
    /// Host file backing it.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
    /// The guest boots from it.
    pub is_root: bool,
    /// The file opened by the daemon (a direct disk): the VMM gets this
    /// descriptor and never reopens `path`.
    pub fd: Option<crate::host::SharedFd>,
}

/// A TAP device attached as the guest's `eth0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttachment {
    /// Host TAP device.
    pub tap_name: String,
    /// Guest MAC address.
    pub guest_mac: String,
}

/// What identifies a VMM process across daemon restarts: a pid alone may be
/// reused, a pid with its start time (clock ticks after boot) may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Process id (also its process group id).
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmExit {
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
}

impl VmmExit {
    /// True for a clean exit with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exited with status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("exited"),
        }
    }
}

/// What went wrong talking to or starting a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be started.
    #[error("failed to start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VMM did not create its control socket in time.
    #[error("vmm did not create its socket {path} within {timeout_ms} ms")]
    SocketTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The VMM process exited while it was being started.
    #[error("vmm exited during startup ({exit}): {detail}")]
    ExitedEarly {
        /// How it exited.
        exit: VmmExit,
        /// The last lines of its output.
        detail: String,
    },
    /// The VMM answered a request with an error.
    #[error("vmm refused {request}: {message}")]
    Refused {
        /// The request, e.g. `PUT /machine-config`.
        request: String,
        /// HTTP status (Firecracker) or 0 (QMP).
        status: u16,
        /// The VMM's own message.
        message: String,
    },
    /// The control socket failed.
    #[error("vmm request {request} failed: {message}")]
    Transport {
        /// The request.
        request: String,
        /// What failed.
        message: String,
    },
    /// A request got no answer in time (the VMM may be hung).
    #[error("vmm request {request} timed out after {timeout_ms} ms")]
    Timeout {
        /// The request.
        request: String,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The VMM process is gone.
    #[error("vmm is not running")]
    NotRunning,
    /// The VMM's jail cannot be set up (an unusable `[jail]` setting, no
    /// free uid, a mount that fails): the VM cannot start now.
    #[error("cannot jail the vmm: {0}")]
    Jail(String),
    /// A host file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Starts VMMs. One implementation per VMM (Firecracker, QEMU).
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Which VMM this is.
    fn kind(&self) -> BackendKind;

    /// Starts a VMM process for `spec` and boots the guest.
    ///
    /// On error nothing is left behind: the process is killed and reaped and its
    /// control socket removed.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError>;

    /// The VMM's name and version as a full snapshot records it (e.g.
    /// `qemu 7.2.19`, `firecracker 1.13.1`); a restore needs the same.
    async fn version(&self) -> Result<String, VmmError>;

    /// Starts a VMM from a full snapshot, without booting: the guest runs on
    /// from the instant of the snapshot. On error nothing is left behind, as
    /// for [`Vmm::launch`].
    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn VmmInstance>, VmmError>;

    /// Takes over a VMM that an earlier daemon started: checks that the process
    /// is the recorded one, connects to its control socket and reads back
    /// whether the guest runs or is paused. On error nothing is changed (the
    /// caller decides what to do with the process).
    async fn adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Box<dyn VmmInstance>, AdoptedState), VmmError> {
        let _ = spec;
        Err(VmmError::Transport {
            request: "adopt".into(),
            message: format!("the {} backend cannot re-adopt vmms", self.kind()),
        })
    }
}

/// The drivers of backends other than the one new VMs get, for the VMs an
/// earlier daemon recorded with them: a VM keeps its backend across restarts,
/// whatever the configuration now chooses for new VMs.
pub trait VmmDrivers: Send + Sync + 'static {
    /// A driver for `kind`, or why this host cannot have one (its binary is
    /// not found, …). Called once per kind, when a record first needs it.
    fn driver(&self, kind: BackendKind) -> Result<std::sync::Arc<dyn Vmm>, String>;
}

/// What a new daemon knows about a VMM an earlier one started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptSpec {
    /// The VM's id.
    pub vm_id: String,
    /// The recorded process.
    pub process: ProcessIdentity,
    /// Its control socket (also what its command line must mention).
    pub control_socket: PathBuf,
    /// Its agent channel socket, if it has one.
    pub agent_socket: Option<PathBuf>,
    /// Its console log (kept bounded from now on).
    pub console_log: PathBuf,
    /// Rotation size of `console_log`.
    pub console_log_max_bytes: u64,
    /// How long one control request may take.
    pub request_timeout: Duration,
}

/// What a re-adopted VMM says its guest is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptedState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped.
    Paused,
}

/// One running VMM process.
#[async_trait]
pub trait VmmInstance: Send + Sync {
    /// The VMM's process id.
    fn pid(&self) -> Option<u32>;

    /// Whether the guest's vCPUs run or are paused, as the VMM says now.
    async fn guest_state(&self) -> Result<AdoptedState, VmmError> {
        Err(VmmError::NotRunning)
    }

    /// The process's identity (pid and start time), for re-adoption after a restart.
    fn identity(&self) -> Option<ProcessIdentity> {
        None
    }

    /// Stops the guest's vCPUs.
    async fn pause(&self) -> Result<(), VmmError>;

    /// Writes a full snapshot of the paused guest (vCPUs, devices and, per
    /// [`SavedMemory`], its memory) into `files`. The guest stays paused;
    /// [`VmmInstance::resume`] runs it again.
    async fn save_full(&self, files: &FullSnapshotFiles) -> Result<SavedMemory, VmmError>;

    /// Restarts the guest's vCPUs.
    async fn resume(&self) -> Result<(), VmmError>;

    /// Asks the guest to power off (Ctrl-Alt-Del for Firecracker, the ACPI power
    /// button for QEMU). Returns once asked; watch [`VmmInstance::exit_watch`] for the exit.
    async fn request_shutdown(&self) -> Result<(), VmmError>;

    /// Kills the VMM's whole process group and waits until it is reaped.
    async fn kill(&self) -> Result<VmmExit, VmmError>;

    /// Becomes `Some` when the VMM process has exited and been reaped.
    fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>>;

    /// How the host reaches the guest agent, when the VM has a channel for it.
    fn agent_channel(&self) -> Option<AgentChannel> {
        None
    }
}

/// The host end of a VM's guest agent channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// A Unix socket that is the byte stream itself (QEMU virtio-serial chardev).
    Stream(PathBuf),
    /// Firecracker's hybrid vsock: connect to the socket, write `CONNECT <port>\n`,
    /// read `OK <host port>\n`, then the byte stream follows.
    HybridVsock {
        /// The vsock device's Unix socket.
        socket: PathBuf,
        /// The guest port.
        port: u32,
    },
}

/// Waits on an exit watch until the process is gone, or until `timeout`.
pub async fn wait_exit(
    mut rx: watch::Receiver<Option<VmmExit>>,
    timeout: Duration,
) -> Option<VmmExit> {
    let fut = async {
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return Some(e);
            }
            if rx.changed().await.is_err() {
                return *rx.borrow();
            }
        }
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}
