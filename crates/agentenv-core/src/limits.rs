//! Resource limits per VM: what a VM's VMM may use (computed here, a pure
//! function of the configuration and the VM's size) and the seam that puts
//! its VMM in a cgroup holding them ([`HostCgroups`], implemented by
//! `agentenv_host::cgroup::Cgroups`).

use std::path::PathBuf;

use agentenv_api::VmLimitsInfo;

use crate::config::CgroupConfig;
use crate::host::HostError;

/// What one VM's VMM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// CPU time per period, in microseconds.
    pub cpu_quota_us: u64,
    /// The CPU accounting period, in microseconds.
    pub cpu_period_us: u64,
    /// Memory, guest memory included, in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids_max: u64,
    /// I/O weight, 1 to 10000.
    pub io_weight: u32,
}

impl VmLimits {
    /// The limits of a VM with `vcpus` vCPUs and `memory_mib` MiB of guest
    /// memory: CPU = its vCPUs (times `cpu_per_vcpu`) plus the VMM's
    /// allowance; memory = guest memory + the VMM's overhead (a fixed part and
    /// a percentage of the guest's memory).
    pub fn compute(cfg: &CgroupConfig, vcpus: u32, memory_mib: u64) -> VmLimits {
        let cores = f64::from(vcpus) * cfg.cpu_per_vcpu + cfg.vmm_cpu_allowance;
        let cpu_quota_us = ((cores * cfg.cpu_period_us as f64).round() as u64).max(1000);
        let overhead_mib = cfg.vmm_memory_overhead_mib
            + memory_mib.saturating_mul(cfg.vmm_memory_overhead_percent) / 100;
        VmLimits {
            cpu_quota_us,
            cpu_period_us: cfg.cpu_period_us,
            memory_bytes: memory_mib
                .saturating_add(overhead_mib)
                .saturating_mul(1 << 20),
            pids_max: cfg.pids_max,
            io_weight: cfg.io_weight,
        }
    }
}

/// A VM's cgroup, made and holding its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlacement {
    /// The `cgroup.procs` files the VMM joins before it runs (one per
    /// hierarchy on cgroup v1): `LaunchSpec::cgroup_procs`.
    pub procs: Vec<PathBuf>,
    /// What `GET /v1/vm/{id}` shows.
    pub info: VmLimitsInfo,
}

/// Puts VMMs in cgroups: one per VM, below the daemon's parent cgroup.
pub trait HostCgroups: Send + Sync + 'static {
    /// Makes VM `vm_id`'s cgroup (or takes the one that exists: a restarted
    /// daemon, a reset) and writes `limits` into it. `running`: the VM's VMM
    /// already runs (re-adopted after a restart) and is moved into the
    /// cgroup if it is not there (an earlier daemon ran without cgroups).
    fn prepare(
        &self,
        vm_id: &str,
        limits: &VmLimits,
        running: Option<u32>,
    ) -> Result<CgroupPlacement, HostError>;

    /// Removes VM `vm_id`'s cgroup once its processes are gone (retrying
    /// briefly while the kernel releases it); succeeds when it is already gone.
    fn remove(&self, vm_id: &str) -> Result<(), HostError>;

    /// Whether the kernel's out-of-memory killer killed a process of VM
    /// `vm_id`'s cgroup because it reached the memory limit.
    fn oom_killed(&self, vm_id: &str) -> bool;

    /// The names of the VM cgroups below the parent.
    fn list(&self) -> Vec<String>;

    /// Removes the parent cgroup if no VM cgroup is left below it (a clean
    /// daemon stop that stopped its VMs).
    fn remove_parent(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size_and_the_config() {
        let cfg = CgroupConfig {
            vmm_memory_overhead_mib: 64,
            vmm_memory_overhead_percent: 10,
            ..CgroupConfig::default()
        };
        let l = VmLimits::compute(&cfg, 2, 1024);
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(l.cpu_quota_us, 225_000, "2 vcpus + 0.25 core");
        assert_eq!(l.memory_bytes, (1024 + 64 + 102) << 20);
        assert_eq!(l.pids_max, cfg.pids_max);
        assert_eq!(l.io_weight, 100);

        let frac = CgroupConfig {
            cpu_per_vcpu: 0.5,
            vmm_cpu_allowance: 0.0,
            cpu_period_us: 50_000,
            ..CgroupConfig::default()
        };
        assert_eq!(VmLimits::compute(&frac, 1, 256).cpu_quota_us, 25_000);
        // The kernel refuses a quota under 1 ms.
        let tiny = CgroupConfig {
            cpu_per_vcpu: 0.001,
            vmm_cpu_allowance: 0.0,
            cpu_period_us: 1000,
            ..CgroupConfig::default()
        };
        assert_eq!(VmLimits::compute(&tiny, 1, 256).cpu_quota_us, 1000);
    }
}
