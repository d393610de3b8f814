//! The daemon's TOML configuration: every key optional, unknown keys refused.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default kernel command line.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Firecracker's vCPU limit, and so the slot limit.
pub const MAX_SLOTS: u32 = 32;

/// Which VMM new VMs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmChoice {
    /// Firecracker (needs a working KVM).
    Firecracker,
    /// QEMU `microvm` (KVM when usable, TCG otherwise).
    Qemu,
    /// Firecracker when its binary exists and KVM runs a guest, QEMU otherwise.
    Auto,
}

/// What a clean daemon stop does to running VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnShutdown {
    /// Shut every VM down (then kill what does not exit in time).
    Stop,
    /// Leave VMMs running.
    Leave,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Per-VM session directories.
    pub session_root: PathBuf,
    /// VMM control sockets (kept short: Unix socket paths are limited to 107 bytes).
    pub socket_root: PathBuf,
    /// Read-only base images, by `rootfs_id`.
    pub rootfs_root: PathBuf,
    /// Snapshot metadata.
    pub snapshots_root: PathBuf,
    /// Fast snapshot tier (a tmpfs).
    pub tmpfs_snapshot_root: PathBuf,
    /// Durable snapshot tier: a directory on any mounted file system (local
    /// disk, NFS, …; not necessarily HDFS) whose copies survive a reboot.
    /// The TOML key is `hdfs_snapshot_root` (its original name, kept for
    /// existing configs) or, preferred, its alias `durable_snapshot_root`;
    /// a file giving both is refused ([`ConfigError::BothKeys`]).
    #[serde(alias = "durable_snapshot_root")]
    pub hdfs_snapshot_root: PathBuf,
    /// Kernel images, by name.
    pub kernel_root: PathBuf,
    /// Initramfs images, by name.
    pub initramfs_root: PathBuf,
    /// Firecracker binary (a bare name is looked up in `PATH`).
    pub firecracker_binary: PathBuf,
    /// QEMU binary (a bare name is looked up in `PATH`).
    pub qemu_binary: PathBuf,
    /// Which VMM new VMs get.
    pub vmm: VmmChoice,
    /// Kernel file name under `kernel_root` used when a request names none.
    pub default_kernel: String,
    /// Initramfs file name under `initramfs_root` used when a request names none.
    pub default_initrd: Option<String>,
    /// Kernel command line used when a request gives none.
    pub default_boot_args: String,
    /// MiB of guest memory per slot.
    pub memory_mib_per_slot: u64,
    /// Slots a VM gets when the request names none.
    pub default_slots: u32,
    /// Size of a fresh overlay disk when the request names none.
    pub default_disk_size_gib: u64,
    /// Room kept beside a snapshot's disk in the tmpfs tier.
    pub snapshot_state_overhead_mib: u64,
    /// Directories under which `direct` disks may live (none: direct disks refused).
    pub direct_disk_roots: Vec<PathBuf>,
    /// Largest share directory, in MiB (file sizes plus a block per entry,
    /// counted while it is copied).
    pub max_share_mib: u64,
    /// Seconds a shutdown waits for the guest to power off before killing the VMM.
    pub shutdown_timeout_s: u64,
    /// Milliseconds a VMM may take to come up and accept its configuration.
    pub startup_timeout_ms: u64,
    /// Milliseconds one VMM control request may take.
    pub request_timeout_ms: u64,
    /// Size at which a VM's console log is rotated (one old file kept).
    pub console_log_max_bytes: u64,
    /// Memory the daemon may commit to VMs, in MiB (default: the host's total memory).
    pub max_memory_mib: Option<u64>,
    /// What a clean daemon stop does to running VMs.
    pub on_shutdown: OnShutdown,
    /// Mutating API requests (POST, PUT, DELETE) served at once; more get 429.
    pub max_inflight_ops: u32,
    /// Most clones one `fork` call makes.
    pub max_fork: u32,
    /// Where QEMU guests keep their RAM (a shared file each, so a full
    /// snapshot can copy it): a tmpfs. Default `{tmpfs_snapshot_root}/.guest-memory`.
    pub guest_memory_root: Option<PathBuf>,
    /// Milliseconds a client may take to send a request's headers (and an idle
    /// connection is kept open between requests).
    pub header_timeout_ms: u64,
    /// Milliseconds a client may take to send a JSON body; for file uploads, the
    /// longest pause between two pieces of the body.
    pub body_timeout_ms: u64,
    /// Automatic networking.
    pub network: NetworkConfig,
    /// The guest agent.
    pub agent: AgentConfig,
    /// Who may call the API (`[auth]`).
    pub auth: AuthConfig,
    /// HTTPS (and client certificates) on the TCP listeners.
    pub tls: TlsConfig,
    /// Listeners and the checks every request passes before a handler.
    pub http: HttpConfig,
    /// Resource limits per VM through cgroups.
    pub cgroup: CgroupConfig,
    /// The VMM jail.
    pub jail: JailConfig,
    /// The E2B-compatible API (`[e2b]`): its listeners and templates.
    pub e2b: E2bConfig,
}

/// How API requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every request but `GET /v1/health` needs `Authorization: Bearer TOKEN`
    /// with a token of the tokens file (the default).
    #[default]
    Token,
    /// No credentials: every request is an admin named `anonymous`. Must be
    /// written explicitly, and then only loopback TCP and Unix listeners are
    /// allowed.
    None,
}

/// The `[auth]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `token` (default) or `none`.
    pub mode: AuthMode,
    /// The tokens file: one `NAME SCOPE SHA256-HEX-OF-TOKEN` per line, `#`
    /// comments; only hashes are stored. It must not be world-accessible or
    /// group-writable. Default `data/tokens` (beside the default state
    /// roots; relative paths are taken from the daemon's directory).
    pub tokens_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Token,
            tokens_file: PathBuf::from("data/tokens"),
        }
    }
}

/// The `[cgroup]` table: one cgroup per VM holding its VMM, under `parent`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    /// Confine VMMs in cgroups. Absent: on when the daemon runs as root.
    pub enable: Option<bool>,
    /// The parent cgroup of the VMs' cgroups: relative to the daemon's own
    /// cgroup, or absolute (a leading `/`) from the hierarchy's root.
    pub parent: String,
    /// Cores each vCPU may use (1.0: a whole core; less overcommits the host).
    pub cpu_per_vcpu: f64,
    /// Cores the VMM's own threads (I/O, emulation) may use on top of its vCPUs.
    pub vmm_cpu_allowance: f64,
    /// The CPU accounting period, in microseconds.
    pub cpu_period_us: u64,
    /// MiB the VMM may use beyond the guest's memory.
    pub vmm_memory_overhead_mib: u64,
    /// And this percentage of the guest's memory on top (page tables, caches
    /// that grow with the guest).
    pub vmm_memory_overhead_percent: u64,
    /// Most processes and threads one VMM may have.
    pub pids_max: u64,
    /// I/O weight, 1 to 10000 (cgroup v2 `io.weight`; v1 `blkio.weight` takes
    /// 10 to 1000, the value is clamped into that range).
    pub io_weight: u32,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enable: None,
            parent: "agentenv".into(),
            cpu_per_vcpu: 1.0,
            vmm_cpu_allowance: 0.25,
            cpu_period_us: 100_000,
            vmm_memory_overhead_mib: 256,
            vmm_memory_overhead_percent: 5,
            pids_max: 512,
            io_weight: 100,
        }
    }
}

/// The `[jail]` table: every VMM runs in its own mount, PID, IPC and UTS
/// namespaces, under a per-VM root, as an unprivileged uid.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Jail every VMM. Default (unset): on when the daemon runs as root (a
    /// jail needs root to set up), off otherwise.
    pub enable: Option<bool>,
    /// One fixed uid for every VMM (instead of `uid_range`).
    pub uid: Option<u32>,
    /// The group of every VMM (default: `uid` when that is set, else the
    /// first id of `uid_range`). Read-only inputs shared by VMs (kernels,
    /// base images, snapshot memory files) are made readable to it.
    pub gid: Option<u32>,
    /// `[start, count]`: each VM gets its own uid out of this range (used
    /// when `uid` is unset). The uid is recorded as the owner of the VM's
    /// jail directory.
    pub uid_range: [u32; 2],
    /// Where the per-VM jail roots are made (default: `jail` beside
    /// `session_root`).
    pub chroot_base: Option<PathBuf>,
    /// Firecracker's own `jailer` binary: when set, Firecracker VMs start
    /// through it instead of the daemon's jail.
    pub firecracker_jailer: Option<PathBuf>,
    /// More host files or directories every VMM sees, read-only, at their
    /// host paths (what a wrapper script given as the VMM binary runs, say).
    pub read_only_paths: Vec<PathBuf>,
}

/// The first uid of the default `[jail] uid_range`.
pub const DEFAULT_JAIL_UID_START: u32 = 900_000;

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enable: None,
            uid: None,
            gid: None,
            uid_range: [DEFAULT_JAIL_UID_START, 65_536],
            chroot_base: None,
            firecracker_jailer: None,
            read_only_paths: Vec::new(),
        }
    }
}

/// The `[tls]` table: with `cert_file` and `key_file`, TCP listeners serve
/// HTTPS; with `client_ca_file` too, they require a client certificate
/// signed by that CA (mTLS). All PEM files.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
}

/// The `[e2b]` table: the E2B-compatible API (docs/e2b.md). Off unless it
/// has a listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct E2bConfig {
    /// Addresses the E2B API listens on (`HOST:PORT`; TLS as `[tls]` says).
    /// Empty (the default): no E2B API. `--e2b-listen` on the command line
    /// replaces this list.
    pub listen: Vec<String>,
    /// The domain of host-based routing (`Host: 49983-<id>.<domain>`), also
    /// returned to the SDK as the sandbox's `domain`. None: routing by the
    /// `E2b-Sandbox-Id` header only, and `domain` is null.
    pub domain: Option<String>,
    /// Seconds a sandbox lives when its create gives no `timeout`.
    pub default_timeout_s: u64,
    /// Longest `timeout` a create or `set_timeout` may ask for, in seconds.
    pub max_timeout_s: u64,
    /// The guest user processes and file operations run as when the SDK names none.
    pub default_user: String,
    /// Templates by E2B `templateID` (`[e2b.templates.NAME]`).
    pub templates: std::collections::BTreeMap<String, E2bTemplate>,
}

impl Default for E2bConfig {
    fn default() -> Self {
        E2bConfig {
            listen: Vec::new(),
            domain: None,
            default_timeout_s: 300,
            max_timeout_s: 86_400,
            default_user: "user".into(),
            templates: std::collections::BTreeMap::new(),
        }
    }
}

/// One `[e2b.templates.NAME]` table: what a sandbox of that template starts from.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct E2bTemplate {
    /// Base image file name under `rootfs_root`.
    pub image: String,
    /// Slots (vCPUs and `memory_mib_per_slot` MiB each); default `default_slots`.
    #[serde(default)]
    pub slots: Option<u32>,
    /// Kernel under `kernel_root`; default `default_kernel`.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Initramfs under `initramfs_root`; default `default_initrd`.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line; default `default_boot_args`.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Keep a full snapshot of the template booted and idle, so a create is a
    /// restore instead of a boot (default true).
    #[serde(default = "yes")]
    pub snapshot: bool,
}

fn yes() -> bool {
    true
}

impl E2bConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.default_timeout_s == 0 || self.default_timeout_s > self.max_timeout_s {
            return Err(invalid(
                "e2b.default_timeout_s",
                format!("must be 1 to e2b.max_timeout_s ({})", self.max_timeout_s),
            ));
        }
        if self.max_timeout_s == 0 || self.max_timeout_s > 30 * 86_400 {
            return Err(invalid(
                "e2b.max_timeout_s",
                "must be 1 to 2592000 (30 days)",
            ));
        }
        if let Some(domain) = &self.domain {
            let ok = !domain.is_empty()
                && domain.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(invalid(
                    "e2b.domain",
                    format!("{domain:?} is not a DNS name (labels of letters, digits and `-`)"),
                ));
            }
        }
        let user_ok = !self.default_user.is_empty()
            && self.default_user.len() <= 32
            && self
                .default_user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !user_ok {
            return Err(invalid(
                "e2b.default_user",
                format!("{:?} is not a user name", self.default_user),
            ));
        }
        for (name, t) in &self.templates {
            let key = format!("e2b.templates.{name}");
            crate::ids::validate_id(&key, name).map_err(|e| invalid(&key, e.reason))?;
            crate::ids::validate_id(&format!("{key}.image"), &t.image)
                .map_err(|e| invalid(&format!("{key}.image"), e.reason))?;
            if let Some(k) = &t.kernel {
                crate::ids::validate_id(&format!("{key}.kernel"), k)
                    .map_err(|e| invalid(&format!("{key}.kernel"), e.reason))?;
            }
            if let Some(i) = &t.initrd {
                crate::ids::validate_id(&format!("{key}.initrd"), i)
                    .map_err(|e| invalid(&format!("{key}.initrd"), e.reason))?;
            }
            if let Some(s) = t.slots {
                if s == 0 || s > MAX_SLOTS {
                    return Err(invalid(
                        &format!("{key}.slots"),
                        format!("must be between 1 and {MAX_SLOTS}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `[http]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Addresses to listen on (`HOST:PORT` or `unix:/PATH`) when the command
    /// line gives no `--listen` (none here either: `127.0.0.1:8080`).
    pub listen: Vec<String>,
    /// `Host` header values TCP requests may carry besides the loopback names
    /// and the listen addresses (a name, or `name:port`).
    pub allowed_hosts: Vec<String>,
    /// Group (name or numeric gid) of the Unix listener sockets, which are
    /// mode 0660: its members may call the API (default: the daemon's group).
    pub socket_group: Option<String>,
}

impl CgroupConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = self.parent.trim_start_matches('/');
        if p.is_empty()
            || p.split('/').any(|c| {
                c.is_empty()
                    || c == "."
                    || c == ".."
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            })
        {
            return Err(invalid(
                "cgroup.parent",
                format!(
                    "{:?} is not a cgroup path (components of letters, digits, `-`, `_`, `.`, `@`; no `..`)",
                    self.parent
                ),
            ));
        }
        if !(self.cpu_per_vcpu.is_finite() && self.cpu_per_vcpu > 0.0 && self.cpu_per_vcpu <= 1.0) {
            return Err(invalid(
                "cgroup.cpu_per_vcpu",
                "must be more than 0 and at most 1",
            ));
        }
        if !(self.vmm_cpu_allowance.is_finite() && (0.0..=16.0).contains(&self.vmm_cpu_allowance)) {
            return Err(invalid(
                "cgroup.vmm_cpu_allowance",
                "must be between 0 and 16",
            ));
        }
        if !(1000..=1_000_000).contains(&self.cpu_period_us) {
            return Err(invalid(
                "cgroup.cpu_period_us",
                "must be between 1000 and 1000000",
            ));
        }
        if self.vmm_memory_overhead_mib > 1 << 20 {
            return Err(invalid(
                "cgroup.vmm_memory_overhead_mib",
                "must be at most 1048576",
            ));
        }
        if self.vmm_memory_overhead_percent > 100 {
            return Err(invalid(
                "cgroup.vmm_memory_overhead_percent",
                "must be at most 100",
            ));
        }
        if !(16..=1_000_000).contains(&self.pids_max) {
            return Err(invalid("cgroup.pids_max", "must be between 16 and 1000000"));
        }
        if !(1..=10_000).contains(&self.io_weight) {
            return Err(invalid("cgroup.io_weight", "must be between 1 and 10000"));
        }
        Ok(())
    }
}

impl JailConfig {
    /// Whether VMMs are jailed, given the daemon's effective uid.
    pub fn enabled(&self, euid: u32) -> bool {
        self.enable.unwrap_or(euid == 0)
    }

    /// The VMMs' group.
    pub fn group(&self) -> u32 {
        self.gid.or(self.uid).unwrap_or(self.uid_range[0])
    }

    /// Checks the ids: never root, a range that does not wrap.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.uid == Some(0) {
            return Err(invalid("jail.uid", "must not be 0 (root)"));
        }
        if self.gid == Some(0) {
            return Err(invalid("jail.gid", "must not be 0 (root)"));
        }
        let [start, count] = self.uid_range;
        if start == 0
            || count == 0
            || start
                .checked_add(count)
                .is_none_or(|end| end > u32::MAX - 1)
        {
            return Err(invalid(
                "jail.uid_range",
                "must be [start, count] with start >= 1, count >= 1 and start + count below 4294967295",
            ));
        }
        for p in &self.read_only_paths {
            if !p.is_absolute() {
                return Err(invalid(
                    "jail.read_only_paths",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        for (key, id) in [("jail.uid", self.uid), ("jail.gid", self.gid)] {
            if id == Some(u32::MAX) {
                return Err(invalid(key, "4294967295 is not a valid id"));
            }
        }
        Ok(())
    }
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Give VMs an agent channel and connect to the agent.
    pub enable: bool,
    /// Bytes of stdout and of stderr a non-streaming exec returns (the rest is dropped
    /// and the result says `truncated`).
    pub max_output_bytes: u64,
    /// Seconds `wait_ready` waits when the request names no timeout.
    pub ready_timeout_s: u64,
    /// Milliseconds one connection attempt (with the handshake) may take.
    pub connect_timeout_ms: u64,
    /// Seconds an exec may run when the request names no timeout.
    pub default_exec_timeout_s: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            enable: true,
            max_output_bytes: 1024 * 1024,
            ready_timeout_s: 120,
            connect_timeout_ms: 2000,
            default_exec_timeout_s: 600,
        }
    }
}

/// The `[network]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Create a TAP and a subnet per VM.
    pub enable: bool,
    /// TAP names are `{tap_prefix}{n}`.
    pub tap_prefix: String,
    /// First two octets of the VM subnets: VM `n` gets `{subnet_prefix}.{n}.0`.
    pub subnet_prefix: String,
    /// Netmask of each VM subnet, kept in dotted form; the file may give a
    /// prefix length (`netmask = 24`) or the dotted form
    /// (`netmask = "255.255.255.0"`).
    #[serde(deserialize_with = "netmask_from_toml")]
    pub netmask: String,
    /// Interface NAT leaves through (default: the default route's).
    pub host_interface: Option<String>,
    /// Guests may not reach private, CGNAT, link-local, loopback, multicast
    /// and reserved IPv4 ranges (only what a VM's `network.allow` lists).
    pub deny_private: bool,
}

/// A prefix length (0 to 32) as a dotted netmask.
pub fn netmask_from_prefix(len: u8) -> Option<String> {
    (len <= 32).then(|| {
        let bits = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        Ipv4Addr::from(bits).to_string()
    })
}

/// `[network] netmask`: an integer prefix length, or a string holding the
/// dotted form (or a prefix length). Kept dotted; `validate` checks the range.
fn netmask_from_toml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mask {
        Prefix(i64),
        Text(String),
    }
    let bad_prefix = |n: &dyn std::fmt::Display| {
        serde::de::Error::custom(format!(
            "network.netmask: prefix length {n} is not 0 to 32 (give 24 to 30, or the dotted form such as \"255.255.255.0\")"
        ))
    };
    match Mask::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "network.netmask must be a prefix length such as 24 or a dotted netmask such as \"255.255.255.0\"",
        )
    })? {
        Mask::Prefix(n) => u8::try_from(n)
            .ok()
            .and_then(netmask_from_prefix)
            .ok_or_else(|| bad_prefix(&n)),
        Mask::Text(t) => match t.trim().trim_start_matches('/').parse::<u8>() {
            Ok(n) => netmask_from_prefix(n).ok_or_else(|| bad_prefix(&n)),
            Err(_) => Ok(t),
        },
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enable: true,
            tap_prefix: "agtap".into(),
            subnet_prefix: "172.20".into(),
            netmask: "255.255.255.0".into(),
            host_interface: None,
            deny_private: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let data = Path::new("data");
        Config {
            session_root: data.join("sessions"),
            socket_root: data.join("sockets"),
            rootfs_root: data.join("rootfs"),
            snapshots_root: data.join("snapshots"),
            tmpfs_snapshot_root: data.join("snapshots/tmpfs"),
            hdfs_snapshot_root: data.join("snapshots/durable"),
            kernel_root: data.join("kernels"),
            initramfs_root: data.join("initramfs"),
            firecracker_binary: PathBuf::from("firecracker"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            vmm: VmmChoice::Auto,
            default_kernel: "vmlinux".into(),
            default_initrd: None,
            default_boot_args: DEFAULT_BOOT_ARGS.into(),
            memory_mib_per_slot: 1024,
            default_slots: 2,
            default_disk_size_gib: 32,
            snapshot_state_overhead_mib: 64,
            direct_disk_roots: Vec::new(),
            max_share_mib: 4096,
            shutdown_timeout_s: 10,
            startup_timeout_ms: 5000,
            request_timeout_ms: 5000,
            console_log_max_bytes: 4 * 1024 * 1024,
            max_memory_mib: None,
            on_shutdown: OnShutdown::Leave,
            max_inflight_ops: 64,
            max_fork: 64,
            guest_memory_root: None,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            network: NetworkConfig::default(),
            agent: AgentConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            cgroup: CgroupConfig::default(),
            jail: JailConfig::default(),
            e2b: E2bConfig::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// Two keys that name the same setting (a key and its alias) are both given.
    #[error("config keys `{key}` and `{alias}` name the same setting; give one of them")]
    BothKeys {
        /// The key.
        key: &'static str,
        /// Its alias.
        alias: &'static str,
    },
    /// A key has a value outside its range.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, dotted for tables (`network.netmask`).
        key: String,
        /// Why the value is refused.
        reason: String,
    },
}

/// Top-level keys that have an alias, with it: the alias is the preferred
/// name, the key stays for the configs that already use it.
const KEY_ALIASES: &[(&str, &str)] = &[("hdfs_snapshot_root", "durable_snapshot_root")];

/// Refuses a file that gives both a key and its alias (serde's own message
/// would name only one of them). Malformed TOML passes here and is reported by
/// the real parse, with its line.
fn refuse_both_keys(text: &str) -> Result<(), ConfigError> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    match KEY_ALIASES
        .iter()
        .find(|(key, alias)| table.contains_key(*key) && table.contains_key(*alias))
    {
        Some(&(key, alias)) => Err(ConfigError::BothKeys { key, alias }),
        None => Ok(()),
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        refuse_both_keys(text)?;
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_mib_per_slot == 0 {
            return Err(invalid("memory_mib_per_slot", "must be at least 1"));
        }
        if self.default_slots == 0 || self.default_slots > MAX_SLOTS {
            return Err(invalid(
                "default_slots",
                format!("must be between 1 and {MAX_SLOTS}"),
            ));
        }
        if self.default_disk_size_gib == 0 || self.default_disk_size_gib > 16 * 1024 {
            return Err(invalid(
                "default_disk_size_gib",
                "must be between 1 and 16384",
            ));
        }
        if self.default_boot_args.trim().is_empty() {
            return Err(invalid("default_boot_args", "must not be empty"));
        }
        crate::ids::validate_id("default_kernel", &self.default_kernel)
            .map_err(|e| invalid("default_kernel", e.reason))?;
        if let Some(initrd) = &self.default_initrd {
            crate::ids::validate_id("default_initrd", initrd)
                .map_err(|e| invalid("default_initrd", e.reason))?;
        }
        if self.max_fork == 0 || self.max_fork > 1024 {
            return Err(invalid("max_fork", "must be between 1 and 1024"));
        }
        if let Some(p) = &self.guest_memory_root {
            if p.as_os_str().is_empty() {
                return Err(invalid("guest_memory_root", "must not be empty"));
            }
        }
        for (key, value) in [
            ("shutdown_timeout_s", self.shutdown_timeout_s),
            ("startup_timeout_ms", self.startup_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.agent.max_output_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "agent.max_output_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        if self.agent.ready_timeout_s == 0 || self.agent.ready_timeout_s > 3600 {
            return Err(invalid("agent.ready_timeout_s", "must be 1 to 3600"));
        }
        if !(10..=60_000).contains(&self.agent.connect_timeout_ms) {
            return Err(invalid("agent.connect_timeout_ms", "must be 10 to 60000"));
        }
        if self.agent.default_exec_timeout_s == 0 || self.agent.default_exec_timeout_s > 86_400 {
            return Err(invalid(
                "agent.default_exec_timeout_s",
                "must be 1 to 86400",
            ));
        }
        if self.max_inflight_ops == 0 || self.max_inflight_ops > 65_536 {
            return Err(invalid("max_inflight_ops", "must be 1 to 65536"));
        }
        for (key, value) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
        ] {
            if !(10..=3_600_000).contains(&value) {
                return Err(invalid(key, "must be 10 to 3600000"));
            }
        }
        if self.console_log_max_bytes < 4096 {
            return Err(invalid("console_log_max_bytes", "must be at least 4096"));
        }
        if self.max_share_mib == 0 || self.max_share_mib > 1 << 20 {
            return Err(invalid("max_share_mib", "must be between 1 and 1048576"));
        }
        if self.max_memory_mib == Some(0) {
            return Err(invalid("max_memory_mib", "must be at least 1"));
        }
        for (key, path) in self.roots() {
            if path.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        for root in &self.direct_disk_roots {
            if !root.is_absolute() {
                return Err(invalid(
                    "direct_disk_roots",
                    format!("{} is not an absolute path", root.display()),
                ));
            }
        }
        self.tls.validate()?;
        self.jail.validate()?;
        self.network.validate()?;
        self.e2b.validate()?;
        self.cgroup.validate()
    }

    /// Where guests' RAM files live (see [`Config::guest_memory_root`]).
    pub fn guest_memory_dir(&self) -> PathBuf {
        self.guest_memory_root
            .clone()
            .unwrap_or_else(|| self.tmpfs_snapshot_root.join(".guest-memory"))
    }

    /// Where a jailed VMM binds its control socket `socket` (`.jail-<vm_id>`
    /// beside it); the daemon renames the socket into place from there.
    pub fn jail_socket_staging(socket: &Path, vm_id: &str) -> PathBuf {
        socket
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!(".jail-{vm_id}"))
    }

    /// Where the per-VM jail roots are made (`[jail] chroot_base`, default
    /// `jail` beside `session_root`).
    pub fn jail_dir(&self) -> PathBuf {
        self.jail.chroot_base.clone().unwrap_or_else(|| {
            self.session_root
                .parent()
                .unwrap_or(Path::new("."))
                .join("jail")
        })
    }

    /// Every directory the daemon owns, with its key.
    pub fn roots(&self) -> [(&'static str, &Path); 8] {
        [
            ("session_root", &self.session_root),
            ("socket_root", &self.socket_root),
            ("rootfs_root", &self.rootfs_root),
            ("snapshots_root", &self.snapshots_root),
            ("tmpfs_snapshot_root", &self.tmpfs_snapshot_root),
            ("hdfs_snapshot_root", &self.hdfs_snapshot_root),
            ("kernel_root", &self.kernel_root),
            ("initramfs_root", &self.initramfs_root),
        ]
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(invalid("tls.key_file", "must be given with tls.cert_file")),
            (None, Some(_)) => Err(invalid("tls.cert_file", "must be given with tls.key_file")),
            (None, None) if self.client_ca_file.is_some() => Err(invalid(
                "tls.client_ca_file",
                "needs tls.cert_file and tls.key_file (client certificates are asked for in a TLS handshake)",
            )),
            _ => Ok(()),
        }
    }
}

impl NetworkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tap_prefix.is_empty()
            || self.tap_prefix.len() > 10
            || !self
                .tap_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "network.tap_prefix",
                "must be 1 to 10 ASCII letters, digits, `-` or `_`",
            ));
        }
        let octets: Vec<&str> = self.subnet_prefix.split('.').collect();
        if octets.len() != 2 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
            return Err(invalid(
                "network.subnet_prefix",
                format!(
                    "{:?} is not two dotted octets such as \"172.20\"",
                    self.subnet_prefix
                ),
            ));
        }
        let mask: Ipv4Addr = self.netmask.parse().map_err(|_| {
            invalid(
                "network.netmask",
                format!("{:?} is not an IPv4 netmask", self.netmask),
            )
        })?;
        let bits = u32::from(mask);
        let len = bits.leading_ones();
        if len + bits.trailing_zeros() != 32 || !(24..=30).contains(&len) {
            return Err(invalid(
                "network.netmask",
                format!(
                    "{:?} must be a contiguous mask from /24 to /30 (a prefix length 24 to 30, or its dotted form)",
                    self.netmask
                ),
            ));
        }
        if let Some(ifname) = &self.host_interface {
            if ifname.is_empty() || ifname.len() > 15 {
                return Err(invalid("network.host_interface", "must be 1 to 15 bytes"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_is_on_by_default_and_none_must_be_written() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.auth.mode, AuthMode::Token);
        assert_eq!(cfg.auth.tokens_file, PathBuf::from("data/tokens"));
        let cfg = Config::parse("[auth]\nmode = \"none\"\ntokens_file = \"/etc/t\"").unwrap();
        assert_eq!(cfg.auth.mode, AuthMode::None);
        assert_eq!(cfg.auth.tokens_file, PathBuf::from("/etc/t"));
        let e = Config::parse("[auth]\nmode = \"off\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode"), "{e}");
        let e = Config::parse("[auth]\ntoken = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("token"), "{e}");
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.memory_mib_per_slot, 1024);
        assert_eq!(c.default_slots, 2);
        assert_eq!(c.default_disk_size_gib, 32);
        assert_eq!(c.snapshot_state_overhead_mib, 64);
        assert_eq!(
            c.default_boot_args,
            "console=ttyS0 reboot=k panic=1 pci=off"
        );
        assert_eq!(c.session_root, PathBuf::from("data/sessions"));
        assert_eq!(c.max_inflight_ops, 64);
        assert_eq!(c.header_timeout_ms, 10_000);
        assert_eq!(c.body_timeout_ms, 10_000);
    }

    #[test]
    fn keys_are_read() {
        let c = Config::parse(
            r#"
            session_root = "/srv/s"
            memory_mib_per_slot = 512
            default_slots = 4
            vmm = "qemu"
            direct_disk_roots = ["/images"]
            [network]
            tap_prefix = "vmtap"
            "#,
        )
        .unwrap();
        assert_eq!(c.session_root, PathBuf::from("/srv/s"));
        assert_eq!(c.memory_mib_per_slot, 512);
        assert_eq!(c.default_slots, 4);
        assert_eq!(c.vmm, VmmChoice::Qemu);
        assert_eq!(c.network.tap_prefix, "vmtap");
    }

    #[test]
    fn the_durable_tier_has_two_names_but_takes_one() {
        let old = Config::parse("hdfs_snapshot_root = \"/mnt/nfs/snaps\"").unwrap();
        assert_eq!(old.hdfs_snapshot_root, PathBuf::from("/mnt/nfs/snaps"));
        let new = Config::parse("durable_snapshot_root = \"/mnt/nfs/snaps\"").unwrap();
        assert_eq!(new, old);
        let e = err("hdfs_snapshot_root = \"/a\"\ndurable_snapshot_root = \"/b\"");
        assert!(
            e.contains("`hdfs_snapshot_root`") && e.contains("`durable_snapshot_root`"),
            "{e}"
        );
        // The same key twice is still the parser's error, with its line.
        let e = err("durable_snapshot_root = \"/a\"\ndurable_snapshot_root = \"/b\"");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn listener_tls_and_auth_tables_are_read() {
        let c = Config::parse(
            "[http]\nlisten = [\"unix:/run/a.sock\", \"127.0.0.1:1\"]\nallowed_hosts = [\"a.example\"]\n\
             socket_group = \"agentenv\"\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n\
             client_ca_file = \"/ca\"\n[auth]\nmode = \"none\"\n",
        )
        .unwrap();
        assert_eq!(c.http.listen, ["unix:/run/a.sock", "127.0.0.1:1"]);
        assert_eq!(c.http.allowed_hosts, ["a.example"]);
        assert_eq!(c.http.socket_group.as_deref(), Some("agentenv"));
        assert_eq!(c.tls.client_ca_file.as_deref(), Some(Path::new("/ca")));
        assert_eq!(c.tls.key_file.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.auth.mode, AuthMode::None);
        assert_eq!(Config::default().auth.mode, AuthMode::Token);
        assert!(err("[http]\nlisten = \"x\"").contains("listen"));
        assert!(err("[http]\nhosts = []").contains("unknown field `hosts`"));
        assert!(err("[tls]\ncert = \"/c\"").contains("unknown field `cert`"));
        assert!(err("[auth]\nmode = \"off\"").contains("mode"));
        assert!(err("[tls]\nkey_file = \"/k\"").contains("tls.cert_file"));
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(err("sesion_root = \"/x\"").contains("unknown field `sesion_root`"));
        assert!(err("[network]\nenabled = true").contains("unknown field `enabled`"));
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("memory_mib_per_slot = 0", "memory_mib_per_slot"),
            ("memory_mib_per_slot = \"lots\"", "memory_mib_per_slot"),
            ("default_slots = 33", "default_slots"),
            ("default_slots = 0", "default_slots"),
            ("default_disk_size_gib = 0", "default_disk_size_gib"),
            ("default_kernel = \"../vmlinux\"", "default_kernel"),
            ("default_boot_args = \" \"", "default_boot_args"),
            ("vmm = \"xen\"", "vmm"),
            ("shutdown_timeout_s = 0", "shutdown_timeout_s"),
            ("max_inflight_ops = 0", "max_inflight_ops"),
            ("max_inflight_ops = 100000", "max_inflight_ops"),
            ("max_inflight_ops = -1", "max_inflight_ops"),
            ("header_timeout_ms = 0", "header_timeout_ms"),
            ("body_timeout_ms = 5", "body_timeout_ms"),
            ("body_timeout_ms = 3600001", "body_timeout_ms"),
            ("session_root = \"\"", "session_root"),
            ("direct_disk_roots = [\"rel\"]", "direct_disk_roots"),
            ("[network]\nnetmask = \"255.0.255.0\"", "network.netmask"),
            (
                "[network]\nnetmask = \"255.255.255.254\"",
                "network.netmask",
            ),
            ("[network]\nnetmask = \"255.255.0.0\"", "network.netmask"),
            ("[network]\nnetmask = 16", "network.netmask"),
            ("[network]\nnetmask = 31", "network.netmask"),
            ("[network]\nnetmask = 33", "network.netmask"),
            ("[network]\nnetmask = -1", "network.netmask"),
            ("[network]\nnetmask = true", "network.netmask"),
            ("[network]\nnetmask = \"/40\"", "network.netmask"),
            ("[network]\nsubnet_prefix = \"10\"", "network.subnet_prefix"),
            (
                "[network]\ntap_prefix = \"a-very-long-prefix\"",
                "network.tap_prefix",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.contains(key), "{text:?} gave {e:?}");
        }
    }

    /// The seed's own sample config (fuzzland/agentenv's README) loads as
    /// written: an integer netmask and `acpi=off` in the boot args.
    #[test]
    fn the_seeds_sample_config_loads_unchanged() {
        let c = Config::parse(
            r#"
default_boot_args = "console=ttyS0 reboot=k panic=1 pci=off acpi=off"
[network]
enable = true
tap_prefix = "tap"
subnet_prefix = "172.20"
netmask = 24
"#,
        )
        .unwrap();
        assert_eq!(c.network.netmask, "255.255.255.0");
        assert_eq!(c.network.tap_prefix, "tap");
        assert!(c.default_boot_args.ends_with("acpi=off"));
    }

    #[test]
    fn netmask_is_a_prefix_length_or_dotted() {
        let mask = |v: &str| {
            Config::parse(&format!("[network]\nnetmask = {v}"))
                .unwrap()
                .network
                .netmask
        };
        assert_eq!(mask("24"), "255.255.255.0");
        assert_eq!(mask("28"), "255.255.255.240");
        assert_eq!(mask("30"), "255.255.255.252");
        assert_eq!(mask("\"255.255.255.0\""), "255.255.255.0");
        assert_eq!(mask("\"255.255.255.248\""), "255.255.255.248");
        assert_eq!(mask("\"/26\""), "255.255.255.192");
        assert_eq!(mask("\"24\""), "255.255.255.0");
        assert_eq!(netmask_from_prefix(0).unwrap(), "0.0.0.0");
        assert_eq!(netmask_from_prefix(32).unwrap(), "255.255.255.255");
        assert_eq!(netmask_from_prefix(33), None);
    }
}
