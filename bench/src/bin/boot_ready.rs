//! `boot_ready`: create → `AGENTENV_READY` through the agentenv daemon against
//! the very same QEMU command line launched by hand (the daemon's `qemu.json`
//! replayed), interleaved in one run; and how long the guest artifacts take to
//! build. See `bench/README.md`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_api::{CreateVmRequest, VmInfo, VmState};
use agentenv_bench::args::Common;
use agentenv_bench::daemon::{self, tail_lines, workspace, Harness, QemuGuest};
use agentenv_bench::procfs;
use agentenv_bench::report::{or_exit, skip, Cell, Limit, Report, Table};
use agentenv_bench::runner::{self, progress, rotated, rounds, Sides};
use agentenv_bench::signals;
use agentenv_bench::stats::{median, ms};
use agentenv_core::backend::{DriveSpec, LaunchSpec};
use agentenv_core::engine::{AGENT_SOCKET, CONSOLE_LOG};
use agentenv_core::host::DiskImages;
use agentenv_host::disk::Ext4Templates;
use agentenv_host::qemu::{command_document, qemu_args_for, Accel, GuestMemory, StartMode};
use agentenv_host::LocalHost;
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
/// Both sides look for the ready line at most once per this interval: QEMU
/// writes the serial console a few bytes at a time (thousands of writes per
/// boot), and waking up for each would cost the guest CPU on a small machine.
/// It bounds the detection latency on both sides alike.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// How long a single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Boot to AGENTENV_READY: the agentenv daemon against the same QEMU command
/// line by hand, interleaved in one run; plus the guest artifacts' build times.
#[derive(Debug, Parser)]
#[command(name = "boot_ready", version, about, long_about = None)]
struct Args {
    /// Timed boots per side (daemon and by hand, interleaved) [default: 5;
    /// --quick: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=999))]
    runs: Option<u64>,
    /// Do not run scripts/build-artifacts.sh (the artifact build times)
    /// [--quick: not run].
    #[arg(long)]
    skip_artifacts: bool,
    /// The guest artifacts to boot (kernels/vmlinuz, initramfs/initrd.img,
    /// rootfs/minimal.ext4) [default: <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Give up on a boot that has not printed AGENTENV_READY after this many seconds.
    #[arg(long, default_value_t = 120, value_name = "S")]
    boot_timeout_s: u64,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let runs = args.runs.unwrap_or(c.pick(5, 2)) as usize;
    let build = !(args.skip_artifacts || c.quick);
    let guest = QemuGuest::find(args.artifacts.as_deref(), ROOTFS_ID)
        .unwrap_or_else(|why| skip(&why, c.json));
    let [agentenv] = or_exit(
        daemon::find_binaries(
            c.bin_dir.as_deref(),
            ["agentenv"],
            "build the daemon first with:\n\n    cargo build --release -p agentenv\n",
        ),
        2,
        "",
    );
    let script = workspace().join("scripts/build-artifacts.sh");
    if build && !script.is_file() {
        let e = anyhow::anyhow!("{} not found (pass --skip-artifacts)", script.display());
        or_exit::<()>(Err(e), 2, "");
    }
    let mut h = or_exit(
        Harness::new(c.tmp_dir.as_deref(), "ae-boot-", &["hand"]).and_then(|mut h| {
            h.write_config(&daemon::qemu_config(&guest, MEMORY_MIB, OVERLAY_GIB))
                .map(|()| h)
        }),
        1,
        "setting up: ",
    );
    let mut rep = Report::new(
        "agentenv boot to AGENTENV_READY: the daemon vs the same QEMU command line by hand, same run",
        json!({"runs": runs, "boot_timeout_s": args.boot_timeout_s, "memory_mib": MEMORY_MIB,
               "vcpus": 1, "overlay_gib": OVERLAY_GIB, "rootfs": ROOTFS_ID, "artifact_build": build}),
    );
    rep.about(
        "guest",
        format!(
            "{}/kernels/vmlinuz + initrd.img, overlay ({OVERLAY_GIB} GiB) on {ROOTFS_ID}, 1 vCPU, \
             {MEMORY_MIB} MiB",
            guest.artifacts.display()
        ),
    )
    .about(
        "daemon",
        format!(
            "{} (vmm = \"qemu\", [network] enable = false); temp dir on {}",
            agentenv.display(),
            h.fs()
        ),
    );
    let timeout = Duration::from_secs(args.boot_timeout_s.max(1));
    let result = run(&mut h, &agentenv, &guest, runs, timeout, &mut rep);
    let result = result.and_then(|()| {
        if build {
            signals::check()?;
            artifacts_table(h.root(), &script, &mut rep)?;
        }
        Ok(())
    });
    let (result, cleanup) = h.finish(result, c.keep);
    rep.settle(result, "daemon", cleanup.cleaned());
    rep.finish(c.json)
}

// ---------------------------------------------------------------- QEMU command line

/// The daemon's QEMU command line, built by its own code
/// (`agentenv_host::qemu::qemu_args`) from what the API says of a VM, with
/// the binary, accelerator and TSC rate the daemon chose (read from the
/// `qemu.json` of its reference VM).
#[derive(Debug, Clone)]
struct QemuCmd {
    binary: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
    args: usize,
    /// Where the daemon keeps guest RAM files (its `guest_memory_root`).
    memory_dir: Option<PathBuf>,
}

impl QemuCmd {
    fn from_doc(doc: &Value) -> Result<QemuCmd> {
        let args: Vec<&str> = doc["args"]
            .as_array()
            .context("qemu.json has no \"args\"")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1))
        };
        Ok(QemuCmd {
            binary: doc["binary"]
                .as_str()
                .context("qemu.json has no \"binary\"")?
                .into(),
            accel: if after("-accel") == Some(&"kvm") {
                Accel::Kvm
            } else {
                Accel::Tcg
            },
            tsc_khz: after("-append").and_then(|a| {
                a.split_whitespace()
                    .find_map(|w| w.strip_prefix("tsc_early_khz=")?.parse().ok())
            }),
            args: args.len(),
            memory_dir: after("-object")
                .and_then(|o| o.split_once("mem-path="))
                .and_then(|(_, p)| Path::new(p).parent().map(Path::to_path_buf)),
        })
    }

    /// The arguments for VM `id` with its session in `dir`, its QMP socket at
    /// `socket` and (as the daemon's VMs) its RAM in a file in `memory_dir`,
    /// otherwise as the daemon's VM `v`.
    fn args(
        &self,
        v: &VmInfo,
        id: &str,
        dir: &Path,
        socket: &Path,
        memory_dir: Option<&Path>,
    ) -> Vec<OsString> {
        let drive = |id: &str, path: PathBuf, root: bool| DriveSpec {
            id: id.into(),
            path,
            read_only: root,
            is_root: root,
            fd: None,
        };
        let spec = LaunchSpec {
            memory_file: memory_dir.map(|d| d.join(format!("{id}.mem"))),
            cgroup_procs: Vec::new(),
            vm_id: id.into(),
            session_dir: dir.into(),
            control_socket: socket.into(),
            console_log: dir.join(CONSOLE_LOG),
            console_log_max_bytes: 0,
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            kernel: v.kernel.clone().into(),
            initrd: v.initrd.clone().map(PathBuf::from),
            boot_args: v.boot_args.replace(
                &format!("agentenv.vm_id={}", v.vm_id),
                &format!("agentenv.vm_id={id}"),
            ),
            drives: (v
                .disk
                .rootfs_path
                .iter()
                .map(|p| drive("rootfs", p.into(), true)))
            .chain([drive("overlay", overlay_in(v, dir), false)])
            .collect(),
            net: None,
            agent_socket: Some(dir.join(AGENT_SOCKET)),
            startup_timeout: Duration::ZERO,
            request_timeout: Duration::ZERO,
        };
        let mode = match &spec.memory_file {
            Some(path) => StartMode {
                memory: GuestMemory::File { path, shared: true },
                incoming: false,
            },
            None => StartMode::BOOT,
        };
        qemu_args_for(&spec, self.accel, self.tsc_khz, mode)
    }

    /// Whether `doc` (a VM's `qemu.json`) is exactly the command line this
    /// builds for the daemon's VM `v`.
    fn rebuilds(&self, v: &VmInfo, doc: &Value) -> bool {
        let (dir, socket) = (Path::new(&v.session_dir), Path::new(&v.api_socket));
        let args = self.args(v, &v.vm_id, dir, socket, self.memory_dir.as_deref());
        command_document(&self.binary, &args) == *doc
    }
}

/// Where VM `v`'s overlay goes in a session directory `dir`.
fn overlay_in(v: &VmInfo, dir: &Path) -> PathBuf {
    dir.join(
        Path::new(&v.disk.writable_path)
            .file_name()
            .unwrap_or_default(),
    )
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
    /// The VM, as the create answered.
    info: VmInfo,
    /// Its `qemu.json`: the command line the daemon ran.
    doc: Value,
    /// CPU time the daemon process used from POST to ready.
    daemon_cpu: Option<Duration>,
    /// CPU time its QEMU had used when the ready line was seen.
    qemu_cpu: Option<Duration>,
}

fn daemon_boot(h: &mut Harness, id: &str, timeout: Duration) -> Result<DaemonBoot> {
    let req: CreateVmRequest = serde_json::from_value(json!({
        "vm_id": id,
        "slots": 1,
        "disk": {"kind": "overlay", "rootfs_id": ROOTFS_ID},
    }))?;
    let d = h.daemon_mut();
    let daemon_pid = d.pid;
    let cpu0 = procfs::cpu_time(daemon_pid);
    let t0 = Instant::now();
    let v = d.api.create_vm(&req).context("POST /v1/vm")?;
    let post = t0.elapsed();
    ensure!(v.state == VmState::Running, "created vm is {:?}", v.state);
    wait_ready_in_file(Path::new(&v.console_log), t0 + timeout, timeout)
        .with_context(|| format!("daemon VM {id}"))?;
    let ready = t0.elapsed();
    let qemu_cpu = v.pid.and_then(procfs::cpu_time);
    let daemon_cpu = procfs::cpu_time(daemon_pid)
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a));

    // Untimed: what the daemon ran, then delete.
    let doc_path = Path::new(&v.session_dir).join("qemu.json");
    let doc: Value = serde_json::from_slice(
        &std::fs::read(&doc_path).with_context(|| format!("cannot read {}", doc_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", doc_path.display()))?;
    let t1 = Instant::now();
    d.api
        .delete_vm(id)
        .with_context(|| format!("DELETE /v1/vm/{id}"))?;
    let delete = t1.elapsed();
    Ok(DaemonBoot {
        ready,
        post,
        delete,
        info: v,
        doc,
        daemon_cpu,
        qemu_cpu,
    })
}

// ---------------------------------------------------------------- the by-hand side

/// How the by-hand side makes its overlay: with the daemon's own code, from
/// the daemon's template when it made one (`Ext4Templates::create_disk`: a
/// sparse copy plus a new UUID), else with `mkfs.ext4` (`LocalHost`).
struct Overlays {
    rt: tokio::runtime::Runtime,
    templates: Option<Ext4Templates>,
}

impl Overlays {
    fn find(root: &Path) -> Result<Overlays> {
        let t = Ext4Templates::new(root.join("snap/templates"));
        Ok(Overlays {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            templates: t.path_for(OVERLAY_GIB << 30).is_file().then_some(t),
        })
    }

    fn describe(&self) -> String {
        match &self.templates {
            Some(t) => format!(
                "a sparse copy of the daemon's empty ext4 template {} plus a new file-system \
                 UUID (the daemon's own code, agentenv_host::disk)",
                t.path_for(OVERLAY_GIB << 30).file_name().unwrap_or_default().to_string_lossy()
            ),
            None => format!(
                "truncate to {OVERLAY_GIB} GiB + mkfs.ext4 with the daemon's flags (it left no template)"
            ),
        }
    }

    /// Makes `path`; returns how the copy was done (for the report).
    fn make(&self, path: &Path) -> Result<String> {
        let size = OVERLAY_GIB << 30;
        match &self.templates {
            Some(t) => Ok(self
                .rt
                .block_on(t.create_disk(path, size))?
                .method
                .as_str()
                .into()),
            None => {
                self.rt
                    .block_on(LocalHost::new().create_ext4_disk(path, size))?;
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
        if let Some(child) = self.child.take() {
            signals::kill_group(child);
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
    root: &Path,
    cmd: &QemuCmd,
    reference: &VmInfo,
    overlay: &Overlays,
    id: &str,
    timeout: Duration,
) -> Result<HandBoot> {
    let dir = root.join("hand").join(id);
    let socket = root.join("s").join(format!("{id}.sock"));
    // Its RAM in a file of its own, as the daemon's VMs have theirs.
    let memory = cmd.memory_dir.as_ref().map(|_| dir.as_path());
    let args = cmd.args(reference, id, &dir, &socket, memory);
    // The by-hand VM must not touch anything of the daemon's.
    let daemon_sessions = root.join("sessions").display().to_string();
    if let Some(a) = args
        .iter()
        .find(|a| a.to_string_lossy().contains(&daemon_sessions))
    {
        bail!("the by-hand command line names a daemon session: {a:?}");
    }

    let t0 = Instant::now();
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut vm = HandVm {
        child: None,
        socket,
        dir: dir.clone(),
    };
    let copy_method = overlay.make(&overlay_in(reference, &dir))?;
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
        .stderr(writer2);
    // Should this benchmark die, QEMU dies too.
    vm.child = Some(signals::spawn_group(&mut command, libc::SIGKILL)?);
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
    let qemu_cpu = vm.child.as_ref().and_then(|c| procfs::cpu_time(c.id()));
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

impl Drop for BuildProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let stages = [(libc::SIGINT, 30), (libc::SIGTERM, 5)];
                signals::stop_group(child, &stages.map(|(s, t)| (s, Duration::from_secs(t))));
            }
        }
    }
}

struct ArtifactBuild {
    command: String,
    wall: Duration,
    /// The script's own timing lines, verbatim.
    lines: Vec<String>,
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

fn build_artifacts(root: &Path, script: &Path) -> Result<ArtifactBuild> {
    let out = root.join("artifacts-build");
    let log = root.join("build-artifacts.log");
    let command = format!("{} --output {} --force", script.display(), out.display());
    let cache = script_cache();
    let before = cache_workdirs(cache.as_deref());
    let log_file = File::create(&log)?;
    let mut cmd = Command::new(script);
    cmd.arg("--output")
        .arg(&out)
        .arg("--force")
        .stdin(Stdio::null());
    cmd.stdout(log_file.try_clone()?).stderr(log_file);
    progress(format!("artifacts: {command}"));
    let t0 = Instant::now();
    let mut proc = BuildProc {
        child: Some(signals::spawn_group(&mut cmd, libc::SIGTERM)?),
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
                progress(format!("  {l}"));
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
        error,
        cache_leftovers,
    })
}

// ---------------------------------------------------------------- the run

fn run(
    h: &mut Harness,
    agentenv: &Path,
    guest: &QemuGuest,
    runs: usize,
    timeout: Duration,
    rep: &mut Report,
) -> Result<()> {
    let root = h.root().to_path_buf();
    h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(30))?;
    progress(
        "reference boot through the daemon (untimed: builds its overlay template, warms caches)",
    );
    let r = daemon_boot(h, "bd-000", timeout)?;
    progress(format!(
        "  ready after {:.0} ms (POST → 201 {:.0} ms)",
        ms(r.ready),
        ms(r.post)
    ));
    let cmd = QemuCmd::from_doc(&r.doc)?;
    ensure!(
        cmd.rebuilds(&r.info, &r.doc),
        "agentenv_host::qemu::qemu_args does not rebuild the daemon's command line {}",
        r.doc
    );
    let overlay = Overlays::find(&root)?;
    progress("reference boot by hand (untimed: checks the rebuilt command line)");
    let hr = hand_boot(&root, &cmd, &r.info, &overlay, "bh-000", timeout)?;
    progress(format!(
        "  ready after {:.0} ms (overlay {:.1} ms, {})",
        ms(hr.ready),
        ms(hr.overlay),
        hr.copy_method
    ));

    let mut ready = Sides::<2>::default();
    let mut per_run = Table::new(
        "runs (ms)",
        [
            "first",
            "daemon",
            "by hand",
            "ratio",
            "POST→201",
            "overlay",
            "daemon CPU",
            "its QEMU CPU",
            "by-hand QEMU CPU",
        ],
    );
    let (mut mismatches, mut deletes, mut kills) = (Vec::new(), Vec::new(), Vec::new());
    rounds("boots, daemon and by hand interleaved", 0, runs, |i, _| {
        let (did, hid) = (format!("bd-{:03}", i + 1), format!("bh-{:03}", i + 1));
        let (mut db, mut hb) = (None, None);
        let t = rotated(
            i,
            [
                &mut || Ok(db.insert(daemon_boot(h, &did, timeout)?).ready),
                &mut || {
                    Ok(hb
                        .insert(hand_boot(&root, &cmd, &r.info, &overlay, &hid, timeout)?)
                        .ready)
                },
            ],
        )?;
        let (d, b) = (db.expect("booted"), hb.expect("booted"));
        if !cmd.rebuilds(&d.info, &d.doc) {
            mismatches.push(did);
        }
        let cpu = |c: Option<Duration>| Cell::opt(c.map(ms), 0);
        per_run.row(
            &format!("{}", i + 1),
            vec![
                if i % 2 == 0 { "daemon" } else { "by hand" }.into(),
                Cell::Num(ms(t[0]), 0),
                Cell::Num(ms(t[1]), 0),
                Cell::Ratio(ms(t[0]) / ms(t[1])),
                Cell::Num(ms(d.post), 1),
                Cell::Num(ms(b.overlay), 1),
                cpu(d.daemon_cpu),
                cpu(d.qemu_cpu),
                cpu(b.qemu_cpu),
            ],
            None,
        );
        deletes.push(ms(d.delete));
        kills.push(ms(b.kill));
        ready.push(t);
        Ok(())
    })?;
    let mut t = Table::latency("boot → AGENTENV_READY (ms)", &["daemon", "by hand"]);
    t.latency_row("boot → ready", &ready, Some(Limit::Ratio(TARGET_RATIO)))
        .note("daemon: POST /v1/vm → ready in console_log; by hand: overlay + spawn QEMU → ready on stdout")
        .note(format!(
            "untimed reference boots: daemon {:.0} ms, by hand {:.0} ms{}",
            ms(r.ready),
            ms(hr.ready),
            if runs < 5 { "; fewer than 5 runs: a rough figure" } else { "" }
        ));
    per_run
        .note("POST→201: the daemon's create (overlay, records, QEMU spawn, QMP handshake); overlay: making the")
        .note("by-hand overlay; daemon CPU: the daemon process's CPU time from POST to ready; QEMU CPU: the VM's")
        .note("QEMU's CPU time when the ready line was seen (10 ms ticks)")
        .note(format!(
            "teardown (untimed, p50): DELETE /v1/vm/{{id}} {:.1} ms; by hand kill + reap + rm {:.1} ms",
            median(&deletes).unwrap_or(f64::NAN),
            median(&kills).unwrap_or(f64::NAN)
        ));
    rep.about("qemu", format!("{} ({}), -accel {}", cmd.binary.display(), guest.version, cmd.accel))
        .about(
            "by hand",
            format!(
                "the daemon's command line ({} args) built by agentenv_host::qemu::qemu_args for a fresh overlay,\nQMP socket and VM id; {}; \
                 spawn with stdout+stderr on one pipe, read it until the ready line",
                cmd.args,
                if mismatches.is_empty() {
                    format!("every timed daemon VM ran exactly the command line it builds ({runs} of {runs})")
                } else {
                    format!("DIFFERENT command lines in daemon VMs {}", mismatches.join(", "))
                }
            ),
        )
        .about(
            "overlay",
            format!("both sides make it inside the timed part; by hand: {} ({})", overlay.describe(), hr.copy_method),
        );
    rep.table(t).table(per_run);
    Ok(())
}

/// Times `scripts/build-artifacts.sh` and adds its figures to the report.
fn artifacts_table(root: &Path, script: &Path, rep: &mut Report) -> Result<()> {
    let b = build_artifacts(root, script)?;
    progress(format!(
        "  build-artifacts.sh {} after {:.1} s",
        if b.error.is_none() { "done" } else { "FAILED" },
        b.wall.as_secs_f64()
    ));
    let mut t = Table::new(&format!("artifact build: {}", b.command), ["s"]);
    t.row("wall", vec![Cell::Num(b.wall.as_secs_f64(), 1)], None);
    for l in &b.lines {
        t.note(l.clone());
    }
    for l in &b.cache_leftovers {
        t.note(format!(
            "note: {l} appeared in the scripts' cache during the build and is still there \
             (another build running at the same time, or an interrupted step)"
        ));
    }
    if let Some(e) = &b.error {
        t.note(format!("FAILED: {e}"));
        rep.fail("scripts/build-artifacts.sh failed (see above)");
    }
    rep.table(t);
    Ok(())
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
    fn command_lines_are_rebuilt_for_another_vm() {
        let v: VmInfo = serde_json::from_value(json!({
            "vm_id": "bd-000", "state": "running", "backend": "qemu",
            "api_socket": "/t/s/bd-000.sock", "vcpus": 1, "memory_mib": 256,
            "disk": {"kind": "overlay", "rootfs_path": "/a/rootfs/minimal.ext4",
                     "writable_path": "/t/sessions/bd-000/overlay.ext4", "size_bytes": 1},
            "kernel": "/a/kernels/vmlinuz", "initrd": "/a/initramfs/initrd.img",
            "boot_args": "console=ttyS0 agentenv.vm_id=bd-000 agentenv.root=/dev/vda",
            "session_dir": "/t/sessions/bd-000", "console_log": "/t/sessions/bd-000/console.log",
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap();
        let cmd = QemuCmd {
            binary: "/q".into(),
            accel: Accel::Tcg,
            tsc_khz: Some(2_000_000),
            args: 0,
            memory_dir: Some("/t/mem".into()),
        };
        let doc = command_document(
            &cmd.binary,
            &cmd.args(
                &v,
                "bd-000",
                Path::new(&v.session_dir),
                Path::new(&v.api_socket),
                Some(Path::new("/t/mem")),
            ),
        );
        let read = QemuCmd::from_doc(&doc).unwrap();
        assert_eq!((read.accel, read.tsc_khz), (Accel::Tcg, Some(2_000_000)));
        assert!(read.rebuilds(&v, &doc));
        let hand = read.args(
            &v,
            "bh-001",
            Path::new("/t/hand/bh-001"),
            Path::new("/t/s/bh-001.sock"),
            Some(Path::new("/t/hand/bh-001")),
        );
        let text: Vec<String> = hand
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(text.contains(&"bh-001".to_string()), "{text:?}");
        assert!(
            text.iter().any(|a| a.contains("agentenv.vm_id=bh-001 ")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|a| a.contains("file=/t/hand/bh-001/overlay.ext4,")),
            "{text:?}"
        );
        assert!(!text.iter().any(|a| a.contains("bd-000")), "{text:?}");
    }
}
