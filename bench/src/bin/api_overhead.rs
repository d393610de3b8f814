//! `api_overhead`: what the agentenv daemon adds on top of talking to the VMM
//! directly, and how it holds up with many VMs.
//!
//! It starts the real `agentenv` daemon (from `target/release`) with the
//! Firecracker API double `fc-double` as its VMM, and measures, interleaved in
//! the same run:
//!
//! - create → running, pause and resume through the daemon's HTTP API, against
//!   a bare client doing the same Firecracker API calls itself over the Unix
//!   socket (spawn the VMM, wait for its socket, PUT machine-config,
//!   boot-source, drives, InstanceStart; PATCH /vm Paused / Resumed);
//! - overlay creates (which run `mkfs.ext4`), against the bare client running
//!   the same `mkfs.ext4` and boot calls (for information);
//! - with many VMs: `GET /v1/vm` latency (baseline: the same request at 0 VMs)
//!   and the daemon's memory (baseline: at 0 VMs).
//!
//! Targets are printed beside the figures as PASS/MISS, for information: the
//! exit status is 0 whenever the run itself completes.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_bench::daemon::{self, find_in_path, tail_lines, Cleanup, Harness, Vmm};
use agentenv_bench::http::{Client, Endpoint, Response};
use agentenv_bench::procfs::{self, HostInfo, Rss};
use agentenv_bench::signals;
use agentenv_bench::stats::{pass, round3, Summary};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Target: the daemon adds at most this much to the p50 of an operation.
const TARGET_OVERHEAD_P50_MS: f64 = 2.0;
/// Target: `GET /v1/vm` p99 with all the VMs, in ms.
const TARGET_LIST_P99_MS: f64 = 5.0;
/// Target: the daemon's resident memory with all the VMs, in MiB.
const TARGET_RSS_MIB: f64 = 30.0;

/// Guest memory per VM (only accounted, never allocated: the double runs no guest).
const MEMORY_MIB_PER_SLOT: u64 = 32;
/// Kernel command line, as the daemon's default plus its `agentenv.*` parameters.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Overlay size: the config's `default_disk_size_gib`.
const OVERLAY_GIB: u64 = 1;
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to answer `/v1/health` after its start.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

/// The agentenv daemon against a bare Firecracker API client, same run.
#[derive(Debug, Parser)]
#[command(name = "api_overhead", version, about, long_about = None)]
struct Args {
    /// Timed iterations of each interleaved pair (create, pause, resume, delete)
    /// [default: 200; --quick: 30].
    #[arg(long)]
    iterations: Option<usize>,
    /// VMs created for the list and memory figures [default: 1000; --quick: 100].
    #[arg(long)]
    vms: Option<usize>,
    /// Timed `GET /v1/vm` requests, at 0 VMs and at --vms VMs [default: 200; --quick: 50].
    #[arg(long)]
    list_requests: Option<usize>,
    /// Timed overlay creates (they run mkfs.ext4), 0 to skip [default: 30; --quick: 5].
    #[arg(long)]
    overlay_iterations: Option<usize>,
    /// Untimed iterations before each timed series [default: 5; --quick: 2].
    #[arg(long)]
    warmup: Option<usize>,
    /// A short run (about 30 s): fewer iterations and 100 VMs.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Directory holding `agentenv` and `fc-double` [default: this binary's
    /// directory, then <workspace>/target/release].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the run's temporary directory is made (its file system decides
    /// what the daemon's fsyncs cost) [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Keep the temporary directory (config, daemon log, VM sessions) at the end.
    #[arg(long)]
    keep: bool,
}

/// The resolved run parameters.
#[derive(Debug, Clone)]
struct Params {
    iterations: usize,
    vms: usize,
    list_requests: usize,
    overlay_iterations: usize,
    warmup: usize,
}

impl Params {
    fn from(a: &Args) -> Params {
        let (it, vms, list, ovl, warm) = if a.quick {
            (30, 100, 50, 5, 2)
        } else {
            (200, 1000, 200, 30, 5)
        };
        Params {
            iterations: a.iterations.unwrap_or(it).max(1),
            vms: a.vms.unwrap_or(vms).max(1),
            list_requests: a.list_requests.unwrap_or(list).max(1),
            overlay_iterations: a.overlay_iterations.unwrap_or(ovl),
            warmup: a.warmup.unwrap_or(warm),
        }
    }
}

fn main() {
    let args = Args::parse();
    signals::install();
    let params = Params::from(&args);
    let bins = match find_binaries(args.bin_dir.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("api_overhead: {e:#}");
            std::process::exit(2);
        }
    };
    let mut env = match Env::new(&args, bins, &params) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("api_overhead: setting up: {e:#}");
            std::process::exit(1);
        }
    };
    let result = run(&mut env, &params);
    let (mut report, cleanup) = env
        .h
        .finish("api_overhead", result, args.keep, cleanup_summary);
    report.cleanup = cleanup_json(&cleanup);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(&env, &params)).expect("json serialises")
        );
    } else {
        print!("{}", report.to_text(&env, &params, &cleanup));
    }
    if !cleanup.clean() {
        eprintln!(
            "api_overhead: cleanup was not complete: {}",
            cleanup_summary(&cleanup)
        );
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- binaries

struct Binaries {
    agentenv: PathBuf,
    fc_double: PathBuf,
}

fn find_binaries(bin_dir: Option<&Path>) -> Result<Binaries> {
    let [agentenv, fc_double] = daemon::find_binaries(
        bin_dir,
        ["agentenv", "fc-double"],
        "build them first with:\n\n    cargo build --release -p agentenv -p agentenv-testkit\n",
    )?;
    Ok(Binaries {
        agentenv,
        fc_double,
    })
}

// ---------------------------------------------------------------- environment

/// The run's directory and daemon, and what the bare side needs.
struct Env {
    h: Harness,
    /// The run's directory (`h.root()`).
    root: PathBuf,
    bins: Binaries,
    kernel: PathBuf,
    mkfs: Option<PathBuf>,
    list_bytes: usize,
}

impl Env {
    fn new(args: &Args, bins: Binaries, p: &Params) -> Result<Env> {
        check_limits(p.vms)?;
        let mut h = Harness::new(
            args.tmp_dir.as_deref(),
            "ae-bench-",
            &["rootfs", "kernels", "initramfs", "disks", "bare"],
        )?;
        let root = h.root().to_path_buf();
        let kernel = root.join("kernels/vmlinux");
        std::fs::write(&kernel, b"not a kernel: fc-double only opens it")?;
        sparse(&root.join("rootfs/base.ext4"), 8 << 20)?;
        sparse(&root.join("disks/lat.img"), 1 << 20)?;
        sparse(&root.join("disks/bare.img"), 1 << 20)?;
        for j in 0..p.vms {
            sparse(&root.join(format!("disks/d-{j:05}.img")), 1 << 20)?;
        }
        h.write_config(
            "api_overhead",
            &daemon::Config {
                vmm: Vmm::Firecracker(bins.fc_double.clone()),
                rootfs_root: root.join("rootfs"),
                kernel_root: root.join("kernels"),
                initramfs_root: root.join("initramfs"),
                default_kernel: None,
                default_initrd: None,
                memory_mib_per_slot: MEMORY_MIB_PER_SLOT,
                default_disk_size_gib: OVERLAY_GIB,
                max_memory_mib: Some((p.vms as u64 + 1024) * MEMORY_MIB_PER_SLOT),
                direct_disk_roots: vec![root.join("disks")],
                startup_timeout_ms: 10000,
                request_timeout_ms: 10000,
            },
        )?;
        Ok(Env {
            h,
            root,
            bins,
            kernel,
            mkfs: find_in_path("mkfs.ext4"),
            list_bytes: 0,
        })
    }

    fn daemon_pid(&self) -> u32 {
        self.h.daemon().map_or(0, |d| d.pid)
    }

    fn daemon_rss(&self) -> Result<Rss> {
        Rss::of(self.daemon_pid()).context("cannot read the daemon's /proc/PID/status")
    }

    /// One daemon request, checked for the expected status.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> Result<(Duration, Response)> {
        let d = self.h.daemon_mut();
        let t0 = Instant::now();
        let r = match body {
            Some(b) => d.api.request_json(method, path, b),
            None => d.api.request(method, path, None),
        }
        .with_context(|| format!("{method} {path}"))?;
        let took = t0.elapsed();
        ensure!(
            r.status == want,
            "{method} {path}: HTTP {} (wanted {want}): {}",
            r.status,
            r.text()
        );
        Ok((took, r))
    }

    fn daemon_create(&mut self, body: &Value, want_state: &str) -> Result<Duration> {
        let (took, r) = self.call("POST", "/v1/vm", Some(body), 201)?;
        let v = r.json()?;
        ensure!(
            v["state"] == want_state,
            "created vm is {}: {v}",
            v["state"]
        );
        Ok(took)
    }

    fn daemon_flip(&mut self, vm_id: &str, op: &str, want_state: &str) -> Result<Duration> {
        let (took, r) = self.call("POST", &format!("/v1/vm/{vm_id}/{op}"), None, 200)?;
        let v = r.json()?;
        ensure!(v["state"] == want_state, "{op}: vm is {}: {v}", v["state"]);
        Ok(took)
    }

    fn daemon_delete(&mut self, vm_id: &str) -> Result<Duration> {
        Ok(self
            .call("DELETE", &format!("/v1/vm/{vm_id}"), None, 204)?
            .0)
    }

    /// What the bare client needs, detached from `self` so that it can run
    /// beside a mutable borrow of the daemon side.
    fn bare(&self) -> BareClient {
        BareClient {
            fc_double: self.bins.fc_double.clone(),
            kernel: self.kernel.clone(),
            dir: self.root.join("bare"),
        }
    }
}

/// The bare baseline: this program driving fc-double over its API socket.
struct BareClient {
    fc_double: PathBuf,
    kernel: PathBuf,
    dir: PathBuf,
}

impl BareClient {
    /// Starts a VM the bare way and times it up to InstanceStart's answer.
    fn create(&self, name: &str, drives: &[(&str, &Path, bool)]) -> Result<(Duration, BareVm)> {
        let sock = self.dir.join(format!("{name}.sock"));
        let log = self.dir.join(format!("{name}.log"));
        let t0 = Instant::now();
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.fc_double)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(name)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .context("cannot start fc-double")?;
        let mut vm = BareVm {
            child: Some(child),
            sock: sock.clone(),
            api: Client::new(Endpoint::Unix(sock.clone()), IO_TIMEOUT),
        };
        let deadline = t0 + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(status) = vm.child.as_mut().expect("spawned").try_wait()? {
                bail!(
                    "fc-double exited at start ({status}): {}",
                    tail_lines(&log, 5)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "fc-double made no socket within 10 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        // The socket file appears at bind(), an instant before listen().
        loop {
            match vm.api.connect() {
                Ok(()) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(e) => return Err(e).context("cannot connect to fc-double"),
            }
        }
        let boot_args = format!("{BOOT_ARGS} agentenv.vm_id={name} agentenv.root=/dev/vda");
        bare_put(
            &mut vm.api,
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": MEMORY_MIB_PER_SLOT, "smt": false}),
        )?;
        bare_put(
            &mut vm.api,
            "/boot-source",
            &json!({"kernel_image_path": self.kernel, "boot_args": boot_args}),
        )?;
        for (id, path, read_only) in drives {
            bare_put(
                &mut vm.api,
                &format!("/drives/{id}"),
                &json!({"drive_id": id, "path_on_host": path, "is_root_device": *id == "rootfs", "is_read_only": read_only}),
            )?;
        }
        bare_put(
            &mut vm.api,
            "/actions",
            &json!({"action_type": "InstanceStart"}),
        )?;
        Ok((t0.elapsed(), vm))
    }
}

fn bare_put(api: &mut Client, path: &str, body: &Value) -> Result<()> {
    let r = api
        .request_json("PUT", path, body)
        .with_context(|| format!("PUT {path}"))?;
    ensure!(
        r.is_success(),
        "PUT {path}: HTTP {}: {}",
        r.status,
        r.text()
    );
    Ok(())
}

/// A VM started by the bare client; killed when dropped.
struct BareVm {
    child: Option<Child>,
    sock: PathBuf,
    api: Client,
}

impl BareVm {
    fn patch_state(&mut self, state: &str) -> Result<Duration> {
        let t0 = Instant::now();
        let r = self
            .api
            .request_json("PATCH", "/vm", &json!({"state": state}))?;
        let took = t0.elapsed();
        ensure!(
            r.is_success(),
            "PATCH /vm {state}: HTTP {}: {}",
            r.status,
            r.text()
        );
        Ok(took)
    }

    /// What the daemon does on delete, minus its bookkeeping: kill the
    /// process group, reap, remove the socket.
    fn kill(&mut self) -> Duration {
        let t0 = Instant::now();
        self.api.disconnect();
        if let Some(child) = self.child.take() {
            signals::kill_group(child);
        }
        let _ = std::fs::remove_file(&self.sock);
        t0.elapsed()
    }
}

impl Drop for BareVm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sparse(path: &Path, len: u64) -> Result<()> {
    File::create(path)?.set_len(len)?;
    Ok(())
}

/// Raises the open-file limit to its hard limit and checks that `vms` VMs fit.
fn check_limits(vms: usize) -> Result<()> {
    // The daemon keeps ~4 descriptors per VM (two output pipes, the console log,
    // the API connection); it inherits this limit.
    let need_fds = (vms as u64) * 5 + 512;
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < need_fds {
            bail!(
                "the open-file limit is {} but {vms} VMs need about {need_fds}; raise it \
                 (`ulimit -n {need_fds}`) or pass a smaller --vms",
                lim.rlim_cur
            );
        }
    }
    // Each fc-double has two threads (main and one per API connection).
    let need_tasks = (vms as u64) * 3 + 1024;
    for knob in ["/proc/sys/kernel/threads-max", "/proc/sys/kernel/pid_max"] {
        if let Some(v) = std::fs::read_to_string(knob)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            ensure!(
                v >= need_tasks,
                "{knob} is {v} but {vms} VMs need about {need_tasks} tasks; pass a smaller --vms"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- the run

/// Daemon and bare samples of one operation.
#[derive(Default)]
struct Pair {
    daemon: Vec<Duration>,
    bare: Vec<Duration>,
}

/// Back-to-back per-VM operations on one VM (no bare side: this compares
/// the daemon with itself at 1 VM and at N VMs).
#[derive(Default)]
struct PerVm {
    show: Vec<Duration>,
    pause: Vec<Duration>,
    resume: Vec<Duration>,
}

fn per_vm_ops(env: &mut Env, id: &str, k: usize, warmup: usize) -> Result<PerVm> {
    let mut out = PerVm::default();
    for i in 0..(warmup + k) {
        signals::check()?;
        let (show, _) = env.call("GET", &format!("/v1/vm/{id}"), None, 200)?;
        let pause = env.daemon_flip(id, "pause", "paused")?;
        let resume = env.daemon_flip(id, "resume", "running")?;
        if i >= warmup {
            out.show.push(show);
            out.pause.push(pause);
            out.resume.push(resume);
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Report {
    create: Pair,
    pause: Pair,
    resume: Pair,
    delete: Pair,
    overlay: Pair,
    overlay_skipped: Option<String>,
    list0: Vec<Duration>,
    list_n: Vec<Duration>,
    n_creates: Vec<Duration>,
    n_create_wall: Duration,
    /// Per-VM operations with 1 VM, and with all the VMs.
    at1: PerVm,
    at_n: PerVm,
    rss_fresh: Option<Rss>,
    rss_churned: Option<Rss>,
    rss_n_created: Option<Rss>,
    rss_n: Option<Rss>,
    daemon_fds_n: Option<usize>,
    daemon_threads_n: Option<u64>,
    doubles_n: usize,
    doubles_rss_kib: u64,
    wall: Duration,
    /// 1-minute load average at the start and at the end of the run.
    load: (f64, f64),
    cleanup: Value,
}

fn progress(msg: &str) {
    eprintln!("[api_overhead] {msg}");
}

fn run(env: &mut Env, p: &Params) -> Result<Report> {
    let started = Instant::now();
    let load_start = procfs::loadavg();
    let mut rep = Report::default();
    progress(&format!(
        "temp dir {} ({}); starting the daemon",
        env.root.display(),
        env.h.fs()
    ));
    let d = env
        .h
        .start_daemon(&env.bins.agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
    progress(&format!("daemon pid {} on http://{}", d.pid, d.addr));
    std::thread::sleep(Duration::from_millis(200));
    rep.rss_fresh = Some(env.daemon_rss()?);

    // GET /v1/vm at 0 VMs: the list baseline (the HTTP round trip alone).
    for i in 0..(p.warmup + p.list_requests) {
        signals::check()?;
        let (took, _) = env.call("GET", "/v1/vm", None, 200)?;
        if i >= p.warmup {
            rep.list0.push(took);
        }
    }

    progress(&format!(
        "latency: {} iterations (+{} warm-up) of create/pause/resume/delete, daemon and bare interleaved",
        p.iterations, p.warmup
    ));
    let lat_disk = env.root.join("disks/lat.img");
    let bare_disk = env.root.join("disks/bare.img");
    let bare_client = env.bare();
    let mut next_progress = p.warmup + 50;
    for i in 0..(p.warmup + p.iterations) {
        signals::check()?;
        let timed = i >= p.warmup;
        let daemon_first = i % 2 == 0;
        let id = format!("lat-{i:04}");
        let body = json!({"vm_id": id, "disk": {"kind": "direct", "path": lat_disk}});
        let drives: [(&str, &Path, bool); 1] = [("rootfs", &bare_disk, false)];

        let (dc, (bc, mut bare)) = ordered(
            daemon_first,
            || env.daemon_create(&body, "running"),
            || bare_client.create(&format!("b-{i:04}"), &drives),
        )?;
        let (dp, bp) = ordered(
            daemon_first,
            || env.daemon_flip(&id, "pause", "paused"),
            || bare.patch_state("Paused"),
        )?;
        let (dr, br) = ordered(
            daemon_first,
            || env.daemon_flip(&id, "resume", "running"),
            || bare.patch_state("Resumed"),
        )?;
        let (dd, bd) = ordered(daemon_first, || env.daemon_delete(&id), || Ok(bare.kill()))?;
        if timed {
            rep.create.daemon.push(dc);
            rep.create.bare.push(bc);
            rep.pause.daemon.push(dp);
            rep.pause.bare.push(bp);
            rep.resume.daemon.push(dr);
            rep.resume.bare.push(br);
            rep.delete.daemon.push(dd);
            rep.delete.bare.push(bd);
        }
        if i + 1 == next_progress {
            progress(&format!("  {}/{}", i + 1 - p.warmup, p.iterations));
            next_progress += 50;
        }
    }
    rep.rss_churned = Some(env.daemon_rss()?);

    if p.overlay_iterations > 0 {
        match env.mkfs.clone() {
            None => rep.overlay_skipped = Some("mkfs.ext4 not found in PATH".into()),
            Some(mkfs) => overlay_phase(env, p, &mkfs, &mut rep)?,
        }
    } else {
        rep.overlay_skipped = Some("--overlay-iterations 0".into());
    }

    list_phase(env, p, &mut rep)?;
    rep.wall = started.elapsed();
    rep.load = (load_start, procfs::loadavg());
    Ok(rep)
}

/// Runs `daemon` and `bare` in the given order; returns (daemon, bare).
fn ordered<A, B>(
    daemon_first: bool,
    daemon: impl FnOnce() -> Result<A>,
    bare: impl FnOnce() -> Result<B>,
) -> Result<(A, B)> {
    if daemon_first {
        let a = daemon()?;
        Ok((a, bare()?))
    } else {
        let b = bare()?;
        Ok((daemon()?, b))
    }
}

fn overlay_phase(env: &mut Env, p: &Params, mkfs: &Path, rep: &mut Report) -> Result<()> {
    let n = p.overlay_iterations;
    let warm = p.warmup.min(2);
    progress(&format!(
        "overlay creates (mkfs.ext4 on a {OVERLAY_GIB} GiB sparse file): {n} iterations (+{warm} warm-up)"
    ));
    let base = env.root.join("rootfs/base.ext4");
    let bare_client = env.bare();
    for i in 0..(warm + n) {
        signals::check()?;
        let daemon_first = i % 2 == 0;
        let id = format!("ovl-{i:03}");
        let body = json!({"vm_id": id, "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}});
        let overlay = env.root.join(format!("bare/ovl-{i:03}.ext4"));
        let bare = || -> Result<(Duration, BareVm)> {
            // The bare equivalent: make the sparse file, mkfs.ext4 it with the
            // daemon's flags, then boot with base (read-only) and overlay.
            let t0 = Instant::now();
            daemon::mkfs_overlay(mkfs, &overlay, OVERLAY_GIB << 30)?;
            let (_, vm) = bare_client.create(
                &format!("o-{i:03}"),
                &[("rootfs", &base, true), ("overlay", &overlay, false)],
            )?;
            Ok((t0.elapsed(), vm))
        };
        let (dc, (bc, mut bvm)) =
            ordered(daemon_first, || env.daemon_create(&body, "running"), bare)?;
        bvm.kill();
        let _ = std::fs::remove_file(&overlay);
        env.daemon_delete(&id)?;
        if i >= warm {
            rep.overlay.daemon.push(dc);
            rep.overlay.bare.push(bc);
        }
    }
    Ok(())
}

fn list_phase(env: &mut Env, p: &Params, rep: &mut Report) -> Result<()> {
    progress(&format!("list: creating {} VMs (direct disks)", p.vms));
    let t0 = Instant::now();
    for j in 0..p.vms {
        signals::check()?;
        let disk = env.root.join(format!("disks/d-{j:05}.img"));
        let body = json!({"vm_id": format!("vm-{j:05}"), "disk": {"kind": "direct", "path": disk}});
        rep.n_creates.push(env.daemon_create(&body, "running")?);
        if j == 0 {
            // The per-VM operations with 1 VM, to compare with N VMs below.
            rep.at1 = per_vm_ops(env, "vm-00000", p.iterations.min(50), p.warmup)?;
        }
        if (j + 1) % 250 == 0 {
            progress(&format!(
                "  {}/{} VMs ({:.1} s)",
                j + 1,
                p.vms,
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    rep.n_create_wall = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    rep.rss_n_created = Some(env.daemon_rss()?);

    progress(&format!(
        "list: {} × GET /v1/vm at {} VMs",
        p.list_requests, p.vms
    ));
    for i in 0..(p.warmup + p.list_requests) {
        signals::check()?;
        let (took, r) = env.call("GET", "/v1/vm", None, 200)?;
        if i == 0 {
            let v = r.json()?;
            let n = v["vms"].as_array().map(Vec::len).unwrap_or(0);
            ensure!(n == p.vms, "GET /v1/vm listed {n} VMs, not {}", p.vms);
            env.list_bytes = r.body.len();
        }
        if i >= p.warmup {
            rep.list_n.push(took);
        }
    }

    // The per-VM operations at N VMs, against the same at 1 VM above.
    let k = p.iterations.min(50);
    progress(&format!(
        "scale: {k} × GET one VM, pause and resume at {} VMs",
        p.vms
    ));
    rep.at_n = per_vm_ops(env, &format!("vm-{:05}", p.vms / 2), k, p.warmup)?;

    rep.rss_n = Some(env.daemon_rss()?);
    let pid = env.daemon_pid();
    rep.daemon_fds_n = procfs::open_fds(pid);
    rep.daemon_threads_n = procfs::threads(pid);
    let doubles = procfs::processes_mentioning(&env.root.join("s"));
    rep.doubles_n = doubles.len();
    rep.doubles_rss_kib = doubles
        .iter()
        .filter_map(|(pid, _)| Rss::of(*pid))
        .map(|r| r.rss_kib)
        .sum();
    Ok(())
}

// ---------------------------------------------------------------- cleanup

fn cleanup_summary(c: &Cleanup) -> String {
    c.summary(&format!(
        "deleted {} VMs in {:.1} s; daemon stopped by SIGTERM in {:.2} s ({}); {} leftover processes; ",
        c.deleted,
        c.delete_s,
        c.daemon_stop_s,
        c.daemon_exit.as_deref().unwrap_or("not running"),
        c.leftover.len(),
    ))
}

fn cleanup_json(c: &Cleanup) -> Value {
    let mut v = c.to_json();
    v["deleted_vms"] = json!(c.deleted);
    v["delete_s"] = json!(round3(c.delete_s));
    v["daemon_stop_s"] = json!(round3(c.daemon_stop_s));
    v
}

// ---------------------------------------------------------------- output

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One compared operation, summarised.
struct Row {
    d: Summary,
    b: Summary,
}

impl Row {
    fn of(p: &Pair) -> Option<Row> {
        Some(Row {
            d: Summary::of(&p.daemon)?,
            b: Summary::of(&p.bare)?,
        })
    }

    fn overhead(&self) -> f64 {
        self.d.p50 - self.b.p50
    }

    fn json(&self, target: bool) -> Value {
        let mut v = json!({
            "daemon": self.d.to_json(),
            "bare": self.b.to_json(),
            "ratio_p50": round3(self.d.p50 / self.b.p50),
            "ratio_p99": round3(self.d.p99 / self.b.p99),
            "overhead_p50_ms": round3(self.overhead()),
            "overhead_p99_ms": round3(self.d.p99 - self.b.p99),
        });
        if target {
            v["target"] = json!({
                "overhead_p50_ms_max": TARGET_OVERHEAD_P50_MS,
                "pass": self.overhead() <= TARGET_OVERHEAD_P50_MS,
            });
        }
        v
    }
}

/// The first and last tenth of a series (is there growth with the VM count?).
fn tenths(v: &[Duration]) -> (Option<Summary>, Option<Summary>) {
    let k = (v.len() / 10).max(1).min(v.len());
    (Summary::of(&v[..k]), Summary::of(&v[v.len() - k..]))
}

impl Report {
    fn targets(&self) -> Vec<(&'static str, bool)> {
        let mut t = Vec::new();
        for (name, pair) in [
            ("create", &self.create),
            ("pause", &self.pause),
            ("resume", &self.resume),
        ] {
            if let Some(r) = Row::of(pair) {
                t.push((name, r.overhead() <= TARGET_OVERHEAD_P50_MS));
            }
        }
        if let Some(s) = Summary::of(&self.list_n) {
            t.push(("list_p99", s.p99 <= TARGET_LIST_P99_MS));
        }
        if let Some(r) = self.rss_n {
            t.push(("rss", mib(r.rss_kib) <= TARGET_RSS_MIB));
        }
        t
    }

    fn to_json(&self, env: &Env, p: &Params) -> Value {
        let row = |pair: &Pair, target: bool| {
            Row::of(pair).map(|r| r.json(target)).unwrap_or(Value::Null)
        };
        let sj = |v: &[Duration]| Summary::of(v).map(|s| s.to_json()).unwrap_or(Value::Null);
        let rss = |r: Option<Rss>| {
            r.map(|r| json!({"vm_rss_kib": r.rss_kib, "vm_hwm_kib": r.hwm_kib}))
                .unwrap_or(Value::Null)
        };
        let (first, last) = tenths(&self.n_creates);
        let targets = self.targets();
        let list_n = Summary::of(&self.list_n);
        json!({
            "benchmark": "api_overhead",
            "params": {
                "iterations": p.iterations,
                "vms": p.vms,
                "list_requests": p.list_requests,
                "overlay_iterations": p.overlay_iterations,
                "warmup": p.warmup,
            },
            "host": HostInfo::read().to_json(),
            "temp_dir_fs": env.h.fs(),
            "binaries": {
                "agentenv": env.bins.agentenv,
                "fc_double": env.bins.fc_double,
            },
            "latency": {
                "create": row(&self.create, true),
                "pause": row(&self.pause, true),
                "resume": row(&self.resume, true),
                "delete": row(&self.delete, false),
                "overlay_create": row(&self.overlay, false),
                "overlay_skipped": self.overlay_skipped,
            },
            "list": {
                "vms": p.vms,
                "create_total_s": round3(self.n_create_wall.as_secs_f64()),
                "create": sj(&self.n_creates),
                "create_first_tenth": first.map(|s| s.to_json()),
                "create_last_tenth": last.map(|s| s.to_json()),
                "get_list_at_0_vms": sj(&self.list0),
                "get_list": sj(&self.list_n),
                "get_list_response_bytes": env.list_bytes,
                "target": {
                    "stated_for_vms": 1000,
                    "p99_ms_max": TARGET_LIST_P99_MS,
                    "pass": list_n.map(|s| s.p99 <= TARGET_LIST_P99_MS),
                },
            },
            "scale": {
                "get_one_at_1_vm": sj(&self.at1.show),
                "get_one": sj(&self.at_n.show),
                "pause_at_1_vm": sj(&self.at1.pause),
                "pause": sj(&self.at_n.pause),
                "resume_at_1_vm": sj(&self.at1.resume),
                "resume": sj(&self.at_n.resume),
            },
            "memory": {
                "at_0_vms_fresh": rss(self.rss_fresh),
                "at_0_vms_after_churn": rss(self.rss_churned),
                "at_n_vms_after_creates": rss(self.rss_n_created),
                "at_n_vms": rss(self.rss_n),
                "daemon_open_fds_at_n_vms": self.daemon_fds_n,
                "daemon_threads_at_n_vms": self.daemon_threads_n,
                "fc_double_processes_at_n_vms": self.doubles_n,
                "fc_double_total_rss_kib": self.doubles_rss_kib,
                "target": {
                    "stated_for_vms": 1000,
                    "vm_rss_mib_max": TARGET_RSS_MIB,
                    "pass": self.rss_n.map(|r| mib(r.rss_kib) <= TARGET_RSS_MIB),
                },
            },
            "targets": targets.iter().map(|(n, ok)| json!({"name": n, "pass": ok})).collect::<Vec<_>>(),
            "targets_met": targets.iter().filter(|(_, ok)| *ok).count(),
            "targets_total": targets.len(),
            "wall_s": round3(self.wall.as_secs_f64()),
            "loadavg_1min": {"start": self.load.0, "end": self.load.1},
            "cleanup": self.cleanup,
        })
    }

    fn to_text(&self, env: &Env, p: &Params, cleanup: &Cleanup) -> String {
        let mut o = String::new();
        let host = HostInfo::read();
        let w = &mut o;
        let _ = writeln!(
            w,
            "\nagentenv API overhead: the daemon vs a bare Firecracker API client, same run"
        );
        let _ = writeln!(w, "  host      {host}");
        let _ = writeln!(
            w,
            "  daemon    {} with VMM {}",
            env.bins.agentenv.display(),
            env.bins.fc_double.display()
        );
        let _ = writeln!(
            w,
            "  temp dir  on {} (the daemon fsyncs its VM records there)",
            env.h.fs()
        );
        let _ = writeln!(
            w,
            "  run       {} timed iterations per operation (+{} warm-up), daemon and bare \
             interleaved, order alternating; {:.0} s in all",
            p.iterations,
            p.warmup,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "{}",
            host.load_line(
                self.load,
                " (the machine was busy: expect noisy figures, p99 above all)"
            )
        );
        let _ = writeln!(
            w,
            "  baseline  bare = this program spawning fc-double and making the same Firecracker \
             API calls\n            itself over the Unix socket (the same HTTP client code talks \
             to the daemon over TCP)\n"
        );

        let _ = writeln!(
            w,
            "{:<32} {:>17} {:>17} {:>17} {:>9}  target",
            "latency (ms)", "daemon", "bare", "daemon/bare", "overhead"
        );
        let _ = writeln!(
            w,
            "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            "", "p50", "p99", "p50", "p99", "p50", "p99", "p50"
        );
        let line = |w: &mut String, name: &str, pair: &Pair, target: bool| {
            let Some(r) = Row::of(pair) else { return };
            let t = if target {
                format!(
                    "≤ {TARGET_OVERHEAD_P50_MS} ms   {}",
                    pass(r.overhead() <= TARGET_OVERHEAD_P50_MS)
                )
            } else {
                "(info)".to_string()
            };
            let _ = writeln!(
                w,
                "{:<32} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7.2}x {:>7.2}x {:>+9.3}  {t}",
                name,
                r.d.p50,
                r.d.p99,
                r.b.p50,
                r.b.p99,
                r.d.p50 / r.b.p50,
                r.d.p99 / r.b.p99,
                r.overhead()
            );
        };
        line(w, "create → running (direct disk)", &self.create, true);
        line(w, "pause", &self.pause, true);
        line(w, "resume", &self.resume, true);
        line(w, "delete (bare: kill, reap)", &self.delete, false);
        match &self.overlay_skipped {
            Some(why) => {
                let _ = writeln!(w, "{:<32} skipped: {why}", "overlay create (mkfs.ext4)");
            }
            None => {
                line(w, "overlay create (mkfs.ext4)", &self.overlay, false);
                let _ = writeln!(
                    w,
                    "  {} iterations; bare = truncate + mkfs.ext4 with the daemon's flags + boot",
                    p.overlay_iterations
                );
            }
        }

        let _ = writeln!(
            w,
            "\n{:<32} {:>17} {:>17}  target",
            format!("with {} VMs", p.vms),
            "value",
            "baseline"
        );
        let both = |s: &Summary| format!("{:.3} / {:.3}", s.p50, s.p99);
        if p.vms < 1000 {
            let _ = writeln!(
                w,
                "  (the list and memory targets are stated for 1,000 VMs; this run has {})",
                p.vms
            );
        }
        if let (Some(n), Some(z)) = (Summary::of(&self.list_n), Summary::of(&self.list0)) {
            let _ = writeln!(
                w,
                "{:<32} {:>17} {:>17}  p99 ≤ {TARGET_LIST_P99_MS} ms   {}  (baseline: at 0 VMs)",
                "GET /v1/vm p50 / p99 (ms)",
                both(&n),
                both(&z),
                pass(n.p99 <= TARGET_LIST_P99_MS)
            );
            let _ = writeln!(
                w,
                "{:<32} {:>17}",
                "  response body",
                format!("{} KiB", env.list_bytes / 1024)
            );
        }
        if let (Some(n), Some(z)) = (self.rss_n, self.rss_fresh) {
            for (name, value, baseline, note) in [
                (
                    "daemon VmRSS (MiB)",
                    n.rss_kib,
                    z.rss_kib,
                    "baseline: at 0 VMs, fresh",
                ),
                (
                    "daemon VmHWM (MiB)",
                    n.hwm_kib,
                    z.hwm_kib,
                    "peak over the whole run",
                ),
            ] {
                let _ = writeln!(
                    w,
                    "{name:<32} {:>17.1} {:>17.1}  ≤ {TARGET_RSS_MIB} MiB   {}  ({note})",
                    mib(value),
                    mib(baseline),
                    pass(mib(value) <= TARGET_RSS_MIB)
                );
            }
        }
        if let Some(c) = self.rss_churned {
            let _ = writeln!(
                w,
                "{:<32} {:>17.1} {:>17}  (after {} creates and deletes)",
                "  VmRSS back at 0 VMs",
                mib(c.rss_kib),
                "",
                p.iterations + p.warmup
            );
        }
        if let Some(c) = self.rss_n_created {
            let _ = writeln!(
                w,
                "{:<32} {:>17.1} {:>17}  (before the GETs)",
                "  VmRSS right after the creates",
                mib(c.rss_kib),
                ""
            );
        }
        let opt = |x: Option<String>| x.unwrap_or_else(|| "?".into());
        let _ = writeln!(
            w,
            "{:<32} {:>17}",
            "  daemon open fds / threads",
            format!(
                "{} / {}",
                opt(self.daemon_fds_n.map(|x| x.to_string())),
                opt(self.daemon_threads_n.map(|x| x.to_string()))
            )
        );
        let _ = writeln!(
            w,
            "{:<32} {:>17}",
            "  fc-double processes / RSS",
            format!("{} / {:.0} MiB", self.doubles_n, mib(self.doubles_rss_kib))
        );
        if let Some(s) = Summary::of(&self.n_creates) {
            let _ = writeln!(
                w,
                "{:<32} {:>17} {:>17}  (p50 / p99 ms)",
                format!("create {} VMs one by one", p.vms),
                format!("{:.1} s", self.n_create_wall.as_secs_f64()),
                both(&s)
            );
            if let (Some(f), Some(l)) = tenths(&self.n_creates) {
                let _ = writeln!(
                    w,
                    "{:<32} {:>17.3} {:>17.3}  {:.2}x  (baseline: first tenth)",
                    "  create p50, last tenth",
                    l.p50,
                    f.p50,
                    l.p50 / f.p50
                );
            }
        }
        let _ = writeln!(
            w,
            "per-VM operations p50 (ms)        at {:>5} VMs          at 1 VM",
            p.vms
        );
        for (name, at_n, at_1) in [
            ("  GET /v1/vm/{id}", &self.at_n.show, &self.at1.show),
            ("  pause", &self.at_n.pause, &self.at1.pause),
            ("  resume", &self.at_n.resume, &self.at1.resume),
        ] {
            if let (Some(n), Some(one)) = (Summary::of(at_n), Summary::of(at_1)) {
                let _ = writeln!(
                    w,
                    "{:<32} {:>17.3} {:>17.3}  {:.2}x",
                    name,
                    n.p50,
                    one.p50,
                    n.p50 / one.p50
                );
            }
        }

        let targets = self.targets();
        let met = targets.iter().filter(|(_, ok)| *ok).count();
        let missed: Vec<&str> = targets
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        let _ = writeln!(w, "\ncleanup: {}", cleanup_summary(cleanup));
        let _ = writeln!(
            w,
            "targets: {met} of {} met{} (informational: the exit status does not depend on them)",
            targets.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!("; missed: {}", missed.join(", "))
            }
        );
        o
    }
}
