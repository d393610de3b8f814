//! The CLI: a typed client of the API. Tables for people, `--json` for scripts.

use agentenv_api::{
    CreateSnapshotRequest, CreateVmRequest, DiskSpec, ErrorBody, NetworkSpec,
    PersistSnapshotRequest, ShareSpec, SnapshotInfo, SnapshotList, VmInfo, VmList,
};
use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The daemon's address.
    #[arg(
        long,
        global = true,
        env = "AGENTENV_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
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
    /// Snapshot a VM's writable disk (a running VM is paused for the copy).
    Snapshot {
        /// The VM's id.
        vm_id: String,
        /// The snapshot's id (default `{vm_id}-{UTC timestamp}`).
        #[arg(long = "id")]
        snapshot_id: Option<String>,
    },
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
    fn request(self) -> anyhow::Result<CreateVmRequest> {
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
        let network = match (self.tap, self.mac) {
            (Some(tap_name), Some(guest_mac)) => Some(NetworkSpec {
                tap_name,
                guest_mac,
            }),
            _ => None,
        };
        Ok(CreateVmRequest {
            vm_id: self.vm_id,
            slots: self.slots,
            disk,
            network,
            kernel: self.kernel,
            initrd: self.initrd,
            boot_args: self.boot_args,
            shares: self.shares,
        })
    }
}

/// A blocking client of the daemon's API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080`).
    pub fn new(server: &str) -> Client {
        Client {
            base: server.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(120))
                .build(),
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<Option<T>> {
        let url = format!("{}{path}", self.base);
        let req = self.agent.request(method, &url);
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(resp) if resp.status() == 204 => Ok(None),
            Ok(resp) => Ok(Some(
                resp.into_json()
                    .with_context(|| format!("bad response from {url}"))?,
            )),
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ErrorBody>(&text)
                    .map(|e| e.error)
                    .unwrap_or(text);
                Err(anyhow!("{msg} (HTTP {code})"))
            }
            Err(e) => Err(anyhow!(
                "cannot reach the agentenv daemon at {}: {e}",
                self.base
            )),
        }
    }

    /// `POST /v1/vm`.
    pub fn create(&self, req: &CreateVmRequest) -> anyhow::Result<VmInfo> {
        self.call("POST", "/v1/vm", Some(req))?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `GET /v1/vm`.
    pub fn list(&self) -> anyhow::Result<VmList> {
        self.call("GET", "/v1/vm", None::<&()>)?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `GET /v1/vm/{id}`.
    pub fn show(&self, id: &str) -> anyhow::Result<VmInfo> {
        self.call("GET", &format!("/v1/vm/{id}"), None::<&()>)?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `POST /v1/vm/{id}/{verb}` for pause, resume and shutdown.
    pub fn act(&self, id: &str, verb: &str) -> anyhow::Result<VmInfo> {
        self.call("POST", &format!("/v1/vm/{id}/{verb}"), None::<&()>)?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `DELETE` of a VM (`/v1/vm/{id}`) or a snapshot (`/v1/snapshots/{id}`).
    pub fn remove(&self, path: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>("DELETE", path, None::<&()>)?;
        Ok(())
    }

    /// `POST /v1/vm/{id}/snapshot`.
    pub fn snapshot(&self, id: &str, snapshot_id: Option<String>) -> anyhow::Result<SnapshotInfo> {
        self.call(
            "POST",
            &format!("/v1/vm/{id}/snapshot"),
            Some(&CreateSnapshotRequest { snapshot_id }),
        )?
        .ok_or_else(|| anyhow!("empty response"))
    }

    /// `GET /v1/snapshots`.
    pub fn snapshots(&self) -> anyhow::Result<SnapshotList> {
        self.call("GET", "/v1/snapshots", None::<&()>)?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `GET /v1/snapshots/{id}`.
    pub fn snapshot_info(&self, id: &str) -> anyhow::Result<SnapshotInfo> {
        self.call("GET", &format!("/v1/snapshots/{id}"), None::<&()>)?
            .ok_or_else(|| anyhow!("empty response"))
    }

    /// `POST /v1/snapshots/{id}/persist`.
    pub fn persist(&self, id: &str, keep_tmpfs: bool) -> anyhow::Result<SnapshotInfo> {
        self.call(
            "POST",
            &format!("/v1/snapshots/{id}/persist"),
            Some(&PersistSnapshotRequest { keep_tmpfs }),
        )?
        .ok_or_else(|| anyhow!("empty response"))
    }
}

/// Runs one `vm` command, printing its result.
pub fn run_vm(opts: &ClientOpts, cmd: VmCommand) -> anyhow::Result<()> {
    let c = Client::new(&opts.server);
    let out = std::io::stdout();
    let mut out = out.lock();
    match cmd {
        VmCommand::Create(args) => print_vm(&mut out, opts, &c.create(&args.request()?)?),
        VmCommand::Ls => {
            let list = c.list()?;
            if opts.json {
                print_json(&mut out, &list)
            } else {
                write_table(&mut out, &list.vms)
            }
        }
        VmCommand::Show { vm_id } => print_vm(&mut out, opts, &c.show(&vm_id)?),
        VmCommand::Pause { vm_id } => print_vm(&mut out, opts, &c.act(&vm_id, "pause")?),
        VmCommand::Resume { vm_id } => print_vm(&mut out, opts, &c.act(&vm_id, "resume")?),
        VmCommand::Shutdown { vm_id } => print_vm(&mut out, opts, &c.act(&vm_id, "shutdown")?),
        VmCommand::Rm { vm_id } => {
            c.remove(&format!("/v1/vm/{vm_id}"))?;
            print_deleted(&mut out, opts, &vm_id)
        }
        VmCommand::Snapshot { vm_id, snapshot_id } => {
            print_snapshot(&mut out, opts, &c.snapshot(&vm_id, snapshot_id)?)
        }
    }
}

/// Runs one `snapshot` command, printing its result.
pub fn run_snapshot(opts: &ClientOpts, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let c = Client::new(&opts.server);
    let out = std::io::stdout();
    let mut out = out.lock();
    match cmd {
        SnapshotCommand::Ls => {
            let list = c.snapshots()?;
            if opts.json {
                print_json(&mut out, &list)
            } else {
                write_snapshot_table(&mut out, &list.snapshots)
            }
        }
        SnapshotCommand::Show { snapshot_id } => {
            print_snapshot(&mut out, opts, &c.snapshot_info(&snapshot_id)?)
        }
        SnapshotCommand::Persist {
            snapshot_id,
            keep_tmpfs,
        } => print_snapshot(&mut out, opts, &c.persist(&snapshot_id, keep_tmpfs)?),
        SnapshotCommand::Rm { snapshot_id } => {
            c.remove(&format!("/v1/snapshots/{snapshot_id}"))?;
            print_deleted(&mut out, opts, &snapshot_id)
        }
    }
}

fn print_deleted(out: &mut impl std::io::Write, opts: &ClientOpts, id: &str) -> anyhow::Result<()> {
    if opts.json {
        print_json(out, &serde_json::json!({ "deleted": id }))
    } else {
        writeln!(out, "deleted {id}").map_err(Into::into)
    }
}

fn print_snapshot(
    out: &mut impl std::io::Write,
    opts: &ClientOpts,
    s: &SnapshotInfo,
) -> anyhow::Result<()> {
    if opts.json {
        return print_json(out, s);
    }
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let rows = [
        ("snapshot_id", s.snapshot_id.clone()),
        ("vm_id", s.vm_id.clone()),
        ("rootfs_id", opt(&s.rootfs_id)),
        ("tier", format!("{:?}", s.tier).to_lowercase()),
        ("status", format!("{:?}", s.status).to_lowercase()),
        ("tmpfs_path", opt(&s.tmpfs_path)),
        ("durable_path", opt(&s.durable_path)),
        ("logical_bytes", s.logical_bytes.to_string()),
        ("allocated_bytes", s.allocated_bytes.to_string()),
        ("sha256", s.sha256.clone()),
        ("created_at", s.created_at.to_rfc3339()),
        (
            "persisted_at",
            s.persisted_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "-".into()),
        ),
    ];
    for (k, v) in rows {
        writeln!(out, "{k:<15} {v}")?;
    }
    Ok(())
}

fn write_snapshot_table(
    out: &mut impl std::io::Write,
    snaps: &[SnapshotInfo],
) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.snapshot_id.clone(),
                s.vm_id.clone(),
                format!("{:?}", s.tier).to_lowercase(),
                format!("{:?}", s.status).to_lowercase(),
                s.allocated_bytes.to_string(),
                s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    write_rows(
        out,
        &[
            "SNAPSHOT_ID",
            "VM_ID",
            "TIER",
            "STATUS",
            "ALLOCATED",
            "CREATED",
        ],
        &rows,
    )
}

/// Left-aligned columns, two spaces apart.
fn write_rows(
    out: &mut impl std::io::Write,
    head: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(head.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn print_json(out: &mut impl std::io::Write, v: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

fn print_vm(out: &mut impl std::io::Write, opts: &ClientOpts, vm: &VmInfo) -> anyhow::Result<()> {
    if opts.json {
        return print_json(out, vm);
    }
    write_details(out, vm)
}

/// `vm ls` as a table.
pub fn write_table(out: &mut impl std::io::Write, vms: &[VmInfo]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.vm_id.clone(),
                v.state.to_string(),
                v.backend.to_string(),
                v.vcpus.to_string(),
                v.memory_mib.to_string(),
                v.guest_ip.clone().unwrap_or_else(|| "-".into()),
                v.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    write_rows(
        out,
        &[
            "VM_ID", "STATE", "BACKEND", "VCPUS", "MEM_MIB", "GUEST_IP", "CREATED",
        ],
        &rows,
    )
}

/// One VM as `key: value` lines.
pub fn write_details(out: &mut impl std::io::Write, v: &VmInfo) -> anyhow::Result<()> {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![
        ("vm_id", v.vm_id.clone()),
        ("state", v.state.to_string()),
        ("backend", v.backend.to_string()),
        ("vcpus", v.vcpus.to_string()),
        ("memory_mib", v.memory_mib.to_string()),
        ("disk", v.disk.kind.clone()),
        ("rootfs", opt(&v.disk.rootfs_path)),
        ("writable_disk", v.disk.writable_path.clone()),
        ("kernel", v.kernel.clone()),
        ("initrd", opt(&v.initrd)),
        ("boot_args", v.boot_args.clone()),
        ("tap_name", opt(&v.tap_name)),
        ("guest_mac", opt(&v.guest_mac)),
        ("host_ip", opt(&v.host_ip)),
        ("guest_ip", opt(&v.guest_ip)),
        ("api_socket", v.api_socket.clone()),
        ("session_dir", v.session_dir.clone()),
        ("console_log", v.console_log.clone()),
        (
            "pid",
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ),
        ("created_at", v.created_at.to_rfc3339()),
    ];
    for sh in &v.shares {
        rows.push((
            "share",
            format!(
                "{} -> {} ({}, {})",
                sh.host_path,
                sh.guest_path,
                if sh.read_only { "ro" } else { "rw" },
                sh.device
            ),
        ));
    }
    if let Some(e) = &v.exit {
        rows.push(("exit", e.cause.clone()));
    }
    for w in &v.warnings {
        rows.push(("warning", w.clone()));
    }
    for (k, val) in rows {
        writeln!(out, "{k:<14} {val}")?;
    }
    Ok(())
}
