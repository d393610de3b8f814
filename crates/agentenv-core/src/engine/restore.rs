//! Startup reconciliation: the VM records on disk against what is alive.
//!
//! VMMs outlive the daemon. At startup each record is settled:
//! - `creating` / `deleting` (a crash mid-operation): the create is rolled back,
//!   the delete completed;
//! - `running` / `paused` whose VMM is the recorded process (same pid and start
//!   time, command line naming its control socket) and answers on its control
//!   socket: re-adopted, in the state the VMM reports;
//! - `snapshotting` (a crash mid-snapshot): re-adopted as above, and resumed
//!   when the snapshot had paused it; the copy is kept if it was complete;
//! - otherwise: `failed` with the cause, its VMM (if any is left) killed and its
//!   resources freed;
//! - a session directory without a record is a create that never got one:
//!   removed; one whose record cannot be read is moved aside and reported, and
//!   stops nothing else.
//!
//! Then everything with agentenv's naming that no record owns is cleaned and
//! logged: VMM processes mentioning the socket root, sockets in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_api::{ExitInfo, VmInfo, VmState};
use chrono::Utc;

use super::{Engine, SnapshotInProgress, VmRecord, VmSlot, RECORD_FILE, VM_RECORD_SCHEMA};
use crate::backend::{AdoptSpec, AdoptedState, VmmInstance};
use crate::ids::checked_join;

/// Where unreadable session directories are moved, under `session_root`.
pub const QUARANTINE_DIR: &str = ".quarantine";

/// Why a recorded VMM was not re-adopted.
enum NotAdopted {
    /// This daemon cannot build the driver of its backend: the VMM is left
    /// running, untouched.
    NoDriver(String),
    /// It is gone, or not the recorded process, or does not answer.
    Failed(String),
}

/// What became of one session directory.
enum Outcome {
    /// A VM to track, with its VMM when it was re-adopted.
    Track(Arc<VmSlot>, Option<Arc<dyn VmmInstance>>),
    /// Nothing to track.
    Skip,
}

impl Engine {
    /// Reconciles every session directory with what is alive, then cleans what
    /// no record owns. Never fails: a bad record is reported and skipped.
    pub(super) async fn restore(self: &Arc<Self>) {
        let root = self.cfg.session_root.clone();
        let names = match self.host.files.list_dir(&root) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("cannot list session_root: {e}");
                return;
            }
        };
        let mut adopted = Vec::new();
        for name in names {
            if name.starts_with('.') {
                continue;
            }
            match self.restore_one(&root, &name).await {
                Outcome::Track(slot, inst) => {
                    if let Some(inst) = inst {
                        adopted.push((name.clone(), inst));
                    }
                    self.vms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, slot);
                }
                Outcome::Skip => {}
            }
        }
        for (vm_id, inst) in adopted {
            self.spawn_exit_monitor(vm_id.clone(), inst.clone());
            self.spawn_agent_watch(vm_id, inst);
        }
        for slot in self.slots() {
            if slot.state() == VmState::Resetting {
                self.finish_reset(&slot).await;
            }
        }
        self.clean_orphans();
        self.clean_orphan_cgroups().await;
        self.clean_memory_files();
        for snap in self.snapshots.list() {
            if snap.full.as_ref().is_some_and(|f| f.ephemeral) {
                self.drop_ephemeral(&snap.snapshot_id).await;
            }
        }
    }

    /// Finishes a reset a crash cut short: the VM goes back to its snapshot
    /// now, or ends `failed` with the cause.
    async fn finish_reset(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let vm_id = slot.with_info(|i| i.vm_id.clone());
        let snapshot_id = slot.rt().reset.clone().unwrap_or_default();
        let done = async {
            let (_, full, base) = self.restorable("snapshot_id", &snapshot_id).await?;
            self.reset_in_place(slot, &snapshot_id, &full, base).await
        }
        .await;
        slot.set_reset(None);
        match done {
            Ok(inst) => {
                if let Err(e) = self.set_state(slot, VmState::Running) {
                    tracing::error!("vm {vm_id}: {e}");
                }
                tracing::warn!(
                    "vm {vm_id}: finished a reset to {snapshot_id} that a restart interrupted"
                );
                self.spawn_exit_monitor(vm_id.clone(), inst.clone());
                self.spawn_agent_watch(vm_id, inst);
            }
            Err(e) => {
                let _ = slot.take_lease();
                let _ = slot.update(|i| {
                    i.state = VmState::Failed;
                    i.pid = None;
                    i.exit = Some(ExitInfo {
                        exit_code: None,
                        signal: None,
                        cause: format!(
                            "agentenv restarted during a reset to {snapshot_id}, which could not be finished: {e}"
                        ),
                        at: Utc::now(),
                    });
                    Ok::<(), std::convert::Infallible>(())
                });
                if let Err(e) = self.write_record(slot) {
                    tracing::warn!("vm {vm_id}: {e}");
                }
                tracing::error!("vm {vm_id}: an interrupted reset could not be finished: {e}");
            }
        }
    }

    /// Removes guest RAM files no VM with a VMM owns (left by a crash).
    fn clean_memory_files(&self) {
        let dir = self.cfg.guest_memory_dir();
        let Ok(names) = self.host.files.list_dir(&dir) else {
            return;
        };
        for name in names {
            let Some(vm_id) = name.strip_suffix(".mem") else {
                continue;
            };
            let owned = self.slot(vm_id).is_ok_and(|s| {
                (s.state().has_vmm() || s.process().is_some())
                    && s.with_info(|i| i.restored_from.is_none())
            });
            if !owned {
                let path = dir.join(&name);
                match self.host.files.remove_file(&path) {
                    Ok(()) => tracing::warn!(
                        "removed guest memory file {} that no vm owns",
                        path.display()
                    ),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
    }

    async fn restore_one(&self, root: &Path, name: &str) -> Outcome {
        let Ok(dir) = checked_join(root, "vm_id", name) else {
            tracing::warn!("session_root holds {name:?}, which is no vm id; left alone");
            return Outcome::Skip;
        };
        let path = dir.join(RECORD_FILE);
        let bytes = match self.host.files.read(&path) {
            Ok(b) => b,
            Err(_) if self.host.files.inspect(&path).is_err() => {
                // A create that crashed before writing its record: nothing
                // refers to this directory.
                match self.host.files.remove_dir_all(&dir) {
                    Ok(()) => tracing::warn!("removed session {name}: it has no vm record"),
                    Err(e) => tracing::error!("session {name} has no vm record: {e}"),
                }
                return Outcome::Skip;
            }
            Err(e) => {
                self.quarantine(&dir, name, &e.to_string());
                return Outcome::Skip;
            }
        };
        let record: VmRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.quarantine(&dir, name, &format!("cannot parse {}: {e}", path.display()));
                return Outcome::Skip;
            }
        };
        if record.schema_version != VM_RECORD_SCHEMA {
            tracing::error!(
                "session {name}: record schema {} is not {VM_RECORD_SCHEMA}; left alone",
                record.schema_version
            );
            return Outcome::Skip;
        }
        if record.vm.vm_id != name {
            tracing::error!(
                "session {name}: its record names vm {}; left alone",
                record.vm.vm_id
            );
            return Outcome::Skip;
        }
        let mut info = record.vm.clone();
        let socket = PathBuf::from(&info.api_socket);
        // Readiness is a live connection, never carried over.
        info.ready = false;
        // `deny_private` is the daemon's, applied to every VM as of this start.
        if let (Some(e), Some((_, plan))) = (info.egress.as_mut(), &self.net) {
            e.deny_private = plan.deny_private();
        }

        if matches!(info.state, VmState::Creating | VmState::Deleting) {
            // A create or a delete cut short by a crash is finished now: the
            // create is rolled back, the delete completed.
            self.kill_stale(&info, &record, &socket);
            let _ = self.host.files.remove_file(&socket);
            if let Err(e) = self.remove_cgroup(name).await {
                tracing::error!("vm {name}: {e}");
            }
            match self.host.files.remove_dir_all(&dir) {
                Ok(()) => tracing::warn!(
                    "vm {name}: finished an interrupted {} (session removed)",
                    if info.state == VmState::Creating {
                        "create"
                    } else {
                        "delete"
                    }
                ),
                Err(e) => tracing::error!("vm {name}: {e}"),
            }
            return Outcome::Skip;
        }

        let slot = VmSlot::new(
            info.clone(),
            record.net.clone(),
            record.agent_socket.clone(),
        );
        if !info.state.has_vmm() {
            return Outcome::Track(slot, None);
        }
        if info.state == VmState::Resetting {
            // Whatever VMM the reset left goes; the reset is finished once
            // every record is loaded (`finish_reset`).
            self.kill_stale(&info, &record, &socket);
            let _ = self.host.files.remove_file(&socket);
            if let Some(a) = &record.agent_socket {
                let _ = self.host.files.remove_file(a);
            }
            slot.set_reset(Some(record.reset.clone().unwrap_or_default()));
            return Outcome::Track(slot, None);
        }
        match self.adopt(&info, &record).await {
            Ok((inst, state)) => {
                slot.set_process(inst.identity());
                slot.set_instance(Some(inst.clone()));
                // Its VMM stays in the cgroup it joined (or is put there, if
                // an earlier daemon ran without cgroups); the limits are
                // written again (the configuration may have changed).
                if let Err(e) = self.place_in_cgroup(&slot, info.vcpus, info.memory_mib, inst.pid())
                {
                    tracing::warn!("vm {name}: {e}");
                }
                let mut to = match state {
                    AdoptedState::Running => VmState::Running,
                    AdoptedState::Paused => VmState::Paused,
                };
                if info.state == VmState::Snapshotting {
                    to = self
                        .finish_snapshot(name, record.snapshot.as_ref(), &*inst, to)
                        .await;
                }
                let info = slot
                    .update(|i| {
                        if i.state != to && i.state != VmState::Snapshotting {
                            tracing::warn!(
                                "vm {name}: recorded {} but its vmm reports {to}; keeping {to}",
                                i.state
                            );
                        }
                        i.state = to;
                        i.pid = inst.pid();
                        i.updated_at = Utc::now();
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .unwrap_or_else(|e| match e {});
                if let Err(e) = self.write_record(&slot) {
                    tracing::warn!("vm {name}: {e}");
                }
                tracing::info!(
                    vm_id = %name,
                    pid = info.pid.unwrap_or(0),
                    "re-adopted the running vmm ({to})"
                );
                Outcome::Track(slot, Some(inst))
            }
            Err(NotAdopted::NoDriver(why)) => {
                self.leave_running(name, &slot, &record, &why);
                Outcome::Track(slot, None)
            }
            Err(NotAdopted::Failed(why)) => {
                if self.kill_stale(&info, &record, &socket) {
                    tracing::warn!("vm {name}: killed its vmm (pid {:?}): {why}", info.pid);
                }
                let _ = self.host.files.remove_file(&socket);
                if let Some(a) = &record.agent_socket {
                    let _ = self.host.files.remove_file(a);
                }
                // Its TAP and rules are reclaimed by the network's init.
                let _ = slot.take_lease();
                let was = info.state;
                // A VMM the OOM killer ended while no daemon ran says so.
                let why = match self.oom_cause(
                    &slot,
                    &crate::backend::VmmExit {
                        code: None,
                        signal: None,
                    },
                ) {
                    Some(oom) => format!("{why}; {oom}"),
                    None => why,
                };
                let Ok(_) = slot.update(|i| {
                    i.exit = Some(ExitInfo {
                        exit_code: None,
                        signal: None,
                        cause: format!("agentenv restarted while the vm was {was}: {why}"),
                        at: Utc::now(),
                    });
                    i.state = VmState::Failed;
                    i.pid = None;
                    i.limits = None;
                    i.updated_at = Utc::now();
                    Ok::<(), std::convert::Infallible>(())
                });
                if let Err(e) = self.write_record(&slot) {
                    tracing::warn!("vm {name}: {e}");
                }
                tracing::warn!("vm {name}: failed: {why}");
                Outcome::Track(slot, None)
            }
        }
    }

    /// Finishes a snapshot that a crash cut short, on its re-adopted VMM: the
    /// VM runs again if the snapshot had paused it. The copy itself was either
    /// complete (and is kept) or partial (and the snapshot store removed it
    /// when it opened). A guest file system the snapshot froze is thawed by
    /// the agent itself: its session ended with the old daemon. Returns the
    /// state the VM is in now.
    async fn finish_snapshot(
        &self,
        name: &str,
        snap: Option<&SnapshotInProgress>,
        inst: &dyn VmmInstance,
        now: VmState,
    ) -> VmState {
        let Some(snap) = snap else {
            tracing::warn!("vm {name}: recorded as snapshotting without its snapshot; left {now}");
            return now;
        };
        let copy = if self.snapshots.get(&snap.snapshot_id).is_ok() {
            "complete, kept"
        } else {
            "partial, removed"
        };
        let mut to = now;
        if snap.resume && now == VmState::Paused {
            match inst.resume().await {
                Ok(()) => to = VmState::Running,
                Err(e) => tracing::error!("vm {name}: cannot resume it after its snapshot: {e}"),
            }
        }
        tracing::warn!(
            "vm {name}: finished snapshot {} that a restart interrupted (copy {copy}); the vm is {to}",
            snap.snapshot_id
        );
        to
    }

    /// Re-adopts a record's VMM with the driver of the record's own backend,
    /// or says why it cannot be.
    async fn adopt(
        &self,
        info: &VmInfo,
        record: &VmRecord,
    ) -> Result<(Arc<dyn VmmInstance>, AdoptedState), NotAdopted> {
        let vmm = self.vmm_for(info.backend).map_err(NotAdopted::NoDriver)?;
        let Some(process) = record.vmm_process else {
            return Err(NotAdopted::Failed(
                "its record names no vmm process (written by an older agentenv)".into(),
            ));
        };
        let spec = AdoptSpec {
            vm_id: info.vm_id.clone(),
            process,
            control_socket: PathBuf::from(&info.api_socket),
            agent_socket: record.agent_socket.clone(),
            console_log: PathBuf::from(&info.console_log),
            console_log_max_bytes: self.cfg.console_log_max_bytes,
            request_timeout: std::time::Duration::from_millis(self.cfg.request_timeout_ms),
        };
        match vmm.adopt(&spec).await {
            Ok((inst, state)) => Ok((Arc::from(inst), state)),
            Err(e) => Err(NotAdopted::Failed(format!(
                "its vmm (pid {}) could not be re-adopted: {e}",
                process.pid
            ))),
        }
    }

    /// A VM whose backend this daemon has no driver for: its VMM is left
    /// running, untouched (never killed: a later daemon that has the driver
    /// re-adopts it, since its record on disk is not rewritten). It is shown
    /// as `failed` with the cause; its process, sockets and network lease stay
    /// owned, so no cleanup touches them; a delete kills it by its recorded
    /// identity.
    fn leave_running(&self, name: &str, slot: &Arc<VmSlot>, record: &VmRecord, why: &str) {
        slot.set_process(record.vmm_process);
        let was = record.vm.state;
        let backend = record.vm.backend;
        let pid = record.vm.pid.map_or("?".to_string(), |p| p.to_string());
        let _ = slot.update(|i| {
            i.exit = Some(ExitInfo {
                exit_code: None,
                signal: None,
                cause: format!(
                    "not managed: its {backend} vmm (pid {pid}) was left {was} because this daemon cannot drive {backend} ({why}); \
                     start agentenv where {backend} is available to re-adopt it, or delete the vm to kill it"
                ),
                at: Utc::now(),
            });
            i.state = VmState::Failed;
            Ok::<(), std::convert::Infallible>(())
        });
        tracing::error!(
            "vm {name}: left its {backend} vmm (pid {pid}) running, not managed: {why}"
        );
    }

    /// Moves an unreadable session aside so it blocks nothing, and says so.
    fn quarantine(&self, dir: &Path, name: &str, why: &str) {
        let qdir = self.cfg.session_root.join(QUARANTINE_DIR);
        let to = qdir.join(format!(
            "{name}.{}",
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        let moved = self
            .host
            .files
            .create_dir(&qdir)
            .or_else(|e| match self.host.files.inspect(&qdir) {
                Ok(_) => Ok(()),
                Err(_) => Err(e),
            })
            .and_then(|()| self.host.files.rename(dir, &to));
        match moved {
            Ok(()) => tracing::error!(
                "session {name}: unreadable record ({why}); moved to {} for inspection",
                to.display()
            ),
            Err(e) => tracing::error!("session {name}: unreadable record ({why}); {e}"),
        }
    }

    /// Kills what is left of a record's VMM: the recorded process (same pid
    /// and start time) when the record has it, else the process with the
    /// recorded pid, else any process; each only if its control socket is
    /// exactly the VM's own.
    fn kill_stale(&self, info: &VmInfo, record: &VmRecord, socket: &Path) -> bool {
        match record.vmm_process {
            Some(id) if info.pid.is_none_or(|p| p == id.pid) => {
                self.host.processes.kill_recorded_process(id, socket)
            }
            _ => self.host.processes.kill_stale_process(info.pid, socket),
        }
    }

    /// Kills VMM processes and removes sockets under `socket_root` that no
    /// tracked VM owns (left by a crash between spawn and record, or by hand).
    /// A VMM is a process whose control socket (a whole argument of its
    /// `--api-sock` / `-qmp` option) lies in `socket_root`: a process that
    /// only mentions a path there (an operator's `socat`) is left alone.
    fn clean_orphans(&self) {
        let slots = self.slots();
        let owned_pids: Vec<u32> = slots
            .iter()
            .filter_map(|s| s.process().map(|p| p.pid))
            .collect();
        let owned_sockets: Vec<PathBuf> = slots
            .iter()
            .map(|s| PathBuf::from(&s.info().api_socket))
            .collect();
        let root = &self.cfg.socket_root;
        for (pid, socket) in self.host.processes.vmm_processes_in(root) {
            if owned_pids.contains(&pid) || owned_sockets.contains(&socket) {
                continue;
            }
            if self.host.processes.kill_stale_process(Some(pid), &socket) {
                tracing::warn!(
                    "killed orphan vmm {pid}: its control socket {} is in socket_root but no vm owns it",
                    socket.display()
                );
            }
        }
        for name in self.host.files.list_dir(root).unwrap_or_default() {
            let Ok(path) = checked_join(root, "socket", &name) else {
                continue;
            };
            if owned_sockets.contains(&path) {
                continue;
            }
            let is_socket = self
                .host
                .files
                .inspect(&path)
                .is_ok_and(|i| i.kind == crate::host::FileKind::Special);
            if is_socket && self.host.files.remove_file(&path).is_ok() {
                tracing::warn!("removed orphan socket {}", path.display());
            }
        }
    }
}
