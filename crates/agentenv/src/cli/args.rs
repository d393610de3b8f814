//! The command line: clap definitions of the daemon's flags and of the client
//! commands, and their conversion into API requests.

use std::path::PathBuf;

use agentenv_api::{CreateVmRequest, DiskSpec, NetworkSpec, ShareSpec};
use anyhow::anyhow;
use clap::{Args, Parser, Subcommand};

use crate::server::listen::ListenAddr;

/// Where the daemon listens when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Disposable microVMs behind a JSON HTTP API.
#[derive(Debug, Parser)]
#[command(name = "agentenv", version, about)]
pub struct Cli {
    /// The daemon's flags (`agentenv --config F --listen A`).
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// What to do (the daemon when none is given).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The daemon's flags: only the daemon (and `check-config`) read a config.
#[derive(Debug, Clone, Default, Args)]
pub struct DaemonArgs {
    /// Daemon configuration file (TOML). Without one, defaults under ./data.
    #[arg(long, env = "AGENTENV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the daemon listens: IP:PORT (HTTPS with [tls]) or unix:/PATH;
    /// repeat it for several [default: http.listen, else 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Vec<ListenAddr>,
    /// Where the E2B-compatible API listens: IP:PORT (HTTPS with [tls]);
    /// repeat it for several [default: e2b.listen, else no E2B API].
    #[arg(long)]
    pub e2b_listen: Vec<ListenAddr>,
}

impl DaemonArgs {
    /// These flags, each filled from `outer` when not given here.
    pub fn or(self, outer: DaemonArgs) -> DaemonArgs {
        DaemonArgs {
            config: self.config.or(outer.config),
            listen: if self.listen.is_empty() {
                outer.listen
            } else {
                self.listen
            },
            e2b_listen: if self.e2b_listen.is_empty() {
                outer.e2b_listen
            } else {
                self.e2b_listen
            },
        }
    }

    /// The addresses of the E2B API: `--e2b-listen`, else the config's
    /// `e2b.listen` (none: no E2B API). TCP only: the SDK speaks HTTP(S).
    pub fn e2b_listen(
        &self,
        cfg: &agentenv_core::config::Config,
    ) -> anyhow::Result<Vec<ListenAddr>> {
        let addrs: Vec<ListenAddr> = if self.e2b_listen.is_empty() {
            cfg.e2b
                .listen
                .iter()
                .map(|a| {
                    a.parse()
                        .map_err(|e| anyhow!("config key `e2b.listen`: {e}"))
                })
                .collect::<anyhow::Result<_>>()?
        } else {
            self.e2b_listen.clone()
        };
        if let Some(unix) = addrs.iter().find(|a| matches!(a, ListenAddr::Unix(_))) {
            return Err(anyhow!(
                "e2b listen address {unix}: the E2B API is served on TCP (IP:PORT) only"
            ));
        }
        Ok(addrs)
    }

    /// The addresses to listen on: `--listen`, else the config's
    /// `http.listen`, else [`DEFAULT_LISTEN`].
    pub fn listen(&self, cfg: &agentenv_core::config::Config) -> anyhow::Result<Vec<ListenAddr>> {
        if !self.listen.is_empty() {
            return Ok(self.listen.clone());
        }
        if cfg.http.listen.is_empty() {
            return Ok(vec![DEFAULT_LISTEN.parse().expect("a listen address")]);
        }
        cfg.http
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| anyhow!("config key `http.listen`: {e}"))
            })
            .collect()
    }
}

/// `agentenv …`
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no command is given).
    Serve(DaemonArgs),
    /// Manage VMs through a running daemon.
    Vm {
        /// Where the daemon is, and how to print.
        #[command(flatten)]
        opts: ClientOpts,
        /// The verb.
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Manage disk snapshots through a running daemon.
    Snapshot {
        /// Where the daemon is, and how to print.
        #[command(flatten)]
        opts: ClientOpts,
        /// The verb.
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Manage the API tokens of the tokens file (`[auth] tokens_file`); the
    /// daemon reads it again on SIGHUP.
    Token {
        /// Which tokens file.
        #[command(flatten)]
        file: TokenFileArgs,
        /// The verb.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check a config file and print it with every default filled in.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(long, env = "AGENTENV_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the OpenAPI document.
    Openapi,
}

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The daemon's address: http://HOST:PORT, https://HOST:PORT or unix:/PATH.
    #[arg(
        long,
        global = true,
        env = "AGENTENV_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// CA certificate (PEM) an https:// daemon's certificate must chain to.
    #[arg(long, global = true, env = "AGENTENV_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for a daemon that requires one (mTLS).
    #[arg(long, global = true, env = "AGENTENV_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "AGENTENV_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The API token (`agentenv token create`), sent as `Authorization:
    /// Bearer TOKEN`.
    #[arg(long, global = true, env = "AGENTENV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientOpts {
    /// A client of the daemon these options name (with its TLS files), with
    /// the token if given.
    pub fn client(&self) -> anyhow::Result<agentenv_client::ApiClient> {
        let tls = agentenv_client::TlsOptions {
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
        let c = agentenv_client::ApiClient::with_tls(&self.server, &tls)?;
        Ok(match &self.token {
            Some(t) => c.with_token(t.trim()),
            None => c,
        })
    }
}

/// Which tokens file `agentenv token` edits.
#[derive(Debug, Clone, Args)]
pub struct TokenFileArgs {
    /// The tokens file [default: the config's `[auth] tokens_file`].
    #[arg(long, global = true)]
    pub tokens_file: Option<PathBuf>,
    /// The daemon's configuration file, for its `[auth] tokens_file`.
    #[arg(long, global = true, env = "AGENTENV_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `agentenv token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add a token and print it (once: only its hash is kept).
    Create {
        /// Its name: the `owner` of what it creates, and its name in the audit log.
        name: String,
        /// `user` (only its own VMs and snapshots) or `admin` (everything).
        #[arg(long, value_parser = parse_scope)]
        scope: agentenv_core::principal::Scope,
    },
    /// List the tokens' names and scopes (never their hashes).
    #[command(alias = "list")]
    Ls,
    /// Remove a token (the daemon stops accepting it on SIGHUP or restart).
    Revoke {
        /// Its name.
        name: String,
    },
}

fn parse_scope(s: &str) -> Result<agentenv_core::principal::Scope, String> {
    s.parse()
}

/// `agentenv vm …`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM.
    Create(Box<CreateArgs>),
    /// List VMs.
    Ls,
    /// Show one VM.
    Show {
        /// The VM's id.
        vm_id: String,
    },
    /// Pause a running VM.
    Pause {
        /// The VM's id.
        vm_id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's id.
        vm_id: String,
    },
    /// Power a VM off (killed after the shutdown timeout); the record stays.
    Shutdown {
        /// The VM's id.
        vm_id: String,
    },
    /// Stop a VM if needed and remove it with its session directory.
    Rm {
        /// The VM's id.
        vm_id: String,
    },
    /// Run a command in a VM through its guest agent, streaming its output;
    /// exits with the command's exit status (128+N for signal N, 124 on timeout).
    Exec(ExecArgs),
    /// Copy a file into or out of a VM: `cp LOCAL VM:/PATH` or `cp VM:/PATH LOCAL`
    /// (`-` is stdin/stdout).
    Cp(CpArgs),
    /// Snapshot a VM's writable disk, or with --memory the whole VM (a
    /// running VM is paused for the copy).
    Snapshot {
        /// The VM's id.
        vm_id: String,
        /// The snapshot's id (default `{vm_id}-{UTC timestamp}`).
        #[arg(long = "id")]
        snapshot_id: Option<String>,
        /// A full snapshot: memory, vCPUs and devices too, so VMs restored
        /// from it run on without booting.
        #[arg(long)]
        memory: bool,
    },
    /// Start a new VM from a full snapshot, without booting.
    Restore {
        /// The new VM's id.
        vm_id: String,
        /// The full snapshot.
        #[arg(long = "snapshot")]
        snapshot_id: String,
        /// Answer only once the guest agent answers.
        #[arg(long)]
        wait_ready: bool,
    },
    /// New running VMs from a VM's current state (it runs on after a short pause).
    Fork {
        /// The VM's id.
        vm_id: String,
        /// How many clones.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
        /// Their ids, comma-separated (default `{vm_id}-fork-{n}`).
        #[arg(long = "ids", value_delimiter = ',')]
        vm_ids: Option<Vec<String>>,
    },
    /// Put a VM back to a full snapshot in place (same id and address).
    Reset {
        /// The VM's id.
        vm_id: String,
        /// The full snapshot.
        snapshot_id: String,
    },
}

/// `agentenv vm exec` options.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM's id.
    pub vm_id: String,
    /// Environment variable for the command, NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Seconds after which the command is killed.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Send this process's stdin to the command (at most 48 KiB).
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// `agentenv vm cp` options.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a local path, `-`, or VM:/PATH.
    pub src: String,
    /// Destination: a local path, `-`, or VM:/PATH.
    pub dst: String,
    /// Permission bits of an uploaded file, in octal (default: the local file's).
    #[arg(long)]
    pub mode: Option<String>,
    /// Create missing parent directories in the guest.
    #[arg(long, short = 'p')]
    pub parents: bool,
}

/// `VM:/PATH` split, when `s` names a guest path.
pub fn guest_side(s: &str) -> Option<(&str, &str)> {
    let (vm, path) = s.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then_some((vm, path))
}

/// `agentenv snapshot …`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots.
    Ls,
    /// Show one snapshot.
    Show {
        /// The snapshot's id.
        snapshot_id: String,
    },
    /// Copy a tmpfs snapshot to the durable tier.
    Persist {
        /// The snapshot's id.
        snapshot_id: String,
        /// Keep the tmpfs copy too.
        #[arg(long)]
        keep_tmpfs: bool,
    },
    /// Remove a snapshot from every tier.
    Rm {
        /// The snapshot's id.
        snapshot_id: String,
    },
}

/// `agentenv vm create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new VM's id.
    pub vm_id: String,
    /// Slots (one vCPU and `memory_mib_per_slot` MiB each).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Boot the base image ROOTFS_ID with a fresh writable overlay.
    #[arg(long, group = "disk_kind")]
    pub rootfs: Option<String>,
    /// Size of the overlay disk in GiB.
    #[arg(long, requires = "rootfs")]
    pub disk_size_gib: Option<u64>,
    /// Boot from a copy of a disk snapshot.
    #[arg(long, group = "disk_kind")]
    pub snapshot: Option<String>,
    /// Boot a host disk image as is.
    #[arg(long, group = "disk_kind")]
    pub direct: Option<String>,
    /// Existing TAP device (networking disabled in the daemon).
    #[arg(long, requires = "mac")]
    pub tap: Option<String>,
    /// Guest MAC address for --tap.
    #[arg(long, requires = "tap")]
    pub mac: Option<String>,
    /// Open a destination for the guest: CIDR or CIDR:PORT (repeatable;
    /// automatic networking).
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,
    /// No egress at all except --allow (automatic networking).
    #[arg(long)]
    pub no_internet: bool,
    /// Kernel file name under kernel_root.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initramfs file name under initramfs_root.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    pub boot_args: Option<String>,
    /// Share a host directory: HOST_DIR:GUEST_PATH[:ro|rw] (read-only by default; repeatable).
    #[arg(long = "share", value_parser = parse_share)]
    pub shares: Vec<ShareSpec>,
    /// Return only once the guest agent answers (the VM is then `ready`).
    #[arg(long)]
    pub wait_ready: bool,
    /// Seconds --wait-ready waits (default: the daemon's `agent.ready_timeout_s`).
    #[arg(long, requires = "wait_ready")]
    pub ready_timeout: Option<u64>,
}

fn parse_share(s: &str) -> Result<ShareSpec, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(host), Some(guest)) = (parts.next(), parts.next()) else {
        return Err("expected HOST_DIR:GUEST_PATH[:ro|rw]".into());
    };
    let read_only = match parts.next() {
        None | Some("ro") => true,
        Some("rw") => false,
        Some(other) => return Err(format!("mode {other:?} is not ro or rw")),
    };
    Ok(ShareSpec {
        host_path: host.into(),
        guest_path: guest.into(),
        read_only,
    })
}

impl CreateArgs {
    /// The create request these options describe.
    pub fn request(self) -> anyhow::Result<CreateVmRequest> {
        let disk = match (self.rootfs, self.snapshot, self.direct) {
            (Some(rootfs_id), None, None) => DiskSpec::Overlay {
                rootfs_id,
                disk_size_gib: self.disk_size_gib,
            },
            (None, Some(snapshot_id), None) => DiskSpec::Snapshot { snapshot_id },
            (None, None, Some(path)) => DiskSpec::Direct { path },
            _ => {
                return Err(anyhow!(
                    "give exactly one of --rootfs, --snapshot or --direct"
                ))
            }
        };
        let mut network = NetworkSpec {
            allow: self.allow,
            internet: self.no_internet.then_some(false),
            ..NetworkSpec::default()
        };
        if let (Some(tap_name), Some(guest_mac)) = (self.tap, self.mac) {
            network.tap_name = Some(tap_name);
            network.guest_mac = Some(guest_mac);
        }
        let network = (network != NetworkSpec::default()).then_some(network);
        Ok(CreateVmRequest {
            vm_id: self.vm_id,
            slots: self.slots,
            disk: Some(disk),
            restore: None,
            network,
            kernel: self.kernel,
            initrd: self.initrd,
            boot_args: self.boot_args,
            shares: self.shares,
            wait_ready: self.wait_ready,
            wait_ready_timeout_s: self.ready_timeout,
        })
    }
}
