//! `snapshot_restore`: full-VM snapshots of a QEMU/TCG guest (restore vs cold
//! boot, reset, fork, pause windows) and the daemon's restore vs a bare
//! fc-double loading the same files. See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use agentenv_api::{ExecRequest, SnapshotInfo};
use agentenv_bench::args::Common;
use agentenv_bench::bare::BareVmm;
use agentenv_bench::daemon::{self, call, Harness, QemuGuest};
use agentenv_bench::report::{Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{interleaved, progress, rounds, Side};
use agentenv_bench::{procfs, runner, signals, stats::Summary};
use agentenv_client::ApiClient;
use agentenv_host::firecracker::models::SnapshotLoadParams;
use agentenv_host::snapshots::{DISK_FILE, MEMORY_FILE, STATE_FILE};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Guest memory of the QEMU guest, MiB (one slot).
const GUEST_MIB: u64 = 512;
/// Guest memory of the fc-double VMs, MiB (the double maps nothing).
const FC_GUEST_MIB: u64 = 128;
const QEMU_ROOTFS: &str = "minimal.ext4";
/// How long any single HTTP read or write may block (a fork of 10 under TCG).
const IO_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restored, reset or forked VM may take to answer its first exec.
const EXEC_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the guest's touched memory lives (a tmpfs mounted for the run).
const GUEST_TOUCH_DIR: &str = "/run/ae-touch";
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

const TARGET_RESTORE_P50_MS: f64 = 300.0;
const TARGET_SPEEDUP: f64 = 15.0;
const TARGET_PAUSE_P50_MS: f64 = 150.0;
const TARGET_FORK_READY_MS: f64 = 3000.0;
const TARGET_CLONE_PSS_PCT: f64 = 20.0;
const TARGET_RESET_P50_MS: f64 = 300.0;
const TARGET_FC_OVERHEAD_MS: f64 = 2.0;
const TARGET_DISK_PAUSE_RATIO: f64 = 1.1;

/// Full-VM snapshots: restore, fork, reset and pause windows, each beside its baseline.
#[derive(Debug, Parser)]
#[command(name = "snapshot_restore", version, about, long_about = None)]
struct Args {
    /// Restore / cold-boot pairs, interleaved [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    runs: usize,
    /// Timed resets in the reset loop [--quick: 5].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "5"))]
    resets: usize,
    /// Full snapshots whose pause window is measured [--quick: 3].
    #[arg(long, default_value_t = 10, default_value_if("quick", "true", "3"))]
    pauses: usize,
    /// Disk-snapshot / `cp` pairs, interleaved [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    disk_runs: usize,
    /// Forks of --fork-count clones [--quick: 1].
    #[arg(long, default_value_t = 3, default_value_if("quick", "true", "1"))]
    forks: usize,
    /// Clones per fork.
    #[arg(long, default_value_t = 10)]
    fork_count: u32,
    /// Guest memory touched (tmpfs in the guest) before the full snapshots, MiB.
    #[arg(long, default_value_t = 256)]
    touch_mib: u64,
    /// Data written to the guest's disk before the disk snapshots, MiB [--quick: 64].
    #[arg(long, default_value_t = 256, default_value_if("quick", "true", "64"))]
    disk_mib: u64,
    /// fc-double restore / bare `snapshot/load` pairs [--quick: 20].
    #[arg(long, default_value_t = 100, default_value_if("quick", "true", "20"))]
    fc_iterations: usize,
    /// Skip the QEMU part.
    #[arg(long)]
    skip_qemu: bool,
    /// Skip the fc-double part.
    #[arg(long)]
    skip_fc: bool,
    /// The guest artifacts [default: $AGENTENV_ARTIFACTS, else <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// A cold boot whose agent has not answered after S s fails the run.
    #[arg(long, default_value_t = 180)]
    boot_timeout_s: u64,
    /// Untimed rounds before each interleaved series (fc-double: at least 3).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[command(flatten)]
    common: Common,
    /// `agentenv` and `fc-double`, found once the flags are parsed.
    #[arg(skip)]
    bins: [PathBuf; 2],
}

fn main() {
    let mut p: Args = runner::start();
    p.bins = daemon::binaries(p.common.bin_dir.as_deref(), ["agentenv", "fc-double"]);
    let (p, c) = (&p, &p.common);
    let mut rep = Report::new(
        "agentenv full-VM snapshots: restore, fork, reset and pause windows, same run",
        json!({"runs": p.runs, "resets": p.resets, "pauses": p.pauses,
               "disk_runs": p.disk_runs, "forks": p.forks, "fork_count": p.fork_count,
               "touch_mib": p.touch_mib, "disk_mib": p.disk_mib, "guest_mib": GUEST_MIB,
               "fc_iterations": p.fc_iterations, "warmup": p.warmup}),
    );
    rep.about("daemon", p.bins[0].display().to_string());
    match QemuGuest::find(p.artifacts.as_deref(), QEMU_ROOTFS) {
        _ if p.skip_qemu => drop(rep.about("QEMU", "not run (--skip-qemu)")),
        Err(why) => drop(rep.about("QEMU", format!("skipped: {why}"))),
        Ok(g) => run_part(rep.about("QEMU", g.version.clone()), p, "qemu", Some(&g)),
    }
    if p.skip_fc {
        rep.about("fc-double", "not run (--skip-fc)");
    } else {
        let fc = p.bins[1].display().to_string();
        run_part(rep.about("fc-double", fc), p, "fc-double", None);
    }
    rep.finish(c.json)
}

/// A part of the run, its daemon in a fresh directory (default /dev/shm: a tmpfs).
fn run_part(rep: &mut Report, p: &Args, part: &str, qemu: Option<&QemuGuest>) {
    let (c, tag) = (&p.common, if qemu.is_some() { "q" } else { "fc" });
    let tmp = c.tmp_dir.clone().unwrap_or_else(|| "/dev/shm".into());
    let h = Harness::new(Some(&tmp), &format!("ae-snaprest-{tag}-"), &["work"]);
    let result = h.and_then(|mut h| {
        let result = match qemu {
            Some(guest) => run_qemu(&mut h, guest, p, rep),
            None => run_fc(&mut h, p, rep),
        };
        let (result, cleanup) = h.finish(result, c.keep);
        rep.cleanup(part, cleanup.cleaned());
        result
    });
    if let Err(e) = result {
        rep.fail(format!("{part}: {e:#}"));
    }
}

/// Runs `cmd` in the guest; its stdout, or an error with its output.
fn sh(api: &ApiClient, vm_id: &str, cmd: &str) -> Result<String> {
    let req: ExecRequest = serde_json::from_value(json!({"cmd": ["sh", "-c", cmd]}))?;
    let r = api.exec(vm_id, &req);
    let r = r.with_context(|| format!("{vm_id}: exec {cmd:?}"))?;
    ensure!(r.exit_code == Some(0), "{vm_id}: `{cmd}` failed: {r:?}");
    Ok(r.stdout)
}

/// Execs `true` until answered, every 2 ms while the agent is not back (503).
fn first_exec(api: &ApiClient, vm_id: &str) -> Result<()> {
    let req: ExecRequest = serde_json::from_value(json!({"cmd": ["true"]}))?;
    let deadline = Instant::now() + EXEC_READY_TIMEOUT;
    loop {
        match api.exec(vm_id, &req) {
            Ok(r) if r.exit_code == Some(0) => return Ok(()),
            Ok(r) => bail!("{vm_id}: exec of true: {r:?}"),
            Err(e) if e.status() == Some(503) && Instant::now() < deadline => {
                signals::check()?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).with_context(|| format!("{vm_id}: exec of true")),
        }
    }
}

/// A name not used before in the run: `prefix` and a number.
fn fresh(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Relaxed))
}

/// `start` making the VM `id`, timed; then the VM is deleted.
fn timed(api: &ApiClient, id: String, start: impl FnOnce(&str) -> Result<()>) -> Result<Duration> {
    let t0 = Instant::now();
    start(&id)?;
    let took = t0.elapsed();
    api.delete_vm(&id)?;
    Ok(took)
}

/// A cold boot of the guest, up to its first exec.
fn cold_boot(api: &ApiClient, vm_id: &str, p: &Args) -> Result<()> {
    let body = json!({"vm_id": vm_id, "disk": {"kind": "overlay", "rootfs_id": QEMU_ROOTFS},
                      "wait_ready": true, "wait_ready_timeout_s": p.boot_timeout_s});
    call(api, "POST", "/v1/vm", Some(&body), 201)?;
    first_exec(api, vm_id)
}

/// A VM restored from the snapshot `base`; a QEMU one up to its first exec.
fn restore(api: &ApiClient, vm_id: &str, qemu: bool) -> Result<()> {
    let r = api.restore_vm(vm_id, "base", qemu);
    r.with_context(|| format!("restore {vm_id}"))?;
    if qemu {
        first_exec(api, vm_id)?;
    }
    Ok(())
}

fn full_snapshot(api: &ApiClient, vm_id: &str, id: &str) -> Result<SnapshotInfo> {
    let req = serde_json::from_value(json!({"snapshot_id": id, "memory": true}))?;
    let r = api.snapshot_vm_with(vm_id, &req);
    r.with_context(|| format!("full snapshot {id} of {vm_id}"))
}

fn run_qemu(h: &mut Harness, guest: &QemuGuest, p: &Args, rep: &mut Report) -> Result<()> {
    let mut config = daemon::qemu_config(guest, GUEST_MIB, 2);
    config.max_memory_mib = Some(GUEST_MIB * (u64::from(p.fork_count) + 8));
    // The guests' RAM files go in the tmpfs tier; the daemon wants it there.
    std::fs::create_dir_all(daemon::in_run(&config, h.root()).guest_memory_dir())?;
    h.write_config(&config)?;
    let tier = h.root().join("snap/tmpfs");
    let d = &*h.start_daemon(&p.bins[0], IO_TIMEOUT, HEALTH_TIMEOUT)?;
    let api = &d.api;
    progress("qemu: booting the source VM");
    cold_boot(api, "src", p)?;
    let src_pid = api.get_vm("src")?.pid.context("src has no VMM pid")?;
    full_snapshot(api, "src", "base")?;
    let what = "qemu: restore vs cold boot → first exec";
    let sides: [Side; 2] = [
        &mut || timed(api, fresh("r"), |id| restore(api, id, true)),
        &mut || timed(api, fresh("b"), |id| cold_boot(api, id, p)),
    ];
    let boot = interleaved(what, p.warmup, p.runs, sides)?;
    restore(api, "rs", true)?;
    let mut reset = || {
        let t0 = Instant::now();
        api.reset_vm("rs", "base").context("reset")?;
        first_exec(api, "rs")?;
        Ok(t0.elapsed())
    };
    let what = "qemu: reset → first exec";
    let resets = interleaved(what, p.warmup, p.resets, [&mut reset])?;
    api.delete_vm("rs")?;
    // Fork: all clones exec-ready (a thread each), then their idle memory (MiB).
    let (mut fork_call, mut fork_ready, mut pss, mut rss) = (vec![], vec![], vec![], vec![]);
    rounds("qemu: fork", 0, p.forks, |_, _| {
        let t0 = Instant::now();
        let req = serde_json::from_value(json!({"count": p.fork_count}))?;
        let f = api.fork_vm("src", &req).context("fork")?;
        fork_call.push(t0.elapsed());
        std::thread::scope(|s| {
            let exec = |id| move || first_exec(&d.client(IO_TIMEOUT)?, id);
            let ready: Vec<_> = f.vms.iter().map(|v| s.spawn(exec(&v.vm_id))).collect();
            let mut ready = ready.into_iter();
            ready.try_for_each(|r| r.join().expect("an exec thread"))
        })?;
        fork_ready.push(t0.elapsed());
        std::thread::sleep(Duration::from_secs(3));
        for v in &f.vms {
            let pid = v.pid.context("a clone without a pid")?;
            let kib = procfs::pss_kib(pid).context("smaps_rollup of a clone")?;
            pss.push(kib as f64 / 1024.0);
            rss.push(procfs::status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0);
        }
        f.vms.iter().try_for_each(|v| api.delete_vm(&v.vm_id))?;
        Ok(())
    })?;
    let src_pss = procfs::pss_kib(src_pid).unwrap_or(0) as f64 / 1024.0;
    // Pause windows (full, then disk vs cp) while a guest busy loop runs the vCPU.
    let (mut full_pause, mut full_call) = (vec![], vec![]);
    let (dir, mib, size) = (GUEST_TOUCH_DIR, p.touch_mib, p.touch_mib + 16);
    progress(format!("qemu: touching {mib} MiB, starting a busy loop"));
    let mount = format!("mkdir -p {dir} && mount -t tmpfs -o size={size}m tmpfs {dir}");
    let dd = format!("dd if=/dev/urandom of={dir}/x bs=1M count={mib} 2>/dev/null");
    sh(api, "src", &format!("{mount} && {dd}"))?;
    let lp = "setsid sh -c 'renice -n 19 -p $$ >/dev/null; while :; do :; done' \
              </dev/null >/dev/null 2>&1 & echo $!";
    let busy = sh(api, "src", lp)?;
    let vcpu = vcpu_thread(src_pid)?;
    rounds("qemu: full snapshot pause window", 0, p.pauses, |i, _| {
        let id = format!("pw{i}");
        let (pause, (r, took)) = stalls(vcpu, || {
            let t0 = Instant::now();
            (full_snapshot(api, "src", &id), t0.elapsed())
        })?;
        r?;
        full_pause.push(pause);
        full_call.push(took);
        Ok(api.delete_snapshot(&id)?)
    })?;
    let mib = p.disk_mib;
    progress(format!("qemu: writing {mib} MiB to the guest's disk"));
    let dd = format!("dd if=/dev/urandom of=/root/ae-disk.bin bs=1M count={mib}");
    let write = format!("rm -f {dir}/x; umount {dir}; {dd} 2>/dev/null && sync");
    sh(api, "src", &write)?;
    let overlay = api.get_vm("src")?.disk.writable_path;
    let copy = tier.join("cp-baseline.ext4");
    let mut snapshot = || {
        let id = fresh("ds");
        let (pause, r) = stalls(vcpu, || api.snapshot_vm("src", Some(id.clone())))?;
        r.with_context(|| format!("disk snapshot {id}"))?;
        api.delete_snapshot(&id)?;
        Ok(pause)
    };
    let mut cp = || {
        let (mut cp, t0) = (Command::new("cp"), Instant::now());
        daemon::run(cp.arg("--sparse=always").arg(&overlay).arg(&copy))?;
        let took = t0.elapsed();
        std::fs::remove_file(&copy)?;
        Ok(took)
    };
    let what = "qemu: disk snapshot pause vs cp --sparse=always";
    let disk = interleaved(what, p.warmup, p.disk_runs, [&mut snapshot, &mut cp])?;
    let clean = format!("rm -f /root/ae-disk.bin; kill {}", busy.trim());
    sh(api, "src", &clean)?;
    let title = format!("QEMU/TCG, {GUEST_MIB} MiB guest, agent ready (ms)");
    let mut t = Table::new(&title, ["p50", "p99", "min", "max", "n"]);
    let p50 = |n, s: &[Duration], l| Summary::of(s).map(|x| Target::at_most(n, x.p50, l, " ms"));
    let target = p50("restore_p50", boot.side(0), TARGET_RESTORE_P50_MS);
    stats(&mut t, "restore → first exec", boot.side(0), target);
    stats(&mut t, "cold boot → first exec", boot.side(1), None);
    if let Some([r, b]) = boot.summaries() {
        let x = b.p50 / r.p50;
        let target = Target::at_least("restore_speedup", x, TARGET_SPEEDUP, "x");
        let name = "speedup (cold boot p50 ÷ restore p50)";
        t.row(name, vec![Cell::Ratio(x)], Some(target));
    }
    let target = p50("reset_p50", resets.side(0), TARGET_RESET_P50_MS);
    stats(&mut t, "reset → first exec", resets.side(0), target);
    let (limit, unit) = (TARGET_FORK_READY_MS, " ms (max)");
    let target = Summary::of(&fork_ready).map(|x| x.max);
    let target = target.map(|x| Target::at_most("fork_all_ready", x, limit, unit));
    let name = format!("fork {} → all exec-ready", p.fork_count);
    stats(&mut t, &name, &fork_ready, target);
    stats(&mut t, "  fork call (201)", &fork_call, None);
    let target = p50("full_pause_p50", &full_pause, TARGET_PAUSE_P50_MS);
    let name = format!("pause window, full snapshot ({} MiB touched)", p.touch_mib);
    stats(&mut t, &name, &full_pause, target);
    let name = "  snapshot call (201, seal included)";
    stats(&mut t, name, &full_call, None);
    t.note("each up to the first `exec true` answered; pause window: the vCPU thread not runnable");
    let title = format!("disk snapshot of {mib} MiB written: pause vs `cp --sparse=always` (ms)");
    let mut disk_t = Table::latency(&title, &["snapshot pause", "cp"]);
    let limit = Some(Limit::Ratio(TARGET_DISK_PAUSE_RATIO));
    let fs = procfs::fs_type(&tier);
    let note = format!("cp: the VM's overlay into the tmpfs tier ({fs}), where snapshots go");
    disk_t.latency_row("pause vs cp", &disk, limit).note(note);
    rep.table(t).table(disk_t);
    if pss.is_empty() {
        return Ok(());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let pct = |mib: f64| mib / GUEST_MIB as f64 * 100.0;
    let cells = |mib: f64| vec![Cell::Num(mib, 1), Cell::Num(pct(mib), 1)];
    let title = format!("host memory of idle clones, {GUEST_MIB} MiB guests");
    let mut mem = Table::new(&title, ["MiB", "% of guest"]);
    let target = Target::at_most("clone_pss", pct(mean(&pss)), TARGET_CLONE_PSS_PCT, " %");
    let max_pss = pss.iter().copied().fold(f64::NAN, f64::max);
    mem.row("PSS per clone, mean", cells(mean(&pss)), Some(target))
        .row("PSS, largest clone", cells(max_pss), None)
        .row("VmRSS per clone, mean", cells(mean(&rss)), None)
        .row("PSS of the booted source VM", cells(src_pss), None)
        .note("PSS (smaps_rollup) of each clone's QEMU, 3 s after all answered");
    rep.table(mem);
    Ok(())
}

/// A row of p50, p99, min, max and count, when there are samples.
fn stats(t: &mut Table, name: &str, s: &[Duration], target: Option<Target>) {
    if let Some(x) = Summary::of(s) {
        let mut cells: Vec<Cell> = [x.p50, x.p99, x.min, x.max].map(Cell::ms).into();
        cells.push(Cell::Num(x.n as f64, 0));
        t.row(name, cells, target);
    }
}

/// The vCPU thread (pid, tid): QEMU's busiest in 0.5 s of a guest busy loop.
fn vcpu_thread(pid: u32) -> Result<(u32, u32)> {
    let before = procfs::thread_cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let mut most = (0, 0);
    for (tid, t) in procfs::thread_cpu_ticks(pid) {
        let t0 = before.iter().find(|b| b.0 == tid).map_or(0, |b| b.1);
        most = most.max((t - t0, tid));
    }
    match most {
        (0, _) => bail!("no QEMU thread used the CPU: is the guest's busy loop running?"),
        (_, tid) => Ok((pid, tid)),
    }
}

/// `f`'s result and the longest stall of the vCPU thread, sampled every ~0.2 ms.
fn stalls<R: Send>((pid, tid): (u32, u32), f: impl FnOnce() -> R + Send) -> Result<(Duration, R)> {
    std::thread::scope(|s| {
        let (call, mut samples) = (s.spawn(f), Vec::with_capacity(1 << 14));
        while !call.is_finished() {
            samples.push((Instant::now(), procfs::thread_state(pid, tid) == Some('R')));
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok((longest_stall(&samples)?, call.join().expect("the call")))
    })
}

/// The longest run of samples not runnable, from its first to the next runnable.
fn longest_stall(samples: &[(Instant, bool)]) -> Result<Duration> {
    let (mut longest, mut since) = (Duration::ZERO, None);
    for &(t, runnable) in samples {
        match (runnable, since) {
            (false, None) => since = Some(t),
            (true, Some(s)) => (longest, since) = (longest.max(t - s), None),
            _ => {}
        }
    }
    match since {
        Some(_) => bail!("the vCPU thread was still stopped after the snapshot"),
        None => Ok(longest),
    }
}

fn run_fc(h: &mut Harness, p: &Args, rep: &mut Report) -> Result<()> {
    let (root, fc) = (h.root().to_path_buf(), &*p.bins[1]);
    let mut config = daemon::fc_double_config(fc.into(), &root, FC_GUEST_MIB)?;
    config.max_memory_mib = Some(FC_GUEST_MIB * 16);
    std::fs::File::create(root.join("rootfs/base.ext4"))?.set_len(8 << 20)?;
    h.write_config(&config)?;
    let api = &h.start_daemon(&p.bins[0], IO_TIMEOUT, HEALTH_TIMEOUT)?.api;
    let body = json!({"vm_id": "src", "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}});
    call(api, "POST", "/v1/vm", Some(&body), 201)?;
    let snap = full_snapshot(api, "src", "base")?;
    // The record names the snapshot's disk file; the other files are beside it.
    let disk = snap.tmpfs_path.or(snap.durable_path);
    let disk = PathBuf::from(disk.context("no snapshot path")?);
    let dir = disk.parent().context("a snapshot path without a parent")?;
    let mut daemon = || timed(api, fresh("r"), |id| restore(api, id, false));
    let mut bare = || bare_load(fc, dir, &root.join("work"), &fresh("b"));
    let what = "fc-double: daemon restore vs bare snapshot/load";
    let sides: [Side; 2] = [&mut daemon, &mut bare];
    let s = interleaved(what, p.warmup.max(3), p.fc_iterations, sides)?;
    let title = format!("restore of a {FC_GUEST_MIB} MiB fc-double VM (ms)");
    let mut t = Table::latency(&title, &["daemon", "bare"]);
    let name = "fc-double restore → running";
    let limit = Some(Limit::OverheadMs(TARGET_FC_OVERHEAD_MS));
    let note = "daemon: POST /v1/vm {\"restore\"} to its 201; bare: spawn to the load's 204";
    t.latency_row(name, &s, limit).note(note);
    rep.table(t);
    Ok(())
}

/// The baseline: a fresh fc-double `name` in a new directory `work/name`
/// loading the snapshot in `dir`, timed from its spawn to the load's 204. The
/// directory first gets (untimed) the snapshot's disk at each relative drive
/// path the state names, as a session directory; it is removed after.
fn bare_load(fc_double: &Path, dir: &Path, work: &Path, name: &str) -> Result<Duration> {
    let work = &work.join(name);
    std::fs::create_dir_all(work)?;
    let state = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state)?;
    let (magic, saved) = text.split_once('\n').unwrap_or_default();
    if magic != "fc-double snapshot" {
        bail!("{} is no fc-double state file", state.display());
    }
    let saved: Value = serde_json::from_str(saved).context("the state file's JSON")?;
    let drives = saved["drives"].as_array().into_iter().flatten();
    let paths = drives.filter_map(|d| d["path_on_host"].as_str());
    for rel in paths.map(Path::new).filter(|p| p.is_relative()) {
        std::fs::create_dir_all(work.join(rel).parent().unwrap_or(work))?;
        std::fs::hard_link(dir.join(DISK_FILE), work.join(rel))?;
    }
    let mem = json!({"backend_path": dir.join(MEMORY_FILE), "backend_type": "File"});
    let body = json!({"snapshot_path": state, "mem_backend": mem, "resume_vm": true});
    let load: SnapshotLoadParams = serde_json::from_value(body)?;
    let body = json!(load);
    let t0 = Instant::now();
    let took = (|| {
        let mut vmm = BareVmm::start(fc_double, work, name, IO_TIMEOUT)?;
        vmm.call("PUT", "/snapshot/load", &body)?;
        Ok(t0.elapsed())
    })();
    std::fs::remove_dir_all(work)?;
    took
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_stall_runs_from_its_first_sleeping_sample_to_the_next_runnable_one() {
        let t0 = Instant::now();
        let at = |(ms, r)| (t0 + Duration::from_millis(ms), r);
        let (y, n) = (true, false);
        let s = [(0, y), (1, n), (3, y), (4, n), (5, n), (9, y), (10, y)].map(at);
        assert_eq!(longest_stall(&s).unwrap(), Duration::from_millis(5));
        assert_eq!(longest_stall(&s[..1]).unwrap(), Duration::ZERO);
        assert!(longest_stall(&s[..5]).is_err());
    }
}
