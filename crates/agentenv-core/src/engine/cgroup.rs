//! Each VM's cgroup: made (or taken again) with its limits before its VMM
//! starts, removed with the VM and on every rollback, read when the VMM is
//! killed to tell an out-of-memory kill from other deaths.

use std::path::PathBuf;

use super::{Engine, VmSlot};
use crate::backend::VmmExit;
use crate::error::EngineError;
use crate::limits::VmLimits;

impl Engine {
    /// Makes VM `vm_id`'s cgroup with the limits of a VM of its size (or
    /// takes the one it has: a reset, a restarted daemon), shows them in its
    /// info and returns the `cgroup.procs` files its VMM joins. Empty when
    /// cgroups are off. `running`: the pid of its VMM when it already runs
    /// (re-adopted), which is put in the cgroup if it is not there yet.
    pub(super) fn place_in_cgroup(
        &self,
        slot: &VmSlot,
        vcpus: u32,
        memory_mib: u64,
        running: Option<u32>,
    ) -> Result<Vec<PathBuf>, EngineError> {
        let Some(cg) = &self.host.cgroups else {
            return Ok(Vec::new());
        };
        let vm_id = slot.with_info(|i| i.vm_id.clone());
        let limits = VmLimits::compute(&self.cfg.cgroup, vcpus, memory_mib);
        let placed = cg.prepare(&vm_id, &limits, running).map_err(|e| {
            EngineError::Cgroup(format!("vm {vm_id}: cannot set up its cgroup: {e}"))
        })?;
        let _ = slot.update(|i| {
            i.limits = Some(placed.info);
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(placed.procs)
    }

    /// Removes VM `vm_id`'s cgroup (its VMM must be gone). The removal may
    /// wait briefly for the kernel, so it runs off the async workers.
    pub(super) async fn remove_cgroup(&self, vm_id: &str) -> Result<(), EngineError> {
        let Some(cg) = self.host.cgroups.clone() else {
            return Ok(());
        };
        let id = vm_id.to_string();
        tokio::task::spawn_blocking(move || cg.remove(&id))
            .await
            .map_err(|e| EngineError::Cgroup(format!("vm {vm_id}: {e}")))?
            .map_err(|e| EngineError::Cgroup(format!("vm {vm_id}: {e}")))
    }

    /// Why a VMM that died unasked was killed, when it was the kernel's
    /// out-of-memory killer at the VM's memory limit. A VMM killed by a
    /// signal (or an adopted one, whose status is unknown) is checked.
    pub(super) fn oom_cause(&self, slot: &VmSlot, exit: &VmmExit) -> Option<String> {
        let cg = self.host.cgroups.as_ref()?;
        if exit.code.is_some() {
            return None;
        }
        let (vm_id, limit) = slot.with_info(|i| {
            (
                i.vm_id.clone(),
                i.limits.as_ref().map(|l| l.memory_bytes).unwrap_or(0),
            )
        });
        cg.oom_killed(&vm_id).then(|| {
            format!(
                "the vmm was killed by the kernel's out-of-memory killer: it reached its memory limit of {limit} bytes (vmm {exit})"
            )
        })
    }

    /// Removes the cgroups below the parent that no VM with a VMM owns (left
    /// by a crash, or by a VM whose VMM ended while no daemon ran).
    pub(super) async fn clean_orphan_cgroups(&self) {
        let Some(cg) = &self.host.cgroups else {
            return;
        };
        let owned: Vec<String> = self
            .slots()
            .iter()
            .map(|s| s.info())
            .filter(|i| i.state.has_vmm())
            .map(|i| i.vm_id)
            .collect();
        for name in cg.list() {
            if owned.contains(&name) {
                continue;
            }
            match self.remove_cgroup(&name).await {
                Ok(()) => tracing::warn!("removed orphan cgroup {name}: no vm owns it"),
                Err(e) => tracing::error!("orphan cgroup {name}: {e}"),
            }
        }
    }
}
