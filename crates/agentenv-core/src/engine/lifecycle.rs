//! Pause, resume, shutdown and delete.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::{VmInfo, VmState};

use super::{Engine, VmSlot};
use crate::backend::{wait_exit, VmmError, VmmInstance};
use crate::error::EngineError;
use crate::state::transition;

impl Engine {
    /// Checks that `to` is reachable now, before doing anything.
    pub(super) fn check_transition(&self, slot: &VmSlot, to: VmState) -> Result<(), EngineError> {
        slot.with_info(|info| transition(&info.vm_id, info.state, to))?;
        Ok(())
    }

    pub(super) fn live_instance(&self, slot: &VmSlot) -> Result<Arc<dyn VmmInstance>, EngineError> {
        slot.instance().ok_or_else(|| {
            let state = slot.state();
            EngineError::Conflict {
                message: format!(
                    "vm {} has no running vmm (state {state})",
                    slot.info().vm_id
                ),
                state: Some(state),
            }
        })
    }

    /// Stops a running VM's vCPUs.
    pub async fn pause(self: &Arc<Self>, vm_id: &str) -> Result<VmInfo, EngineError> {
        self.flip(vm_id, true).await
    }

    /// Restarts a paused VM's vCPUs.
    pub async fn resume(self: &Arc<Self>, vm_id: &str) -> Result<VmInfo, EngineError> {
        self.flip(vm_id, false).await
    }

    /// Pause and resume share one shape: in-between state, VMM call, settled state
    /// (or back to where it was on error).
    async fn flip(self: &Arc<Self>, vm_id: &str, pause: bool) -> Result<VmInfo, EngineError> {
        use VmState::*;
        let (during, done, back) = if pause {
            (Pausing, Paused, Running)
        } else {
            (Resuming, Running, Paused)
        };
        let slot = self.slot(vm_id)?;
        let _op = slot.op.lock().await;
        self.check_transition(&slot, during)?;
        let inst = self.live_instance(&slot)?;
        self.set_state(&slot, during)?;
        let res = if pause {
            inst.pause().await
        } else {
            inst.resume().await
        };
        match res {
            Ok(()) => self.set_state(&slot, done),
            Err(source) => {
                // Back to the state the VM was in; if the VMM died meanwhile the exit
                // monitor settles it once we release the operation lock.
                let _ = self.set_state(&slot, back);
                if matches!(source, VmmError::Timeout { .. }) {
                    // A hung VMM may still carry the request out when it wakes up.
                    self.spawn_reconcile(vm_id.to_string(), inst.clone());
                }
                Err(EngineError::Vmm {
                    vm_id: vm_id.to_string(),
                    source,
                })
            }
        }
    }

    /// Asks the guest to power off, waits up to `shutdown_timeout_s`, then kills
    /// the VMM. The record stays, in `stopped`.
    pub async fn shutdown(&self, vm_id: &str) -> Result<VmInfo, EngineError> {
        let slot = self.slot(vm_id)?;
        let _op = slot.op.lock().await;
        self.check_transition(&slot, VmState::Stopping)?;
        let inst = self.live_instance(&slot)?;
        let was = slot.state();
        self.set_state(&slot, VmState::Stopping)?;
        let timeout = Duration::from_secs(self.cfg.shutdown_timeout_s);
        if was == VmState::Paused {
            // A paused guest cannot act on the request.
            if let Err(e) = inst.resume().await {
                tracing::warn!("vm {vm_id}: resume before shutdown: {e}");
            }
        }
        let asked = inst.request_shutdown().await;
        let (exit, why) = match asked {
            // Killed from outside while powering off: not a requested stop.
            Ok(()) => match wait_exit(inst.exit_watch(), timeout).await {
                Some(exit) if exit.signal.is_some() => {
                    return Ok(self.settle_exit(&slot, exit, None).await)
                }
                Some(exit) => (exit, "shut down by request".to_string()),
                None => (
                    self.kill_instance(&inst).await,
                    format!(
                        "killed: the guest did not power off within {} s",
                        timeout.as_secs()
                    ),
                ),
            },
            Err(e) => {
                if let Some(exit) = wait_exit(inst.exit_watch(), Duration::from_millis(200)).await {
                    // The VMM died on its own: that is the story, not the request.
                    return Ok(self.settle_exit(&slot, exit, None).await);
                }
                (
                    self.kill_instance(&inst).await,
                    format!("killed: the shutdown request failed ({e})"),
                )
            }
        };
        Ok(self.settle_exit(&slot, exit, Some(&why)).await)
    }

    /// After a VMM request timed out, reads the guest's state back once the VMM
    /// answers again (a hung VMM may carry out late requests when it wakes, in
    /// any order) and settles the VM in what the VMM says, for a few seconds
    /// more so that every late request has landed. Gives up after ten minutes.
    fn spawn_reconcile(self: &Arc<Self>, vm_id: String, inst: Arc<dyn VmmInstance>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            let mut answered = false;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let Ok(slot) = engine.slot(&vm_id) else {
                    return;
                };
                let _op = slot.op.lock().await;
                if !slot.instance().is_some_and(|c| Arc::ptr_eq(&c, &inst)) {
                    return;
                }
                let truth = match inst.guest_state().await {
                    Ok(crate::backend::AdoptedState::Running) => VmState::Running,
                    Ok(crate::backend::AdoptedState::Paused) => VmState::Paused,
                    Err(VmmError::NotRunning) => return,
                    Err(_) => continue,
                };
                let now = slot.state();
                if matches!(now, VmState::Running | VmState::Paused) && now != truth {
                    tracing::warn!(
                        "vm {vm_id}: the vmm answers again and reports {truth} (recorded {now}); \
                         following the vmm"
                    );
                    let Ok(_) = slot.update(|i| {
                        i.state = truth;
                        i.updated_at = chrono::Utc::now();
                        Ok::<(), std::convert::Infallible>(())
                    });
                    if let Err(e) = engine.write_record(&slot) {
                        tracing::warn!("vm {vm_id}: {e}");
                    }
                }
                if !answered {
                    answered = true;
                    deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                }
            }
        });
    }

    pub(super) async fn kill_instance(
        &self,
        inst: &Arc<dyn VmmInstance>,
    ) -> crate::backend::VmmExit {
        match inst.kill().await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("kill failed: {e}");
                crate::backend::VmmExit {
                    code: None,
                    signal: None,
                }
            }
        }
    }

    /// Kills the VMM if there is one, removes the session directory and forgets the VM.
    pub async fn delete(&self, vm_id: &str) -> Result<(), EngineError> {
        let slot = self.slot(vm_id)?;
        let _op = slot.op.lock().await;
        // Another delete may have finished while this one waited for the lock:
        // the slot is then out of the table, and a create may already have
        // reused the id. Going on would remove that new VM's files and entry.
        if !self.is_current(vm_id, &slot) {
            return Err(EngineError::not_found(
                "vm_id",
                format!("vm {vm_id} not found (it was deleted meanwhile)"),
            ));
        }
        // A delete that failed half-way (a file it could not remove) may be retried.
        let retry = slot.state() == VmState::Deleting;
        if !retry {
            self.check_transition(&slot, VmState::Deleting)?;
        }
        if let Some(inst) = slot.instance() {
            let exit = self.kill_instance(&inst).await;
            self.settle_exit(&slot, exit, Some("killed: the vm was deleted"))
                .await;
        } else if let Some(id) = slot.process() {
            // A VMM left running at startup, not managed (no driver for its
            // backend): the delete kills it by its recorded identity.
            let socket = PathBuf::from(slot.with_info(|i| i.api_socket.clone()));
            if self.host.processes.kill_recorded_process(id, &socket) {
                tracing::warn!("vm {vm_id}: killed its unmanaged vmm (pid {})", id.pid);
            }
            // Its jail directories (empty once it is gone: the jail's mounts
            // lived only in its own mount namespace), which no driver removes.
            let staging = crate::config::Config::jail_socket_staging(&socket, vm_id);
            for dir in [self.cfg.jail_dir().join(vm_id), staging] {
                self.host.files.remove_dir_all(&dir)?;
            }
            slot.set_process(None);
            self.release_network(&slot).await;
        }
        // From here a failure leaves the VM stopped or `deleting`: a retried
        // DELETE (or the next startup) finishes the job.
        self.failpoints.point("delete.vmm_stopped").await?;
        if !retry {
            self.set_state(&slot, VmState::Deleting)?;
        }
        self.failpoints.point("delete.marked").await?;
        let info = slot.info();
        self.host
            .files
            .remove_file(&PathBuf::from(&info.api_socket))?;
        self.failpoints.point("delete.socket_removed").await?;
        self.remove_cgroup(vm_id).await?;
        self.host
            .files
            .remove_dir_all(&PathBuf::from(&info.session_dir))?;
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm_id);
        if let Some(snapshot_id) = &info.restored_from {
            self.drop_ephemeral(snapshot_id).await;
        }
        Ok(())
    }

    /// True while `slot` is the table's entry for `vm_id`.
    fn is_current(&self, vm_id: &str, slot: &Arc<VmSlot>) -> bool {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm_id)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }
}
