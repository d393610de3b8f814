//! `snapshot_restore`: full-VM snapshots of a QEMU/TCG guest (restore vs cold
//! boot, reset, fork, pause windows) and the daemon's restore vs a bare
//! fc-double loading the same files. See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use agentenv_api::{CreateSnapshotRequest, ExecRequest, ForkRequest, SnapshotInfo, VmState};
use agentenv_bench::args::{count, Common};
use agentenv_bench::bare::BareVmm;
use agentenv_bench::daemon::{self, create_vm, Daemon, Harness, QemuGuest};
use agentenv_bench::procfs::{self, mib};
use agentenv_bench::report::{Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{interleaved, progress, rounds, Side, Sides};
use agentenv_bench::{runner, signals, stats::Summary};
use agentenv_client::ApiClient;
use agentenv_host::firecracker::models::{MemBackend, MemBackendType, SnapshotLoadParams};
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
/// A busy loop that keeps the guest's vCPU running: niced, in a session of
/// its own (the image's busybox has `renice` but no `nice`); prints its pid.
const BUSY_LOOP_CMD: &str = "setsid sh -c 'renice -n 19 -p $$ >/dev/null; while :; do :; done' \
                             </dev/null >/dev/null 2>&1 & echo $!";
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
    #[arg(value_parser = count)]
    runs: usize,
    /// Timed resets in the reset loop [--quick: 5].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "5"))]
    #[arg(value_parser = count)]
    resets: usize,
    /// Full snapshots whose pause window is measured [--quick: 3].
    #[arg(long, default_value_t = 10, default_value_if("quick", "true", "3"))]
    #[arg(value_parser = count)]
    pauses: usize,
    /// Disk-snapshot / `cp` pairs, interleaved [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    #[arg(value_parser = count)]
    disk_runs: usize,
    /// Forks of --fork-count clones [--quick: 1].
    #[arg(long, default_value_t = 3, default_value_if("quick", "true", "1"))]
    #[arg(value_parser = count)]
    forks: usize,
    /// Clones per fork.
    #[arg(long, default_value_t = 10, value_parser = count)]
    fork_count: usize,
    /// Guest memory touched (tmpfs in the guest) before the full snapshots, MiB.
    #[arg(long, default_value_t = 256, value_parser = count)]
    touch_mib: usize,
    /// Data written to the guest's disk before the disk snapshots, MiB [--quick: 64].
    #[arg(long, default_value_t = 256, default_value_if("quick", "true", "64"))]
    #[arg(value_parser = count)]
    disk_mib: usize,
    /// fc-double restore / bare `snapshot/load` pairs [--quick: 20].
    #[arg(long, default_value_t = 100, default_value_if("quick", "true", "20"))]
    #[arg(value_parser = count)]
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
}

fn main() {
    let p: Args = runner::start();
    let c = &p.common;
    let [agentenv, fc_double] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv", "fc-double"]);
    let mut rep = Report::new(
        "agentenv full-VM snapshots: restore, fork, reset and pause windows, same run",
        json!({"runs": p.runs, "resets": p.resets, "pauses": p.pauses,
               "disk_runs": p.disk_runs, "forks": p.forks, "fork_count": p.fork_count,
               "touch_mib": p.touch_mib, "disk_mib": p.disk_mib, "guest_mib": GUEST_MIB,
               "fc_iterations": p.fc_iterations, "warmup": p.warmup}),
    );
    rep.about("daemon", agentenv.display().to_string());
    // Each part has a daemon in a directory of its own, by default on
    // /dev/shm: the tmpfs snapshot tier and the guests' RAM files belong on a
    // tmpfs, as in production.
    let tmp = c.tmp_dir.clone().unwrap_or_else(|| "/dev/shm".into());
    let harness = |tag: &str| Harness::new(Some(&tmp), &format!("ae-snaprest-{tag}-"), &["work"]);
    if p.skip_qemu {
        rep.about("QEMU", "not run (--skip-qemu)");
    } else {
        match QemuGuest::find(p.artifacts.as_deref(), QEMU_ROOTFS) {
            Ok(guest) => {
                rep.about("QEMU", guest.version.clone());
                let run = |h: &mut Harness| run_qemu(h, &agentenv, &guest, &p);
                let tables = rep.part("qemu", harness("q"), c.keep, run);
                for t in tables.unwrap_or_default() {
                    rep.table(t);
                }
            }
            Err(why) => {
                progress(format!("qemu: skipped: {why}"));
                rep.about("QEMU", format!("skipped: {why}"));
            }
        }
    }
    if p.skip_fc {
        rep.about("fc-double", "not run (--skip-fc)");
    } else {
        rep.about("fc-double", fc_double.display().to_string());
        let run = |h: &mut Harness| run_fc(h, &agentenv, &fc_double, &p);
        if let Some(t) = rep.part("fc-double", harness("fc"), c.keep, run) {
            rep.table(t);
        }
    }
    rep.finish(c.json)
}

/// Runs `cmd` in the guest; its stdout, or an error with its output.
fn sh(api: &ApiClient, vm_id: &str, cmd: &str) -> Result<String> {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), cmd.into()],
        ..ExecRequest::default()
    };
    let r = api.exec(vm_id, &req);
    let r = r.with_context(|| format!("{vm_id}: exec {cmd:?}"))?;
    ensure!(r.exit_code == Some(0), "{vm_id}: `{cmd}` failed: {r:?}");
    Ok(r.stdout)
}

/// Execs `true` until one is answered: the agent of a VM just restored,
/// reset or forked may not be back yet (503), which is retried every 2 ms.
fn first_exec(api: &ApiClient, vm_id: &str) -> Result<()> {
    let req = ExecRequest {
        cmd: vec!["true".into()],
        ..ExecRequest::default()
    };
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

/// `start` making the VM `id`, timed; then, untimed, the VM is deleted.
fn timed_then_delete(
    api: &ApiClient,
    id: String,
    start: impl FnOnce(&str) -> Result<()>,
) -> Result<Duration> {
    let ((), took) = runner::timed(|| start(&id))?;
    api.delete_vm(&id)
        .with_context(|| format!("deleting {id}"))?;
    Ok(took)
}

/// A cold boot of the guest, up to its first exec.
fn cold_boot(api: &ApiClient, vm_id: &str, p: &Args) -> Result<()> {
    let body = json!({"vm_id": vm_id, "disk": {"kind": "overlay", "rootfs_id": QEMU_ROOTFS},
                      "wait_ready": true, "wait_ready_timeout_s": p.boot_timeout_s});
    create_vm(api, &body)?;
    first_exec(api, vm_id)
}

/// A VM restored from the snapshot `base`, running; a QEMU one up to its first exec.
fn restore(api: &ApiClient, vm_id: &str, qemu: bool) -> Result<()> {
    let vm = api.restore_vm(vm_id, "base", qemu);
    let vm = vm.with_context(|| format!("restore {vm_id}"))?;
    ensure!(
        vm.state == VmState::Running,
        "restored {vm_id} is {:?}",
        vm.state
    );
    if qemu {
        first_exec(api, vm_id)?;
    }
    Ok(())
}

fn full_snapshot(api: &ApiClient, vm_id: &str, id: &str) -> Result<SnapshotInfo> {
    let req = CreateSnapshotRequest {
        snapshot_id: Some(id.into()),
        memory: true,
    };
    let r = api.snapshot_vm_with(vm_id, &req);
    r.with_context(|| format!("full snapshot {id} of {vm_id}"))
}

/// The QEMU part: restore vs cold boot, the reset loop, forks, then the
/// pause windows while a busy loop runs in the source VM; its tables.
fn run_qemu(h: &mut Harness, agentenv: &Path, guest: &QemuGuest, p: &Args) -> Result<Vec<Table>> {
    let mut config = daemon::qemu_config(guest, GUEST_MIB, 2);
    config.max_memory_mib = Some(GUEST_MIB * (p.fork_count as u64 + 8));
    // The guests' RAM files go in the tmpfs tier; the daemon wants it there.
    std::fs::create_dir_all(daemon::in_run(&config, h.root()).guest_memory_dir())?;
    h.write_config(&config)?;
    let tier = h.root().join("snap/tmpfs");
    let d = &*h.start_daemon(agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
    let api = &d.api;
    progress("qemu: booting the source VM");
    cold_boot(api, "src", p)?;
    let src_pid = api.get_vm("src")?.pid.context("src has no VMM pid")?;
    full_snapshot(api, "src", "base")?;
    let what = "qemu: restore vs cold boot → first exec";
    let mut restored = || timed_then_delete(api, fresh("r"), |id| restore(api, id, true));
    let mut booted = || timed_then_delete(api, fresh("b"), |id| cold_boot(api, id, p));
    let sides: [Side; 2] = [&mut restored, &mut booted];
    let boot = interleaved(what, p.warmup, p.runs, sides)?;
    restore(api, "rs", true)?;
    let mut reset = || {
        let ((), took) = runner::timed(|| {
            api.reset_vm("rs", "base").context("reset rs")?;
            first_exec(api, "rs")
        })?;
        Ok(took)
    };
    let what = "qemu: reset → first exec";
    let [resets] = interleaved(what, p.warmup, p.resets, [&mut reset])?.0;
    api.delete_vm("rs")?;
    let forks = forks(d, p)?;
    let src_pss = procfs::pss_kib(src_pid).context("smaps_rollup of the source VM")?;
    let pauses = pause_windows(api, src_pid, &tier, p)?;
    Ok(vec![
        ready_table(p, &boot, &resets, &forks, &pauses),
        disk_pause_table(p, &pauses.disk, &tier),
        clone_memory_table(&forks, mib(src_pss)),
    ])
}

/// What the forks measured.
#[derive(Default)]
struct Forks {
    /// The fork call, to its 201.
    call: Vec<Duration>,
    /// From the fork call to the last clone's first exec answered.
    all_ready: Vec<Duration>,
    /// Each clone's PSS and VmRSS, MiB, idle 3 s after all answered.
    pss_mib: Vec<f64>,
    rss_mib: Vec<f64>,
}

/// `--forks` forks of `--fork-count` clones of `src`: every clone up to its
/// first exec (each from a thread and a client of its own), then the clones'
/// idle memory; the clones are deleted after.
fn forks(d: &Daemon, p: &Args) -> Result<Forks> {
    let (api, mut out) = (&d.api, Forks::default());
    let req = ForkRequest {
        count: u32::try_from(p.fork_count).context("--fork-count")?,
        vm_ids: None,
    };
    rounds("qemu: fork", 0, p.forks, |_, _| {
        let t0 = Instant::now();
        let fork = api.fork_vm("src", &req).context("fork")?;
        out.call.push(t0.elapsed());
        std::thread::scope(|s| {
            let execs: Vec<_> = fork
                .vms
                .iter()
                .map(|vm| s.spawn(|| first_exec(&d.client(IO_TIMEOUT)?, &vm.vm_id)))
                .collect();
            for exec in execs {
                exec.join().expect("an exec thread panicked")?;
            }
            anyhow::Ok(())
        })?;
        out.all_ready.push(t0.elapsed());
        std::thread::sleep(Duration::from_secs(3));
        for vm in &fork.vms {
            let pid = vm
                .pid
                .with_context(|| format!("{} has no VMM pid", vm.vm_id))?;
            let pss = procfs::pss_kib(pid).context("smaps_rollup of a clone")?;
            let rss = procfs::status_kib(pid, "VmRSS").context("VmRSS of a clone")?;
            out.pss_mib.push(mib(pss));
            out.rss_mib.push(mib(rss));
        }
        for vm in &fork.vms {
            api.delete_vm(&vm.vm_id)?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// The pause windows of `src`, each the longest stall of its vCPU thread.
struct Pauses {
    /// Full snapshots with `--touch-mib` MiB touched: the pause window, and
    /// the whole call (201, seal included).
    full: Vec<Duration>,
    full_call: Vec<Duration>,
    /// A disk snapshot's pause window vs `cp --sparse=always` of the overlay.
    disk: Sides<2>,
}

/// Touches `--touch-mib` MiB in `src` (QEMU `src_pid`) and starts a busy
/// loop in it; the full snapshots' pause windows; then `--disk-mib` MiB
/// written to its disk, and the disk snapshots' pause windows against `cp`
/// of its overlay into `tier`. The busy loop is stopped after.
fn pause_windows(api: &ApiClient, src_pid: u32, tier: &Path, p: &Args) -> Result<Pauses> {
    let (dir, touch_mib, disk_mib) = (GUEST_TOUCH_DIR, p.touch_mib, p.disk_mib);
    progress(format!(
        "qemu: touching {touch_mib} MiB, starting a busy loop"
    ));
    let touch = format!(
        "mkdir -p {dir} && mount -t tmpfs -o size={}m tmpfs {dir} \
         && dd if=/dev/urandom of={dir}/x bs=1M count={touch_mib} 2>/dev/null",
        touch_mib + 16
    );
    sh(api, "src", &touch)?;
    let busy_loop_pid = sh(api, "src", BUSY_LOOP_CMD)?;
    let vcpu = Vcpu::find(src_pid)?;
    let (mut full, mut full_call) = (vec![], vec![]);
    rounds("qemu: full snapshot pause window", 0, p.pauses, |i, _| {
        let id = format!("pw{i}");
        let snapshot = vcpu.watch(|| runner::timed(|| full_snapshot(api, "src", &id)))?;
        let (_, call) = snapshot.result?;
        full.push(snapshot.longest_stall);
        full_call.push(call);
        Ok(api.delete_snapshot(&id)?)
    })?;
    progress(format!("qemu: writing {disk_mib} MiB to the guest's disk"));
    let write = format!(
        "rm -f {dir}/x && umount {dir} \
         && dd if=/dev/urandom of=/root/ae-disk.bin bs=1M count={disk_mib} 2>/dev/null && sync"
    );
    sh(api, "src", &write)?;
    let overlay = api.get_vm("src")?.disk.writable_path;
    let copy = tier.join("cp-baseline.ext4");
    let mut disk_snapshot = || {
        let id = fresh("ds");
        let snapshot = vcpu.watch(|| api.snapshot_vm("src", Some(id.clone())))?;
        snapshot
            .result
            .with_context(|| format!("disk snapshot {id}"))?;
        api.delete_snapshot(&id)?;
        Ok(snapshot.longest_stall)
    };
    let mut cp = Command::new("cp");
    cp.arg("--sparse=always").arg(&overlay).arg(&copy);
    let mut cp_overlay = || {
        let ((), took) = runner::timed(|| daemon::run(&mut cp))?;
        std::fs::remove_file(&copy)?;
        Ok(took)
    };
    let what = "qemu: disk snapshot pause vs cp --sparse=always";
    let sides: [Side; 2] = [&mut disk_snapshot, &mut cp_overlay];
    let disk = interleaved(what, p.warmup, p.disk_runs, sides)?;
    let stop = format!("rm -f /root/ae-disk.bin && kill {}", busy_loop_pid.trim());
    sh(api, "src", &stop)?;
    Ok(Pauses {
        full,
        full_call,
        disk,
    })
}

/// A row of p50, p99, min, max and count; none without samples.
fn summary_row(t: &mut Table, name: &str, samples: &[Duration], target: Option<Target>) {
    if let Some(x) = Summary::of(samples) {
        let mut cells: Vec<Cell> = [x.p50, x.p99, x.min, x.max].map(Cell::ms).into();
        cells.push(Cell::Num(x.n as f64, 0));
        t.row(name, cells, target);
    }
}

/// The target `name`: the p50 of `samples` at most `limit_ms`; none without samples.
fn p50_target(name: &str, samples: &[Duration], limit_ms: f64) -> Option<Target> {
    let p50 = Summary::of(samples)?.p50;
    Some(Target::at_most(name, p50, limit_ms, " ms"))
}

/// Restore, cold boot, reset and fork up to the agent's answer, and the
/// full snapshots' pause windows.
fn ready_table(
    p: &Args,
    boot: &Sides<2>,
    resets: &[Duration],
    forks: &Forks,
    pauses: &Pauses,
) -> Table {
    let title = format!("QEMU/TCG, {GUEST_MIB} MiB guest, agent ready (ms)");
    let mut t = Table::new(&title, ["p50", "p99", "min", "max", "n"]);
    let (restored, booted) = (boot.side(0), boot.side(1));
    let target = p50_target("restore_p50", restored, TARGET_RESTORE_P50_MS);
    summary_row(&mut t, "restore → first exec", restored, target);
    summary_row(&mut t, "cold boot → first exec", booted, None);
    if let Some([restore, cold_boot]) = boot.summaries() {
        let speedup = cold_boot.p50 / restore.p50;
        let target = Target::at_least("restore_speedup", speedup, TARGET_SPEEDUP, "x");
        let name = "speedup (cold boot p50 ÷ restore p50)";
        t.row(name, vec![Cell::Ratio(speedup)], Some(target));
    }
    let target = p50_target("reset_p50", resets, TARGET_RESET_P50_MS);
    summary_row(&mut t, "reset → first exec", resets, target);
    let worst_fork_ms = Summary::of(&forks.all_ready).map(|s| s.max);
    let (limit, unit) = (TARGET_FORK_READY_MS, " ms (max)");
    let target = worst_fork_ms.map(|ms| Target::at_most("fork_all_ready", ms, limit, unit));
    let name = format!("fork {} → all exec-ready", p.fork_count);
    summary_row(&mut t, &name, &forks.all_ready, target);
    summary_row(&mut t, "  fork call (201)", &forks.call, None);
    let target = p50_target("full_pause_p50", &pauses.full, TARGET_PAUSE_P50_MS);
    let name = format!("pause window, full snapshot ({} MiB touched)", p.touch_mib);
    summary_row(&mut t, &name, &pauses.full, target);
    let name = "  snapshot call (201, seal included)";
    summary_row(&mut t, name, &pauses.full_call, None);
    t.note("each up to the first `exec true` answered; pause window: the vCPU thread not runnable");
    t
}

/// A disk snapshot's pause window against `cp` of the overlay into `tier`.
fn disk_pause_table(p: &Args, disk: &Sides<2>, tier: &Path) -> Table {
    let title = format!(
        "disk snapshot of {} MiB written: pause vs `cp --sparse=always` (ms)",
        p.disk_mib
    );
    let mut t = Table::latency(&title, &["snapshot pause", "cp"]);
    let limit = Some(Limit::Ratio(TARGET_DISK_PAUSE_RATIO));
    let fs = procfs::fs_type(tier);
    let note = format!("cp: the VM's overlay into the tmpfs tier ({fs}), where snapshots go");
    t.latency_row("pause vs cp", disk, limit).note(note);
    t
}

/// The idle clones' memory, beside that of the booted source VM.
fn clone_memory_table(forks: &Forks, src_pss_mib: f64) -> Table {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let pct = |mib: f64| mib / GUEST_MIB as f64 * 100.0;
    let cells = |mib: f64| vec![Cell::Num(mib, 1), Cell::Num(pct(mib), 1)];
    let title = format!("host memory of idle clones, {GUEST_MIB} MiB guests");
    let mut t = Table::new(&title, ["MiB", "% of guest"]);
    let mean_pss = mean(&forks.pss_mib);
    let target = Target::at_most("clone_pss", pct(mean_pss), TARGET_CLONE_PSS_PCT, " %");
    let max_pss = forks.pss_mib.iter().copied().fold(f64::NAN, f64::max);
    t.row("PSS per clone, mean", cells(mean_pss), Some(target))
        .row("PSS, largest clone", cells(max_pss), None)
        .row("VmRSS per clone, mean", cells(mean(&forks.rss_mib)), None)
        .row("PSS of the booted source VM", cells(src_pss_mib), None)
        .note("PSS (smaps_rollup) of each clone's QEMU, 3 s after all answered");
    t
}

/// The guest's vCPU thread: the QEMU thread that uses the CPU while the
/// guest runs a busy loop.
#[derive(Debug, Clone, Copy)]
struct Vcpu {
    pid: u32,
    tid: u32,
}

/// What a call gave, and the longest stall of the vCPU thread during it.
struct Watched<R> {
    result: R,
    longest_stall: Duration,
}

impl Vcpu {
    /// QEMU `pid`'s thread that used the most CPU in 0.5 s.
    fn find(pid: u32) -> Result<Vcpu> {
        let before = procfs::thread_cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(500));
        let mut busiest = (0, 0); // (ticks used, tid)
        for (tid, ticks) in procfs::thread_cpu_ticks(pid) {
            let ticks_before = before.iter().find(|b| b.0 == tid).map_or(0, |b| b.1);
            busiest = busiest.max((ticks.saturating_sub(ticks_before), tid));
        }
        let (used, tid) = busiest;
        ensure!(
            used > 0,
            "no QEMU thread used the CPU: is the guest's busy loop running?"
        );
        Ok(Vcpu { pid, tid })
    }

    /// Runs `f` on a thread of its own while this thread's state is sampled
    /// every ~0.2 ms.
    fn watch<R: Send>(self, f: impl FnOnce() -> R + Send) -> Result<Watched<R>> {
        std::thread::scope(|s| {
            let call = s.spawn(f);
            let mut samples = Vec::with_capacity(1 << 14);
            while !call.is_finished() {
                let runnable = procfs::thread_state(self.pid, self.tid) == Some('R');
                samples.push((Instant::now(), runnable));
                std::thread::sleep(Duration::from_micros(200));
            }
            let longest_stall = longest_stall(&samples)?;
            let result = call.join().expect("the watched call panicked");
            Ok(Watched {
                result,
                longest_stall,
            })
        })
    }
}

/// The longest run of samples not runnable, from its first sample to the
/// next runnable one; an error if the last run never ended.
fn longest_stall(samples: &[(Instant, bool)]) -> Result<Duration> {
    let (mut longest, mut since) = (Duration::ZERO, None);
    for &(t, runnable) in samples {
        match (runnable, since) {
            (false, None) => since = Some(t),
            (true, Some(s)) => (longest, since) = (longest.max(t - s), None),
            _ => {}
        }
    }
    ensure!(
        since.is_none(),
        "the vCPU thread was still stopped after the snapshot"
    );
    Ok(longest)
}

/// The fc-double part: the daemon's restore of a full snapshot against a
/// bare fc-double loading the same files; its table.
fn run_fc(h: &mut Harness, agentenv: &Path, fc_double: &Path, p: &Args) -> Result<Table> {
    let root = h.root().to_path_buf();
    let mut config = daemon::fc_double_config(fc_double.into(), &root, FC_GUEST_MIB)?;
    config.max_memory_mib = Some(FC_GUEST_MIB * 16);
    std::fs::File::create(root.join("rootfs/base.ext4"))?.set_len(8 << 20)?;
    h.write_config(&config)?;
    let api = &h.start_daemon(agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?.api;
    let body = json!({"vm_id": "src", "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}});
    create_vm(api, &body)?;
    let snap = full_snapshot(api, "src", "base")?;
    // The record names the snapshot's disk file; the other files are beside it.
    let disk = snap.tmpfs_path.or(snap.durable_path);
    let disk = PathBuf::from(disk.context("the snapshot record names no path")?);
    let dir = disk.parent().context("a snapshot path without a parent")?;
    let mut daemon = || timed_then_delete(api, fresh("r"), |id| restore(api, id, false));
    let mut bare = || bare_load(fc_double, dir, &root.join("work"), &fresh("b"));
    let what = "fc-double: daemon restore vs bare snapshot/load";
    let sides: [Side; 2] = [&mut daemon, &mut bare];
    let s = interleaved(what, p.warmup.max(3), p.fc_iterations, sides)?;
    let title = format!("restore of a {FC_GUEST_MIB} MiB fc-double VM (ms)");
    let mut t = Table::latency(&title, &["daemon", "bare"]);
    let name = "fc-double restore → running";
    let limit = Some(Limit::OverheadMs(TARGET_FC_OVERHEAD_MS));
    let note = "daemon: POST /v1/vm {\"restore\"} to its 201; bare: spawn to the load's 204";
    t.latency_row(name, &s, limit).note(note);
    Ok(t)
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
    ensure!(
        magic == "fc-double snapshot",
        "{} is no fc-double state file",
        state.display()
    );
    let saved: Value = serde_json::from_str(saved).context("the state file's JSON")?;
    let drives = saved["drives"].as_array().into_iter().flatten();
    let paths = drives.filter_map(|d| d["path_on_host"].as_str());
    for rel in paths.map(Path::new).filter(|p| p.is_relative()) {
        std::fs::create_dir_all(work.join(rel).parent().unwrap_or(work))?;
        std::fs::hard_link(dir.join(DISK_FILE), work.join(rel))?;
    }
    let load = SnapshotLoadParams {
        snapshot_path: state,
        mem_backend: Some(MemBackend {
            backend_path: dir.join(MEMORY_FILE),
            backend_type: MemBackendType::File,
        }),
        resume_vm: true,
        ..SnapshotLoadParams::default()
    };
    let body = serde_json::to_value(&load)?;
    let loaded = runner::timed(|| {
        let mut vmm = BareVmm::start(fc_double, work, name, IO_TIMEOUT)?;
        vmm.call("PUT", "/snapshot/load", &body)?;
        Ok(vmm)
    });
    // Killed (untimed) before its directory goes; a failed load has been already.
    let took = loaded.map(|(mut vmm, took)| {
        vmm.kill();
        took
    });
    let removed =
        std::fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()));
    // The load's error first: it is what went wrong.
    let took = took?;
    removed?;
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_zero_are_refused_and_quick_shortens_the_run() {
        let parse = |a: &[&str]| Args::try_parse_from([&["snapshot_restore"], a].concat());
        assert!(parse(&["--fork-count", "0"]).is_err());
        assert!(parse(&["--runs", "0"]).is_err());
        let q = parse(&["--quick"]).unwrap();
        let counts = (
            q.runs,
            q.resets,
            q.pauses,
            q.disk_runs,
            q.forks,
            q.fork_count,
        );
        assert_eq!(counts, (2, 5, 3, 2, 1, 10));
        assert_eq!((q.disk_mib, q.fc_iterations, q.warmup), (64, 20, 1));
    }

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
