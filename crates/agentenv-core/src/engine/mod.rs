//! The lifecycle engine: owns the VM table and orchestrates every operation over
//! the [`Vmm`] backend, the [`Host`] seams, [`HostNetwork`] and the
//! [`SnapshotStore`].
//!
//! Locking: the table lock (`vms`) is held only for lookups and insertions. Each
//! VM has an async operation lock (`op`) that serialises operations on it, and
//! one plain mutex around all its runtime state (`VmRuntime`) for quick reads
//! (`GET` never waits for an operation to finish); its record on disk is one
//! copy of that state taken under that mutex (`Engine::write_record`).
//!
//! Files: `create.rs` (plan, reserve, build, rollback) with its field checks in
//! `validate.rs` and the host-path policy in `host_paths.rs`; `lifecycle.rs`
//! (pause, resume, shutdown, delete); `snapshot.rs`; `restore.rs` (startup);
//! `agent.rs`; `orchestration_tests.rs` drives them over the fakes of
//! `crate::testing`.

mod agent;
mod cgroup;
mod create;
mod full;
mod host_paths;
mod lifecycle;
mod owners;
mod restore;
mod snapshot;
mod validate;

#[cfg(test)]
mod orchestration_tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_api::{ExitInfo, VmInfo, VmState};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::agent::{AgentConnector, AgentLink};
use crate::backend::{ProcessIdentity, Vmm, VmmDrivers, VmmExit, VmmInstance};
use crate::config::Config;
use crate::error::EngineError;
pub use crate::failpoints::{Failpoints, FAILPOINTS};
use crate::host::Host;
use crate::net::{HostNetwork, NetLease, NetPlan};
use crate::snapshot::SnapshotStore;
use crate::state::transition;

/// Version of the on-disk VM record.
pub const VM_RECORD_SCHEMA: u32 = 1;

/// Name of the metadata record in a session directory.
pub const RECORD_FILE: &str = "vm.json";

/// Name of the console log in a session directory.
pub const CONSOLE_LOG: &str = "console.log";

/// Name of the guest agent channel's host socket in a session directory.
pub const AGENT_SOCKET: &str = "agent.sock";

/// The VM metadata record as stored in `session_dir/vm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Always [`VM_RECORD_SCHEMA`] when written by this version.
    pub schema_version: u32,
    /// The VM as the API shows it.
    pub vm: VmInfo,
    /// Its network lease while it holds one (automatic networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetLease>,
    /// The VMM process while there is one, for re-adoption after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_process: Option<ProcessIdentity>,
    /// The host end of the guest agent channel, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<PathBuf>,
    /// A snapshot being taken, for a restart to finish what a crash cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInProgress>,
    /// A reset under way (the full snapshot it goes back to), for a restart
    /// to finish what a crash cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
}

/// A snapshot in progress, as the VM record keeps it (state `snapshotting`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInProgress {
    /// The snapshot being made.
    pub snapshot_id: String,
    /// True when the snapshot pauses a running VM, which must run again
    /// afterwards, whatever happens in between.
    pub resume: bool,
}

/// A VM's mutable runtime state. It sits under one lock, so that the record
/// written to `vm.json` (`Engine::write_record`) is always one consistent
/// copy, never pieces read at different moments.
struct VmRuntime {
    /// The current record.
    info: VmInfo,
    /// `info` as JSON, rendered at each change, so listing many VMs is a copy.
    json: Arc<str>,
    /// The running VMM, while there is one.
    instance: Option<Arc<dyn VmmInstance>>,
    /// The network lease, while the VM holds one.
    net: Option<NetLease>,
    /// The guest agent connection, while the agent answers.
    agent: Option<Arc<dyn AgentLink>>,
    /// The VMM process while there is one (persisted for re-adoption).
    process: Option<ProcessIdentity>,
    /// The snapshot being taken (persisted while the state is `snapshotting`).
    snapshot: Option<SnapshotInProgress>,
    /// The full snapshot a reset goes back to (persisted while `resetting`).
    reset: Option<String>,
    /// The identity a VM restored from a memory snapshot still has to be
    /// given by its agent; it is not `ready` before.
    identity: Option<agentenv_proto::Identity>,
}

/// One tracked VM.
struct VmSlot {
    /// Serialises operations on this VM.
    op: tokio::sync::Mutex<()>,
    /// Everything that changes; held only for quick reads and writes, never
    /// across an await (`GET` never waits for an operation to finish).
    rt: Mutex<VmRuntime>,
    /// True while the agent answers, for waiters. Beside `rt`, not in it: a
    /// watch is its own synchronised cell that waiters subscribe to without
    /// the runtime lock, and it is no part of the record.
    ready: tokio::sync::watch::Sender<bool>,
    /// The host end of the agent channel, when the VM has one (never changes).
    agent_socket: Option<PathBuf>,
    /// The direct disk this daemon opened for the VM, kept open while the
    /// VM lives (set once at reservation; unknown for a VM adopted after a
    /// restart).
    direct_disk: std::sync::OnceLock<crate::host::OpenedPath>,
}

impl VmSlot {
    fn new(info: VmInfo, net: Option<NetLease>, agent_socket: Option<PathBuf>) -> Arc<VmSlot> {
        Arc::new(VmSlot {
            op: tokio::sync::Mutex::new(()),
            rt: Mutex::new(VmRuntime {
                json: render(&info),
                info,
                instance: None,
                net,
                agent: None,
                process: None,
                snapshot: None,
                reset: None,
                identity: None,
            }),
            ready: tokio::sync::watch::channel(false).0,
            agent_socket,
            direct_disk: std::sync::OnceLock::new(),
        })
    }

    fn rt(&self) -> std::sync::MutexGuard<'_, VmRuntime> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record as `vm.json` holds it: one copy, taken under the one lock.
    fn record(&self) -> VmRecord {
        let rt = self.rt();
        VmRecord {
            schema_version: VM_RECORD_SCHEMA,
            vm: rt.info.clone(),
            net: rt.net.clone(),
            vmm_process: rt.process,
            agent_socket: self.agent_socket.clone(),
            snapshot: rt.snapshot.clone(),
            reset: rt.reset.clone(),
        }
    }

    fn set_reset(&self, r: Option<String>) {
        self.rt().reset = r;
    }

    fn identity(&self) -> Option<agentenv_proto::Identity> {
        self.rt().identity.clone()
    }

    fn set_identity(&self, i: Option<agentenv_proto::Identity>) {
        self.rt().identity = i;
    }

    fn set_snapshot(&self, s: Option<SnapshotInProgress>) {
        self.rt().snapshot = s;
    }

    fn process(&self) -> Option<ProcessIdentity> {
        self.rt().process
    }

    fn set_process(&self, p: Option<ProcessIdentity>) {
        self.rt().process = p;
    }

    fn agent(&self) -> Option<Arc<dyn AgentLink>> {
        self.rt().agent.clone()
    }

    fn set_agent(&self, a: Option<Arc<dyn AgentLink>>) {
        self.rt().agent = a;
    }

    fn lease(&self) -> Option<NetLease> {
        self.rt().net.clone()
    }

    fn take_lease(&self) -> Option<NetLease> {
        self.rt().net.take()
    }

    fn info(&self) -> VmInfo {
        self.rt().info.clone()
    }

    /// Reads the record in place, without a copy.
    fn with_info<R>(&self, f: impl FnOnce(&VmInfo) -> R) -> R {
        f(&self.rt().info)
    }

    fn json(&self) -> Arc<str> {
        self.rt().json.clone()
    }

    /// Changes the record (all changes go through here, so the rendered JSON
    /// stays in step) and returns the new one.
    fn update<E>(&self, f: impl FnOnce(&mut VmInfo) -> Result<(), E>) -> Result<VmInfo, E> {
        let mut rt = self.rt();
        f(&mut rt.info)?;
        rt.json = render(&rt.info);
        Ok(rt.info.clone())
    }

    fn state(&self) -> VmState {
        self.rt().info.state
    }

    fn instance(&self) -> Option<Arc<dyn VmmInstance>> {
        self.rt().instance.clone()
    }

    fn set_instance(&self, inst: Option<Arc<dyn VmmInstance>>) {
        self.rt().instance = inst;
    }
}

/// A backend's driver as built for the VMs recorded with it, or why not.
type BuiltDriver = Result<Arc<dyn Vmm>, String>;

/// The lifecycle engine.
pub struct Engine {
    cfg: Arc<Config>,
    /// The driver new VMs get.
    vmm: Arc<dyn Vmm>,
    /// Builds the drivers of other backends, for VMs recorded with them.
    drivers: Option<Arc<dyn VmmDrivers>>,
    /// The other backends' drivers built so far (or why one cannot be).
    other_vmms: Mutex<Vec<(agentenv_api::BackendKind, BuiltDriver)>>,
    host: Host,
    /// Automatic networking, when `[network] enable = true`.
    net: Option<(Arc<dyn HostNetwork>, NetPlan)>,
    /// Disk snapshots.
    snapshots: Arc<dyn SnapshotStore>,
    /// Connects to the guest agents.
    agents: Arc<dyn AgentConnector>,
    /// Snapshots being copied into new VMs, with their count (no delete meanwhile).
    snapshot_holds: Mutex<HashMap<String, usize>>,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
    /// Test-only failure injection.
    pub failpoints: Arc<Failpoints>,
}

impl Engine {
    /// Builds an engine and reconciles the VM records found under `session_root`
    /// with what is alive (see [`restore`](Engine::restore)): live VMMs are
    /// re-adopted, dead ones recorded as failed, leftovers cleaned.
    ///
    /// `cfg` paths must be absolute. With networking, the firewall table is
    /// installed and network objects no VM owns are reclaimed. `agents`
    /// connects to the guest agents of running VMs.
    pub async fn start(
        cfg: Config,
        vmm: Arc<dyn Vmm>,
        host: Host,
        net: Option<Arc<dyn HostNetwork>>,
        snapshots: Arc<dyn SnapshotStore>,
        agents: Arc<dyn AgentConnector>,
    ) -> Result<Arc<Engine>, EngineError> {
        Engine::start_with_drivers(cfg, vmm, None, host, net, snapshots, agents).await
    }

    /// Like [`start`](Engine::start), with `drivers` building the driver of
    /// every other backend a recorded VM needs: each VM is re-adopted with
    /// its own backend's driver, whatever `vmm` (the backend new VMs get) is.
    /// A VM whose driver cannot be built is left running, untouched.
    pub async fn start_with_drivers(
        cfg: Config,
        vmm: Arc<dyn Vmm>,
        drivers: Option<Arc<dyn VmmDrivers>>,
        host: Host,
        net: Option<Arc<dyn HostNetwork>>,
        snapshots: Arc<dyn SnapshotStore>,
        agents: Arc<dyn AgentConnector>,
    ) -> Result<Arc<Engine>, EngineError> {
        let plan = NetPlan::new(&cfg.network);
        let cleanup = snapshots.init().await?;
        for p in &cleanup.removed {
            tracing::warn!("removed partial snapshot leftover {}", p.display());
        }
        let engine = Arc::new(Engine {
            cfg: Arc::new(cfg),
            vmm,
            drivers,
            other_vmms: Mutex::new(Vec::new()),
            host,
            net: net.map(|n| (n, plan)),
            snapshots,
            agents,
            snapshot_holds: Mutex::new(HashMap::new()),
            vms: Mutex::new(BTreeMap::new()),
            failpoints: Arc::new(Failpoints::default()),
        });
        engine.snapshots.set_failpoints(engine.failpoints.clone());
        engine.restore().await;
        if let Some((net, plan)) = &engine.net {
            let keep: Vec<NetLease> = engine.slots().iter().filter_map(|s| s.lease()).collect();
            net.init(plan, &keep)
                .await
                .map_err(|e| EngineError::Network(e.to_string()))?;
        }
        Ok(engine)
    }

    fn slots(&self) -> Vec<Arc<VmSlot>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The backend new VMs get.
    pub fn backend(&self) -> agentenv_api::BackendKind {
        self.vmm.kind()
    }

    /// The driver of backend `kind`: the one new VMs get, or another one
    /// built (once) for the VMs recorded with it; or why there is none.
    fn vmm_for(&self, kind: agentenv_api::BackendKind) -> BuiltDriver {
        if kind == self.vmm.kind() {
            return Ok(self.vmm.clone());
        }
        let mut others = self.other_vmms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, built)) = others.iter().find(|(k, _)| *k == kind) {
            return built.clone();
        }
        let built = match &self.drivers {
            Some(d) => d.driver(kind).and_then(|v| {
                if v.kind() == kind {
                    Ok(v)
                } else {
                    Err(format!("the driver built for {kind} is {}", v.kind()))
                }
            }),
            None => Err(format!("this daemon runs {} only", self.vmm.kind())),
        };
        others.push((kind, built.clone()));
        built
    }

    fn slot(&self, vm_id: &str) -> Result<Arc<VmSlot>, EngineError> {
        crate::ids::validate_id("vm_id", vm_id)?;
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm_id)
            .cloned()
            .ok_or_else(|| EngineError::not_found("vm_id", format!("vm {vm_id} not found")))
    }

    /// One VM.
    pub fn get(&self, vm_id: &str) -> Result<VmInfo, EngineError> {
        Ok(self.slot(vm_id)?.info())
    }

    /// Every VM, sorted by id.
    pub fn list(&self) -> Vec<VmInfo> {
        self.slots().iter().map(|s| s.info()).collect()
    }

    /// Every VM, sorted by id, as the JSON of a `VmList`, without re-serialising.
    pub fn list_json(&self) -> String {
        let parts: Vec<Arc<str>> = self.slots().iter().map(|s| s.json()).collect();
        vm_list_json(&parts)
    }

    /// Number of tracked VMs.
    pub fn len(&self) -> usize {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no VM is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the VM's record (`vm.json`): one consistent copy of its runtime
    /// state. Writers hold the VM's operation lock, so records land in order.
    fn write_record(&self, slot: &VmSlot) -> Result<(), EngineError> {
        let record = slot.record();
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialise");
        let path = Path::new(&record.vm.session_dir).join(RECORD_FILE);
        self.host.files.write_atomic(&path, &bytes)?;
        Ok(())
    }

    /// Moves a VM to `to` through the transition table; settled states are
    /// persisted before this returns.
    fn set_state(&self, slot: &VmSlot, to: VmState) -> Result<VmInfo, EngineError> {
        let info = slot.update(|info| {
            info.state = transition(&info.vm_id, info.state, to)?;
            info.updated_at = Utc::now();
            Ok::<(), EngineError>(())
        })?;
        if is_settled(to) {
            self.write_record(slot)?;
        }
        Ok(info)
    }

    /// Records how the VMM ended, frees what it held and settles the VM in
    /// `stopped` or `failed`.
    async fn settle_exit(&self, slot: &VmSlot, exit: VmmExit, requested: Option<&str>) -> VmInfo {
        let console = slot.with_info(|info| PathBuf::from(&info.console_log));
        let panic = find_panic(&self.host.files.read_tail(&console, 64 * 1024));
        let oom = match requested {
            None => self.oom_cause(slot, &exit),
            Some(_) => None,
        };
        let (to, cause) = match (panic, requested) {
            _ if oom.is_some() => (VmState::Failed, oom.unwrap_or_default()),
            (Some(p), _) => (VmState::Failed, format!("guest kernel panic: {p}")),
            (None, Some(why)) => (VmState::Stopped, format!("{why} (vmm {exit})")),
            (None, None) if exit.success() => (
                VmState::Stopped,
                "the guest powered off or rebooted (vmm exited with status 0)".to_string(),
            ),
            (None, None) => (VmState::Failed, format!("vmm {exit} unexpectedly")),
        };
        slot.set_instance(None);
        slot.set_process(None);
        if let Some(a) = slot.agent() {
            a.shutdown();
        }
        slot.set_agent(None);
        slot.ready.send_replace(false);
        self.release_network(slot).await;
        let vm_id = slot.with_info(|i| i.vm_id.clone());
        if let Ok(mem) = self.memory_file(&vm_id) {
            let _ = self.host.files.remove_file(&mem);
        }
        // The cgroup goes with its VMM (a reset makes it again); a removal
        // that fails is retried by delete.
        if let Err(e) = self.remove_cgroup(&vm_id).await {
            tracing::warn!("{e}");
        }
        let info = slot.update(|info| {
            let _ = self.host.files.remove_file(Path::new(&info.api_socket));
            match transition(&info.vm_id, info.state, to) {
                Ok(s) => info.state = s,
                Err(e) => {
                    tracing::error!("{e}; forcing {to}");
                    info.state = to;
                }
            }
            info.pid = None;
            info.ready = false;
            info.limits = None;
            info.updated_at = Utc::now();
            info.exit = Some(ExitInfo {
                exit_code: exit.code,
                signal: exit.signal,
                cause,
                at: Utc::now(),
            });
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(info) = info;
        if let Err(e) = self.write_record(slot) {
            tracing::warn!("vm {}: {e}", info.vm_id);
        }
        tracing::info!(
            vm_id = %info.vm_id,
            "vm is {}: {}",
            info.state,
            info.exit.as_ref().map(|e| e.cause.as_str()).unwrap_or("")
        );
        info
    }

    /// Watches a VMM and settles its VM when it exits on its own.
    fn spawn_exit_monitor(self: &Arc<Self>, vm_id: String, inst: Arc<dyn VmmInstance>) {
        let engine = Arc::downgrade(self);
        let rx = inst.exit_watch();
        tokio::spawn(async move {
            let Some(exit) = crate::backend::wait_exit(rx, Duration::MAX).await else {
                return;
            };
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let Ok(slot) = engine.slot(&vm_id) else {
                return;
            };
            let _op = slot.op.lock().await;
            // An operation that expected the exit (shutdown, delete) has settled
            // the VM already; only act when this VMM is still the VM's VMM.
            let current = slot.instance();
            if current.is_some_and(|c| Arc::ptr_eq(&c, &inst)) && slot.state().has_vmm() {
                engine.settle_exit(&slot, exit, None).await;
            }
        });
    }

    /// Tears down a VM's TAP and rules, if it holds a lease.
    async fn release_network(&self, slot: &VmSlot) {
        if let (Some((net, _)), Some(lease)) = (&self.net, slot.take_lease()) {
            if let Err(e) = net.teardown(&lease).await {
                tracing::error!("{}: network teardown: {e}", lease.tap_name);
            }
        }
    }

    /// Stops the daemon's VMs as `on_shutdown` says. Called on a clean daemon stop.
    pub async fn shutdown_all(self: &Arc<Self>) {
        self.stop_vms().await;
        if let Some(cg) = &self.host.cgroups {
            cg.remove_parent();
        }
    }

    async fn stop_vms(self: &Arc<Self>) {
        if self.cfg.on_shutdown == crate::config::OnShutdown::Leave {
            return;
        }
        // Creates in flight finish (or roll back) first: they run in their own
        // tasks and hold their VM's operation lock until then.
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.cfg.startup_timeout_ms.saturating_mul(2));
        while self.slots().iter().any(|s| s.state() == VmState::Creating)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ids: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| v.state.has_vmm())
            .map(|v| v.vm_id)
            .collect();
        let mut tasks = Vec::new();
        for id in ids {
            let engine = self.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = engine.shutdown(&id).await {
                    tracing::warn!("vm {id}: shutdown at daemon stop: {e}");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The JSON of a `VmList` from the rendered JSON of each VM.
fn vm_list_json(parts: &[Arc<str>]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 12);
    out.push_str("{\"vms\":[");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(p);
    }
    out.push_str("]}");
    out
}

fn render(info: &VmInfo) -> Arc<str> {
    serde_json::to_string(info)
        .expect("vm info serialises")
        .into()
}

/// States that are written to disk when entered. Other in-between states live
/// in memory only: a crash in the middle of a pause, resume or shutdown is
/// reconciled from the VMM itself. (`snapshotting` is written by the snapshot
/// itself, together with what a restart must finish.)
fn is_settled(s: VmState) -> bool {
    matches!(
        s,
        VmState::Creating
            | VmState::Running
            | VmState::Paused
            | VmState::Stopped
            | VmState::Failed
            | VmState::Deleting
    )
}

/// The message of the last kernel panic in a console excerpt.
pub fn find_panic(console: &str) -> Option<String> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains("Kernel panic - not syncing"))?;
    let msg = line
        .split_once("Kernel panic - not syncing:")
        .map(|(_, m)| m.trim())
        .unwrap_or(line.trim());
    Some(msg.trim_end_matches(" ]---").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_are_found_in_console_output() {
        let log = "[    0.5] foo\n[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n[    1.3] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---\n";
        assert_eq!(
            find_panic(log).unwrap(),
            "VFS: Unable to mount root fs on unknown-block(0,0)"
        );
        assert_eq!(find_panic("all fine\n"), None);
    }

    #[test]
    fn every_settled_state_is_persisted() {
        assert!(is_settled(VmState::Running));
        assert!(is_settled(VmState::Stopped));
        assert!(!is_settled(VmState::Pausing));
        assert!(!is_settled(VmState::Stopping));
    }
}
