//! `api_overhead`: what the agentenv daemon adds on top of talking to the VMM
//! (fc-double) directly — create, pause, resume, delete and overlay creates
//! against a bare Firecracker API client, interleaved in one run — and how it
//! holds up with many VMs (list latency, per-VM operations, memory).
//! See `bench/README.md`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon::{self, call, find_in_path, wait_for_socket, Harness};
use agentenv_bench::procfs::{self, Rss};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, progress, rotated, rounds, Sides};
use agentenv_bench::signals;
use agentenv_bench::stats::Summary;
use agentenv_client::{ApiClient, Client, Endpoint};
use agentenv_core::host::DiskImages;
use agentenv_host::firecracker::models::{
    ActionType, BootSource, Drive, FullVmConfiguration, InstanceActionInfo, MachineConfiguration,
    Vm, VmState,
};
use agentenv_host::LocalHost;
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Target: the daemon adds at most this much to the p50 of an operation.
const TARGET_OVERHEAD_P50_MS: f64 = 2.0;
/// Target: checking a bearer token adds at most this much to a request's p50.
const TARGET_AUTH_P50_MS: f64 = 0.1;
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
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
}

/// The resolved run parameters.
struct Params {
    iterations: usize,
    vms: usize,
    list_requests: usize,
    overlay_iterations: usize,
    warmup: usize,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let p = Params {
        iterations: args.iterations.unwrap_or(c.pick(200, 30)).max(1),
        vms: args.vms.unwrap_or(c.pick(1000, 100)).max(1),
        list_requests: args.list_requests.unwrap_or(c.pick(200, 50)).max(1),
        overlay_iterations: args.overlay_iterations.unwrap_or(c.pick(30, 5)),
        warmup: args.warmup.get(c, 5, 2),
    };
    let [agentenv, fc_double] = or_exit(
        daemon::find_binaries(
            c.bin_dir.as_deref(),
            ["agentenv", "fc-double"],
            "build them first with:\n\n    cargo build --release -p agentenv -p agentenv-testkit\n",
        ),
        2,
        "",
    );
    let mut env = or_exit(Env::new(c, fc_double, &p), 1, "setting up: ");
    let mut rep = Report::new(
        "agentenv API overhead: the daemon vs a bare Firecracker API client, same run",
        json!({"iterations": p.iterations, "vms": p.vms, "list_requests": p.list_requests,
               "overlay_iterations": p.overlay_iterations, "warmup": p.warmup}),
    );
    rep.about(
        "daemon",
        format!(
            "{} with VMM {}",
            agentenv.display(),
            env.bare.fc_double.display()
        ),
    )
    .about(
        "temp dir",
        format!("on {} (the daemon fsyncs its VM records there)", env.h.fs()),
    )
    .about(
        "baseline",
        "bare = this program spawning fc-double and making the same Firecracker API calls\n\
         itself over the Unix socket (the same HTTP client code talks to the daemon over TCP)",
    );
    let result = run(&mut env, &agentenv, &p, &mut rep)
        .and_then(|()| tls_handshake(&mut env, &agentenv, &p, &mut rep));
    let (result, cleanup) = env.h.finish(result, c.keep);
    rep.settle(result, "daemon", cleanup.cleaned());
    rep.finish(c.json)
}

// ---------------------------------------------------------------- environment

/// The run's directory and daemon, and what the bare side needs.
struct Env {
    h: Harness,
    root: PathBuf,
    bare: BareClient,
    /// Where a second run directory goes (`--tmp-dir`).
    tmp_parent: Option<PathBuf>,
}

impl Env {
    fn new(c: &Common, fc_double: PathBuf, p: &Params) -> Result<Env> {
        check_limits(p.vms)?;
        let mut h = Harness::new(c.tmp_dir.as_deref(), "ae-bench-", &["bare"])?;
        let root = h.root().to_path_buf();
        let config = daemon::Config {
            default_disk_size_gib: OVERLAY_GIB,
            max_memory_mib: Some((p.vms as u64 + 1024) * MEMORY_MIB_PER_SLOT),
            ..daemon::fc_double_config(fc_double.clone(), &root, MEMORY_MIB_PER_SLOT)?
        };
        File::create(root.join("rootfs/base.ext4"))?.set_len(8 << 20)?;
        for name in ["lat", "bare"]
            .map(String::from)
            .into_iter()
            .chain((0..p.vms).map(|j| format!("d-{j:05}")))
        {
            File::create(root.join(format!("disks/{name}.img")))?.set_len(1 << 20)?;
        }
        h.write_config(&config)?;
        let bare = BareClient {
            fc_double,
            kernel: root.join("kernels/vmlinux"),
            dir: root.join("bare"),
        };
        Ok(Env {
            h,
            root,
            bare,
            tmp_parent: c.tmp_dir.clone(),
        })
    }

    fn api(&mut self) -> &ApiClient {
        &self.h.daemon_mut().api
    }

    fn rss(&self) -> Result<Rss> {
        Rss::of(self.h.daemon().map_or(0, |d| d.pid)).context("cannot read the daemon's memory")
    }
}

fn create(api: &ApiClient, body: &Value) -> Result<Duration> {
    let (took, r) = call(api, "POST", "/v1/vm", Some(body), 201)?;
    let v = r.json()?;
    ensure!(v["state"] == "running", "created vm is {}: {v}", v["state"]);
    Ok(took)
}

fn flip(api: &ApiClient, vm_id: &str, op: &str, want_state: &str) -> Result<Duration> {
    let (took, r) = call(api, "POST", &format!("/v1/vm/{vm_id}/{op}"), None, 200)?;
    let v = r.json()?;
    ensure!(v["state"] == want_state, "{op}: vm is {}: {v}", v["state"]);
    Ok(took)
}

fn delete(api: &ApiClient, vm_id: &str) -> Result<Duration> {
    Ok(call(api, "DELETE", &format!("/v1/vm/{vm_id}"), None, 204)?.0)
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
        let mut cmd = Command::new(&self.fc_double);
        cmd.arg("--api-sock").arg(&sock).arg("--id").arg(name);
        cmd.stdin(Stdio::null())
            .stderr(out.try_clone()?)
            .stdout(out);
        let mut child = signals::spawn_group(&mut cmd, libc::SIGKILL)?;
        let poll = Duration::from_micros(100);
        let waited = wait_for_socket(&mut child, &sock, &log, "fc-double", poll);
        let mut vm = BareVm {
            child: Some(child),
            sock: sock.clone(),
            api: Client::new(Endpoint::Unix(sock.clone()), IO_TIMEOUT),
        };
        waited?;
        let deadline = t0 + Duration::from_secs(10);
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
        // The daemon's bodies: its driver builds them from the same models.
        let config = FullVmConfiguration {
            boot_source: BootSource {
                kernel_image_path: self.kernel.clone(),
                initrd_path: None,
                boot_args: Some(format!(
                    "{BOOT_ARGS} agentenv.vm_id={name} agentenv.root=/dev/vda"
                )),
            },
            drives: drives
                .iter()
                .map(|(id, path, ro)| Drive::file(id, path.to_path_buf(), *id == "rootfs", *ro))
                .collect(),
            machine_config: MachineConfiguration {
                mem_size_mib: MEMORY_MIB_PER_SLOT as usize,
                ..MachineConfiguration::default()
            },
            ..FullVmConfiguration::default()
        };
        let start = InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        };
        let mut puts = config.api_calls();
        puts.push(("/actions".into(), serde_json::to_value(start)?));
        for (path, body) in &puts {
            call_bare(&mut vm.api, "PUT", path, body)?;
        }
        Ok((t0.elapsed(), vm))
    }
}

/// A VM started by the bare client; killed when dropped.
struct BareVm {
    child: Option<Child>,
    sock: PathBuf,
    api: Client,
}

impl BareVm {
    fn patch_state(&mut self, state: VmState) -> Result<Duration> {
        call_bare(
            &mut self.api,
            "PATCH",
            "/vm",
            &serde_json::to_value(Vm { state })?,
        )
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

/// One request of the bare client, timed; Firecracker answers 204.
fn call_bare(api: &mut Client, method: &str, path: &str, body: &Value) -> Result<Duration> {
    let t0 = Instant::now();
    let r = api
        .request_json(method, path, body)
        .with_context(|| format!("{method} {path}"))?;
    ensure!(
        r.status == 204,
        "{method} {path}: HTTP {}: {}",
        r.status,
        r.text()
    );
    Ok(t0.elapsed())
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

/// Back-to-back GET, pause and resume of one VM (no bare side: this compares
/// the daemon with itself at 1 VM and at N VMs).
fn per_vm_ops(api: &ApiClient, id: &str, k: usize, warmup: usize) -> Result<[Vec<Duration>; 3]> {
    let mut out: [Vec<Duration>; 3] = Default::default();
    rounds(
        &format!("GET, pause and resume {id}"),
        warmup,
        k,
        |_, timed| {
            let t = [
                call(api, "GET", &format!("/v1/vm/{id}"), None, 200)?.0,
                flip(api, id, "pause", "paused")?,
                flip(api, id, "resume", "running")?,
            ];
            if timed {
                out.iter_mut().zip(t).for_each(|(v, t)| v.push(t));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// `GET /v1/vm` `n` times after `warmup`; checks the VM count and returns
/// the size of the answer.
fn list(api: &ApiClient, vms: usize, warmup: usize, n: usize) -> Result<(Vec<Duration>, usize)> {
    let (mut out, mut bytes) = (Vec::new(), 0);
    rounds(
        &format!("GET /v1/vm at {vms} VMs"),
        warmup,
        n,
        |i, timed| {
            let (took, r) = call(api, "GET", "/v1/vm", None, 200)?;
            if i == 0 {
                let n = r.json()?["vms"].as_array().map_or(0, Vec::len);
                ensure!(n == vms, "GET /v1/vm listed {n} VMs, not {vms}");
                bytes = r.body.len();
            }
            if timed {
                out.push(took);
            }
            Ok(())
        },
    )?;
    Ok((out, bytes))
}

fn run(env: &mut Env, agentenv: &Path, p: &Params, rep: &mut Report) -> Result<()> {
    env.h
        .start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_fresh = env.rss()?;
    let (list0, _) = list(env.api(), 0, p.warmup, p.list_requests)?;
    let auth = auth_cost(env, agentenv, p)?;
    let mut t = Table::latency(
        "auth (ms): GET /v1/vm/{id} (404), the token's daemon vs one with [auth] mode = \"none\"",
        &["token", "none"],
    );
    t.latency_row(
        "per request",
        &auth,
        Some(Limit::OverheadMs(TARGET_AUTH_P50_MS)),
    )
    .note(
        "both daemons empty, same build, requests interleaved; \"token\" checks \
         Authorization: Bearer (SHA-256 + constant-time compare), \"none\" makes every caller admin",
    );
    rep.table(t);

    // create, pause, resume and delete, daemon and bare, each pair in turn.
    let lat_disk = env.root.join("disks/lat.img");
    let bare_disk = env.root.join("disks/bare.img");
    let [mut create_s, mut pause_s, mut resume_s, mut delete_s] =
        [(); 4].map(|_| Sides::<2>::default());
    let Env { h, bare, .. } = env;
    let api = &h.daemon_mut().api;
    rounds("latency", p.warmup, p.iterations, |i, timed| {
        let id = format!("lat-{i:04}");
        let body = json!({"vm_id": id, "disk": {"kind": "direct", "path": lat_disk}});
        let mut vm = None;
        let c = rotated(
            i,
            [&mut || create(api, &body), &mut || {
                let (took, v) =
                    bare.create(&format!("b-{i:04}"), &[("rootfs", &bare_disk, false)])?;
                vm = Some(v);
                Ok(took)
            }],
        )?;
        let vm = vm.as_mut().expect("created");
        let pz = rotated(
            i,
            [&mut || flip(api, &id, "pause", "paused"), &mut || {
                vm.patch_state(VmState::Paused)
            }],
        )?;
        let rs = rotated(
            i,
            [&mut || flip(api, &id, "resume", "running"), &mut || {
                vm.patch_state(VmState::Resumed)
            }],
        )?;
        let dl = rotated(i, [&mut || delete(api, &id), &mut || Ok(vm.kill())])?;
        if timed {
            create_s.push(c);
            pause_s.push(pz);
            resume_s.push(rs);
            delete_s.push(dl);
        }
        Ok(())
    })?;
    let rss_churned = env.rss()?;

    let mut lat = Table::latency("latency (ms)", &["daemon", "bare"]);
    let limit = Some(Limit::OverheadMs(TARGET_OVERHEAD_P50_MS));
    lat.latency_row("create → running (direct disk)", &create_s, limit)
        .latency_row("pause", &pause_s, limit)
        .latency_row("resume", &resume_s, limit)
        .latency_row("delete (bare: kill, reap)", &delete_s, None);
    match (p.overlay_iterations, find_in_path("mkfs.ext4")) {
        (0, _) => lat.note("overlay create: skipped (--overlay-iterations 0)"),
        (_, None) => lat.note("overlay create: skipped (mkfs.ext4 not found in PATH)"),
        (n, Some(_)) => {
            let s = overlays(env, n, p.warmup.min(2))?;
            lat.latency_row("overlay create (mkfs.ext4)", &s, None)
                .note(format!(
                "overlay create: {n} iterations; bare = truncate + mkfs.ext4 with the daemon's \
                 flags + boot"
            ))
        }
    };
    rep.table(lat);
    scale(env, p, rss_fresh, rss_churned, &list0, rep)
}

/// The cost of a bearer token: the same cheap request (a lookup that answers
/// 404, so nothing is rendered) to the run's daemon, with its token, and to
/// a second daemon of the same build with `[auth] mode = "none"`,
/// interleaved.
fn auth_cost(env: &mut Env, agentenv: &Path, p: &Params) -> Result<Sides<2>> {
    let mut h = Harness::new(env.tmp_parent.as_deref(), "ae-bench-noauth-", &[])?;
    let root = h.root().to_path_buf();
    let mut config = daemon::fc_double_config(env.bare.fc_double.clone(), &root, 32)?;
    config.auth.mode = daemon::AuthMode::None;
    h.write_config(&config)?;
    let result = (|| {
        h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
        let open = &h.daemon_mut().api;
        let api = &env.h.daemon_mut().api;
        let mut s = Sides::<2>::default();
        let n = p.list_requests * 4;
        rounds(
            "auth on/off: GET /v1/vm/none",
            p.warmup * 10,
            n,
            |i, timed| {
                let pair = rotated(
                    i,
                    [
                        &mut || Ok(call(api, "GET", "/v1/vm/none", None, 404)?.0),
                        &mut || Ok(call(open, "GET", "/v1/vm/none", None, 404)?.0),
                    ],
                )?;
                if timed {
                    s.push(pair);
                }
                Ok(())
            },
        )?;
        Ok(s)
    })();
    let (result, cleanup) = h.finish(result, false);
    ensure!(
        cleanup.clean(),
        "the auth-off daemon: {}",
        cleanup.summary()
    );
    result
}

/// Overlay creates (the daemon runs mkfs.ext4) against the same done bare.
fn overlays(env: &mut Env, n: usize, warm: usize) -> Result<Sides<2>> {
    let base = env.root.join("rootfs/base.ext4");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = Sides::default();
    let Env { h, bare, root, .. } = env;
    let api = &h.daemon_mut().api;
    rounds("overlay creates", warm, n, |i, timed| {
        let id = format!("ovl-{i:03}");
        let body = json!({"vm_id": id, "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}});
        let overlay = root.join(format!("bare/ovl-{i:03}.ext4"));
        let mut vm = None;
        let t = rotated(
            i,
            [&mut || create(api, &body), &mut || {
                // The bare equivalent: make the sparse file, mkfs.ext4 it with
                // the daemon's flags, then boot with base (read-only) and overlay.
                let t0 = Instant::now();
                rt.block_on(LocalHost::new().create_ext4_disk(&overlay, OVERLAY_GIB << 30))?;
                let drives = [
                    ("rootfs", base.as_path(), true),
                    ("overlay", &overlay, false),
                ];
                vm = Some(bare.create(&format!("o-{i:03}"), &drives)?.1);
                Ok(t0.elapsed())
            }],
        )?;
        drop(vm);
        let _ = std::fs::remove_file(&overlay);
        delete(api, &id)?;
        if timed {
            out.push(t);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The list, per-VM operation and memory figures with `p.vms` VMs.
fn scale(
    env: &mut Env,
    p: &Params,
    fresh: Rss,
    churned: Rss,
    list0: &[Duration],
    rep: &mut Report,
) -> Result<()> {
    progress(format!("creating {} VMs (direct disks)", p.vms));
    let t0 = Instant::now();
    let mut creates = Vec::new();
    let mut at1 = Default::default();
    let k = p.iterations.min(50);
    for j in 0..p.vms {
        signals::check()?;
        let disk = env.root.join(format!("disks/d-{j:05}.img"));
        let body = json!({"vm_id": format!("vm-{j:05}"), "disk": {"kind": "direct", "path": disk}});
        creates.push(create(env.api(), &body)?);
        if j == 0 {
            at1 = per_vm_ops(env.api(), "vm-00000", k, p.warmup)?;
        }
        if (j + 1) % 250 == 0 {
            progress(format!(
                "  {}/{} VMs ({:.1} s)",
                j + 1,
                p.vms,
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    let create_wall = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let rss_created = env.rss()?;
    let (list_n, list_bytes) = list(env.api(), p.vms, p.warmup, p.list_requests)?;
    let at_n = per_vm_ops(env.api(), &format!("vm-{:05}", p.vms / 2), k, p.warmup)?;
    let rss = env.rss()?;
    let pid = env.h.daemon().map_or(0, |d| d.pid);
    let doubles = procfs::processes_mentioning(&env.root.join("s"));
    let doubles_kib: u64 = doubles
        .iter()
        .filter_map(|(pid, _)| Rss::of(*pid))
        .map(|r| r.rss_kib)
        .sum();

    let mut t = Table::new(
        &format!("with {} VMs", p.vms),
        ["value", "baseline", "ratio"],
    );
    let mut row = |name: &str, v: f64, b: Option<f64>, target: Option<Target>| {
        let ratio = b.map_or(Cell::Empty, |b| Cell::Ratio(v / b));
        let dec = if v.fract() == 0.0 { 0 } else { 3 };
        t.row(
            name,
            vec![Cell::Num(v, dec), Cell::opt(b, 3), ratio],
            target,
        );
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let s = |v: &[Duration]| Summary::of(v).context("no samples");
    let (ln, l0) = (s(&list_n)?, s(list0)?);
    row(
        "GET /v1/vm p50 (ms; baseline: at 0 VMs)",
        ln.p50,
        Some(l0.p50),
        None,
    );
    let target = Target::at_most("list_p99", ln.p99, TARGET_LIST_P99_MS, " ms");
    row(
        "GET /v1/vm p99 (ms; baseline: at 0 VMs)",
        ln.p99,
        Some(l0.p99),
        Some(target),
    );
    row(
        "  response body (KiB)",
        list_bytes as f64 / 1024.0,
        None,
        None,
    );
    let target = Target::at_most("rss", mib(rss.rss_kib), TARGET_RSS_MIB, " MiB");
    row(
        "daemon VmRSS (MiB; baseline: at 0 VMs, fresh)",
        mib(rss.rss_kib),
        Some(mib(fresh.rss_kib)),
        Some(target),
    );
    row(
        "daemon VmHWM (MiB; peak over the whole run)",
        mib(rss.hwm_kib),
        Some(mib(fresh.hwm_kib)),
        None,
    );
    let churn = format!(
        "  VmRSS back at 0 VMs (MiB; after {} creates and deletes)",
        p.iterations + p.warmup
    );
    row(&churn, mib(churned.rss_kib), None, None);
    row(
        "  VmRSS right after the creates (MiB)",
        mib(rss_created.rss_kib),
        None,
        None,
    );
    row(
        "  daemon open fds",
        procfs::open_fds(pid).map_or(f64::NAN, |x| x as f64),
        None,
        None,
    );
    row(
        "  daemon threads",
        procfs::threads(pid).map_or(f64::NAN, |x| x as f64),
        None,
        None,
    );
    row("  fc-double processes", doubles.len() as f64, None, None);
    row("  fc-double RSS (MiB)", mib(doubles_kib), None, None);
    row(
        &format!("create {} VMs one by one (s)", p.vms),
        create_wall.as_secs_f64(),
        None,
        None,
    );
    let tenth = (creates.len() / 10).max(1).min(creates.len());
    let (first, last) = (s(&creates[..tenth])?, s(&creates[creates.len() - tenth..])?);
    row(
        "  create p50, last tenth (ms; baseline: first tenth)",
        last.p50,
        Some(first.p50),
        None,
    );
    for (i, name) in ["GET /v1/vm/{id}", "pause", "resume"].iter().enumerate() {
        let (n, one) = (s(&at_n[i])?, s(&at1[i])?);
        row(
            &format!("{name} p50 (ms; baseline: at 1 VM)"),
            n.p50,
            Some(one.p50),
            None,
        );
    }
    if p.vms < 1000 {
        t.note(format!(
            "the list and memory targets are stated for 1,000 VMs; this run has {}",
            p.vms
        ));
    }
    rep.table(t);
    Ok(())
}

// ---------------------------------------------------------------- TLS (issue 14)

/// A new connection and one `GET /v1/health` over HTTPS (TLS handshake
/// included) against the same over plain TCP, interleaved: a second daemon
/// serves HTTPS with a certificate from a CA made here, in its own
/// directory, beside the plain daemon of the other tables.
fn tls_handshake(env: &mut Env, agentenv: &Path, p: &Params, rep: &mut Report) -> Result<()> {
    let plain = Endpoint::Tcp(env.h.daemon().context("the daemon runs")?.addr);
    let dir = env.root.join("tls");
    for sub in ["sessions", "s", "snap", "pki"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    let pki = dir.join("pki");
    for (name, pem) in [
        ("ca.crt", ca.pem()),
        ("server.crt", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        std::fs::write(pki.join(name), pem)?;
    }
    let mut config = daemon::in_run(
        &daemon::fc_double_config(env.bare.fc_double.clone(), &dir, MEMORY_MIB_PER_SLOT)?,
        &dir,
    );
    config.tls = agentenv_core::config::TlsConfig {
        cert_file: Some(pki.join("server.crt")),
        key_file: Some(pki.join("server.key")),
        client_ca_file: None,
    };
    let config_path = dir.join("agentenv.toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(agentenv);
    cmd.arg("--config")
        .arg(&config_path)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("daemon.log"))?);
    let child = signals::spawn_group(&mut cmd, libc::SIGTERM)?;
    let result = (|| {
        let local = ApiClient::new(&format!("unix:{}", sock.display()))?;
        let t0 = Instant::now();
        while local.health().is_err() {
            signals::check()?;
            ensure!(
                t0.elapsed() < Duration::from_secs(15),
                "the HTTPS daemon did not answer: {}",
                daemon::tail_lines(&dir.join("daemon.log"), 10)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let tls = agentenv_client::TlsOptions {
            cacert: Some(pki.join("ca.crt")),
            ..Default::default()
        };
        let https = Endpoint::parse_with(&format!("https://127.0.0.1:{port}"), &tls)?;
        let one = |ep: &Endpoint| -> Result<Duration> {
            let t0 = Instant::now();
            let r = Client::new(ep.clone(), IO_TIMEOUT).request("GET", "/v1/health", None)?;
            let took = t0.elapsed();
            ensure!(
                r.status == 200,
                "GET /v1/health over {ep}: HTTP {}",
                r.status
            );
            Ok(took)
        };
        let mut sides = Sides::<2>::default();
        rounds("TLS handshake", p.warmup, p.iterations, |i, timed| {
            let s = rotated(i, [&mut || one(&https), &mut || one(&plain)])?;
            if timed {
                sides.push(s);
            }
            Ok(())
        })?;
        Ok(sides)
    })();
    signals::stop_group(child, &[(libc::SIGTERM, Duration::from_secs(30))]);
    let sides = result?;
    let mut t = Table::latency("new connection + one request (ms)", &["https", "http"]);
    t.latency_row("connect (+ TLS handshake) + GET /v1/health", &sides, None)
        .note(
            "https: TLS 1.3 (rustls, ring), a P-256 certificate from a CA made for the run, \
             no client certificate; http: the plain daemon of the tables above",
        );
    rep.table(t);
    Ok(())
}
