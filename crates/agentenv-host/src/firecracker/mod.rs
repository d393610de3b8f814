//! The Firecracker driver: one `firecracker` process per VM, configured over its
//! Unix-socket API exactly as Firecracker's swagger documents it.

mod api;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_api::BackendKind;
use agentenv_core::backend::{
    AdoptSpec, AdoptedState, AgentChannel, LaunchSpec, ProcessIdentity, Vmm, VmmError, VmmExit,
    VmmInstance,
};
use async_trait::async_trait;
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::watch;

pub use api::FcClient;

use crate::process::{wait_for_socket, SpawnSpec, VmmProcess};

/// Name of the generated configuration in the session directory.
pub const CONFIG_FILE: &str = "firecracker.json";

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
}

impl FirecrackerVmm {
    /// A driver for the given `firecracker` binary.
    pub fn new(binary: PathBuf) -> FirecrackerVmm {
        FirecrackerVmm { binary }
    }
}

/// Firecracker's instance ids allow ASCII letters, digits and `-`, 1 to 64 long.
pub fn instance_id(vm_id: &str) -> String {
    vm_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect()
}

/// The VM's configuration as the API calls that build it, in order. The same
/// bodies, grouped, form the readable `firecracker.json` (Firecracker's
/// `--config-file` format).
pub fn api_calls(spec: &LaunchSpec) -> Vec<(String, Value)> {
    let mut calls = vec![
        (
            "/machine-config".to_string(),
            json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib, "smt": false }),
        ),
        ("/boot-source".to_string(), boot_source(spec)),
    ];
    for d in &spec.drives {
        calls.push((format!("/drives/{}", d.id), drive(d)));
    }
    if let Some(net) = &spec.net {
        calls.push((
            "/network-interfaces/eth0".to_string(),
            json!({ "iface_id": "eth0", "host_dev_name": net.tap_name, "guest_mac": net.guest_mac }),
        ));
    }
    if let Some(sock) = &spec.agent_socket {
        calls.push(("/vsock".to_string(), vsock(sock)));
    }
    calls
}

/// The vsock device (`PUT /vsock`). `vsock_id` is deprecated since
/// Firecracker 1.4 and not sent.
fn vsock(uds_path: &Path) -> Value {
    json!({ "guest_cid": GUEST_CID, "uds_path": uds_path })
}

fn boot_source(spec: &LaunchSpec) -> Value {
    let mut b = json!({
        "kernel_image_path": spec.kernel,
        "boot_args": spec.boot_args,
    });
    if let Some(initrd) = &spec.initrd {
        b["initrd_path"] = json!(initrd);
    }
    b
}

fn drive(d: &agentenv_core::backend::DriveSpec) -> Value {
    json!({
        "drive_id": d.id,
        "path_on_host": d.path,
        "is_root_device": d.is_root,
        "is_read_only": d.read_only,
    })
}

/// The readable `--config-file` form of a launch.
pub fn config_document(spec: &LaunchSpec) -> Value {
    let mut doc = json!({
        "boot-source": boot_source(spec),
        "drives": spec.drives.iter().map(drive).collect::<Vec<_>>(),
        "machine-config": { "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib, "smt": false },
    });
    if let Some(net) = &spec.net {
        doc["network-interfaces"] = json!([
            { "iface_id": "eth0", "host_dev_name": net.tap_name, "guest_mac": net.guest_mac }
        ]);
    }
    if let Some(sock) = &spec.agent_socket {
        doc["vsock"] = vsock(sock);
    }
    doc
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        let doc = serde_json::to_vec_pretty(&config_document(spec)).expect("json serialises");
        let cfg_path = spec.session_dir.join(CONFIG_FILE);
        // For people to read; the API calls are what configure the VMM, so no fsync.
        std::fs::write(&cfg_path, &doc).map_err(|source| VmmError::Io {
            context: format!("cannot write {}", cfg_path.display()),
            source,
        })?;
        // A socket file left by a dead VMM would make Firecracker refuse to start
        // (or refuse `PUT /vsock`); the engine guarantees no live VMM owns these paths.
        remove_socket(&spec.control_socket, None);
        if let Some(agent) = &spec.agent_socket {
            remove_socket(agent, None);
        }
        let process = VmmProcess::spawn(&SpawnSpec {
            binary: self.binary.clone(),
            args: vec![
                "--api-sock".into(),
                spec.control_socket.clone().into_os_string(),
                "--id".into(),
                instance_id(&spec.vm_id).into(),
            ],
            console_log: spec.console_log.clone(),
            console_log_max_bytes: spec.console_log_max_bytes,
        })?;
        let inst = FirecrackerInstance::new(
            process,
            &spec.control_socket,
            spec.agent_socket.clone(),
            spec.request_timeout,
        );
        match inst.boot(spec).await {
            Ok(()) => {
                inst.remember_sockets();
                Ok(Box::new(inst))
            }
            Err(e) => {
                inst.process.kill().await;
                inst.remove_sockets();
                Err(e)
            }
        }
    }

    async fn adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Box<dyn VmmInstance>, AdoptedState), VmmError> {
        let process = VmmProcess::adopt_vmm(spec)?;
        let inst = FirecrackerInstance::new(
            process,
            &spec.control_socket,
            spec.agent_socket.clone(),
            spec.request_timeout,
        );
        inst.remember_sockets();
        inst.client.set_keep_alive(false).await;
        let state = inst.guest_state().await?;
        Ok((Box::new(inst), state))
    }
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
    client: FcClient,
    socket: PathBuf,
    /// The vsock device's Unix socket (host end of the agent channel).
    agent_socket: Option<PathBuf>,
    /// The sockets this VMM made, with their identities, once it has booted.
    owned: Arc<Mutex<Vec<(PathBuf, SocketId)>>>,
}

impl FirecrackerInstance {
    fn new(
        process: VmmProcess,
        control_socket: &Path,
        agent_socket: Option<PathBuf>,
        request_timeout: Duration,
    ) -> FirecrackerInstance {
        let inst = FirecrackerInstance {
            client: FcClient::new(control_socket, request_timeout),
            socket: control_socket.to_path_buf(),
            agent_socket,
            process,
            owned: Arc::default(),
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

    async fn boot(&self, spec: &LaunchSpec) -> Result<(), VmmError> {
        wait_for_socket(
            &spec.control_socket,
            &self.process,
            &spec.console_log,
            spec.startup_timeout,
        )
        .await?;
        if let Err(e) = self.client.connect_within(spec.startup_timeout).await {
            return Err(match self.process.exited() {
                Some(exit) => VmmError::ExitedEarly {
                    exit,
                    detail: crate::process::last_lines(&spec.console_log),
                },
                None => e,
            });
        }
        for (path, body) in api_calls(spec) {
            self.call(Method::PUT, &path, Some(&body)).await?;
        }
        self.action("InstanceStart").await?;
        // Later calls are rare; an idle VM keeps no connection (and its buffers).
        self.client.set_keep_alive(false).await;
        Ok(())
    }

    /// One API call; when the process died meanwhile, says so with its output.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VmmError> {
        match self.client.request(method, path, body).await {
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

    async fn action(&self, action: &str) -> Result<(), VmmError> {
        self.call(
            Method::PUT,
            "/actions",
            Some(&json!({ "action_type": action })),
        )
        .await
        .map(|_| ())
    }

    /// `GET /`: Firecracker's instance info (`state` is `Not started`, `Running` or `Paused`).
    pub async fn instance_info(&self) -> Result<Value, VmmError> {
        self.call(Method::GET, "/", None)
            .await?
            .ok_or_else(|| VmmError::Transport {
                request: "GET /".into(),
                message: "empty body".into(),
            })
    }
}

#[async_trait]
impl VmmInstance for FirecrackerInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn identity(&self) -> Option<ProcessIdentity> {
        Some(self.process.identity())
    }

    async fn guest_state(&self) -> Result<AdoptedState, VmmError> {
        let info = self.instance_info().await?;
        match info["state"].as_str() {
            Some("Running") => Ok(AdoptedState::Running),
            Some("Paused") => Ok(AdoptedState::Paused),
            other => Err(VmmError::Transport {
                request: "GET /".into(),
                message: format!("the vmm reports state {other:?}, not Running or Paused"),
            }),
        }
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.call(Method::PATCH, "/vm", Some(&json!({ "state": "Paused" })))
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.call(Method::PATCH, "/vm", Some(&json!({ "state": "Resumed" })))
            .await
            .map(|_| ())
    }

    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.action("SendCtrlAltDel").await
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

    fn spec() -> LaunchSpec {
        LaunchSpec {
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
                },
                DriveSpec {
                    id: "overlay".into(),
                    path: "/s/vm/overlay.ext4".into(),
                    read_only: false,
                    is_root: false,
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
        let calls = api_calls(&spec());
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
        // Firecracker 1.13's Vsock object, without the deprecated `vsock_id`.
        assert_eq!(
            calls[5].1,
            json!({"guest_cid": 3, "uds_path": "/s/vm/agent.sock"})
        );
    }

    #[test]
    fn no_agent_socket_no_vsock() {
        let mut s = spec();
        s.agent_socket = None;
        assert!(!api_calls(&s).iter().any(|(p, _)| p == "/vsock"));
        assert!(config_document(&s).get("vsock").is_none());
    }

    #[test]
    fn config_document_groups_the_same_bodies() {
        let doc = config_document(&spec());
        assert_eq!(doc["drives"].as_array().unwrap().len(), 2);
        assert_eq!(doc["machine-config"]["vcpu_count"], 2);
        assert_eq!(doc["network-interfaces"][0]["host_dev_name"], "tap0");
        assert_eq!(
            doc["vsock"],
            json!({"guest_cid": 3, "uds_path": "/s/vm/agent.sock"})
        );
    }

    #[test]
    fn instance_ids_are_sanitised() {
        assert_eq!(instance_id("vm_1.a"), "vm-1-a");
        assert_eq!(instance_id(&"x".repeat(70)).len(), 64);
    }
}
