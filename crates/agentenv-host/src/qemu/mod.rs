//! The QEMU driver: one `qemu-system-x86_64 -M microvm` process per VM, started
//! with its whole configuration on the command line and controlled over QMP.
//!
//! Launch: write `qemu.json` (the exact command) into the session directory,
//! spawn QEMU in its own process group, wait for the QMP socket, negotiate
//! capabilities and check that the guest runs. Any failure after the spawn kills
//! and reaps the process and removes its sockets (QMP, and the guest agent's
//! virtio-serial chardev) before the error is returned.
//!
//! Under TCG the guest kernel's command line gets `tsc_early_khz=<host TSC rate>`
//! (see [`tsc`]): without it a busy host makes the Debian cloud kernel hang early
//! in boot.
//!
//! Guest memory ([`InstanceMemory`]): a VM launched with
//! [`LaunchSpec::memory_file`] keeps its RAM in that file, mapped shared. The
//! driver creates the file (empty, mode 0600, its directory if missing; a stale
//! regular file of a dead VM there is replaced), QEMU sizes and maps it, and the
//! driver removes it as soon as that QEMU is gone (killed, exited, or a failed
//! launch); the engine removes the path too when it deletes the VM. Only the
//! file the driver created (same device and inode) is ever removed. A full
//! snapshot of such a VM saves the device state only and names the file
//! ([`SavedMemory::InFile`]). A VM restored from a snapshot's memory file maps
//! it privately (never written through, never removed by the driver) and one
//! restored from a state that carries RAM has a `memory-backend-ram`; full
//! snapshots of both carry the RAM in the migration stream
//! ([`SavedMemory::InState`]). A re-adopted QEMU's memory is read back over QMP.

pub mod args;
pub mod qmp;
pub mod tsc;

use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv_api::BackendKind;
use agentenv_core::backend::{
    wait_exit, AdoptSpec, AdoptedState, AgentChannel, FullSnapshotFiles, LaunchSpec,
    ProcessIdentity, RestoreSpec, SavedMemory, Vmm, VmmError, VmmExit, VmmInstance,
};
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::watch;

pub use args::{command_document, qemu_args, qemu_args_for, GuestMemory, StartMode};
pub use qmp::QmpClient;

use crate::jail::{Access, Jail, JailCleanup, PreparedJail};
use crate::process::{last_lines, wait_for_socket, SpawnSpec, VmmProcess};

/// How often a shutdown of a machine without ACPI presses Ctrl-Alt-Del again.
pub const CTRL_ALT_DEL_REPEAT: Duration = Duration::from_millis(500);

/// Name of the recorded command line in the session directory.
pub const COMMAND_FILE: &str = "qemu.json";

/// The name a saved or loaded device state's file descriptor gets in QEMU.
const STATE_FD_NAME: &str = "agentenv-state";

/// Migration bandwidth while saving a state (bytes/s): unlimited in effect
/// (QEMU's default, 32 MiB/s, would make a state that carries RAM take seconds).
const SAVE_BANDWIDTH: u64 = 1 << 40;

/// How long saving a state that carries guest RAM may take at least.
const RAM_SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `qemu --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a running QEMU's guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceMemory {
    /// The machine's own anonymous RAM, no memory backend (a VM launched
    /// without a memory file). A full snapshot of it is refused: its RAM
    /// block is not named like a restore's.
    Machine,
    /// Anonymous RAM in a `memory-backend-ram` (a VM restored from a state
    /// that carries its RAM). Full snapshots carry it in the state.
    Ram,
    /// A shared memory file: the VM's own ([`LaunchSpec::memory_file`]),
    /// removed by the driver once this QEMU is gone. Full snapshots name it.
    SharedFile(PathBuf),
    /// A private, copy-on-write mapping of a snapshot's memory file (not
    /// this VM's, never removed by the driver). Full snapshots carry the RAM
    /// in the state.
    PrivateFile(PathBuf),
}

/// How QEMU runs the guest's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's software emulator (`-accel tcg`): slow, but works everywhere.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Starts QEMU microvm VMMs.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
    /// `qemu X.Y.Z`, once asked.
    version: Arc<tokio::sync::OnceCell<String>>,
    /// The jail every QEMU starts in (`None`: unconfined).
    jail: Option<Arc<Jail>>,
}

/// QEMU's own seccomp filter, on for every jailed QEMU: no obsolete system
/// calls, no set*uid, no fork/exec, no scheduler or affinity changes. Full
/// snapshots save and load through descriptors (no `exec:` migration), so
/// `spawn=deny` costs nothing.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

impl QemuVmm {
    /// A driver for the given `qemu-system-x86_64` binary and accelerator. Under
    /// TCG this measures the host's TSC rate once (tens of ms; see [`tsc`]).
    pub fn new(binary: PathBuf, accel: Accel) -> QemuVmm {
        let tsc_khz = match accel {
            Accel::Tcg => tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        QemuVmm {
            binary,
            accel,
            tsc_khz,
            version: Arc::default(),
            jail: None,
        }
    }

    /// Starts every QEMU in `jail` (with its seccomp sandbox on) when given.
    pub fn with_jail(mut self, jail: Option<Arc<Jail>>) -> QemuVmm {
        self.jail = jail;
        self
    }

    /// The jail QEMUs start in.
    pub fn jail(&self) -> Option<&Arc<Jail>> {
        self.jail.as_ref()
    }

    /// Describes the jail of a QEMU for `spec` in `mode`: its kernel, initrd,
    /// drives, session directory and memory file, its staged QMP socket.
    fn prepare_jail(
        &self,
        spec: &LaunchSpec,
        mode: StartMode<'_>,
    ) -> Result<Option<Arc<PreparedJail>>, VmmError> {
        let Some(jail) = &self.jail else {
            return Ok(None);
        };
        let mut paths = crate::jail::launch_paths(spec);
        match mode.memory {
            GuestMemory::File { path, shared: true } => {
                paths.push((path.to_path_buf(), Access::Owned))
            }
            GuestMemory::File {
                path,
                shared: false,
            } => paths.push((path.to_path_buf(), Access::SharedWritable)),
            GuestMemory::Anonymous | GuestMemory::Ram => {}
        }
        let prepared = jail
            .prepare(
                &spec.vm_id,
                &self.binary,
                &paths,
                Some(&spec.control_socket),
                None,
            )
            .map_err(|e| VmmError::Jail(e.to_string()))?;
        let prepared = match &spec.net {
            Some(net) => prepared.with_tap(&net.tap_name),
            None => prepared,
        };
        Ok(Some(Arc::new(prepared)))
    }

    /// The QEMU binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The accelerator every VM gets.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The TSC rate (kHz) TCG guests are told, when known.
    pub fn tsc_khz(&self) -> Option<u64> {
        self.tsc_khz
    }

    /// [`Vmm::launch`] with the concrete instance type: RAM in
    /// `spec.memory_file` (shared) when it is set, else anonymous.
    pub async fn start(&self, spec: &LaunchSpec) -> Result<QemuInstance, VmmError> {
        let mode = match &spec.memory_file {
            Some(path) => StartMode {
                memory: GuestMemory::File { path, shared: true },
                incoming: false,
            },
            None => StartMode::BOOT,
        };
        self.start_with(spec, mode).await
    }

    /// Starts QEMU for `spec` in `mode`: a boot, with its RAM anonymous or in a
    /// file, or (`mode.incoming`) a QEMU waiting for a saved state (see
    /// [`QemuVmm::restore`]). A shared memory file is created here and removed
    /// once this QEMU is gone (see the module docs).
    pub async fn start_with(
        &self,
        spec: &LaunchSpec,
        mode: StartMode<'_>,
    ) -> Result<QemuInstance, VmmError> {
        let (memory, memory_id) = match mode.memory {
            GuestMemory::Anonymous => (InstanceMemory::Machine, None),
            GuestMemory::Ram => (InstanceMemory::Ram, None),
            GuestMemory::File {
                path,
                shared: false,
            } => (InstanceMemory::PrivateFile(path.to_path_buf()), None),
            GuestMemory::File { path, shared: true } => (
                InstanceMemory::SharedFile(path.to_path_buf()),
                Some(create_memory_file(path)?),
            ),
        };
        let owned_memory = |memory: &InstanceMemory| match (memory, memory_id) {
            (InstanceMemory::SharedFile(path), Some(id)) => Some((path.clone(), id)),
            _ => None,
        };
        let result = self.spawn_and_connect(spec, mode).await;
        match result {
            Ok((process, qmp, ids)) => {
                let owned = owned_memory(&memory);
                Ok(QemuInstance::new(
                    process,
                    qmp,
                    &spec.control_socket,
                    spec.agent_socket.clone(),
                    ids,
                    memory,
                    owned,
                ))
            }
            Err(e) => {
                if let Some((path, id)) = owned_memory(&memory) {
                    let _ = remove_memory_file(&path, id);
                }
                Err(e)
            }
        }
    }

    /// Spawns QEMU and waits for its QMP; on failure kills it and removes its
    /// sockets.
    async fn spawn_and_connect(
        &self,
        spec: &LaunchSpec,
        mode: StartMode<'_>,
    ) -> Result<(VmmProcess, QmpClient, SocketIds), VmmError> {
        let mut args = qemu_args_for(spec, self.accel, self.tsc_khz, mode);
        if self.jail.is_some() {
            args.extend(["-sandbox".into(), SANDBOX.into()]);
        }
        let doc = serde_json::to_vec_pretty(&command_document(&self.binary, &args))
            .expect("json serialises");
        let doc_path = spec.session_dir.join(COMMAND_FILE);
        crate::local::write_atomic(&doc_path, &doc).map_err(|source| VmmError::Io {
            context: format!("cannot write {}", doc_path.display()),
            source,
        })?;
        clear_stale_socket(&spec.control_socket)?;
        if let Some(agent) = &spec.agent_socket {
            clear_stale_socket(agent)?;
        }
        let spawned = Instant::now();
        let jail = self.prepare_jail(spec, mode)?;
        let cleanup = jail.as_ref().map(|j| j.cleanup());
        let process = VmmProcess::spawn(&SpawnSpec {
            binary: self.binary.clone(),
            args,
            console_log: spec.console_log.clone(),
            console_log_max_bytes: spec.console_log_max_bytes,
            inherit_fds: spec.drives.iter().filter_map(|d| d.fd.clone()).collect(),
            cgroup_procs: spec.cgroup_procs.clone(),
            jail,
        })
        .inspect_err(|_| {
            if let Some(c) = &cleanup {
                c.run();
            }
        })?;
        let qmp = QmpClient::new(&spec.control_socket, spec.request_timeout);
        let expect = if mode.incoming {
            "inmigrate"
        } else {
            "running"
        };
        match startup(&process, &qmp, spec, spawned, expect).await {
            Ok(ids) => {
                tracing::info!(
                    vm_id = %spec.vm_id,
                    pid = process.pid(),
                    accel = %self.accel,
                    ms = spawned.elapsed().as_millis() as u64,
                    "qemu running, qmp ready"
                );
                Ok((process, qmp, ids))
            }
            Err(e) => {
                let e = explain_exit(e, &process, &spec.console_log).await;
                process.kill().await;
                let _ = remove_socket(&spec.control_socket, None);
                if let Some(agent) = &spec.agent_socket {
                    let _ = remove_socket(agent, None);
                }
                Err(e)
            }
        }
    }
}

impl QemuVmm {
    /// Starts a VM from a full snapshot without booting it: a QEMU for the
    /// same `spec` (devices in the same order; the drives may be copies of the
    /// snapshot's, the sockets new) whose RAM is a private, copy-on-write
    /// mapping of `memory` (the snapshot's memory file, never written through),
    /// loads the device `state` saved by [`QemuInstance::save_state`] and runs.
    /// On any failure the QEMU is killed and its sockets removed.
    pub async fn restore(
        &self,
        spec: &LaunchSpec,
        memory: &Path,
        state: &std::fs::File,
    ) -> Result<QemuInstance, VmmError> {
        self.restore_with(spec, Some(memory), state, "the saved state")
            .await
    }

    /// [`Vmm::restore`] with the concrete instance type: the state file
    /// `spec.state`, RAM from `spec.memory` (mapped privately) or, when it is
    /// `None`, from the state itself into a RAM backend. Errors of the load
    /// name the state file. `spec.launch.memory_file` is not used: a
    /// restored VM's RAM is private, so its own full snapshots carry it.
    pub async fn restore_full(&self, spec: &RestoreSpec) -> Result<QemuInstance, VmmError> {
        let state = std::fs::File::open(&spec.state).map_err(|source| VmmError::Io {
            context: format!("cannot open saved state {}", spec.state.display()),
            source,
        })?;
        let what = format!("the saved state {}", spec.state.display());
        self.restore_with(&spec.launch, spec.memory.as_deref(), &state, &what)
            .await
    }

    /// Starts a QEMU waiting for a saved state (RAM a private mapping of
    /// `memory`, or a RAM backend the state fills) and loads `state` into it.
    /// A failed load is refused naming `what` (the state) and QEMU's reason.
    async fn restore_with(
        &self,
        spec: &LaunchSpec,
        memory: Option<&Path>,
        state: &std::fs::File,
        what: &str,
    ) -> Result<QemuInstance, VmmError> {
        if let Some(path) = memory {
            check_memory_file(path, spec.memory_mib)?;
        }
        let mode = StartMode {
            memory: match memory {
                Some(path) => GuestMemory::File {
                    path,
                    shared: false,
                },
                None => GuestMemory::Ram,
            },
            incoming: true,
        };
        let inst = self.start_with(spec, mode).await?;
        let budget = spec.startup_timeout.max(spec.request_timeout);
        match inst.load_state(state, budget).await {
            Ok(()) => Ok(inst),
            Err(e) => {
                let e = explain_exit(e, &inst.process, &spec.console_log).await;
                let _ = inst.kill().await;
                let why = match e {
                    // QEMU exits when an incoming state does not load.
                    VmmError::ExitedEarly { exit, detail } => format!("qemu {exit}: {detail}"),
                    e => e.to_string(),
                };
                Err(VmmError::Refused {
                    request: "migrate-incoming".into(),
                    status: 0,
                    message: format!("cannot load {what}: {why}"),
                })
            }
        }
    }

    /// `qemu X.Y.Z` from `qemu-system-x86_64 --version` (asked once).
    pub async fn qemu_version(&self) -> Result<String, VmmError> {
        self.version
            .get_or_try_init(|| async {
                let request = "--version";
                let run = tokio::process::Command::new(&self.binary)
                    .arg("--version")
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output();
                let out = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
                    Ok(Ok(out)) => out,
                    Ok(Err(source)) => {
                        return Err(VmmError::Spawn {
                            binary: self.binary.clone(),
                            source,
                        })
                    }
                    Err(_) => {
                        return Err(VmmError::Timeout {
                            request: request.into(),
                            timeout_ms: VERSION_TIMEOUT.as_millis() as u64,
                        })
                    }
                };
                let text = String::from_utf8_lossy(&out.stdout);
                parse_version(&text).ok_or_else(|| VmmError::Transport {
                    request: request.into(),
                    message: format!(
                        "{} printed no version ({}): {}",
                        self.binary.display(),
                        out.status,
                        text.trim()
                    ),
                })
            })
            .await
            .cloned()
    }
}

/// `qemu X.Y.Z` from `QEMU emulator version X.Y.Z (...)`.
fn parse_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("QEMU emulator version "))?;
    let v = line["QEMU emulator version ".len()..]
        .split_whitespace()
        .next()?;
    let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    ok.then(|| format!("qemu {v}"))
}

#[async_trait]
impl Vmm for QemuVmm {
    async fn version(&self) -> Result<String, VmmError> {
        self.qemu_version().await
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        Ok(Box::new(self.restore_full(spec).await?))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        Ok(Box::new(self.start(spec).await?))
    }

    async fn adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Box<dyn VmmInstance>, AdoptedState), VmmError> {
        let (inst, state) = self.adopt_instance(spec).await?;
        Ok((Box::new(inst), state))
    }
}

impl QemuVmm {
    /// [`Vmm::adopt`] with the concrete instance type. Where the guest's RAM
    /// lives is read back from QEMU (`qom-get` on the memory backend).
    pub async fn adopt_instance(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(QemuInstance, AdoptedState), VmmError> {
        let mut process = VmmProcess::adopt_vmm(spec)?;
        if let Some(jail) = &self.jail {
            process =
                process.with_jail_cleanup(JailCleanup::of(jail, &spec.vm_id, &spec.control_socket));
        }
        let qmp = QmpClient::new(&spec.control_socket, spec.request_timeout);
        qmp.connect(spec.request_timeout).await?;
        let state = adopted_state(&qmp.query_status().await?)?;
        let ids = SocketIds {
            control: socket_id(&spec.control_socket)?,
            agent: match &spec.agent_socket {
                Some(p) => Some(socket_id(p)?),
                None => None,
            },
        };
        let memory = read_memory(&qmp).await?;
        // The shared file as it is now is this QEMU's (it maps it).
        let owned = match &memory {
            InstanceMemory::SharedFile(path) => std::fs::metadata(path)
                .ok()
                .map(|m| (path.clone(), (m.dev(), m.ino()))),
            _ => None,
        };
        let inst = QemuInstance::new(
            process,
            qmp,
            &spec.control_socket,
            spec.agent_socket.clone(),
            ids,
            memory,
            owned,
        );
        Ok((inst, state))
    }
}

/// What QEMU says about its guest RAM (the backend `/objects/mem`, if any).
async fn read_memory(qmp: &QmpClient) -> Result<InstanceMemory, VmmError> {
    let path = format!("/objects/{}", args::MEMORY_BACKEND_ID);
    let get = |property: &'static str| {
        let arguments = json!({ "path": path, "property": property });
        qmp.execute("qom-get", Some(arguments))
    };
    let kind = match get("type").await {
        Ok(v) => v.as_str().unwrap_or_default().to_string(),
        // No such object: the machine's own RAM.
        Err(VmmError::Refused { .. }) => return Ok(InstanceMemory::Machine),
        Err(e) => return Err(e),
    };
    match kind.as_str() {
        "memory-backend-ram" => Ok(InstanceMemory::Ram),
        "memory-backend-file" => {
            let shared = get("share").await?.as_bool() == Some(true);
            let file = get("mem-path").await?;
            let file = PathBuf::from(file.as_str().unwrap_or_default());
            Ok(if shared {
                InstanceMemory::SharedFile(file)
            } else {
                InstanceMemory::PrivateFile(file)
            })
        }
        other => Err(VmmError::Refused {
            request: "qom-get".into(),
            status: 0,
            message: format!("{path} is a {other}, not a ram or file memory backend"),
        }),
    }
}

/// Makes the empty file QEMU maps as shared guest RAM at `path` (mode 0600;
/// its directory made if missing; a stale regular file replaced) and returns
/// its identity.
fn create_memory_file(path: &Path) -> Result<FileId, VmmError> {
    let io = |what: &str, source| VmmError::Io {
        context: format!("cannot {what} memory file {}", path.display()),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("make the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        // A dead VM's RAM: nothing can want it.
        Ok(m) if m.file_type().is_file() => {
            std::fs::remove_file(path).map_err(|e| io("remove stale", e))?
        }
        Ok(_) => {
            return Err(io(
                "use",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a regular file"),
            ))
        }
        Err(_) => {}
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io("create", e))?;
    let m = f.metadata().map_err(|e| io("stat", e))?;
    Ok((m.dev(), m.ino()))
}

/// Checks that a snapshot's memory file is there and as large as the guest's
/// RAM before a QEMU maps it: QEMU would create a missing one (an empty
/// guest) and grow an empty one.
fn check_memory_file(path: &Path, memory_mib: u64) -> Result<(), VmmError> {
    let io = |source| VmmError::Io {
        context: format!("cannot map memory file {}", path.display()),
        source,
    };
    let m = std::fs::metadata(path).map_err(io)?;
    let want = memory_mib << 20;
    if !m.is_file() || m.len() != want {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not a regular file of {want} bytes (the guest's memory), but {} bytes",
                m.len()
            ),
        )));
    }
    Ok(())
}

/// Removes the memory file at `path` if it is still the one with identity `id`.
fn remove_memory_file(path: &Path, id: FileId) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() && (m.dev(), m.ino()) == id => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `query-status`'s answer as a running/paused state.
fn adopted_state(status: &str) -> Result<AdoptedState, VmmError> {
    match status {
        "running" => Ok(AdoptedState::Running),
        // `postmigrate`: stopped after its state was saved (a full snapshot of
        // a paused VM); `cont` runs it again like a paused one.
        "paused" | "postmigrate" => Ok(AdoptedState::Paused),
        other => Err(VmmError::Refused {
            request: "query-status".into(),
            status: 0,
            message: format!("guest is {other}, not running or paused"),
        }),
    }
}

/// A file's identity (device, inode): only the socket or memory file this QEMU
/// (or the driver for it) created is removed later.
type FileId = (u64, u64);

/// A socket's identity.
type SocketId = FileId;

/// The identities of a QEMU's sockets.
#[derive(Debug, Clone, Copy)]
struct SocketIds {
    control: SocketId,
    agent: Option<SocketId>,
}

fn socket_id(path: &Path) -> Result<SocketId, VmmError> {
    std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|source| VmmError::Io {
            context: format!("cannot stat {}", path.display()),
            source,
        })
}

/// Waits for the QMP socket, negotiates, and checks the guest runs. Returns the
/// identities of the QMP and agent sockets.
async fn startup(
    process: &VmmProcess,
    qmp: &QmpClient,
    spec: &LaunchSpec,
    spawned: Instant,
    expect: &str,
) -> Result<SocketIds, VmmError> {
    wait_for_socket(
        &spec.control_socket,
        process,
        &spec.console_log,
        spec.startup_timeout,
    )
    .await?;
    let control = socket_id(&spec.control_socket)?;
    // QEMU greets only once its main loop runs: the rest of the startup budget.
    let left = spec
        .startup_timeout
        .saturating_sub(spawned.elapsed())
        .max(Duration::from_millis(100));
    qmp.connect(left).await?;
    let status = qmp.query_status().await?;
    if status != expect {
        return Err(VmmError::Refused {
            request: "query-status".into(),
            status: 0,
            message: format!("guest is {status}, expected {expect}"),
        });
    }
    // QEMU creates its chardev sockets before its monitor answers.
    let agent = match &spec.agent_socket {
        Some(path) => Some(socket_id(path)?),
        None => None,
    };
    Ok(SocketIds { control, agent })
}

/// A control-socket failure during startup is usually QEMU exiting (a missing
/// kernel, a bad option): say so, with its last words.
async fn explain_exit(e: VmmError, process: &VmmProcess, console_log: &Path) -> VmmError {
    if !matches!(
        e,
        VmmError::Transport { .. } | VmmError::Timeout { .. } | VmmError::NotRunning
    ) {
        return e;
    }
    match wait_exit(process.exit_watch(), Duration::from_millis(500)).await {
        Some(exit) => VmmError::ExitedEarly {
            exit,
            detail: last_lines(console_log),
        },
        None => e,
    }
}

/// Removes a socket file left at `path` by a dead VMM (QEMU would replace it
/// anyway, but [`wait_for_socket`] must not mistake it for the new one). Any
/// other kind of file there is an error.
fn clear_stale_socket(path: &Path) -> Result<(), VmmError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VmmError::Io {
                context: format!("cannot remove stale socket {}", path.display()),
                source,
            })
        }
        Ok(_) => Err(VmmError::Io {
            context: format!("control socket path {} is not a socket", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes the socket at `path` when it is a socket and, given `id`, still the one
/// this QEMU created (a later VMM may already own the path).
fn remove_socket(path: &Path, id: Option<SocketId>) -> std::io::Result<()> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let same = match id {
        Some(id) => id == (m.dev(), m.ino()),
        None => true,
    };
    let ours = m.file_type().is_socket() && same;
    if ours {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// One running QEMU process. Dropping it leaves the process running (the
/// engine decides its fate); [`VmmInstance::kill`] ends it.
pub struct QemuInstance {
    process: VmmProcess,
    qmp: Arc<QmpClient>,
    socket: PathBuf,
    /// The agent channel's socket (a virtio-serial chardev QEMU serves).
    agent_socket: Option<PathBuf>,
    ids: SocketIds,
    /// Where guest RAM lives.
    memory: InstanceMemory,
    /// The shared memory file the driver removes once QEMU is gone.
    owned_memory: Option<(PathBuf, FileId)>,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("pid", &self.process.pid())
            .field("socket", &self.socket)
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl QemuInstance {
    fn new(
        process: VmmProcess,
        qmp: QmpClient,
        control_socket: &Path,
        agent_socket: Option<PathBuf>,
        ids: SocketIds,
        memory: InstanceMemory,
        owned_memory: Option<(PathBuf, FileId)>,
    ) -> QemuInstance {
        let inst = QemuInstance {
            process,
            qmp: Arc::new(qmp),
            socket: control_socket.to_path_buf(),
            agent_socket,
            ids,
            memory,
            owned_memory,
        };
        // QEMU removes its sockets when it exits cleanly, not when killed, and
        // never its memory file.
        let sockets = inst.sockets();
        let memory_file = inst.owned_memory.clone();
        let rx = inst.process.exit_watch();
        tokio::spawn(async move {
            if wait_exit(rx, Duration::MAX).await.is_some() {
                for (path, id) in sockets {
                    let _ = remove_socket(&path, Some(id));
                }
                if let Some((path, id)) = memory_file {
                    let _ = remove_memory_file(&path, id);
                }
            }
        });
        inst
    }

    /// Where the guest's RAM lives.
    pub fn memory(&self) -> &InstanceMemory {
        &self.memory
    }

    /// The QMP socket and, when there is one, the agent socket, with their identities.
    fn sockets(&self) -> Vec<(PathBuf, SocketId)> {
        let agent = self.agent_socket.clone().zip(self.ids.agent);
        std::iter::once((self.socket.clone(), self.ids.control))
            .chain(agent)
            .collect()
    }

    /// The QMP socket.
    pub fn control_socket(&self) -> &Path {
        &self.socket
    }

    /// QMP's `query-status`: `running`, `paused`, `shutdown`, …
    pub async fn query_status(&self) -> Result<String, VmmError> {
        self.checked(self.qmp.query_status().await)
    }

    /// Runs one QMP command (for diagnostics and tests).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        if self.process.exited().is_some() {
            return Err(VmmError::NotRunning);
        }
        self.checked(self.qmp.execute(command, arguments).await)
    }

    /// A control-socket failure of a process that has exited is `NotRunning`.
    fn checked<T>(&self, r: Result<T, VmmError>) -> Result<T, VmmError> {
        match r {
            Err(VmmError::Transport { .. } | VmmError::Timeout { .. })
                if self.process.exited().is_some() =>
            {
                Err(VmmError::NotRunning)
            }
            r => r,
        }
    }

    /// Saves the device state (vCPUs, devices, everything but RAM) of a
    /// paused guest into `out`, by a migration to that file descriptor with
    /// shared RAM skipped (`x-ignore-shared`): the guest's RAM is its shared
    /// memory file, which the caller copies while the guest stays stopped.
    /// Afterwards QEMU reports `postmigrate` (stopped); `resume` runs it again.
    ///
    /// RAM that is not a shared file (a private mapping, a RAM backend) goes
    /// into `out` too.
    pub async fn save_state(&self, out: &std::fs::File) -> Result<(), VmmError> {
        self.ignore_shared().await?;
        let carries_ram = !matches!(self.memory, InstanceMemory::SharedFile(_));
        let budget = if carries_ram {
            let p = json!({ "max-bandwidth": SAVE_BANDWIDTH });
            self.execute("migrate-set-parameters", Some(p)).await?;
            self.qmp.timeout().max(RAM_SAVE_TIMEOUT)
        } else {
            self.qmp.timeout()
        };
        self.checked(self.qmp.send_fd(STATE_FD_NAME, out.as_fd()).await)?;
        let uri = format!("fd:{STATE_FD_NAME}");
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        self.wait_migration("migrate", budget).await
    }

    /// Loads a device state saved by [`save_state`](Self::save_state) into a
    /// QEMU started with `-incoming defer` (waiting at most `budget`), then
    /// runs the guest.
    async fn load_state(&self, state: &std::fs::File, budget: Duration) -> Result<(), VmmError> {
        self.ignore_shared().await?;
        self.checked(self.qmp.send_fd(STATE_FD_NAME, state.as_fd()).await)?;
        let uri = format!("fd:{STATE_FD_NAME}");
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        // The load runs in QEMU's main loop; `inmigrate` until it is done.
        // Started with `-S`, it then stops in `paused` instead of running.
        let request = "migrate-incoming";
        let deadline = Instant::now() + budget;
        loop {
            let status = self.query_status().await?;
            match status.as_str() {
                "inmigrate" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                "paused" => break,
                "inmigrate" => {
                    return Err(VmmError::Timeout {
                        request: request.into(),
                        timeout_ms: budget.as_millis() as u64,
                    })
                }
                other => {
                    let why = self.migration_error().await;
                    return Err(VmmError::Refused {
                        request: request.into(),
                        status: 0,
                        message: format!("the saved state did not load (guest is {other}){why}"),
                    });
                }
            }
        }
        self.change_state("cont", "running").await
    }

    /// Both ends of a memory snapshot skip RAM that lives in a file.
    async fn ignore_shared(&self) -> Result<(), VmmError> {
        let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.execute("migrate-set-capabilities", Some(caps))
            .await
            .map(|_| ())
    }

    /// Polls `query-migrate` until the outgoing migration ends, for at most `budget`.
    async fn wait_migration(&self, request: &str, budget: Duration) -> Result<(), VmmError> {
        let deadline = Instant::now() + budget;
        loop {
            let v = self.execute("query-migrate", None).await?;
            match v["status"].as_str().unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmmError::Refused {
                        request: request.into(),
                        status: 0,
                        message: format!(
                            "saving the device state failed: {}",
                            v["error-desc"].as_str().unwrap_or("no reason given")
                        ),
                    })
                }
                _ if Instant::now() >= deadline => {
                    let _ = self.execute("migrate_cancel", None).await;
                    return Err(VmmError::Timeout {
                        request: request.into(),
                        timeout_ms: budget.as_millis() as u64,
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// `query-migrate`'s error, as `: REASON`, or nothing.
    async fn migration_error(&self) -> String {
        match self.execute("query-migrate", None).await {
            Ok(v) => v["error-desc"]
                .as_str()
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Runs `command`, then checks that `query-status` reports `want`.
    async fn change_state(&self, command: &str, want: &str) -> Result<(), VmmError> {
        self.execute(command, None).await?;
        let status = self.query_status().await?;
        // A guest stopped after its state was saved stays `postmigrate`.
        let status = match status.as_str() {
            "postmigrate" if want == "paused" => "paused".to_string(),
            _ => status,
        };
        if status != want {
            return Err(VmmError::Refused {
                request: command.to_string(),
                status: 0,
                message: format!("guest is {status} afterwards, expected {want}"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl VmmInstance for QemuInstance {
    /// The device state (and RAM that is not a shared file) into
    /// `files.state`; the caller paused the guest and resumes it.
    async fn save_full(&self, files: &FullSnapshotFiles) -> Result<SavedMemory, VmmError> {
        if self.memory == InstanceMemory::Machine {
            return Err(VmmError::Refused {
                request: "save_full".into(),
                status: 0,
                message: "the guest's ram is not in a memory backend \
                          (a full snapshot needs a vm launched with a memory file)"
                    .into(),
            });
        }
        // A running guest would be migrated live and stopped at the end: the
        // snapshot's instant would not be the caller's.
        match self.query_status().await?.as_str() {
            "paused" => {}
            // Paused since an earlier snapshot: QEMU migrates such a VM only
            // after it ran again ("Can't migrate the vm that was paused due to
            // previous migration"), so it runs for the two commands (< 1 ms).
            "postmigrate" => {
                self.change_state("cont", "running").await?;
                self.change_state("stop", "paused").await?;
            }
            other => {
                return Err(VmmError::Refused {
                    request: "save_full".into(),
                    status: 0,
                    message: format!("the guest is {other}, a full snapshot needs it paused"),
                })
            }
        }
        let state = &files.state;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(state)
            .map_err(|source| VmmError::Io {
                context: format!("cannot create state file {}", state.display()),
                source,
            })?;
        self.save_state(&out).await.map_err(|e| match e {
            VmmError::Refused {
                request,
                status,
                message,
            } => VmmError::Refused {
                request,
                status,
                message: format!("{message} (state file {})", state.display()),
            },
            e => e,
        })?;
        Ok(match &self.memory {
            InstanceMemory::SharedFile(path) => SavedMemory::InFile(path.clone()),
            _ => SavedMemory::InState,
        })
    }

    fn pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn identity(&self) -> Option<ProcessIdentity> {
        Some(self.process.identity())
    }

    async fn guest_state(&self) -> Result<AdoptedState, VmmError> {
        adopted_state(&self.query_status().await?)
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.change_state("stop", "paused").await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.change_state("cont", "running").await
    }

    /// With ACPI (the default): the ACPI power button (`system_powerdown`).
    /// A machine without ACPI (boot args with `acpi=off`) has no power button:
    /// Ctrl-Alt-Del is pressed on the i8042 keyboard controller instead (the
    /// guest's init reboots, `reboot=k` resets through the i8042 and
    /// `-no-reboot` ends QEMU), and again every [`CTRL_ALT_DEL_REPEAT`] until
    /// QEMU exits, as on Firecracker (a guest ignores it until its keyboard
    /// driver is up). The caller kills QEMU when its shutdown timeout passes.
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        let pid = self.process.pid();
        if !crate::process::proc_argv(pid).is_some_and(|a| args::machine_without_acpi(&a)) {
            return self.execute("system_powerdown", None).await.map(|_| ());
        }
        self.execute("send-key", Some(args::ctrl_alt_del())).await?;
        let qmp = Arc::downgrade(&self.qmp);
        let exit = self.process.exit_watch();
        tokio::spawn(async move {
            loop {
                if wait_exit(exit.clone(), CTRL_ALT_DEL_REPEAT).await.is_some() {
                    return;
                }
                let Some(qmp) = qmp.upgrade() else {
                    return;
                };
                if let Err(e) = qmp.execute("send-key", Some(args::ctrl_alt_del())).await {
                    tracing::debug!("repeated Ctrl-Alt-Del: {e}");
                    return;
                }
            }
        });
        Ok(())
    }

    async fn kill(&self) -> Result<VmmExit, VmmError> {
        let exit = self.process.kill().await;
        for (path, id) in self.sockets() {
            remove_socket(&path, Some(id)).map_err(|source| VmmError::Io {
                context: format!("cannot remove {}", path.display()),
                source,
            })?;
        }
        if let Some((path, id)) = &self.owned_memory {
            remove_memory_file(path, *id).map_err(|source| VmmError::Io {
                context: format!("cannot remove memory file {}", path.display()),
                source,
            })?;
        }
        Ok(exit)
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.process.exit_watch()
    }

    fn agent_channel(&self) -> Option<AgentChannel> {
        self.agent_socket.clone().map(AgentChannel::Stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_cleared_and_other_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.qmp");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(l);
        clear_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
        clear_stale_socket(&sock).unwrap();
        std::fs::write(&sock, b"x").unwrap();
        assert!(clear_stale_socket(&sock).is_err());
        assert!(sock.exists());
    }

    #[test]
    fn versions_are_read_from_the_banner() {
        let banner = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                      Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(banner).as_deref(), Some("qemu 7.2.22"));
        assert_eq!(
            parse_version("QEMU emulator version 9.1.0\n").as_deref(),
            Some("qemu 9.1.0")
        );
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("QEMU emulator version (x)\n"), None);
        assert_eq!(parse_version("qemu-img version 7.2.22\n"), None);
    }

    #[test]
    fn memory_files_are_private_replace_stale_ones_and_only_ours_go() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("shm/vm1/guest.mem");
        create_memory_file(&mem).unwrap();
        let m = std::fs::metadata(&mem).unwrap();
        assert_eq!((m.len(), m.permissions().mode() & 0o777), (0, 0o600));
        let dir_mode = std::fs::metadata(mem.parent().unwrap()).unwrap();
        assert_eq!(dir_mode.permissions().mode() & 0o777, 0o700);
        // A stale file (a dead VM's RAM) is replaced by a new, empty one.
        std::fs::write(&mem, b"old ram").unwrap();
        let stale = std::fs::metadata(&mem).unwrap();
        let id2 = create_memory_file(&mem).unwrap();
        assert_eq!(std::fs::metadata(&mem).unwrap().len(), 0);
        // Another file now at the path (another inode) stays.
        remove_memory_file(&mem, (stale.dev(), stale.ino() + 1)).unwrap();
        assert!(mem.exists());
        remove_memory_file(&mem, id2).unwrap();
        assert!(!mem.exists());
        remove_memory_file(&mem, id2).unwrap();
        // A directory at the path is refused, naming it.
        std::fs::create_dir(&mem).unwrap();
        match create_memory_file(&mem) {
            Err(VmmError::Io { context, .. }) => {
                assert!(context.contains("guest.mem"), "{context}")
            }
            other => panic!("{other:?}"),
        }
        assert!(mem.is_dir());
    }

    #[test]
    fn only_our_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.qmp");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let m = std::fs::metadata(&sock).unwrap();
        // Another VMM's socket (a different inode) stays.
        remove_socket(&sock, Some((m.dev(), m.ino() + 1))).unwrap();
        assert!(sock.exists());
        remove_socket(&sock, Some((m.dev(), m.ino()))).unwrap();
        assert!(!sock.exists());
        // Gone already: fine.
        remove_socket(&sock, None).unwrap();
        // Not a socket: left alone.
        std::fs::write(&sock, b"x").unwrap();
        remove_socket(&sock, None).unwrap();
        assert!(sock.exists());
    }
}
