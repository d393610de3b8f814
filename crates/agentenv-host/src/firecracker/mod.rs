//! The Firecracker driver: one `firecracker` process per VM, configured over its
//! Unix-socket API exactly as Firecracker's swagger documents it.
//!
//! Firecracker runs in the VM's session directory, and every path inside that
//! directory (the overlay disk, shares, the vsock socket) is given to it
//! relative ([`session_relative`]); base images and the kernel stay absolute.
//! A full snapshot (`PUT /snapshot/create`, [`VmmInstance::save_full`])
//! records the paths as given, and both Firecracker v1.13.1 and v1.16 reopen
//! them at load: a VM restored in its own session directory
//! ([`Vmm::restore`]: a fresh Firecracker there, `PUT /snapshot/load` with the
//! memory file mapped privately, its own TAP through `network_overrides`, and
//! on v1.16 its socket through `vsock_override` too) thus uses its own disk
//! copy and socket, and any number of clones of one snapshot run side by side.
//! Started through Firecracker's own jailer (`[jail] firecracker_jailer`),
//! Firecracker runs in `/` of its chroot instead, where the session directory
//! is at [`JAILER_SESSION`]: those paths are given under it ([`SessionView`]).

mod api;
pub mod models;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_api::BackendKind;
use agentenv_core::backend::{
    AdoptSpec, AdoptedState, AgentChannel, FullSnapshotFiles, LaunchSpec, ProcessIdentity,
    RestoreSpec, SavedMemory, Vmm, VmmError, VmmExit, VmmInstance,
};
use async_trait::async_trait;
use hyper::body::Bytes;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

pub use api::FcClient;
use models::{
    ActionType, BootSource, Drive, FullVmConfiguration, InstanceActionInfo, InstanceInfo,
    InstanceState, MachineConfiguration, MemBackend, MemBackendType, NetworkInterface,
    NetworkOverride, SnapshotCreateParams, SnapshotLoadParams, SnapshotType, Vm, VmState, Vsock,
    VsockOverride,
};

use crate::jail::{Access, Jail, JailCleanup, JAILER_SESSION};
use crate::process::{wait_for_socket, SpawnSpec, VmmProcess};

/// Name of the generated configuration in the session directory.
pub const CONFIG_FILE: &str = "firecracker.json";

/// Name of the `PUT /snapshot/load` body a restored VM's session directory
/// keeps (for people to read, as [`CONFIG_FILE`] for a booted one).
pub const LOAD_FILE: &str = "snapshot-load.json";

/// The guest's one network interface.
pub const NET_IFACE: &str = "eth0";

/// How long `firecracker --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `PUT /snapshot/create` may take at least: Firecracker writes the
/// whole guest memory before it answers (0.2–0.7 s per 128 MiB measured here),
/// which the ordinary request timeout does not allow for large guests.
pub const SNAPSHOT_CREATE_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's vsock context id. Each Firecracker process has its own vsock
/// device and the host end is a Unix socket, so every VM can use the first
/// id a guest may have (0–2 are reserved).
pub const GUEST_CID: u32 = 3;

/// The guest port the agent listens on (hybrid vsock `CONNECT <port>`).
pub const AGENT_VSOCK_PORT: u32 = agentenv_proto::VSOCK_PORT;

/// Starts Firecracker VMMs.
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    binary: PathBuf,
    /// `firecracker X.Y.Z`, once asked.
    version: Arc<tokio::sync::OnceCell<String>>,
    /// The jail every Firecracker starts in (`None`: unconfined).
    jail: Option<Arc<Jail>>,
}

impl FirecrackerVmm {
    /// A driver for the given `firecracker` binary.
    pub fn new(binary: PathBuf) -> FirecrackerVmm {
        FirecrackerVmm {
            binary,
            version: Arc::default(),
            jail: None,
        }
    }

    /// Starts every Firecracker in `jail` when given (through Firecracker's
    /// own jailer when the jail names one).
    pub fn with_jail(mut self, jail: Option<Arc<Jail>>) -> FirecrackerVmm {
        self.jail = jail;
        self
    }

    /// How this driver's Firecrackers name their session directory.
    pub fn view(&self) -> SessionView {
        match &self.jail {
            Some(j) if j.firecracker_jailer().is_some() => SessionView::Jailer,
            _ => SessionView::Cwd,
        }
    }
}

/// Where a jailed Firecracker writes a full snapshot: in its session
/// directory (named as its [`SessionView`] says), the only place of the host
/// it may write; the driver then moves the files where they belong.
const JAILED_STATE: &str = ".snapshot.state";
const JAILED_MEMORY: &str = ".snapshot.mem";

/// How Firecracker names the files of the VM's session directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionView {
    /// Relative to its working directory, the session directory
    /// ([`session_relative`]): unconfined or in the daemon's jail.
    #[default]
    Cwd,
    /// Under [`JAILER_SESSION`] of its chroot: started through Firecracker's
    /// jailer, which runs it in `/`.
    Jailer,
}

impl SessionView {
    /// `path` as Firecracker is given it: inside the session directory,
    /// relative to it or under [`JAILER_SESSION`]; elsewhere as it is.
    pub fn path(self, session_dir: &Path, path: &Path) -> PathBuf {
        let local = session_relative(session_dir, path);
        match self {
            SessionView::Jailer if local.is_relative() => Path::new(JAILER_SESSION).join(local),
            _ => local,
        }
    }
}

/// `path` as Firecracker is given it. Firecracker runs in the VM's session
/// directory, so a path inside it is given relative to it: a snapshot records
/// drive and vsock paths as given, and a VM restored from it (in its own
/// session directory) then finds its own disk copy and socket under the same
/// names. Paths elsewhere (base images, the kernel) stay as they are.
pub fn session_relative(session_dir: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(session_dir) {
        Ok(rel) if !rel.as_os_str().is_empty() && session_dir.is_absolute() => rel.to_path_buf(),
        _ => path.to_path_buf(),
    }
}

/// Where Firecracker finds a drive's file: for a file the daemon opened (a
/// direct disk), the descriptor Firecracker inherits (`/proc/self/fd/N`
/// reopens that inode, never the path); otherwise its path.
fn drive_path(d: &agentenv_core::backend::DriveSpec, local: &dyn Fn(&Path) -> PathBuf) -> PathBuf {
    match &d.fd {
        Some(fd) => crate::safe_open::fd_path(fd.raw()),
        None => local(&d.path),
    }
}

/// The version in `firecracker --version`'s first line
/// (`Firecracker v1.13.1`): `1.13.1`.
pub fn parse_version(output: &str) -> Option<String> {
    let rest = output
        .lines()
        .next()?
        .trim()
        .strip_prefix("Firecracker v")?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

/// Whether Firecracker `version` (as [`Vmm::version`] says it,
/// `firecracker X.Y.Z`) takes `vsock_override` in `PUT /snapshot/load`
/// (v1.16 and later).
pub fn has_vsock_override(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches("firecracker ")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 16)
}

/// Firecracker's instance ids allow ASCII letters, digits and `-`, 1 to 64 long.
pub fn instance_id(vm_id: &str) -> String {
    vm_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect()
}

/// How often a shutdown request presses Ctrl-Alt-Del again: a guest ignores
/// the key press until its keyboard driver (i8042) is up.
pub const CTRL_ALT_DEL_REPEAT: Duration = Duration::from_millis(500);

/// The VM's whole configuration, typed: the API calls that build it
/// ([`api_calls`]) and the readable `firecracker.json` (Firecracker's
/// `--config-file` format) both come from it.
///
/// Paths inside the session directory are as `view` names them.
pub fn vm_config(spec: &LaunchSpec, view: SessionView) -> FullVmConfiguration {
    let local = |p: &Path| view.path(&spec.session_dir, p);
    FullVmConfiguration {
        boot_source: BootSource {
            kernel_image_path: spec.kernel.clone(),
            initrd_path: spec.initrd.clone(),
            boot_args: Some(spec.boot_args.clone()),
        },
        drives: spec
            .drives
            .iter()
            .map(|d| Drive::file(&d.id, drive_path(d, &local), d.is_root, d.read_only))
            .collect(),
        machine_config: MachineConfiguration {
            // The engine caps a VM's slots far below 255.
            vcpu_count: u8::try_from(spec.vcpus).unwrap_or(u8::MAX),
            mem_size_mib: spec.memory_mib as usize,
            smt: false,
            ..MachineConfiguration::default()
        },
        network_interfaces: spec.net.as_ref().map(|net| {
            vec![NetworkInterface {
                iface_id: NET_IFACE.into(),
                host_dev_name: net.tap_name.clone(),
                guest_mac: Some(net.guest_mac.clone()),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }]
        }),
        // `vsock_id` is deprecated since Firecracker 1.4 and not sent.
        vsock: spec.agent_socket.as_ref().map(|sock| Vsock {
            vsock_id: None,
            guest_cid: GUEST_CID,
            uds_path: local(sock),
        }),
    }
}

/// The `PUT /snapshot/load` body that restores `spec`: the state file, the
/// memory file mapped privately (`File`), the new TAP for `eth0`, and, when
/// `vsock_override` (Firecracker v1.16), the new VM's vsock socket (relative,
/// as it is saved). On v1.13.1 the socket comes back under its saved relative
/// name, which is the new VM's too: Firecracker runs in its session directory.
pub fn load_params(
    spec: &RestoreSpec,
    vsock_override: bool,
    view: SessionView,
) -> Result<SnapshotLoadParams, VmmError> {
    let launch = &spec.launch;
    let memory = spec.memory.clone().ok_or_else(|| VmmError::Io {
        context: format!("cannot restore from {}", spec.state.display()),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a firecracker snapshot needs its memory file",
        ),
    })?;
    Ok(SnapshotLoadParams {
        snapshot_path: spec.state.clone(),
        mem_backend: Some(MemBackend {
            backend_path: memory,
            backend_type: MemBackendType::File,
        }),
        resume_vm: true,
        network_overrides: launch
            .net
            .iter()
            .map(|net| NetworkOverride {
                iface_id: NET_IFACE.into(),
                host_dev_name: net.tap_name.clone(),
            })
            .collect(),
        vsock_override: launch
            .agent_socket
            .as_ref()
            .filter(|_| vsock_override)
            .map(|sock| VsockOverride {
                uds_path: view.path(&launch.session_dir, sock),
            }),
        ..SnapshotLoadParams::default()
    })
}

/// The VM's configuration as the API calls that build it, in order.
pub fn api_calls(spec: &LaunchSpec, view: SessionView) -> Vec<(String, Value)> {
    vm_config(spec, view).api_calls()
}

/// The readable `--config-file` form of a launch.
pub fn config_document(spec: &LaunchSpec, view: SessionView) -> Value {
    serde_json::to_value(vm_config(spec, view)).expect("api objects serialise")
}

/// What starting a `firecracker` process needs: its id and paths.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub vm_id: String,
    /// Firecracker's working directory: the VM's session directory, where
    /// the relative paths it is given (and saved in its snapshots) resolve.
    pub cwd: PathBuf,
    pub control_socket: PathBuf,
    /// The vsock device's socket (the host end of the agent channel). After
    /// a restore it is the saved `uds_path`, or `vsock_override`'s
    /// (Firecracker v1.16) when given.
    pub agent_socket: Option<PathBuf>,
    pub console_log: PathBuf,
    pub console_log_max_bytes: u64,
    pub startup_timeout: Duration,
    pub request_timeout: Duration,
    /// Files the daemon opened for the VM (its drives'), inherited by Firecracker.
    pub inherit_fds: Vec<agentenv_core::host::SharedFd>,
    /// The VM's `cgroup.procs` files ([`LaunchSpec::cgroup_procs`]).
    pub cgroup_procs: Vec<PathBuf>,
    /// The host paths the VMM uses, for its jail.
    pub jail_paths: Vec<(PathBuf, Access)>,
    /// The TAP it opens, for its jail.
    pub tap_name: Option<String>,
}

impl From<&LaunchSpec> for ProcessSpec {
    fn from(s: &LaunchSpec) -> Self {
        ProcessSpec {
            vm_id: s.vm_id.clone(),
            cwd: s.session_dir.clone(),
            control_socket: s.control_socket.clone(),
            agent_socket: s.agent_socket.clone(),
            console_log: s.console_log.clone(),
            console_log_max_bytes: s.console_log_max_bytes,
            startup_timeout: s.startup_timeout,
            request_timeout: s.request_timeout,
            inherit_fds: s.drives.iter().filter_map(|d| d.fd.clone()).collect(),
            cgroup_procs: s.cgroup_procs.clone(),
            jail_paths: crate::jail::launch_paths(s),
            tap_name: s.net.as_ref().map(|n| n.tap_name.clone()),
        }
    }
}

/// What [`FirecrackerVmm::load_snapshot`] needs: a fresh VMM and the
/// snapshot to load into it.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub process: ProcessSpec,
    pub load: SnapshotLoadParams,
}

impl FirecrackerVmm {
    /// Starts a `firecracker` process on its control socket (removing socket
    /// files a dead VMM left there first).
    fn spawn(&self, p: &ProcessSpec) -> Result<FirecrackerInstance, VmmError> {
        // A socket file left by a dead VMM would make Firecracker refuse to start
        // (or refuse `PUT /vsock`); the engine guarantees no live VMM owns these paths.
        remove_socket(&p.control_socket, None);
        if let Some(agent) = &p.agent_socket {
            remove_socket(agent, None);
        }
        let mut args = vec![
            "--api-sock".into(),
            p.control_socket.clone().into_os_string(),
        ];
        let view = self.view();
        if view == SessionView::Cwd {
            // The jailer gives `--id` itself (the same instance id).
            args.extend(["--id".into(), instance_id(&p.vm_id).into()]);
        }
        let jail = match &self.jail {
            Some(jail) => {
                let prepared = match view {
                    SessionView::Cwd => jail.prepare(
                        &p.vm_id,
                        &self.binary,
                        &p.jail_paths,
                        Some(&p.control_socket),
                        Some(&p.cwd),
                    ),
                    SessionView::Jailer => jail.prepare_jailer(
                        &p.vm_id,
                        &self.binary,
                        &p.cwd,
                        &p.jail_paths,
                        Some(&p.control_socket),
                    ),
                }
                .map_err(|e| VmmError::Jail(e.to_string()))?;
                Some(Arc::new(
                    prepared.with_tap(p.tap_name.as_deref().unwrap_or_default()),
                ))
            }
            None => None,
        };
        let spawn = SpawnSpec {
            binary: self.binary.clone(),
            args,
            console_log: p.console_log.clone(),
            console_log_max_bytes: p.console_log_max_bytes,
            inherit_fds: p.inherit_fds.clone(),
            cgroup_procs: p.cgroup_procs.clone(),
            jail,
        };
        let cleanup = spawn.jail.as_ref().map(|j| j.cleanup());
        let process = VmmProcess::spawn_in(&spawn, Some(&p.cwd)).inspect_err(|_| {
            if let Some(c) = &cleanup {
                c.run();
            }
        })?;
        let mut inst = FirecrackerInstance::new(
            process,
            &p.control_socket,
            p.agent_socket.clone(),
            p.request_timeout,
        );
        if self.jail.is_some() {
            inst.jailed_in = Some((p.cwd.clone(), view));
        }
        Ok(inst)
    }

    /// Starts a VMM, configures it for `spec` and boots it (what
    /// [`Vmm::launch`] does), returning the Firecracker instance itself.
    pub async fn launch_instance(
        &self,
        spec: &LaunchSpec,
    ) -> Result<FirecrackerInstance, VmmError> {
        write_readable(
            &spec.session_dir.join(CONFIG_FILE),
            &vm_config(spec, self.view()),
        )?;
        let inst = self.spawn(&spec.into())?;
        let booted = inst.boot(spec).await;
        inst.settle(booted).await
    }

    /// Starts a fresh VMM and loads a snapshot into it (`PUT /snapshot/load`),
    /// instead of configuring and booting it. With `load.resume_vm` the VM
    /// runs on at once, else it stays paused.
    pub async fn load_snapshot(&self, spec: &LoadSpec) -> Result<FirecrackerInstance, VmmError> {
        let p = &spec.process;
        let inst = self.spawn(p)?;
        let loaded = async {
            inst.wait_api(&p.console_log, p.startup_timeout).await?;
            inst.put("/snapshot/load", &spec.load).await?;
            // Later calls are rare; an idle VM keeps no connection.
            inst.client.set_keep_alive(false).await;
            Ok(())
        }
        .await;
        inst.settle(loaded).await
    }

    /// A running VM from a full snapshot (what [`Vmm::restore`] does): a
    /// fresh Firecracker in the new VM's session directory loads it with
    /// [`load_params`] and runs it on.
    pub async fn restore_instance(
        &self,
        spec: &RestoreSpec,
    ) -> Result<FirecrackerInstance, VmmError> {
        let vsock_override =
            spec.launch.agent_socket.is_some() && has_vsock_override(&self.version().await?);
        let load = load_params(spec, vsock_override, self.view())?;
        write_readable(&spec.launch.session_dir.join(LOAD_FILE), &load)?;
        let mut process = ProcessSpec::from(&spec.launch);
        process
            .jail_paths
            .push((spec.state.clone(), Access::ReadOnly));
        if let Some(memory) = &spec.memory {
            process.jail_paths.push((memory.clone(), Access::ReadOnly));
        }
        self.load_snapshot(&LoadSpec { process, load }).await
    }

    /// `firecracker --version`, as `firecracker X.Y.Z`.
    async fn ask_version(&self) -> Result<String, VmmError> {
        let binary = self.binary.to_string_lossy();
        let out = crate::runner::run(&binary, ["--version"], VERSION_TIMEOUT)
            .await
            .map_err(|e| match e {
                crate::runner::RunError::Spawn { source, .. } => VmmError::Spawn {
                    binary: self.binary.clone(),
                    source,
                },
                other => VmmError::Transport {
                    request: format!("{binary} --version"),
                    message: other.to_string(),
                },
            })?;
        let text = String::from_utf8_lossy(&out);
        // Through the jailer, Firecracker is given session paths its own way
        // (`SessionView`): its full snapshots restore only through it, and
        // the version recorded in them says so.
        let through = match self.view() {
            SessionView::Jailer => " (jailer)",
            SessionView::Cwd => "",
        };
        parse_version(&text)
            .map(|v| format!("firecracker {v}{through}"))
            .ok_or_else(|| VmmError::Transport {
                request: format!("{binary} --version"),
                message: format!("unexpected answer: {:?}", text.lines().next().unwrap_or("")),
            })
    }
}

/// Writes `value` as readable JSON to `path` (for people; the API calls are
/// what configure the VMM, so no fsync).
fn write_readable<T: Serialize>(path: &Path, value: &T) -> Result<(), VmmError> {
    let doc = serde_json::to_vec_pretty(value).expect("api objects serialise");
    crate::private::write(path, &doc).map_err(|source| VmmError::Io {
        context: format!("cannot write {}", path.display()),
        source,
    })
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    /// Asked once (`firecracker --version`), then cached.
    async fn version(&self) -> Result<String, VmmError> {
        self.version
            .get_or_try_init(|| self.ask_version())
            .await
            .cloned()
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        Ok(Box::new(self.restore_instance(spec).await?))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        Ok(Box::new(self.launch_instance(spec).await?))
    }

    async fn adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Box<dyn VmmInstance>, AdoptedState), VmmError> {
        let mut process = VmmProcess::adopt_vmm(spec)?;
        if let Some(jail) = &self.jail {
            process =
                process.with_jail_cleanup(JailCleanup::of(jail, &spec.vm_id, &spec.control_socket));
        }
        let mut inst = FirecrackerInstance::new(
            process,
            &spec.control_socket,
            spec.agent_socket.clone(),
            spec.request_timeout,
        );
        if let (Some(_), Some(session)) = (&self.jail, spec.console_log.parent()) {
            // The session directory is its console log's. How the VMM names
            // it follows how it was started, which `[jail]
            // firecracker_jailer` may no longer say: in its session
            // directory (the daemon's jail) or in `/` (the jailer's chroot).
            let view = match std::fs::read_link(format!("/proc/{}/cwd", inst.process.pid())) {
                Ok(cwd) if cwd == session => SessionView::Cwd,
                Ok(cwd) if cwd == Path::new("/") => SessionView::Jailer,
                _ => self.view(),
            };
            if view != self.view() {
                // Its full snapshot would carry this daemon's version label
                // and the other mode's paths: refused (see `save_full`).
                inst.other_mode = true;
            }
            inst.jailed_in = Some((session.to_path_buf(), view));
        }
        inst.remember_sockets();
        inst.client.set_keep_alive(false).await;
        let state = inst.guest_state().await?;
        Ok((Box::new(inst), state))
    }
}

/// Moves a file: a rename, or a copy where `to` is on another file system.
fn move_file(from: &Path, to: &Path) -> Result<(), VmmError> {
    let io = |source| VmmError::Io {
        context: format!("cannot move {} to {}", from.display(), to.display()),
        source,
    };
    let moved = match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(io)?;
            std::fs::remove_file(from).map_err(io)
        }
        Err(e) => Err(io(e)),
    };
    // The jail uid wrote it; the snapshot store's files are the daemon's.
    moved.and_then(|()| std::os::unix::fs::chown(to, Some(0), Some(0)).map_err(io))
}

/// A socket file's identity: device and inode.
type SocketId = (u64, u64);

fn socket_id(p: &Path) -> Option<SocketId> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(p).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
}

/// Removes the socket file at `p`; given `id`, only while it is still that
/// socket: once this VMM has exited, a new VMM of the same VM (a create that
/// reuses a deleted VM's id) may already have its own socket at the path.
fn remove_socket(p: &Path, id: Option<SocketId>) {
    if id.is_none() || socket_id(p) == id {
        let _ = std::fs::remove_file(p);
    }
}

/// One running Firecracker process.
pub struct FirecrackerInstance {
    process: VmmProcess,
    client: Arc<FcClient>,
    socket: PathBuf,
    /// The vsock device's Unix socket (host end of the agent channel).
    agent_socket: Option<PathBuf>,
    /// The sockets this VMM made, with their identities, once it has booted.
    owned: Arc<Mutex<Vec<(PathBuf, SocketId)>>>,
    /// How long one ordinary API request may take.
    request_timeout: Duration,
    /// A jailed VMM's session directory (where it writes full snapshots)
    /// and how it names it.
    jailed_in: Option<(PathBuf, SessionView)>,
    /// Adopted after `[jail] firecracker_jailer` changed: started the other
    /// way than this daemon starts Firecracker.
    other_mode: bool,
}

impl FirecrackerInstance {
    fn new(
        process: VmmProcess,
        control_socket: &Path,
        agent_socket: Option<PathBuf>,
        request_timeout: Duration,
    ) -> FirecrackerInstance {
        let inst = FirecrackerInstance {
            client: Arc::new(FcClient::new(control_socket, request_timeout)),
            socket: control_socket.to_path_buf(),
            agent_socket,
            process,
            owned: Arc::default(),
            request_timeout,
            jailed_in: None,
            other_mode: false,
        };
        // Firecracker leaves its socket files behind when it exits; remove them
        // (those it made: this runs whenever the exit is noticed, maybe after
        // the VM was deleted and its id reused).
        let owned = inst.owned.clone();
        let rx = inst.process.exit_watch();
        tokio::spawn(async move {
            if agentenv_core::backend::wait_exit(rx, Duration::MAX)
                .await
                .is_some()
            {
                let owned = owned.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (path, id) in owned {
                    remove_socket(&path, Some(id));
                }
            }
        });
        inst
    }

    /// Records the identities of the sockets this VMM made (after boot or adoption).
    fn remember_sockets(&self) {
        let ids = self
            .sockets()
            .into_iter()
            .filter_map(|p| socket_id(&p).map(|id| (p, id)))
            .collect();
        *self.owned.lock().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// The API socket and, when configured, the vsock socket.
    fn sockets(&self) -> Vec<PathBuf> {
        std::iter::once(self.socket.clone())
            .chain(self.agent_socket.clone())
            .collect()
    }

    /// Removes this VMM's sockets: by identity once known, else (a boot that
    /// failed, while the engine still holds the VM's id) by path.
    fn remove_sockets(&self) {
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if owned.is_empty() {
            self.sockets().iter().for_each(|s| remove_socket(s, None));
        } else {
            owned.iter().for_each(|(s, id)| remove_socket(s, Some(*id)));
        }
    }

    /// After the setup of a new VMM: on success it is ready (its sockets
    /// recorded), on failure it is killed and its sockets removed.
    async fn settle(self, setup: Result<(), VmmError>) -> Result<FirecrackerInstance, VmmError> {
        match setup {
            Ok(()) => {
                self.remember_sockets();
                Ok(self)
            }
            Err(e) => {
                self.process.kill().await;
                self.remove_sockets();
                Err(e)
            }
        }
    }

    /// Waits until the API socket accepts connections (or the process died).
    async fn wait_api(&self, console_log: &Path, timeout: Duration) -> Result<(), VmmError> {
        wait_for_socket(&self.socket, &self.process, console_log, timeout).await?;
        if let Err(e) = self.client.connect_within(timeout).await {
            return Err(match self.process.exited() {
                Some(exit) => VmmError::ExitedEarly {
                    exit,
                    detail: crate::process::last_lines(console_log),
                },
                None => e,
            });
        }
        Ok(())
    }

    async fn boot(&self, spec: &LaunchSpec) -> Result<(), VmmError> {
        self.wait_api(&spec.console_log, spec.startup_timeout)
            .await?;
        let view = self
            .jailed_in
            .as_ref()
            .map_or(SessionView::Cwd, |(_, v)| *v);
        for (path, body) in api_calls(spec, view) {
            self.put(&path, &body).await?;
        }
        self.action(ActionType::InstanceStart).await?;
        // Later calls are rare; an idle VM keeps no connection (and its buffers).
        self.client.set_keep_alive(false).await;
        Ok(())
    }

    /// One API call that may take `timeout`; when the process died
    /// meanwhile, says so with its output.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, VmmError> {
        match self
            .client
            .request_within(method, path, body, timeout)
            .await
        {
            Ok(v) => Ok(v),
            Err(e) => match self.exited_soon(&e).await {
                Some(exit) if !matches!(e, VmmError::Refused { .. }) => {
                    Err(VmmError::ExitedEarly {
                        exit,
                        detail: format!("{e}"),
                    })
                }
                _ => Err(e),
            },
        }
    }

    /// A request with a JSON body and an empty answer.
    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let body = Some(api::to_bytes(body));
        self.call(method, path, body, timeout).await.map(|_| ())
    }

    async fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), VmmError> {
        self.send(Method::PUT, path, body, self.request_timeout)
            .await
    }

    async fn patch<T: Serialize>(&self, path: &str, body: &T) -> Result<(), VmmError> {
        self.send(Method::PATCH, path, body, self.request_timeout)
            .await
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, VmmError> {
        let body = self
            .call(Method::GET, path, None, self.request_timeout)
            .await?;
        serde_json::from_slice(&body).map_err(|e| VmmError::Transport {
            request: format!("GET {path}"),
            message: format!("unexpected answer: {e}"),
        })
    }

    /// After a failed request: the exit, if the process is gone or goes within
    /// a moment (a killed VMM drops its socket before it is reaped).
    async fn exited_soon(&self, e: &VmmError) -> Option<VmmExit> {
        if matches!(e, VmmError::Transport { .. }) {
            agentenv_core::backend::wait_exit(self.process.exit_watch(), Duration::from_millis(200))
                .await
        } else {
            self.process.exited()
        }
    }

    async fn action(&self, action_type: ActionType) -> Result<(), VmmError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `GET /`: Firecracker's instance info (`state` is `Not started`, `Running` or `Paused`).
    pub async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        self.get("/").await
    }

    /// `PUT /snapshot/create`: writes the VM's state and its memory to the
    /// files `params` names. Firecracker refuses it unless the VM is paused
    /// ([`VmmInstance::pause`] first); the VM stays paused.
    /// It may take [`SNAPSHOT_CREATE_TIMEOUT`] (or the request timeout, if
    /// longer): Firecracker writes the whole guest memory first.
    pub async fn snapshot_create(&self, params: &SnapshotCreateParams) -> Result<(), VmmError> {
        let timeout = self.request_timeout.max(SNAPSHOT_CREATE_TIMEOUT);
        self.send(Method::PUT, "/snapshot/create", params, timeout)
            .await
    }
}

#[async_trait]
impl VmmInstance for FirecrackerInstance {
    /// `PUT /snapshot/create` (Full): Firecracker writes the state and the
    /// memory files itself.
    async fn save_full(&self, files: &FullSnapshotFiles) -> Result<SavedMemory, VmmError> {
        if self.other_mode {
            return Err(VmmError::Io {
                context: "cannot take a full snapshot of this vm".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "its Firecracker was started the other way than `[jail] firecracker_jailer` \
                     now says (through the jailer or not), so the snapshot's paths and version \
                     label would disagree; restart the vm first",
                ),
            });
        }
        let Some((session, view)) = &self.jailed_in else {
            self.snapshot_create(&SnapshotCreateParams {
                snapshot_type: Some(SnapshotType::Full),
                snapshot_path: files.state.clone(),
                mem_file_path: files.memory.clone(),
            })
            .await?;
            return Ok(SavedMemory::Written);
        };
        // Jailed: written in the session directory (relative to it), then
        // moved.
        let staged = [
            (session.join(JAILED_STATE), &files.state),
            (session.join(JAILED_MEMORY), &files.memory),
        ];
        let written = self
            .snapshot_create(&SnapshotCreateParams {
                snapshot_type: Some(SnapshotType::Full),
                snapshot_path: view.path(session, &session.join(JAILED_STATE)),
                mem_file_path: view.path(session, &session.join(JAILED_MEMORY)),
            })
            .await;
        let moved = match written {
            Ok(()) => staged.iter().try_for_each(|(from, to)| move_file(from, to)),
            Err(e) => Err(e),
        };
        for (from, _) in &staged {
            let _ = std::fs::remove_file(from);
        }
        moved.map(|()| SavedMemory::Written)
    }

    fn pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn identity(&self) -> Option<ProcessIdentity> {
        Some(self.process.identity())
    }

    async fn guest_state(&self) -> Result<AdoptedState, VmmError> {
        let info = self.instance_info().await?;
        match info.state {
            InstanceState::Running => Ok(AdoptedState::Running),
            InstanceState::Paused => Ok(AdoptedState::Paused),
            other => Err(VmmError::Transport {
                request: "GET /".into(),
                message: format!("the vmm reports state {other:?}, not Running or Paused"),
            }),
        }
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.patch(
            "/vm",
            &Vm {
                state: VmState::Paused,
            },
        )
        .await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.patch(
            "/vm",
            &Vm {
                state: VmState::Resumed,
            },
        )
        .await
    }

    /// Presses Ctrl-Alt-Del, then again every [`CTRL_ALT_DEL_REPEAT`] until
    /// the VMM exits: a guest whose keyboard driver is not up yet ignores the
    /// key press. The caller kills the VMM when its shutdown timeout passes,
    /// which ends the repeats (so does dropping this instance, or a refusal).
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.action(ActionType::SendCtrlAltDel).await?;
        let client = Arc::downgrade(&self.client);
        let exit = self.process.exit_watch();
        tokio::spawn(async move {
            let press = InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel,
            };
            loop {
                if agentenv_core::backend::wait_exit(exit.clone(), CTRL_ALT_DEL_REPEAT)
                    .await
                    .is_some()
                {
                    return;
                }
                let Some(client) = client.upgrade() else {
                    return;
                };
                if let Err(e) = client.put("/actions", &press).await {
                    tracing::debug!("repeated Ctrl-Alt-Del: {e}");
                    return;
                }
            }
        });
        Ok(())
    }

    async fn kill(&self) -> Result<VmmExit, VmmError> {
        let exit = self.process.kill().await;
        self.remove_sockets();
        Ok(exit)
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.process.exit_watch()
    }

    fn agent_channel(&self) -> Option<AgentChannel> {
        self.agent_socket
            .as_ref()
            .map(|socket| AgentChannel::HybridVsock {
                socket: socket.clone(),
                port: AGENT_VSOCK_PORT,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentenv_core::backend::{DriveSpec, NetAttachment};
    use models::{MemBackend, MemBackendType, NetworkOverride, SnapshotType, VsockOverride};
    use serde_json::json;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            memory_file: None,
            cgroup_procs: Vec::new(),
            vm_id: "vm_1.a".into(),
            session_dir: "/s/vm".into(),
            control_socket: "/sock/vm.sock".into(),
            console_log: "/s/vm/console.log".into(),
            console_log_max_bytes: 1 << 20,
            vcpus: 2,
            memory_mib: 2048,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/i/initrd.img".into()),
            boot_args: "console=ttyS0".into(),
            drives: vec![
                DriveSpec {
                    id: "rootfs".into(),
                    path: "/r/base.ext4".into(),
                    read_only: true,
                    is_root: true,
                    fd: None,
                },
                DriveSpec {
                    id: "overlay".into(),
                    path: "/s/vm/overlay.ext4".into(),
                    read_only: false,
                    is_root: false,
                    fd: None,
                },
            ],
            net: Some(NetAttachment {
                tap_name: "tap0".into(),
                guest_mac: "06:00:00:00:00:01".into(),
            }),
            agent_socket: Some("/s/vm/agent.sock".into()),
            startup_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn calls_follow_the_documented_bodies() {
        let calls = api_calls(&spec(), SessionView::Cwd);
        let paths: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine-config",
                "/boot-source",
                "/drives/rootfs",
                "/drives/overlay",
                "/network-interfaces/eth0",
                "/vsock"
            ]
        );
        assert_eq!(
            calls[0].1,
            json!({"vcpu_count": 2, "mem_size_mib": 2048, "smt": false})
        );
        assert_eq!(
            calls[1].1,
            json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0", "initrd_path": "/i/initrd.img"})
        );
        assert_eq!(
            calls[2].1,
            json!({"drive_id": "rootfs", "path_on_host": "/r/base.ext4", "is_root_device": true, "is_read_only": true})
        );
        assert_eq!(
            calls[4].1,
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"})
        );
        // Inside the session directory (Firecracker's working directory):
        // relative, so a snapshot records names a clone has too.
        assert_eq!(
            calls[3].1,
            json!({"drive_id": "overlay", "path_on_host": "overlay.ext4", "is_root_device": false, "is_read_only": false})
        );
        // Firecracker 1.13's Vsock object, without the deprecated `vsock_id`.
        assert_eq!(
            calls[5].1,
            json!({"guest_cid": 3, "uds_path": "agent.sock"})
        );
    }

    #[test]
    fn no_agent_socket_no_vsock() {
        let mut s = spec();
        s.agent_socket = None;
        assert!(!api_calls(&s, SessionView::Cwd)
            .iter()
            .any(|(p, _)| p == "/vsock"));
        assert!(config_document(&s, SessionView::Cwd).get("vsock").is_none());
    }

    #[test]
    fn through_the_jailer_session_files_are_named_under_vm() {
        let s = spec();
        let doc = config_document(&s, SessionView::Jailer);
        assert_eq!(doc["drives"][1]["path_on_host"], "/vm/overlay.ext4");
        assert_eq!(doc["vsock"]["uds_path"], "/vm/agent.sock");
        // Paths outside the session directory stay as they are.
        assert_eq!(
            doc["boot-source"]["kernel_image_path"],
            config_document(&s, SessionView::Cwd)["boot-source"]["kernel_image_path"]
        );
        let session = Path::new("/srv/s/vm1");
        assert_eq!(
            SessionView::Jailer.path(session, &session.join(".snapshot.mem")),
            Path::new("/vm/.snapshot.mem")
        );
        assert_eq!(
            SessionView::Cwd.path(session, &session.join(".snapshot.mem")),
            Path::new(".snapshot.mem")
        );
    }

    #[test]
    fn config_document_groups_the_same_bodies() {
        let doc = config_document(&spec(), SessionView::Cwd);
        assert_eq!(doc["drives"].as_array().unwrap().len(), 2);
        assert_eq!(doc["machine-config"]["vcpu_count"], 2);
        assert_eq!(doc["network-interfaces"][0]["host_dev_name"], "tap0");
        assert_eq!(
            doc["vsock"],
            json!({"guest_cid": 3, "uds_path": "agent.sock"})
        );
        assert_eq!(doc["drives"][1]["path_on_host"], "overlay.ext4");
    }

    #[test]
    fn only_paths_inside_the_session_directory_are_relative() {
        let dir = Path::new("/s/vm");
        let rel = |p: &str| session_relative(dir, Path::new(p));
        assert_eq!(rel("/s/vm/overlay.ext4"), Path::new("overlay.ext4"));
        assert_eq!(rel("/s/vm/sub/share0.ext4"), Path::new("sub/share0.ext4"));
        assert_eq!(rel("/s/vm2/overlay.ext4"), Path::new("/s/vm2/overlay.ext4"));
        assert_eq!(rel("/s/vm"), Path::new("/s/vm"));
        assert_eq!(rel("/k/vmlinux"), Path::new("/k/vmlinux"));
        // A relative session directory is no working directory to rely on.
        assert_eq!(
            session_relative(Path::new("s"), Path::new("s/a.ext4")),
            Path::new("s/a.ext4")
        );
    }

    #[test]
    fn versions_are_read_from_the_version_banner() {
        let real = "Firecracker v1.13.1\n\nSupported snapshot versions: v6.0.0\n";
        assert_eq!(parse_version(real).as_deref(), Some("1.13.1"));
        assert_eq!(
            parse_version("Firecracker v1.16.1-double\n").as_deref(),
            Some("1.16.1")
        );
        assert_eq!(parse_version("qemu 7.2"), None);
        assert_eq!(parse_version("Firecracker v\n"), None);
        assert!(!has_vsock_override("firecracker 1.13.1"));
        assert!(!has_vsock_override("firecracker 1.9.0"));
        assert!(has_vsock_override("firecracker 1.16.1"));
        assert!(has_vsock_override("firecracker 2.0.0"));
    }

    #[test]
    fn a_restore_loads_with_the_new_vms_tap_and_socket() {
        let rs = RestoreSpec {
            launch: spec(),
            state: "/t/snap/vm.state".into(),
            memory: Some("/t/snap/vm.mem".into()),
        };
        assert_eq!(
            serde_json::to_value(load_params(&rs, false, SessionView::Cwd).unwrap()).unwrap(),
            json!({"snapshot_path": "/t/snap/vm.state",
                   "mem_backend": {"backend_type": "File", "backend_path": "/t/snap/vm.mem"},
                   "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}]})
        );
        let v1_16 =
            serde_json::to_value(load_params(&rs, true, SessionView::Cwd).unwrap()).unwrap();
        assert_eq!(v1_16["vsock_override"], json!({"uds_path": "agent.sock"}));
        assert!(v1_16.get("clock_realtime").is_none());

        let mut bare = rs.clone();
        bare.launch.net = None;
        bare.launch.agent_socket = None;
        let body =
            serde_json::to_value(load_params(&bare, true, SessionView::Cwd).unwrap()).unwrap();
        assert!(body.get("network_overrides").is_none(), "{body}");
        assert!(body.get("vsock_override").is_none(), "{body}");

        bare.memory = None;
        let err = load_params(&bare, false, SessionView::Cwd)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/t/snap/vm.state") && err.contains("memory file"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_bodies_follow_the_swagger() {
        let create = SnapshotCreateParams {
            snapshot_type: Some(SnapshotType::Full),
            snapshot_path: "/t/vm.snap".into(),
            mem_file_path: "/t/vm.mem".into(),
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"snapshot_type": "Full", "snapshot_path": "/t/vm.snap",
                   "mem_file_path": "/t/vm.mem"})
        );
        let mut load = SnapshotLoadParams {
            snapshot_path: "/t/vm.snap".into(),
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: "/t/vm.mem".into(),
            }),
            resume_vm: true,
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap7".into(),
            }],
            ..Default::default()
        };
        // What Firecracker v1.13.1 takes.
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/t/vm.snap",
                   "mem_backend": {"backend_type": "File", "backend_path": "/t/vm.mem"},
                   "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}]})
        );
        // v1.16's overrides appear only when set.
        load.vsock_override = Some(VsockOverride {
            uds_path: "/t/agent.sock".into(),
        });
        load.clock_realtime = true;
        let body = serde_json::to_value(&load).unwrap();
        assert_eq!(body["vsock_override"], json!({"uds_path": "/t/agent.sock"}));
        assert_eq!(body["clock_realtime"], true);
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type": "SendCtrlAltDel"})
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
    }

    #[test]
    fn instance_ids_are_sanitised() {
        assert_eq!(instance_id("vm_1.a"), "vm-1-a");
        assert_eq!(instance_id(&"x".repeat(70)).len(), 64);
    }
}
