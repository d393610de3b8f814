//! `GET /sandboxes/{id}/metrics`: one sample of the VM's figures, read on
//! the host (never from the guest, which a hostile guest could fake):
//!
//! - `cpuCount`: the VM's vCPUs.
//! - `cpuUsedPct`: CPU time the VMM's cgroup used over a 100 ms window,
//!   as a percentage of `cpuCount` whole cores (vCPU threads plus the VMM's
//!   own I/O threads; capped at 100). 0 without a cgroup.
//! - `memUsed`: the VMM cgroup's memory (`memory.current`, v1
//!   `memory.usage_in_bytes`): guest memory the guest has touched plus the
//!   VMM's own, so it may exceed `memTotal` by the VMM's overhead. 0
//!   without a cgroup.
//! - `memTotal`: the guest's memory size.
//! - `memCache`: page cache charged to that cgroup (`memory.stat` `file`,
//!   v1 `total_cache`).
//! - `diskUsed`: bytes allocated on the host for the VM's writable disk
//!   (its overlay: what the sandbox wrote; a sparse file's holes cost
//!   nothing).
//! - `diskTotal`: that disk's size.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_api::VmInfo;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{now_ms, rfc3339, visible, Caller};
use crate::server::e2b::error::E2bError;
use crate::server::e2b::E2bState;

/// The CPU sampling window.
const WINDOW: Duration = Duration::from_millis(100);

/// `GET /sandboxes/{id}/metrics` (`start`/`end` are accepted and ignored:
/// the answer is one sample, now): 200 `[SandboxMetric]`.
pub(super) async fn get(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<Value>>, E2bError> {
    let (_, vm) = visible(&state, &who, &id)?;
    Ok(Json(vec![sample(&vm).await]))
}

/// One sample of `vm`'s figures.
async fn sample(vm: &VmInfo) -> Value {
    let dirs: Vec<PathBuf> = vm
        .limits
        .iter()
        .flat_map(|l| l.cgroup_paths.iter().map(PathBuf::from))
        .collect();
    let cpu_before = cpu_usage_us(&dirs);
    tokio::time::sleep(WINDOW).await;
    let cpu_after = cpu_usage_us(&dirs);
    let vcpus = u64::from(vm.vcpus.max(1));
    let cpu_pct = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => {
            let used = b.saturating_sub(a) as f64;
            (used / (WINDOW.as_micros() as f64 * vcpus as f64) * 100.0).min(100.0)
        }
        _ => 0.0,
    };
    let mem_used = first_number(&dirs, &["memory.current", "memory.usage_in_bytes"]).unwrap_or(0);
    let mem_cache = stat_field(&dirs, &["file", "total_cache"]).unwrap_or(0);
    let (disk_used, disk_size) = disk(FsPath::new(&vm.disk.writable_path));
    let now = now_ms();
    json!({
        "timestamp": rfc3339(now),
        "timestampUnix": now / 1000,
        "cpuCount": vm.vcpus,
        "cpuUsedPct": (cpu_pct * 100.0).round() / 100.0,
        "memUsed": mem_used,
        "memTotal": vm.memory_mib << 20,
        "memCache": mem_cache,
        "diskUsed": disk_used,
        "diskTotal": disk_size.max(vm.disk.size_bytes),
    })
}

/// CPU time the cgroup used, in µs (v2 `cpu.stat` `usage_usec`, v1
/// `cpuacct.usage` in ns).
fn cpu_usage_us(dirs: &[PathBuf]) -> Option<u64> {
    for d in dirs {
        if let Some(v) = stat_in(&d.join("cpu.stat"), "usage_usec") {
            return Some(v);
        }
        if let Some(ns) = number_in(&d.join("cpuacct.usage")) {
            return Some(ns / 1000);
        }
    }
    None
}

/// The first of `files` that holds a number, in any of `dirs`.
fn first_number(dirs: &[PathBuf], files: &[&str]) -> Option<u64> {
    dirs.iter()
        .flat_map(|d| files.iter().map(move |f| d.join(f)))
        .find_map(|p| number_in(&p))
}

/// A field of `memory.stat`, the first of `keys` found.
fn stat_field(dirs: &[PathBuf], keys: &[&str]) -> Option<u64> {
    dirs.iter()
        .flat_map(|d| keys.iter().map(move |k| (d.join("memory.stat"), *k)))
        .find_map(|(p, k)| stat_in(&p, k))
}

fn number_in(path: &FsPath) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn stat_in(path: &FsPath, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Bytes allocated for `path` and its size (0s when it cannot be read).
fn disk(path: &FsPath) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => (m.blocks() * 512, m.len()),
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "anon 10\nfile 20\n").unwrap();
        let dirs = vec![dir.clone()];
        assert_eq!(cpu_usage_us(&dirs), Some(1500));
        assert_eq!(
            first_number(&dirs, &["memory.current", "memory.usage_in_bytes"]),
            Some(4096)
        );
        assert_eq!(stat_field(&dirs, &["file", "total_cache"]), Some(20));
        assert_eq!(cpu_usage_us(&[dir.join("absent")]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("e2b-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
