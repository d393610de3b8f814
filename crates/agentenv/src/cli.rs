//! The CLI: a typed client of the API. Tables for people, `--json` for scripts.

use agentenv_api::{
    CreateSnapshotRequest, CreateVmRequest, DiskSpec, ErrorBody, ExecEvent, ExecRequest,
    FileWritten, NetworkSpec, PersistSnapshotRequest, ShareSpec, SnapshotInfo, SnapshotList,
    VmInfo, VmList,
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
    /// Run a command in a VM through its guest agent, streaming its output;
    /// exits with the command's exit status (128+N for signal N, 124 on timeout).
    Exec(ExecArgs),
    /// Copy a file into or out of a VM: `cp LOCAL VM:/PATH` or `cp VM:/PATH LOCAL`
    /// (`-` is stdin/stdout).
    Cp(CpArgs),
    /// Snapshot a VM's writable disk (a running VM is paused for the copy).
    Snapshot {
        /// The VM's id.
        vm_id: String,
        /// The snapshot's id (default `{vm_id}-{UTC timestamp}`).
        #[arg(long = "id")]
        snapshot_id: Option<String>,
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
fn guest_side(s: &str) -> Option<(&str, &str)> {
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
            wait_ready: self.wait_ready,
            wait_ready_timeout_s: self.ready_timeout,
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

    /// An agent without an overall timeout, for streams (exec output, files).
    fn streaming(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(10))
            .build()
    }

    fn fail(&self, url: &str, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(code, resp) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ErrorBody>(&text)
                    .map(|e| e.error)
                    .unwrap_or(text);
                anyhow!("{msg} (HTTP {code})")
            }
            e => anyhow!(
                "cannot reach the agentenv daemon at {} ({url}): {e}",
                self.base
            ),
        }
    }

    /// `POST /v1/vm/{id}/exec` with `stream: true`: calls `on_event` for each
    /// event as it arrives.
    pub fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
        mut on_event: impl FnMut(ExecEvent) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use std::io::BufRead;
        let url = format!("{}/v1/vm/{id}/exec", self.base);
        let resp = self
            .streaming()
            .post(&url)
            .send_json(req)
            .map_err(|e| self.fail(&url, e))?;
        let reader = std::io::BufReader::new(resp.into_reader());
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading the output of {url}"))?;
            if line.is_empty() {
                continue;
            }
            let ev: ExecEvent = serde_json::from_str(&line)
                .with_context(|| format!("bad event from {url}: {line}"))?;
            on_event(ev)?;
        }
        Ok(())
    }

    /// `PUT /v1/vm/{id}/files`: streams `body` into the guest file `path`.
    pub fn upload(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        make_parents: bool,
        body: impl std::io::Read,
    ) -> anyhow::Result<FileWritten> {
        let url = format!("{}/v1/vm/{id}/files", self.base);
        let mut req = self.streaming().put(&url).query("path", path);
        if let Some(m) = mode {
            req = req.query("mode", &format!("{m:o}"));
        }
        if make_parents {
            req = req.query("make_parents", "true");
        }
        let resp = req
            .set("content-type", "application/octet-stream")
            .send(body)
            .map_err(|e| self.fail(&url, e))?;
        resp.into_json()
            .with_context(|| format!("bad response from {url}"))
    }

    /// `GET /v1/vm/{id}/files`: the guest file `path` as a stream.
    pub fn download(&self, id: &str, path: &str) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
        let url = format!("{}/v1/vm/{id}/files", self.base);
        let resp = self
            .streaming()
            .get(&url)
            .query("path", path)
            .call()
            .map_err(|e| self.fail(&url, e))?;
        Ok(Box::new(resp.into_reader()))
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
        VmCommand::Exec(args) => {
            drop(out);
            let code = run_exec(&c, args)?;
            std::process::exit(code);
        }
        VmCommand::Cp(args) => run_cp(&c, opts, &mut out, args),
    }
}

/// `vm exec`: streams the command's output to ours and returns its exit status.
fn run_exec(c: &Client, args: ExecArgs) -> anyhow::Result<i32> {
    use std::io::{Read, Write};
    let stdin = if args.stdin {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        Some(agentenv_api::base64::encode(&buf))
    } else {
        None
    };
    let req = ExecRequest {
        cmd: args.cmd,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        stdin: None,
        stdin_base64: stdin,
        timeout_s: args.timeout,
        stream: true,
    };
    let mut code = None;
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    c.exec_stream(&args.vm_id, &req, |ev| {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout { data } | ExecEvent::Stderr { data } if data.is_empty() => {}
            ExecEvent::Stdout { data } => {
                let b = agentenv_api::base64::decode(&data)
                    .ok_or_else(|| anyhow!("bad base64 output"))?;
                let mut o = stdout.lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            ExecEvent::Stderr { data } => {
                let b = agentenv_api::base64::decode(&data)
                    .ok_or_else(|| anyhow!("bad base64 output"))?;
                let mut e = stderr.lock();
                e.write_all(&b)?;
                e.flush()?;
            }
            ExecEvent::Exit {
                exit_code,
                signal,
                timed_out,
                ..
            } => {
                code = Some(if timed_out {
                    eprintln!("agentenv: the command timed out and was killed");
                    124
                } else {
                    match (exit_code, signal) {
                        (Some(c), _) => c,
                        (None, Some(s)) => 128 + s,
                        (None, None) => 1,
                    }
                });
            }
            ExecEvent::Error { error } => return Err(anyhow!("{error}")),
        }
        Ok(())
    })?;
    code.ok_or_else(|| anyhow!("the output ended without the command's exit status"))
}

/// `vm cp`: one side local, the other `VM:/PATH`.
fn run_cp(
    c: &Client,
    opts: &ClientOpts,
    out: &mut impl std::io::Write,
    args: CpArgs,
) -> anyhow::Result<()> {
    let mode = match &args.mode {
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .map_err(|_| anyhow!("--mode {m:?} is not an octal number"))?,
        ),
        None => None,
    };
    match (guest_side(&args.src), guest_side(&args.dst)) {
        (None, Some((vm, path))) => {
            let (reader, local_mode): (Box<dyn std::io::Read>, Option<u32>) = if args.src == "-" {
                (Box::new(std::io::stdin()), None)
            } else {
                let f = std::fs::File::open(&args.src)
                    .with_context(|| format!("cannot open {}", args.src))?;
                use std::os::unix::fs::PermissionsExt;
                let m = f.metadata().map(|m| m.permissions().mode() & 0o7777).ok();
                (Box::new(f), m)
            };
            let done = c.upload(vm, path, mode.or(local_mode), args.parents, reader)?;
            if opts.json {
                print_json(out, &done)
            } else {
                writeln!(out, "wrote {} bytes to {vm}:{}", done.bytes, done.path)
                    .map_err(Into::into)
            }
        }
        (Some((vm, path)), None) => {
            if args.mode.is_some() || args.parents {
                return Err(anyhow!("--mode and --parents apply to uploads only"));
            }
            let mut body = c.download(vm, path)?;
            if args.dst == "-" {
                std::io::copy(&mut body, &mut std::io::stdout().lock())
                    .context("writing to stdout")?;
                return Ok(());
            }
            // Written beside the target and renamed, so a failed copy leaves nothing.
            let dst = std::path::Path::new(&args.dst);
            let dst = if dst.is_dir() {
                dst.join(path.rsplit('/').next().unwrap_or("file"))
            } else {
                dst.to_path_buf()
            };
            let tmp = dst.with_file_name(format!(
                ".{}.agentenv-cp",
                dst.file_name().and_then(|n| n.to_str()).unwrap_or("file")
            ));
            let copy = (|| -> anyhow::Result<u64> {
                let mut f = std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                let n = std::io::copy(&mut body, &mut f)
                    .with_context(|| format!("copying {vm}:{path}"))?;
                f.sync_all()?;
                std::fs::rename(&tmp, &dst)
                    .with_context(|| format!("cannot rename into {}", dst.display()))?;
                Ok(n)
            })();
            let n = copy.inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            if opts.json {
                print_json(out, &serde_json::json!({"path": dst, "bytes": n}))
            } else {
                writeln!(out, "wrote {n} bytes to {}", dst.display()).map_err(Into::into)
            }
        }
        (Some(_), Some(_)) => Err(anyhow!(
            "copy between two VMs is not supported; go through the host"
        )),
        (None, None) => Err(anyhow!("one side must be VM:/ABSOLUTE_PATH")),
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
        ("ready", v.ready.to_string()),
        (
            "agent",
            v.agent
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_else(|| "-".into()),
        ),
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
