//! `boot_ready`: how long a guest takes from "create" to its `AGENTENV_READY`
//! line through the agentenv daemon, against the very same QEMU command line
//! launched by hand, in the same run; and how long each guest artifact takes
//! to build.
//!
//! - **daemon**: `POST /v1/vm` (an overlay on `minimal.ext4`, 1 slot of
//!   256 MiB) to the real `agentenv` daemon (`vmm = "qemu"`, networking off),
//!   then wait until `AGENTENV_READY` appears in the VM's `console_log`
//!   (inotify on the file); the VM is then deleted (untimed).
//! - **by hand**: no daemon. The command line the daemon recorded in
//!   `qemu.json` for an untimed reference VM is replayed with a fresh overlay,
//!   QMP socket and VM id: clone the daemon's empty ext4 overlay template the
//!   way the daemon does (sparse copy plus a new file-system UUID), spawn
//!   `qemu-system-x86_64` with stdout and stderr on one pipe (as the daemon
//!   does), read the pipe until `AGENTENV_READY`; then kill it (untimed).
//!   Both sides time the overlay creation.
//! - The two sides alternate, which one goes first alternating every run.
//!   Each side first boots one untimed reference VM (warm caches, the daemon's
//!   overlay template, and the command line to replay).
//! - **artifacts**: unless `--skip-artifacts`, `scripts/build-artifacts.sh
//!   --output <temp dir> --force` runs once and its timing lines are shown.
//!
//! The target (daemon p50 ≤ 1.05 × by-hand p50) is informational: the exit
//! status is 0 whenever the run completes and cleans up. See `bench/README.md`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_bench::http::{Client, Endpoint};
use agentenv_bench::procfs;
use agentenv_bench::signals;
use agentenv_bench::stats::{round3, Summary};
use agentenv_host::disk;
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// What a booted guest prints on its console (docs/guest-contract.md).
const READY: &[u8] = b"AGENTENV_READY";
/// Target: daemon p50 ≤ this × by-hand p50.
const TARGET_RATIO: f64 = 1.05;
/// Guest memory (one slot).
const MEMORY_MIB: u64 = 256;
/// Size of the sparse overlay disk (the config's `default_disk_size_gib`).
const OVERLAY_GIB: u64 = 1;
/// Base image under the artifacts' `rootfs/`.
const ROOTFS_ID: &str = "minimal.ext4";
/// The daemon's `mkfs.ext4` flags for overlays (crates/agentenv-host/src/local.rs),
/// used by hand only when the daemon left no template to clone.
const MKFS_FLAGS: &[&str] = &[
    "-q",
    "-F",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
];
/// Both sides look for the ready line at most once per this interval: QEMU
/// writes the serial console a few bytes at a time (thousands of writes per
/// boot), and waking up for each would cost the guest CPU on a small machine.
/// It bounds the detection latency on both sides alike.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// How long a single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Placeholders in a normalised QEMU command line.
const P_SESSION: &str = "{SESSION_DIR}";
const P_SOCKET: &str = "{QMP_SOCKET}";
const P_ID: &str = "{VM_ID}";

/// Boot to AGENTENV_READY: the agentenv daemon against the same QEMU command
/// line by hand, interleaved in one run; plus the guest artifacts' build times.
#[derive(Debug, Parser)]
#[command(name = "boot_ready", version)]
struct Args {
    /// Timed boots per side (daemon and by hand, interleaved).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=999))]
    runs: u64,
    /// Do not run scripts/build-artifacts.sh (the artifact build times).
    #[arg(long)]
    skip_artifacts: bool,
    /// The guest artifacts to boot (kernels/vmlinuz, initramfs/initrd.img,
    /// rootfs/minimal.ext4) [default: <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Directory holding `agentenv` [default: this binary's directory, then
    /// <workspace>/target/release].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the run's temporary directory is made [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Give up on a boot that has not printed AGENTENV_READY after this many seconds.
    #[arg(long, default_value_t = 120, value_name = "S")]
    boot_timeout_s: u64,
    /// Keep the temporary directory (config, daemon log, build log) at the end.
    #[arg(long)]
    keep: bool,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

fn progress(msg: &str) {
    eprintln!("[boot_ready] {msg}");
}

fn workspace() -> PathBuf {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::canonicalize(&ws).unwrap_or(ws)
}

fn main() {
    let args = Args::parse();
    signals::install();
    let pre = match preflight(&args) {
        Ok(Preflight::Ready(p)) => p,
        Ok(Preflight::Skip(why)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"benchmark": "boot_ready", "skipped": why})
                    )
                    .expect("json serialises")
                );
            } else {
                println!("boot_ready: skipped: {why}");
            }
            return;
        }
        Err(e) => {
            eprintln!("boot_ready: {e:#}");
            std::process::exit(2);
        }
    };
    let mut env = match Env::new(&args, pre) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("boot_ready: setting up: {e:#}");
            std::process::exit(1);
        }
    };
    let result = run(&mut env, &args);
    if result.is_err() && signals::received().is_none() {
        let tail = env.daemon_log_tail(20);
        if !tail.is_empty() {
            eprintln!("--- last lines of the daemon log ---\n{tail}\n---");
        }
    }
    let cleanup = env.teardown(args.keep);
    match result {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.to_json(&env, &args, &cleanup))
                        .expect("json serialises")
                );
            } else {
                print!("{}", report.to_text(&env, &args, &cleanup));
            }
            let build_failed = report.build.as_ref().is_some_and(|b| b.error.is_some());
            if !cleanup.clean() {
                eprintln!(
                    "boot_ready: cleanup was not complete: {}",
                    cleanup.summary()
                );
                std::process::exit(1);
            }
            if build_failed {
                eprintln!("boot_ready: scripts/build-artifacts.sh failed (see above)");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("boot_ready: {e:#}");
            eprintln!("cleanup: {}", cleanup.summary());
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------- preflight

/// What the run needs from the machine.
struct Found {
    agentenv: PathBuf,
    qemu: PathBuf,
    qemu_version: String,
    artifacts: PathBuf,
    build_script: PathBuf,
}

enum Preflight {
    Ready(Found),
    /// A clean skip (exit 0): the machine cannot run the benchmark.
    Skip(String),
}

fn preflight(args: &Args) -> Result<Preflight> {
    let Some(qemu) = find_in_path("qemu-system-x86_64") else {
        return Ok(Preflight::Skip(
            "qemu-system-x86_64 not found in PATH (Debian: apt-get install qemu-system-x86)".into(),
        ));
    };
    if find_in_path("mkfs.ext4").is_none() {
        return Ok(Preflight::Skip(
            "mkfs.ext4 not found (the daemon makes overlays with it; Debian: e2fsprogs)".into(),
        ));
    }
    let ws = workspace();
    let artifacts = args
        .artifacts
        .clone()
        .unwrap_or_else(|| ws.join("artifacts"));
    let missing: Vec<String> = [
        "kernels/vmlinuz",
        "initramfs/initrd.img",
        &format!("rootfs/{ROOTFS_ID}"),
    ]
    .iter()
    .filter(|f| !artifacts.join(f).is_file())
    .map(|f| f.to_string())
    .collect();
    if !missing.is_empty() {
        return Ok(Preflight::Skip(format!(
            "guest artifacts missing in {}: {}; build them with `scripts/build-artifacts.sh \
             --output artifacts`",
            artifacts.display(),
            missing.join(", ")
        )));
    }
    let artifacts = std::fs::canonicalize(&artifacts)?;
    let agentenv = find_agentenv(args.bin_dir.as_deref())?;
    let build_script = ws.join("scripts/build-artifacts.sh");
    if !args.skip_artifacts && !build_script.is_file() {
        bail!(
            "{} not found (pass --skip-artifacts to time the boots only)",
            build_script.display()
        );
    }
    let qemu_version = Command::new(&qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".into());
    Ok(Preflight::Ready(Found {
        agentenv,
        qemu,
        qemu_version,
        artifacts,
        build_script,
    }))
}

fn find_agentenv(bin_dir: Option<&Path>) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    match bin_dir {
        Some(d) => dirs.push(d.to_path_buf()),
        None => {
            if let Some(d) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
            {
                dirs.push(d);
            }
            dirs.push(workspace().join("target/release"));
        }
    }
    for d in &dirs {
        let a = d.join("agentenv");
        if a.is_file() {
            return Ok(std::fs::canonicalize(a)?);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "cannot find `agentenv` (looked in {}).\n\
         This benchmark builds nothing itself; build the daemon first with:\n\n    \
         cargo build --release -p agentenv\n",
        looked.join(", ")
    )
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------- environment

/// The run's directory and the daemon.
struct Env {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    found: Found,
    config: PathBuf,
    daemon: Option<Daemon>,
    fs: String,
}

struct Daemon {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    api: Client,
    log: PathBuf,
}

impl Env {
    fn new(args: &Args, found: Found) -> Result<Env> {
        let parent = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix("ae-boot-")
            .tempdir_in(&parent)
            .with_context(|| {
                format!("cannot make a temporary directory in {}", parent.display())
            })?;
        let root = std::fs::canonicalize(tmp.path())?;
        for sub in ["sessions", "s", "snap", "hand"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let mut env = Env {
            tmp: Some(tmp),
            root,
            found,
            config: PathBuf::new(),
            daemon: None,
            fs: String::new(),
        };
        env.config = env.write_config()?;
        env.fs = procfs::fs_type(&env.root);
        Ok(env)
    }

    fn write_config(&self) -> Result<PathBuf> {
        let r = &self.root;
        let a = &self.found.artifacts;
        let q = |path: PathBuf| serde_json::to_string(&path.display().to_string()).expect("string");
        let text = format!(
            r#"# agentenv-bench boot_ready
session_root = {}
socket_root = {}
snapshots_root = {}
tmpfs_snapshot_root = {}
hdfs_snapshot_root = {}
rootfs_root = {}
kernel_root = {}
initramfs_root = {}
qemu_binary = {}
vmm = "qemu"
default_kernel = "vmlinuz"
default_initrd = "initrd.img"
memory_mib_per_slot = {MEMORY_MIB}
default_slots = 1
default_disk_size_gib = {OVERLAY_GIB}
shutdown_timeout_s = 5
startup_timeout_ms = 30000
request_timeout_ms = 30000

# The benchmark runs in the host's own network namespace: it must never
# create TAPs or firewall rules there.
[network]
enable = false
"#,
            q(r.join("sessions")),
            q(r.join("s")),
            q(r.join("snap")),
            q(r.join("snap/tmpfs")),
            q(r.join("snap/durable")),
            q(a.join("rootfs")),
            q(a.join("kernels")),
            q(a.join("initramfs")),
            q(self.found.qemu.clone()),
        );
        let path = r.join("agentenv.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn start_daemon(&mut self) -> Result<()> {
        let mut last_err = None;
        for _ in 0..3 {
            match self.try_start_daemon() {
                Ok(d) => {
                    self.daemon = Some(d);
                    return Ok(());
                }
                // Another process may have taken the free port; try another one.
                Err(e) if format!("{e:#}").contains("cannot listen") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("three attempts"))
    }

    fn try_start_daemon(&mut self) -> Result<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = self.root.join("daemon.log");
        let log_file = File::create(&log)?;
        let mut cmd = Command::new(&self.found.agentenv);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            // Its own process group: a Ctrl-C in the terminal reaches only this
            // benchmark, which then deletes the VM and stops the daemon in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. If this benchmark dies without
        // cleaning up, the daemon gets SIGTERM and stops its VMs itself.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.found.agentenv.display()))?;
        let pid = child.id();
        let mut d = Daemon {
            child,
            pid,
            addr,
            api: Client::new(Endpoint::Tcp(addr), IO_TIMEOUT),
            log,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = d.child.try_wait()? {
                let tail = tail_lines(&d.log, 10);
                bail!("the daemon exited at start ({status}): {tail}");
            }
            if signals::received().is_some() || start.elapsed() > Duration::from_secs(30) {
                let _ = d.child.kill();
                let _ = d.child.wait();
                signals::check()?;
                bail!("the daemon did not answer /v1/health within 30 s");
            }
            if let Ok(r) = d.api.request("GET", "/v1/health", None) {
                if r.status == 200 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon runs")
    }

    fn daemon_log_tail(&self, n: usize) -> String {
        self.daemon
            .as_ref()
            .map(|d| tail_lines(&d.log, n))
            .unwrap_or_default()
    }

    /// Deletes every VM, stops the daemon with SIGTERM, kills (and reports) any
    /// process still naming the run's directory, and removes the directory.
    fn teardown(&mut self, keep: bool) -> Cleanup {
        let mut c = Cleanup::default();
        if let Some(mut d) = self.daemon.take() {
            let ids: Vec<String> = match d.api.request("GET", "/v1/vm", None).and_then(|r| r.json())
            {
                Ok(v) => v["vms"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|vm| vm["vm_id"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                Err(e) => {
                    c.errors.push(format!("listing VMs: {e}"));
                    Vec::new()
                }
            };
            for id in &ids {
                match d.api.request("DELETE", &format!("/v1/vm/{id}"), None) {
                    Ok(r) if r.status == 204 => c.deleted += 1,
                    Ok(r) => c
                        .errors
                        .push(format!("DELETE {id}: HTTP {}: {}", r.status, r.text())),
                    Err(e) => c.errors.push(format!("DELETE {id}: {e}")),
                }
            }
            // SAFETY: plain kill(2) on our own child, not reaped yet.
            unsafe {
                libc::kill(d.pid as i32, libc::SIGTERM);
            }
            let t = Instant::now();
            let status = loop {
                match d.child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if t.elapsed() < Duration::from_secs(30) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        c.errors
                            .push("the daemon did not exit within 30 s of SIGTERM; killed".into());
                        let _ = d.child.kill();
                        break d.child.wait().ok();
                    }
                }
            };
            c.daemon_exit = status.map(|s| s.to_string());
            c.daemon_exit_ok = status.is_some_and(|s| s.success());
        } else {
            c.daemon_exit_ok = true;
        }
        // Any process still naming the run's directory: a QEMU, a build step.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut left = procfs::processes_mentioning(&self.root);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = procfs::processes_mentioning(&self.root);
        }
        for (pid, cmd) in &left {
            c.leftover.push(format!("{pid} {cmd}"));
            // SAFETY: plain kill(2) of a leftover of this run, by its pid.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if keep {
                c.kept_dir = Some(tmp.keep().display().to_string());
            } else if let Err(e) = tmp.close() {
                c.errors
                    .push(format!("removing {}: {e}", self.root.display()));
            } else {
                c.dir_removed = true;
            }
        }
        c
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.daemon.is_some() || self.tmp.is_some() {
            let _ = self.teardown(false);
        }
    }
}

// ---------------------------------------------------------------- QEMU command line

/// A QEMU command line as the daemon recorded it in `qemu.json`, with the
/// VM's own session directory, QMP socket and id replaced by placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QemuCmd {
    binary: PathBuf,
    args: Vec<String>,
}

impl QemuCmd {
    fn from_doc(doc: &Value, session_dir: &str, socket: &str, vm_id: &str) -> Result<QemuCmd> {
        let binary = doc["binary"]
            .as_str()
            .context("qemu.json has no \"binary\"")?;
        let raw = doc["args"]
            .as_array()
            .context("qemu.json has no \"args\"")?;
        let id_param = format!("agentenv.vm_id={vm_id}");
        let id_placeholder = format!("agentenv.vm_id={P_ID}");
        let mut args = Vec::with_capacity(raw.len());
        for a in raw {
            let a = a.as_str().context("a qemu.json argument is not a string")?;
            let a = if a == vm_id {
                P_ID.to_string()
            } else {
                a.replace(socket, P_SOCKET)
                    .replace(session_dir, P_SESSION)
                    .replace(&id_param, &id_placeholder)
            };
            args.push(a);
        }
        let cmd = QemuCmd {
            binary: PathBuf::from(binary),
            args,
        };
        for p in [P_SESSION, P_SOCKET, P_ID] {
            ensure!(
                cmd.args.iter().any(|a| a.contains(p)),
                "the daemon's QEMU command line does not name its {} ({}); \
                 cannot replay it",
                match p {
                    P_SESSION => "session directory",
                    P_SOCKET => "QMP socket",
                    _ => "VM id",
                },
                session_dir
            );
        }
        Ok(cmd)
    }

    /// The argument list for a VM of our own.
    fn instantiate(&self, session_dir: &Path, socket: &Path, vm_id: &str) -> Vec<String> {
        let s = session_dir.display().to_string();
        let q = socket.display().to_string();
        self.args
            .iter()
            .map(|a| {
                a.replace(P_SESSION, &s)
                    .replace(P_SOCKET, &q)
                    .replace(P_ID, vm_id)
            })
            .collect()
    }

    /// The value after `flag`, if any.
    fn value_of(&self, flag: &str) -> Option<&str> {
        let at = self.args.iter().position(|a| a == flag)?;
        self.args.get(at + 1).map(String::as_str)
    }
}

// ---------------------------------------------------------------- waiting for READY

/// Finds `READY` in a stream fed in pieces, and keeps its tail for errors.
struct Scanner {
    carry: Vec<u8>,
    tail: Vec<u8>,
}

impl Scanner {
    fn new() -> Scanner {
        Scanner {
            carry: Vec::new(),
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> bool {
        self.tail.extend_from_slice(data);
        if self.tail.len() > 4096 {
            self.tail.drain(..self.tail.len() - 2048);
        }
        self.carry.extend_from_slice(data);
        let found = self.carry.windows(READY.len()).any(|w| w == READY);
        let keep = READY.len() - 1;
        if self.carry.len() > keep {
            self.carry.drain(..self.carry.len() - keep);
        }
        found
    }

    fn tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// Waits until `fd` is readable or `ms` milliseconds pass; EINTR counts as a timeout.
fn poll_in(fd: BorrowedFd<'_>, ms: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Waits until the file at `path` (the daemon's console log) contains `READY`,
/// woken by inotify on every write.
fn wait_ready_in_file(path: &Path, deadline: Instant, timeout: Duration) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall; the fd is owned below.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    ensure!(
        raw >= 0,
        "inotify_init1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let ino = unsafe { OwnedFd::from_raw_fd(raw) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid descriptor and NUL-terminated path.
    let wd = unsafe {
        libc::inotify_add_watch(
            ino.as_raw_fd(),
            c_path.as_ptr(),
            libc::IN_MODIFY | libc::IN_CLOSE_WRITE,
        )
    };
    ensure!(
        wd >= 0,
        "inotify on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // Opened after the watch: nothing written in between is missed.
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut pos = 0u64;
    let mut scan = Scanner::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = [0u8; 4096];
    loop {
        // The log is rotated to NAME.1 only past its size limit; start over if
        // it ever shrinks.
        if f.metadata()?.len() < pos {
            f = File::open(path)?;
            pos = 0;
        }
        f.seek(SeekFrom::Start(pos))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if scan.feed(&buf[..n]) {
                return Ok(());
            }
        }
        signals::check()?;
        ensure!(
            Instant::now() < deadline,
            "no AGENTENV_READY in {} within {} s; its last lines:\n{}",
            path.display(),
            timeout.as_secs(),
            scan.tail()
        );
        if poll_in(ino.as_fd(), 100)? {
            // Let writes accumulate, then drain the events: they only say
            // "something was written".
            std::thread::sleep(CHECK_EVERY);
            // SAFETY: reading into a local buffer of the given length.
            unsafe {
                libc::read(ino.as_raw_fd(), events.as_mut_ptr().cast(), events.len());
            }
        }
    }
}

// ---------------------------------------------------------------- the daemon side

struct DaemonBoot {
    /// POST /v1/vm → AGENTENV_READY in the console log.
    ready: Duration,
    /// POST /v1/vm → 201 (overlay made, QEMU spawned, QMP answered).
    post: Duration,
    /// DELETE /v1/vm/{id} (untimed part).
    delete: Duration,
    /// The command line the daemon ran, normalised.
    cmd: QemuCmd,
    /// CPU time the daemon process used from POST to ready.
    daemon_cpu: Option<Duration>,
    /// CPU time its QEMU had used when the ready line was seen.
    qemu_cpu: Option<Duration>,
}

fn daemon_boot(env: &mut Env, id: &str, timeout: Duration) -> Result<DaemonBoot> {
    let body = json!({
        "vm_id": id,
        "slots": 1,
        "disk": {"kind": "overlay", "rootfs_id": ROOTFS_ID},
    });
    let d = env.daemon();
    let daemon_pid = d.pid;
    let cpu0 = cpu_time(daemon_pid);
    let t0 = Instant::now();
    let r = d
        .api
        .request_json("POST", "/v1/vm", &body)
        .context("POST /v1/vm")?;
    let post = t0.elapsed();
    ensure!(
        r.status == 201,
        "POST /v1/vm: HTTP {} (wanted 201): {}",
        r.status,
        r.text()
    );
    let v = r.json()?;
    ensure!(v["state"] == "running", "created vm is {}: {v}", v["state"]);
    let console = v["console_log"]
        .as_str()
        .context("the create response has no console_log")?;
    wait_ready_in_file(Path::new(console), t0 + timeout, timeout)
        .with_context(|| format!("daemon VM {id}"))?;
    let ready = t0.elapsed();
    let qemu_cpu = v["pid"].as_u64().and_then(|p| cpu_time(p as u32));
    let daemon_cpu = cpu_time(daemon_pid)
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a));

    // Untimed: what the daemon ran, then delete.
    let session_dir = v["session_dir"]
        .as_str()
        .context("the create response has no session_dir")?;
    let socket = v["api_socket"]
        .as_str()
        .context("the create response has no api_socket")?;
    let doc_path = Path::new(session_dir).join("qemu.json");
    let doc: Value = serde_json::from_slice(
        &std::fs::read(&doc_path).with_context(|| format!("cannot read {}", doc_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", doc_path.display()))?;
    let cmd = QemuCmd::from_doc(&doc, session_dir, socket, id)?;
    let t1 = Instant::now();
    let r = d
        .api
        .request("DELETE", &format!("/v1/vm/{id}"), None)
        .with_context(|| format!("DELETE /v1/vm/{id}"))?;
    let delete = t1.elapsed();
    ensure!(
        r.status == 204,
        "DELETE /v1/vm/{id}: HTTP {}: {}",
        r.status,
        r.text()
    );
    Ok(DaemonBoot {
        ready,
        post,
        delete,
        cmd,
        daemon_cpu,
        qemu_cpu,
    })
}

// ---------------------------------------------------------------- the by-hand side

/// How the by-hand side makes its overlay.
#[derive(Debug, Clone)]
enum OverlayMethod {
    /// Clone the daemon's empty ext4 template (as the daemon does).
    Template(PathBuf),
    /// `truncate` + `mkfs.ext4` with the daemon's flags.
    Mkfs(PathBuf),
}

impl OverlayMethod {
    /// The daemon's template for our overlay size, if it made one; else mkfs.
    fn find(root: &Path) -> Result<OverlayMethod> {
        let dir = root.join("snap/templates");
        let size = OVERLAY_GIB << 30;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut found: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() == size))
                .map(|e| e.path())
                .collect();
            found.sort();
            if let Some(t) = found.pop() {
                return Ok(OverlayMethod::Template(t));
            }
        }
        let mkfs = find_in_path("mkfs.ext4").context("mkfs.ext4 not found")?;
        Ok(OverlayMethod::Mkfs(mkfs))
    }

    fn describe(&self) -> String {
        match self {
            OverlayMethod::Template(t) => format!(
                "a sparse copy of the daemon's empty ext4 template {} plus a new file-system \
                 UUID (the daemon's own code, agentenv_host::disk)",
                t.file_name().unwrap_or_default().to_string_lossy()
            ),
            OverlayMethod::Mkfs(_) => format!(
                "truncate to {OVERLAY_GIB} GiB + mkfs.ext4 {} (the daemon left no template)",
                MKFS_FLAGS.join(" ")
            ),
        }
    }

    /// Makes `path`; returns how the copy was done (for the report).
    fn make(&self, path: &Path) -> Result<String> {
        match self {
            OverlayMethod::Template(t) => {
                let stats = disk::copy_sparse(t, path)
                    .with_context(|| format!("cannot clone {}", t.display()))?;
                let uuid = disk::random_uuid()?;
                disk::set_ext4_uuid(path, uuid)
                    .with_context(|| format!("cannot set the UUID of {}", path.display()))?;
                Ok(stats.method.as_str().to_string())
            }
            OverlayMethod::Mkfs(mkfs) => {
                File::create_new(path)?.set_len(OVERLAY_GIB << 30)?;
                let out = Command::new(mkfs)
                    .args(MKFS_FLAGS)
                    .arg(path)
                    .stdin(Stdio::null())
                    .output()
                    .context("cannot run mkfs.ext4")?;
                ensure!(
                    out.status.success(),
                    "mkfs.ext4: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok("mkfs.ext4".into())
            }
        }
    }
}

/// A QEMU started by hand; killed (process group), reaped and its files
/// removed when dropped.
struct HandVm {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl HandVm {
    /// Kill, reap, remove the socket and the session directory.
    fn kill(&mut self) -> Duration {
        let t0 = Instant::now();
        if let Some(mut child) = self.child.take() {
            // SAFETY: the group leader is our unreaped child, so the id is ours.
            unsafe {
                libc::killpg(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.dir);
        t0.elapsed()
    }
}

impl Drop for HandVm {
    fn drop(&mut self) {
        self.kill();
    }
}

struct HandBoot {
    /// Overlay creation → AGENTENV_READY on QEMU's stdout.
    ready: Duration,
    /// Making the overlay (part of `ready`).
    overlay: Duration,
    /// Kill, reap, remove the overlay (untimed part).
    kill: Duration,
    copy_method: String,
    /// CPU time QEMU had used when the ready line was seen.
    qemu_cpu: Option<Duration>,
}

fn hand_boot(
    env: &Env,
    cmd: &QemuCmd,
    overlay: &OverlayMethod,
    id: &str,
    timeout: Duration,
) -> Result<HandBoot> {
    let dir = env.root.join("hand").join(id);
    let socket = env.root.join("s").join(format!("{id}.sock"));
    let args = cmd.instantiate(&dir, &socket, id);
    // The replay must not touch anything of the daemon's.
    let daemon_sessions = env.root.join("sessions").display().to_string();
    if let Some(a) = args.iter().find(|a| a.contains(&daemon_sessions)) {
        bail!("the replayed command line still names a daemon session: {a}");
    }

    let t0 = Instant::now();
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut vm = HandVm {
        child: None,
        socket,
        dir: dir.clone(),
    };
    let copy_method = overlay.make(&dir.join("overlay.ext4"))?;
    let overlay_took = t0.elapsed();
    // stdout and stderr on one pipe, stdin closed, own process group: as the
    // daemon spawns it (crates/agentenv-host/src/process.rs).
    let (reader, writer) = std::io::pipe().context("cannot make a pipe")?;
    let writer2 = writer.try_clone()?;
    let mut command = Command::new(&cmd.binary);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe. Should this benchmark die, QEMU dies too.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    vm.child = Some(
        command
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.binary.display()))?,
    );
    // Our copies of the write end go with `command`: EOF once QEMU is gone.
    drop(command);
    let mut reader = reader;
    let mut scan = Scanner::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = t0 + timeout;
    loop {
        if poll_in(reader.as_fd(), 100)? {
            // Let writes accumulate (the pipe holds 64 KiB; a boot prints ~18 KiB).
            std::thread::sleep(CHECK_EVERY);
            let n = reader.read(&mut buf)?;
            if n == 0 {
                let status = vm.child.as_mut().and_then(|c| c.wait().ok());
                bail!(
                    "QEMU by hand ({id}) exited before AGENTENV_READY ({}); its last lines:\n{}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    scan.tail()
                );
            }
            if scan.feed(&buf[..n]) {
                break;
            }
        }
        signals::check()?;
        ensure!(
            Instant::now() < deadline,
            "QEMU by hand ({id}): no AGENTENV_READY within {} s; its last lines:\n{}",
            timeout.as_secs(),
            scan.tail()
        );
    }
    let ready = t0.elapsed();
    let qemu_cpu = vm.child.as_ref().and_then(|c| cpu_time(c.id()));
    let kill = vm.kill();
    Ok(HandBoot {
        ready,
        overlay: overlay_took,
        kill,
        copy_method,
        qemu_cpu,
    })
}

// ---------------------------------------------------------------- artifacts

/// A running `build-artifacts.sh`: interrupted like a Ctrl-C (SIGINT to its
/// process group, so its scripts' EXIT traps remove their work directories),
/// then SIGTERM, then SIGKILL, and reaped, when dropped before it ends.
struct BuildProc {
    child: Option<Child>,
}

impl BuildProc {
    fn wait_for(child: &mut Child, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for BuildProc {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pgid = child.id() as i32;
        for (sig, within) in [
            (libc::SIGINT, Duration::from_secs(30)),
            (libc::SIGTERM, Duration::from_secs(5)),
        ] {
            // SAFETY: the group leader is our unreaped child, so the group is ours.
            unsafe {
                libc::killpg(pgid, sig);
            }
            if Self::wait_for(&mut child, within) {
                // The leader is gone; anything left in its group gets SIGKILL.
                // SAFETY: as above; the group id stays ours until we reap it.
                unsafe {
                    libc::killpg(pgid, libc::SIGKILL);
                }
                let _ = child.wait();
                return;
            }
        }
        // SAFETY: as above.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        let _ = child.wait();
    }
}

struct ArtifactBuild {
    command: String,
    wall: Duration,
    /// The script's own timing lines, verbatim.
    lines: Vec<String>,
    /// The script's `--timings` JSON.
    timings: Value,
    error: Option<String>,
    /// Work directories that appeared in the scripts' cache during the build
    /// and were still there afterwards.
    cache_leftovers: Vec<String>,
}

/// The scripts' cache directory (scripts/lib/common.sh `cache_root`).
fn script_cache() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("AGENTENV_CACHE").filter(|c| !c.is_empty()) {
        return Some(PathBuf::from(c));
    }
    let var = PathBuf::from("/var/cache/agentenv");
    if var.is_dir() {
        return Some(var);
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentenv"))
}

fn cache_workdirs(cache: Option<&Path>) -> Vec<String> {
    let Some(rd) = cache.and_then(|c| std::fs::read_dir(c).ok()) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("build-kernel.") || n.starts_with("create-rootfs."))
        .collect();
    v.sort();
    v
}

fn build_artifacts(env: &Env) -> Result<ArtifactBuild> {
    let out = env.root.join("artifacts-build");
    let log = env.root.join("build-artifacts.log");
    let timings = env.root.join("build-timings.json");
    let script = &env.found.build_script;
    let command = format!("{} --output {} --force", script.display(), out.display());
    let cache = script_cache();
    let before = cache_workdirs(cache.as_deref());
    let log_file = File::create(&log)?;
    let mut cmd = Command::new(script);
    cmd.arg("--output")
        .arg(&out)
        .arg("--force")
        .arg("--timings")
        .arg(&timings)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    progress(&format!("artifacts: {command}"));
    let t0 = Instant::now();
    let mut proc = BuildProc {
        child: Some(
            cmd.spawn()
                .with_context(|| format!("cannot start {}", script.display()))?,
        ),
    };
    let mut shown = 0usize;
    let status = loop {
        let child = proc.child.as_mut().expect("running");
        let done = child.try_wait()?;
        // Echo the script's step lines as progress.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let complete = if text.ends_with('\n') {
            lines.len()
        } else {
            lines.len().saturating_sub(1)
        };
        for l in &lines[shown.min(complete)..complete] {
            if l.starts_with("==> [") {
                progress(&format!("  {l}"));
            }
        }
        shown = shown.max(complete);
        if let Some(s) = done {
            break s;
        }
        if let Err(e) = signals::check() {
            drop(proc);
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    proc.child = None;
    let wall = t0.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut lines = Vec::new();
    let mut in_summary = false;
    for l in text.lines() {
        if l.starts_with("==> build times") {
            in_summary = true;
        } else if l.starts_with("==> timings written") {
            in_summary = false;
            continue;
        } else if l.starts_with("==> [") && l.contains("] took ") {
            lines.push(l.to_string());
            continue;
        }
        if in_summary {
            lines.push(l.replace(&out.display().to_string(), "<temp dir>"));
        }
    }
    let timings_json = std::fs::read(&timings)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let after = cache_workdirs(cache.as_deref());
    let cache_leftovers = after
        .into_iter()
        .filter(|n| !before.contains(n))
        .map(|n| {
            cache
                .as_deref()
                .map(|c| c.join(&n).display().to_string())
                .unwrap_or(n)
        })
        .collect();
    let error = (!status.success()).then(|| {
        format!(
            "{} ({status}); last lines of its output:\n{}",
            script.display(),
            tail_lines(&log, 15)
        )
    });
    Ok(ArtifactBuild {
        command: command.replace(&out.display().to_string(), "<temp dir>"),
        wall,
        lines,
        timings: timings_json,
        error,
        cache_leftovers,
    })
}

// ---------------------------------------------------------------- the run

/// One interleaved pair.
struct Pair {
    daemon_first: bool,
    d: DaemonBoot,
    h: HandBoot,
}

struct Report {
    /// The untimed reference boots.
    ref_daemon: Duration,
    ref_daemon_post: Duration,
    ref_hand: Duration,
    cmd: QemuCmd,
    overlay: OverlayMethod,
    copy_method: String,
    pairs: Vec<Pair>,
    /// Timed daemon VMs whose command line differed from the reference's.
    cmd_mismatches: Vec<String>,
    build: Option<ArtifactBuild>,
    boots_wall: Duration,
    load: (f64, f64),
}

fn run(env: &mut Env, args: &Args) -> Result<Report> {
    let load_start = loadavg();
    let timeout = Duration::from_secs(args.boot_timeout_s.max(1));
    progress(&format!(
        "temp dir {} ({}); starting the daemon {}",
        env.root.display(),
        env.fs,
        env.found.agentenv.display()
    ));
    env.start_daemon()?;
    if let Some(d) = &env.daemon {
        progress(&format!("daemon pid {} on http://{}", d.pid, d.addr));
    }
    let started = Instant::now();

    progress(
        "reference boot through the daemon (untimed: builds its overlay template, warms caches)",
    );
    let r = daemon_boot(env, "bd-000", timeout)?;
    progress(&format!(
        "  ready after {:.0} ms (POST → 201 {:.0} ms)",
        r.ready.as_secs_f64() * 1e3,
        r.post.as_secs_f64() * 1e3
    ));
    let cmd = r.cmd.clone();
    let overlay = OverlayMethod::find(&env.root)?;
    progress(&format!(
        "replaying {} with {} arguments; overlay by hand: {}",
        cmd.binary.display(),
        cmd.args.len(),
        overlay.describe()
    ));
    progress("reference boot by hand (untimed: checks the replayed command line)");
    let h = hand_boot(env, &cmd, &overlay, "bh-000", timeout)?;
    progress(&format!(
        "  ready after {:.0} ms (overlay {:.1} ms, {})",
        h.ready.as_secs_f64() * 1e3,
        h.overlay.as_secs_f64() * 1e3,
        h.copy_method
    ));
    let mut rep = Report {
        ref_daemon: r.ready,
        ref_daemon_post: r.post,
        ref_hand: h.ready,
        cmd,
        overlay,
        copy_method: h.copy_method,
        pairs: Vec::new(),
        cmd_mismatches: Vec::new(),
        build: None,
        boots_wall: Duration::ZERO,
        load: (load_start, 0.0),
    };

    let n = args.runs as usize;
    progress(&format!(
        "{n} timed boots per side, interleaved, order alternating"
    ));
    for i in 0..n {
        signals::check()?;
        let daemon_first = i % 2 == 0;
        let did = format!("bd-{:03}", i + 1);
        let hid = format!("bh-{:03}", i + 1);
        let (d, h) = if daemon_first {
            let d = daemon_boot(env, &did, timeout)?;
            signals::check()?;
            (d, hand_boot(env, &rep.cmd, &rep.overlay, &hid, timeout)?)
        } else {
            let h = hand_boot(env, &rep.cmd, &rep.overlay, &hid, timeout)?;
            signals::check()?;
            (daemon_boot(env, &did, timeout)?, h)
        };
        if d.cmd != rep.cmd {
            rep.cmd_mismatches.push(did.clone());
        }
        progress(&format!(
            "  {}/{n} ({} first): daemon {:.0} ms, by hand {:.0} ms ({:.3}x)",
            i + 1,
            if daemon_first { "daemon" } else { "by hand" },
            ms(d.ready),
            ms(h.ready),
            ms(d.ready) / ms(h.ready)
        ));
        rep.pairs.push(Pair { daemon_first, d, h });
    }
    rep.boots_wall = started.elapsed();
    rep.load.1 = loadavg();

    if !args.skip_artifacts {
        signals::check()?;
        let b = build_artifacts(env)?;
        progress(&format!(
            "  build-artifacts.sh {} after {:.1} s",
            if b.error.is_none() { "done" } else { "FAILED" },
            b.wall.as_secs_f64()
        ));
        rep.build = Some(b);
    }
    Ok(rep)
}

// ---------------------------------------------------------------- cleanup

#[derive(Default)]
struct Cleanup {
    deleted: usize,
    daemon_exit: Option<String>,
    daemon_exit_ok: bool,
    leftover: Vec<String>,
    dir_removed: bool,
    kept_dir: Option<String>,
    errors: Vec<String>,
}

impl Cleanup {
    fn clean(&self) -> bool {
        self.leftover.is_empty() && self.errors.is_empty() && self.daemon_exit_ok
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{} VMs left to delete; daemon stopped by SIGTERM ({}); {} leftover processes; ",
            self.deleted,
            self.daemon_exit.as_deref().unwrap_or("not running"),
            self.leftover.len(),
        );
        match (&self.kept_dir, self.dir_removed) {
            (Some(d), _) => s.push_str(&format!("temp dir kept at {d}")),
            (None, true) => s.push_str("temp dir removed"),
            (None, false) => s.push_str("temp dir NOT removed"),
        }
        for l in &self.leftover {
            s.push_str(&format!("\n  leftover (killed): {l}"));
        }
        for e in &self.errors {
            s.push_str(&format!("\n  error: {e}"));
        }
        s
    }

    fn to_json(&self) -> Value {
        json!({
            "vms_deleted_at_cleanup": self.deleted,
            "daemon_exit": self.daemon_exit,
            "daemon_exit_ok": self.daemon_exit_ok,
            "leftover_processes": self.leftover,
            "temp_dir_removed": self.dir_removed,
            "temp_dir_kept": self.kept_dir,
            "errors": self.errors,
            "clean": self.clean(),
        })
    }
}

// ---------------------------------------------------------------- output

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// User + system CPU time of a process, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn host_info() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    json!({"cpus": cpus, "kernel": kernel, "cpu_model": model})
}

/// The median (lower middle for an even count) of plain numbers.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

impl Report {
    fn series(&self, f: impl Fn(&Pair) -> Duration) -> Vec<Duration> {
        self.pairs.iter().map(f).collect()
    }

    fn summaries(&self) -> (Summary, Summary) {
        (
            Summary::of(&self.series(|p| p.d.ready)).expect("at least one run"),
            Summary::of(&self.series(|p| p.h.ready)).expect("at least one run"),
        )
    }

    /// The median of the per-pair ratios (robust to load drifting over the run).
    fn pair_ratio(&self) -> f64 {
        median(
            self.pairs
                .iter()
                .map(|p| ms(p.d.ready) / ms(p.h.ready))
                .collect(),
        )
    }

    fn to_json(&self, env: &Env, args: &Args, cleanup: &Cleanup) -> Value {
        let (d, h) = self.summaries();
        let ratio = d.p50 / h.p50;
        let sj = |v: Vec<Duration>| Summary::of(&v).map(|s| s.to_json()).unwrap_or(Value::Null);
        json!({
            "benchmark": "boot_ready",
            "params": {"runs": args.runs, "boot_timeout_s": args.boot_timeout_s,
                       "memory_mib": MEMORY_MIB, "vcpus": 1, "overlay_gib": OVERLAY_GIB,
                       "rootfs": ROOTFS_ID},
            "host": host_info(),
            "temp_dir_fs": env.fs,
            "daemon": env.found.agentenv,
            "qemu": {"binary": self.cmd.binary, "version": env.found.qemu_version,
                     "accel": self.cmd.value_of("-accel"), "args": self.cmd.args},
            "artifacts": env.found.artifacts,
            "overlay_by_hand": self.overlay.describe(),
            "overlay_copy_method": self.copy_method,
            "command_line_mismatches": self.cmd_mismatches,
            "reference_untimed_ms": {"daemon": round3(ms(self.ref_daemon)),
                                     "daemon_post": round3(ms(self.ref_daemon_post)),
                                     "by_hand": round3(ms(self.ref_hand))},
            "boot_to_ready": {
                "daemon": d.to_json(),
                "by_hand": h.to_json(),
                "ratio_p50": round3(ratio),
                "median_pair_ratio": round3(self.pair_ratio()),
                "target": {"ratio_p50_max": TARGET_RATIO, "pass": ratio <= TARGET_RATIO},
            },
            "runs": self.pairs.iter().enumerate().map(|(i, p)| json!({
                "run": i + 1,
                "daemon_first": p.daemon_first,
                "daemon_ready_ms": round3(ms(p.d.ready)),
                "daemon_post_ms": round3(ms(p.d.post)),
                "daemon_delete_ms": round3(ms(p.d.delete)),
                "by_hand_ready_ms": round3(ms(p.h.ready)),
                "by_hand_overlay_ms": round3(ms(p.h.overlay)),
                "by_hand_kill_ms": round3(ms(p.h.kill)),
                "daemon_cpu_ms": p.d.daemon_cpu.map(|d| round3(ms(d))),
                "daemon_qemu_cpu_ms": p.d.qemu_cpu.map(|d| round3(ms(d))),
                "by_hand_qemu_cpu_ms": p.h.qemu_cpu.map(|d| round3(ms(d))),
            })).collect::<Vec<_>>(),
            "breakdown": {
                "daemon_post_to_201": sj(self.series(|p| p.d.post)),
                "by_hand_overlay": sj(self.series(|p| p.h.overlay)),
                "daemon_delete": sj(self.series(|p| p.d.delete)),
                "by_hand_kill_reap_rm": sj(self.series(|p| p.h.kill)),
            },
            "boots_wall_s": round3(self.boots_wall.as_secs_f64()),
            "loadavg_1min": {"start": self.load.0, "end": self.load.1},
            "artifact_build": match &self.build {
                None => json!({"skipped": true}),
                Some(b) => json!({
                    "command": b.command,
                    "wall_s": round3(b.wall.as_secs_f64()),
                    "timings": b.timings,
                    "lines": b.lines,
                    "error": b.error,
                    "cache_leftovers": b.cache_leftovers,
                }),
            },
            "cleanup": cleanup.to_json(),
        })
    }

    fn to_text(&self, env: &Env, args: &Args, cleanup: &Cleanup) -> String {
        let mut o = String::new();
        let w = &mut o;
        let host = host_info();
        let (d, h) = self.summaries();
        let ratio = d.p50 / h.p50;
        let _ = writeln!(
            w,
            "\nagentenv boot to AGENTENV_READY: the daemon vs the same QEMU command line by hand, same run"
        );
        let _ = writeln!(
            w,
            "  host      {} CPUs, {}, Linux {}",
            host["cpus"],
            host["cpu_model"].as_str().unwrap_or("?"),
            host["kernel"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            w,
            "  qemu      {} ({}), -accel {}",
            self.cmd.binary.display(),
            env.found.qemu_version,
            self.cmd.value_of("-accel").unwrap_or("?")
        );
        let _ = writeln!(
            w,
            "  guest     {}/kernels/vmlinuz + initrd.img, overlay ({OVERLAY_GIB} GiB) on {ROOTFS_ID}, \
             1 vCPU, {MEMORY_MIB} MiB",
            env.found.artifacts.display()
        );
        let _ = writeln!(
            w,
            "  daemon    {} (vmm = \"qemu\", [network] enable = false); temp dir on {}",
            env.found.agentenv.display(),
            env.fs
        );
        let _ = writeln!(
            w,
            "  by hand   the reference VM's qemu.json ({} args) with a fresh overlay, QMP socket and \
             VM id;\n            {}; spawn with stdout+stderr on one pipe, read it until the ready line",
            self.cmd.args.len(),
            if self.cmd_mismatches.is_empty() {
                format!(
                    "every timed daemon VM ran the identical command line ({} of {})",
                    self.pairs.len(),
                    self.pairs.len()
                )
            } else {
                format!(
                    "DIFFERENT command lines in daemon VMs {}",
                    self.cmd_mismatches.join(", ")
                )
            }
        );
        let _ = writeln!(
            w,
            "  overlay   both sides make it inside the timed part; by hand: {} ({})",
            self.overlay.describe(),
            self.copy_method
        );
        let _ = writeln!(
            w,
            "  run       {} timed boots per side (+1 untimed reference each), interleaved, order \
             alternating; {:.0} s of boots",
            self.pairs.len(),
            self.boots_wall.as_secs_f64()
        );
        let cpus = host["cpus"].as_f64().unwrap_or(1.0);
        let busy = self.load.0.max(self.load.1) > cpus * 0.5;
        let _ = writeln!(
            w,
            "  load      1-min load average {:.2} at the start, {:.2} at the end{}",
            self.load.0,
            self.load.1,
            if busy {
                " (the machine was busy: TCG boots slow down and vary with it)"
            } else {
                ""
            }
        );

        let _ = writeln!(
            w,
            "\n{:<48} {:>9} {:>9} {:>9} {:>3}",
            "boot → AGENTENV_READY (ms)", "p50", "min", "max", "n"
        );
        let row = |w: &mut String, name: &str, s: &Summary| {
            let _ = writeln!(
                w,
                "{:<48} {:>9.0} {:>9.0} {:>9.0} {:>3}",
                name, s.p50, s.min, s.max, s.n
            );
        };
        row(w, "daemon   POST /v1/vm → ready in console_log", &d);
        row(w, "by hand  overlay + spawn QEMU → ready on stdout", &h);
        let _ = writeln!(
            w,
            "{:<48} {:>8.3}x   target ≤ {TARGET_RATIO:.2}x   {}",
            "daemon / by hand (p50)",
            ratio,
            pass(ratio <= TARGET_RATIO)
        );
        let _ = writeln!(
            w,
            "{:<48} {:>8.3}x   (info: robust to load drifting during the run)",
            "  median of the per-run ratios",
            self.pair_ratio()
        );
        let _ = writeln!(
            w,
            "{:<48} {:>9.0} {:>9.0}   (untimed reference boots: daemon, by hand)",
            "  reference boots (ms)",
            ms(self.ref_daemon),
            ms(self.ref_hand)
        );

        let cpu = |d: Option<Duration>| d.map(|d| format!("{:.0}", ms(d))).unwrap_or("?".into());
        let _ = writeln!(
            w,
            "\n{:<4} {:<8} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "run",
            "first",
            "daemon",
            "by hand",
            "ratio",
            "POST→201",
            "overlay",
            "dmn CPU",
            "QEMU CPU",
            "QEMU CPU"
        );
        let _ = writeln!(
            w,
            "{:<4} {:<8} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "", "", "", "", "", "daemon", "by hand", "daemon", "daemon", "by hand"
        );
        for (i, p) in self.pairs.iter().enumerate() {
            let _ = writeln!(
                w,
                "{:<4} {:<8} {:>10.0} {:>10.0} {:>6.3}x {:>9.1} {:>9.1} {:>9} {:>9} {:>8}",
                i + 1,
                if p.daemon_first { "daemon" } else { "by hand" },
                ms(p.d.ready),
                ms(p.h.ready),
                ms(p.d.ready) / ms(p.h.ready),
                ms(p.d.post),
                ms(p.h.overlay),
                cpu(p.d.daemon_cpu),
                cpu(p.d.qemu_cpu),
                cpu(p.h.qemu_cpu)
            );
        }
        let p50 = |v: Vec<Duration>| Summary::of(&v).map(|s| s.p50).unwrap_or(f64::NAN);
        let _ = writeln!(
            w,
            "  all in ms. POST→201: the daemon's create (overlay, records, QEMU spawn, QMP handshake);\n  \
             overlay: making the by-hand overlay; dmn CPU: CPU time of the daemon process from POST to\n  \
             ready; QEMU CPU: CPU time of the VM's QEMU when the ready line was seen (10 ms ticks)"
        );
        let _ = writeln!(
            w,
            "  teardown (untimed, p50): DELETE /v1/vm/{{id}} {:.1} ms; by hand kill + reap + rm {:.1} ms",
            p50(self.series(|p| p.d.delete)),
            p50(self.series(|p| p.h.kill))
        );

        let _ = writeln!(w);
        match &self.build {
            None => {
                let _ = writeln!(w, "artifact build: skipped (--skip-artifacts)");
            }
            Some(b) => {
                let _ = writeln!(
                    w,
                    "artifact build: {} ({:.1} s wall)",
                    b.command,
                    b.wall.as_secs_f64()
                );
                for l in &b.lines {
                    let _ = writeln!(w, "  {l}");
                }
                if let Some(e) = &b.error {
                    let _ = writeln!(w, "  FAILED: {e}");
                }
                for l in &b.cache_leftovers {
                    let _ = writeln!(
                        w,
                        "  note: {l} appeared in the scripts' cache during the build and is still \
                         there (another build running at the same time, or an interrupted step)"
                    );
                }
            }
        }
        let _ = writeln!(w, "\ncleanup: {}", cleanup.summary());
        let _ = writeln!(
            w,
            "target: daemon p50 ≤ {TARGET_RATIO:.2}x by hand: {} (informational: the exit status \
             does not depend on it){}",
            pass(ratio <= TARGET_RATIO),
            if args.runs < 5 {
                "; fewer than 5 runs: a rough figure"
            } else {
                ""
            }
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_is_found_across_chunks() {
        let mut s = Scanner::new();
        assert!(!s.feed(b"boot...\nAGENTENV_RE"));
        assert!(s.feed(b"ADY vm_id=x boots=1\n"));
        let mut s = Scanner::new();
        assert!(!s.feed(b"AGENTENV_READ"));
        assert!(!s.feed(b""));
        assert!(s.feed(b"Y"));
    }

    #[test]
    fn command_lines_are_normalised_and_replayed() {
        let doc = json!({
            "binary": "/usr/bin/qemu-system-x86_64",
            "args": ["-name", "bd-000", "-append", "console=ttyS0 agentenv.vm_id=bd-000 agentenv.root=/dev/vda",
                     "-drive", "id=overlay,file=/t/sessions/bd-000/overlay.ext4,format=raw,if=none",
                     "-qmp", "unix:/t/s/bd-000.sock,server=on,wait=off"],
        });
        let c =
            QemuCmd::from_doc(&doc, "/t/sessions/bd-000", "/t/s/bd-000.sock", "bd-000").unwrap();
        let other = json!({
            "binary": "/usr/bin/qemu-system-x86_64",
            "args": ["-name", "bd-001", "-append", "console=ttyS0 agentenv.vm_id=bd-001 agentenv.root=/dev/vda",
                     "-drive", "id=overlay,file=/t/sessions/bd-001/overlay.ext4,format=raw,if=none",
                     "-qmp", "unix:/t/s/bd-001.sock,server=on,wait=off"],
        });
        let c1 =
            QemuCmd::from_doc(&other, "/t/sessions/bd-001", "/t/s/bd-001.sock", "bd-001").unwrap();
        assert_eq!(c, c1);
        let args = c.instantiate(
            Path::new("/t/hand/bh-001"),
            Path::new("/t/s/bh-001.sock"),
            "bh-001",
        );
        assert_eq!(
            args,
            [
                "-name",
                "bh-001",
                "-append",
                "console=ttyS0 agentenv.vm_id=bh-001 agentenv.root=/dev/vda",
                "-drive",
                "id=overlay,file=/t/hand/bh-001/overlay.ext4,format=raw,if=none",
                "-qmp",
                "unix:/t/s/bh-001.sock,server=on,wait=off"
            ]
        );
        // A command line that does not name its session cannot be replayed.
        let bad = json!({"binary": "q", "args": ["-name", "bd-000"]});
        assert!(
            QemuCmd::from_doc(&bad, "/t/sessions/bd-000", "/t/s/bd-000.sock", "bd-000").is_err()
        );
    }
}
