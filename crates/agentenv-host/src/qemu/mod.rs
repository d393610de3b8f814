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

pub mod args;
pub mod qmp;
pub mod tsc;

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_api::BackendKind;
use agentenv_core::backend::{
    wait_exit, AdoptSpec, AdoptedState, AgentChannel, LaunchSpec, ProcessIdentity, Vmm, VmmError,
    VmmExit, VmmInstance,
};
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::watch;

pub use args::{command_document, qemu_args, qemu_args_for, GuestMemory, StartMode};
pub use qmp::QmpClient;

use crate::process::{last_lines, wait_for_socket, SpawnSpec, VmmProcess};

/// Name of the recorded command line in the session directory.
pub const COMMAND_FILE: &str = "qemu.json";

/// The name a saved or loaded device state's file descriptor gets in QEMU.
const STATE_FD_NAME: &str = "agentenv-state";

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
}

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
        }
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

    /// [`Vmm::launch`] with the concrete instance type.
    pub async fn start(&self, spec: &LaunchSpec) -> Result<QemuInstance, VmmError> {
        self.start_with(spec, StartMode::BOOT).await
    }

    /// Starts QEMU for `spec` in `mode`: a boot, with its RAM anonymous or in a
    /// file, or (`mode.incoming`) a QEMU waiting for a saved state (see
    /// [`QemuVmm::restore`]).
    pub async fn start_with(
        &self,
        spec: &LaunchSpec,
        mode: StartMode<'_>,
    ) -> Result<QemuInstance, VmmError> {
        let args = qemu_args_for(spec, self.accel, self.tsc_khz, mode);
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
        let process = VmmProcess::spawn(&SpawnSpec {
            binary: self.binary.clone(),
            args,
            console_log: spec.console_log.clone(),
            console_log_max_bytes: spec.console_log_max_bytes,
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
                Ok(QemuInstance::new(
                    process,
                    qmp,
                    &spec.control_socket,
                    spec.agent_socket.clone(),
                    ids,
                ))
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
        let mode = StartMode {
            memory: GuestMemory::File {
                path: memory,
                shared: false,
            },
            incoming: true,
        };
        let inst = self.start_with(spec, mode).await?;
        match inst.load_state(state).await {
            Ok(()) => Ok(inst),
            Err(e) => {
                let e = explain_exit(e, &inst.process, &spec.console_log).await;
                let _ = inst.kill().await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Vmm for QemuVmm {
    async fn version(&self) -> Result<String, VmmError> {
        Err(interim("version"))
    }

    async fn restore(
        &self,
        spec: &agentenv_core::backend::RestoreSpec,
    ) -> Result<Box<dyn VmmInstance>, VmmError> {
        let _ = spec;
        Err(interim("restore"))
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
        let process = VmmProcess::adopt_vmm(spec)?;
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
        let inst = QemuInstance::new(
            process,
            qmp,
            &spec.control_socket,
            spec.agent_socket.clone(),
            ids,
        );
        Ok((Box::new(inst), state))
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

/// A socket file's identity (device, inode): only the socket this QEMU created
/// is removed later.
type SocketId = (u64, u64);

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
    if !matches!(e, VmmError::Transport { .. } | VmmError::Timeout { .. }) {
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
    qmp: QmpClient,
    socket: PathBuf,
    /// The agent channel's socket (a virtio-serial chardev QEMU serves).
    agent_socket: Option<PathBuf>,
    ids: SocketIds,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("pid", &self.process.pid())
            .field("socket", &self.socket)
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
    ) -> QemuInstance {
        let inst = QemuInstance {
            process,
            qmp,
            socket: control_socket.to_path_buf(),
            agent_socket,
            ids,
        };
        // QEMU removes its sockets when it exits cleanly, not when killed.
        let sockets = inst.sockets();
        let rx = inst.process.exit_watch();
        tokio::spawn(async move {
            if wait_exit(rx, Duration::MAX).await.is_some() {
                for (path, id) in sockets {
                    let _ = remove_socket(&path, Some(id));
                }
            }
        });
        inst
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
    pub async fn save_state(&self, out: &std::fs::File) -> Result<(), VmmError> {
        self.ignore_shared().await?;
        self.checked(self.qmp.send_fd(STATE_FD_NAME, out.as_fd()).await)?;
        let uri = format!("fd:{STATE_FD_NAME}");
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        self.wait_migration("migrate").await
    }

    /// Loads a device state saved by [`save_state`](Self::save_state) into a
    /// QEMU started with `-incoming defer`, then runs the guest.
    async fn load_state(&self, state: &std::fs::File) -> Result<(), VmmError> {
        self.ignore_shared().await?;
        self.checked(self.qmp.send_fd(STATE_FD_NAME, state.as_fd()).await)?;
        let uri = format!("fd:{STATE_FD_NAME}");
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        // The load runs in QEMU's main loop; `inmigrate` until it is done.
        // Started with `-S`, it then stops in `paused` instead of running.
        let request = "migrate-incoming";
        let deadline = Instant::now() + self.qmp.timeout();
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
                        timeout_ms: self.qmp.timeout().as_millis() as u64,
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

    /// Polls `query-migrate` until the outgoing migration ends.
    async fn wait_migration(&self, request: &str) -> Result<(), VmmError> {
        let deadline = Instant::now() + self.qmp.timeout();
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
                        timeout_ms: self.qmp.timeout().as_millis() as u64,
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
    async fn save_full(
        &self,
        files: &agentenv_core::backend::FullSnapshotFiles,
    ) -> Result<agentenv_core::backend::SavedMemory, VmmError> {
        let _ = files;
        Err(interim("save_full"))
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

    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    async fn kill(&self) -> Result<VmmExit, VmmError> {
        let exit = self.process.kill().await;
        for (path, id) in self.sockets() {
            remove_socket(&path, Some(id)).map_err(|source| VmmError::Io {
                context: format!("cannot remove {}", path.display()),
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

/// INTERIM (issue 12 in progress): replaced by the real implementation.
fn interim(request: &str) -> VmmError {
    VmmError::Refused {
        request: request.into(),
        status: 0,
        message: "not implemented yet".into(),
    }
}
