//! Request and response bodies of the Firecracker API, as the double parses
//! and prints them.
//!
//! The field names, their order, their types and whether unknown fields are
//! refused follow Firecracker's public API description (its swagger file) and
//! the behaviour of Firecracker v1.13: the order matters because serde's
//! "unknown field …, expected one of …" message lists the fields in
//! declaration order, and the double's error texts should read like the real
//! ones.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One token bucket of a rate limiter (unknown fields are accepted, as in
/// Firecracker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucket {
    /// The bucket as Firecracker reports it back: a bucket with a zero size
    /// or a zero refill time is disabled (reported as absent), and a zero
    /// one-time burst is reported as absent.
    pub fn normalized(self) -> Option<TokenBucket> {
        if self.size == 0 || self.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            one_time_burst: self.one_time_burst.filter(|b| *b != 0),
            ..self
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    pub bandwidth: Option<TokenBucket>,
    pub ops: Option<TokenBucket>,
}

/// A rate limiter as reported back: absent when neither bucket is active.
pub fn normalize_rate_limiter(rl: Option<RateLimiter>) -> Option<RateLimiter> {
    let rl = rl?;
    let out = RateLimiter {
        bandwidth: rl.bandwidth.and_then(TokenBucket::normalized),
        ops: rl.ops.and_then(TokenBucket::normalized),
    };
    if out.bandwidth.is_none() && out.ops.is_none() {
        None
    } else {
        Some(out)
    }
}

/// Applies a rate limiter update (PATCH): a bucket that is absent in the
/// update is kept, a given one replaces the old one (or disables it when it
/// has a zero size or refill time).
pub fn update_rate_limiter(
    old: Option<RateLimiter>,
    update: Option<RateLimiter>,
) -> Option<RateLimiter> {
    let Some(update) = update else {
        return old;
    };
    let old = old.unwrap_or_default();
    let merged = RateLimiter {
        bandwidth: match update.bandwidth {
            Some(b) => b.normalized(),
            None => old.bandwidth,
        },
        ops: match update.ops {
            Some(b) => b.normalized(),
            None => old.ops,
        },
    };
    normalize_rate_limiter(Some(merged))
}

// ---------------------------------------------------------------- actions

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action_type: ActionType,
}

// ------------------------------------------------------------ machine config

/// The static CPU templates of Firecracker on x86_64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    None,
    T2CL,
    T2A,
}

/// The body of `PUT /cpu-config` (a custom CPU template, x86_64 layout).
/// Only its shape is checked: the modifiers are not interpreted.
#[allow(dead_code)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCpuTemplate {
    #[serde(default)]
    pub kvm_capabilities: Vec<serde_json::Value>,
    #[serde(default)]
    pub cpuid_modifiers: Vec<serde_json::Value>,
    #[serde(default)]
    pub msr_modifiers: Vec<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// The body of `PUT /machine-config`, and what `GET /machine-config` returns.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// The body of `PATCH /machine-config` (every field optional, at least one
/// needed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    pub fn is_empty(&self) -> bool {
        *self == MachineConfigUpdate::default()
    }
}

impl From<MachineConfig> for MachineConfigUpdate {
    fn from(cfg: MachineConfig) -> Self {
        MachineConfigUpdate {
            vcpu_count: Some(cfg.vcpu_count),
            mem_size_mib: Some(cfg.mem_size_mib),
            smt: Some(cfg.smt),
            cpu_template: cfg.cpu_template,
            track_dirty_pages: Some(cfg.track_dirty_pages),
            huge_pages: Some(cfg.huge_pages),
        }
    }
}

// --------------------------------------------------------------- boot source

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    pub initrd_path: Option<String>,
    pub boot_args: Option<String>,
}

// -------------------------------------------------------------------- drives

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    Async,
    #[default]
    Sync,
}

/// The body of `PUT /drives/{id}`, and a drive as `GET /vm/config` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub cache_type: CacheType,
    pub is_read_only: Option<bool>,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiter>,
    pub io_engine: Option<IoEngine>,
    pub socket: Option<String>,
}

/// The body of `PATCH /drives/{id}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiter>,
}

// --------------------------------------------------------- network interfaces

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn parse(s: &str) -> Option<MacAddr> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return None;
        }
        let mut bytes = [0u8; 6];
        for (slot, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return None;
            }
            *slot = u8::from_str_radix(part, 16).ok()?;
        }
        Some(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        MacAddr::parse(&text)
            .ok_or_else(|| D::Error::custom("The provided MAC address is invalid."))
    }
}

/// The body of `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: Option<MacAddr>,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The body of `PATCH /network-interfaces/{id}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

// --------------------------------------------------------------------- vsock

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

// ------------------------------------------------------------------- balloon

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
}

// ------------------------------------------------------------------- entropy

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    pub rate_limiter: Option<RateLimiter>,
}

// ------------------------------------------------------------ logger, metrics

/// A log level; accepted case-insensitively, `Warning` included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Off,
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.to_lowercase().as_str() {
            "off" => Ok(LogLevel::Off),
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            _ => Err(D::Error::custom("Invalid LevelFilter")),
        }
    }
}

/// The body of `PUT /logger`. Only `log_path` is acted on; the other fields
/// are checked and otherwise ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Logger {
    pub log_path: Option<PathBuf>,
    pub level: Option<LogLevel>,
    pub show_level: Option<bool>,
    pub show_log_origin: Option<bool>,
    pub module: Option<String>,
}

/// The body of `PUT /metrics` (unknown fields are accepted, as in
/// Firecracker).
#[derive(Clone, Debug, Deserialize)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

// ---------------------------------------------------------------------- mmds

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    pub ipv4_address: Option<Ipv4Addr>,
    #[serde(default)]
    pub imds_compat: bool,
}

// ------------------------------------------------------------------------ vm

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmBody {
    pub state: VmStateRequest,
}

// ----------------------------------------------------------------- snapshots

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    Diff,
    #[default]
    Full,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_path: PathBuf,
    pub backend_type: MemBackendType,
}

/// One entry of `network_overrides` (unknown fields are accepted, as in
/// Firecracker).
#[derive(Debug, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    pub mem_file_path: Option<PathBuf>,
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

// ----------------------------------------------------------------- responses

#[derive(Debug, Serialize)]
pub struct InstanceInfo<'a> {
    pub id: &'a str,
    pub state: &'a str,
    pub vmm_version: &'a str,
    pub app_name: &'a str,
}

/// What `GET /vm/config` returns (the fields in Firecracker's order; the
/// logger, metrics and CPU configuration are always reported as null, as
/// Firecracker does).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FullVmConfig {
    pub balloon: Option<Balloon>,
    pub drives: Vec<Drive>,
    pub boot_source: BootSource,
    pub cpu_config: Option<serde_json::Value>,
    pub logger: Option<serde_json::Value>,
    pub machine_config: Option<MachineConfig>,
    pub metrics: Option<serde_json::Value>,
    pub mmds_config: Option<MmdsConfig>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<Entropy>,
}

/// What the double writes into a snapshot file, so that a later
/// `PUT /snapshot/load` restores the same devices.
#[derive(Debug, Deserialize, Serialize)]
pub struct SnapshotState {
    pub fc_double_snapshot: u32,
    pub vmm_version: String,
    pub vm_id: String,
    pub machine_config: MachineConfig,
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<(NetworkInterface, bool)>,
    pub vsock: Option<Vsock>,
    pub balloon: Option<Balloon>,
    pub entropy: Option<Entropy>,
    pub mmds_version: Option<MmdsVersion>,
    pub heartbeat: u64,
}
