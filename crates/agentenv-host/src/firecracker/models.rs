//! Firecracker's API objects, typed once: the driver builds its request
//! bodies from them and the Firecracker double (`agentenv-testkit`) parses
//! requests with them.
//!
//! They follow Firecracker's swagger description (`firecracker.yaml`) of
//! v1.13.1, plus the v1.16 additions the next issue needs:
//!
//! | object | v1.13.1 | v1.16.x |
//! |---|---|---|
//! | `SnapshotLoadParams` | `network_overrides` | adds `vsock_override`, `clock_realtime` |
//! | `NetworkInterface` | | adds `mtu` (not modelled: never sent) |
//! | new endpoints | | pmem, serial, memory hotplug, balloon hinting (not modelled) |
//!
//! Field order, types and the refusal of unknown fields follow Firecracker's
//! own Rust definitions: serde's "unknown field …, expected one of …" lists
//! the fields in declaration order, so a parser built on these types words
//! its errors as Firecracker does. Optional fields are `Option`s (or
//! defaulted) and are left out when serialised unset, so a body carries only
//! what its builder set.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------- limiters

/// One token bucket of a rate limiter (unknown fields are accepted, as in
/// Firecracker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// An I/O rate limiter (`RateLimiter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

// ----------------------------------------------------------------- actions

/// `InstanceActionInfo.action_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// The body of `PUT /actions` (`InstanceActionInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

// ----------------------------------------------------------- machine config

/// The static CPU templates of Firecracker on x86_64 (deprecated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    None,
    T2CL,
    T2A,
}

/// Backing pages of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// The body of `PUT /machine-config` (`MachineConfiguration`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl Default for MachineConfiguration {
    /// Firecracker's configuration before any `PUT /machine-config`.
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: None,
        }
    }
}

// ------------------------------------------------------------- boot source

/// The body of `PUT /boot-source` (`BootSource`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

// ------------------------------------------------------------------ drives

/// `Drive.cache_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    Async,
    #[default]
    Sync,
}

/// The body of `PUT /drives/{drive_id}` (`Drive`): a virtio-block drive
/// (`path_on_host`) or a vhost-user one (`socket`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Drive {
    /// A virtio-block drive backed by the file at `path`.
    pub fn file(id: &str, path: PathBuf, is_root: bool, read_only: bool) -> Drive {
        Drive {
            drive_id: id.to_string(),
            partuuid: None,
            is_root_device: is_root,
            cache_type: None,
            is_read_only: Some(read_only),
            path_on_host: Some(path),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }
}

// ------------------------------------------------------ network interfaces

/// The body of `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
/// `guest_mac` is `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

// ------------------------------------------------------------------- vsock

/// The body of `PUT /vsock` (`Vsock`). `vsock_id` is deprecated since
/// Firecracker 1.4.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

// ---------------------------------------------------------------------- vm

/// `Vm.state`: the state a `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// The body of `PATCH /vm` (`Vm`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmState,
}

/// `InstanceInfo.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// What `GET /` answers (`InstanceInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// What `GET /version` answers (`FirecrackerVersion`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// The body of every 4xx/5xx answer (`Error`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ApiError {
    pub fault_message: String,
}

// --------------------------------------------------------- the config file

/// A whole VM configuration: Firecracker's `--config-file` form and the
/// answer of `GET /vm/config` (`FullVmConfiguration`), for the resources
/// modelled here. The driver writes it as `firecracker.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FullVmConfiguration {
    pub boot_source: BootSource,
    #[serde(default)]
    pub drives: Vec<Drive>,
    pub machine_config: MachineConfiguration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_interfaces: Option<Vec<NetworkInterface>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
}

impl FullVmConfiguration {
    /// The pre-boot API calls that set up this configuration, in
    /// Firecracker's documented order: `(path, body)`.
    pub fn api_calls(&self) -> Vec<(String, serde_json::Value)> {
        fn body<T: Serialize>(value: &T) -> serde_json::Value {
            serde_json::to_value(value).expect("api objects serialise")
        }
        let mut calls = vec![
            ("/machine-config".to_string(), body(&self.machine_config)),
            ("/boot-source".to_string(), body(&self.boot_source)),
        ];
        for d in &self.drives {
            calls.push((format!("/drives/{}", d.drive_id), body(d)));
        }
        for n in self.network_interfaces.iter().flatten() {
            calls.push((format!("/network-interfaces/{}", n.iface_id), body(n)));
        }
        if let Some(v) = &self.vsock {
            calls.push(("/vsock".to_string(), body(v)));
        }
        calls
    }
}

// --------------------------------------------------------------- snapshots

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SnapshotType {
    Diff,
    #[default]
    Full,
}

/// The body of `PUT /snapshot/create` (`SnapshotCreateParams`); only on a
/// paused VM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

/// `MemoryBackend.backend_type`: a file mapped privately, or a userfaultfd
/// handler listening on a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// `SnapshotLoadParams.mem_backend` (`MemoryBackend`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_path: PathBuf,
    pub backend_type: MemBackendType,
}

/// One entry of `SnapshotLoadParams.network_overrides` (`NetworkOverride`,
/// v1.13+): the TAP device a restored interface uses instead of the saved
/// one. Unknown fields are accepted, as in Firecracker.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `SnapshotLoadParams.vsock_override` (`VsockOverride`, v1.16 only): the
/// Unix socket a restored vsock device binds instead of the saved one.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// The body of `PUT /snapshot/load` (`SnapshotLoadParams`); only in a fresh
/// process, before any configuration. Exactly one of `mem_backend` and the
/// deprecated `mem_file_path` must be given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    /// Deprecated: use `mem_backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated: use `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_diff_snapshots: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// v1.16 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// v1.16 only (x86_64): advance kvmclock by the wall-clock time since
    /// the snapshot.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clock_realtime: bool,
}

/// The fields of `SnapshotLoadParams` in v1.13.1, in Firecracker's order
/// (for a v1.13 parser's "unknown field" message).
pub const SNAPSHOT_LOAD_FIELDS_V1_13: &[&str] = &[
    "snapshot_path",
    "mem_file_path",
    "mem_backend",
    "enable_diff_snapshots",
    "track_dirty_pages",
    "resume_vm",
    "network_overrides",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unset_optional_fields_are_left_out() {
        let load = SnapshotLoadParams {
            snapshot_path: "/s/vm.snap".into(),
            mem_backend: Some(MemBackend {
                backend_path: "/s/vm.mem".into(),
                backend_type: MemBackendType::File,
            }),
            resume_vm: true,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/s/vm.snap", "resume_vm": true,
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/vm.mem"}})
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "id": "a", "state": "Not started", "vmm_version": "1.13.1", "app_name": "Firecracker"
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
    }

    #[test]
    fn unknown_fields_are_refused_in_declaration_order() {
        let err = serde_json::from_value::<MachineConfiguration>(
            json!({"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, \
                 `cpu_template`, `track_dirty_pages`, `huge_pages`"
            ),
            "{err}"
        );
        let err = serde_json::from_value::<SnapshotLoadParams>(
            json!({"snapshot_path": "/s", "bogus": 1}),
        )
        .unwrap_err()
        .to_string();
        let v1_13: Vec<String> = SNAPSHOT_LOAD_FIELDS_V1_13
            .iter()
            .map(|f| format!("`{f}`"))
            .collect();
        assert!(err.contains(&v1_13.join(", ")), "{err}");
    }
}
