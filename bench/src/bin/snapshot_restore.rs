//! `snapshot_restore`: full-VM snapshots on a real QEMU/TCG guest through the
//! daemon — restore against a cold boot, the pause window of a full and of a
//! disk snapshot, fork, reset — and the daemon's restore against a bare
//! fc-double loading the same snapshot files, in one run.
//! See `bench/README.md`.

use std::cell::Cell as Counter;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentenv_api::{CreateSnapshotRequest, ExecRequest, ForkRequest, SnapshotInfo};
use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon::{self, call, wait_for_socket, Harness, QemuGuest};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{interleaved, progress, rounds, Sides};
use agentenv_bench::stats::Summary;
use agentenv_bench::{procfs, runner, signals};
use agentenv_client::{ApiClient, Client, Endpoint};
use agentenv_host::firecracker::models::{MemBackend, MemBackendType, SnapshotLoadParams};
use agentenv_host::snapshots::{DISK_FILE, META_FILE};
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
    /// Restore / cold-boot pairs, interleaved [default: 5; --quick: 2].
    #[arg(long)]
    runs: Option<usize>,
    /// Timed resets in the reset loop [default: 20; --quick: 5].
    #[arg(long)]
    resets: Option<usize>,
    /// Full snapshots whose pause window is measured [default: 10; --quick: 3].
    #[arg(long)]
    pauses: Option<usize>,
    /// Disk-snapshot / `cp` pairs, interleaved [default: 5; --quick: 2].
    #[arg(long)]
    disk_runs: Option<usize>,
    /// Forks of --fork-count clones [default: 3; --quick: 1].
    #[arg(long)]
    forks: Option<usize>,
    /// Clones per fork.
    #[arg(long, default_value_t = 10)]
    fork_count: u32,
    /// Guest memory touched (tmpfs in the guest) before the full snapshots'
    /// pause windows, MiB [default: 256; --quick: 256].
    #[arg(long)]
    touch_mib: Option<u64>,
    /// Data written to the guest's disk before the disk snapshots, MiB
    /// [default: 256; --quick: 64].
    #[arg(long)]
    disk_mib: Option<u64>,
    /// fc-double restore / bare `snapshot/load` pairs [default: 100; --quick: 20].
    #[arg(long)]
    fc_iterations: Option<usize>,
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
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
}

/// The resolved run parameters.
#[derive(Debug, Clone)]
struct Params {
    runs: usize,
    resets: usize,
    pauses: usize,
    disk_runs: usize,
    forks: usize,
    fork_count: u32,
    touch_mib: u64,
    disk_mib: u64,
    fc_iterations: usize,
    warmup: usize,
    boot_timeout_s: u64,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let p = Params {
        runs: args.runs.unwrap_or(c.pick(5, 2)).max(1),
        resets: args.resets.unwrap_or(c.pick(20, 5)).max(1),
        pauses: args.pauses.unwrap_or(c.pick(10, 3)).max(1),
        disk_runs: args.disk_runs.unwrap_or(c.pick(5, 2)).max(1),
        forks: args.forks.unwrap_or(c.pick(3, 1)).max(1),
        fork_count: args.fork_count.max(1),
        touch_mib: args.touch_mib.unwrap_or(256).max(1),
        disk_mib: args.disk_mib.unwrap_or(c.pick(256, 64)).max(1),
        fc_iterations: args.fc_iterations.unwrap_or(c.pick(100, 20)).max(1),
        warmup: args.warmup.get(c, 1, 1),
        boot_timeout_s: args.boot_timeout_s,
    };
    let [agentenv, fc_double] = or_exit(
        daemon::find_binaries(
            c.bin_dir.as_deref(),
            ["agentenv", "fc-double"],
            "build them first with:\n\n    \
             cargo build --release -p agentenv -p agentenv-testkit\n",
        ),
        2,
        "",
    );
    let mut rep = Report::new(
        "agentenv full-VM snapshots: restore, fork, reset and pause windows, same run",
        json!({"runs": p.runs, "resets": p.resets, "pauses": p.pauses,
               "disk_runs": p.disk_runs, "forks": p.forks, "fork_count": p.fork_count,
               "touch_mib": p.touch_mib, "disk_mib": p.disk_mib, "guest_mib": GUEST_MIB,
               "fc_iterations": p.fc_iterations, "warmup": p.warmup}),
    );
    rep.about("daemon", agentenv.display().to_string());
    // The tmpfs tier and the guests' RAM files belong on a tmpfs, as in production.
    let tmp = c
        .tmp_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    if args.skip_qemu {
        rep.about("QEMU", "not run (--skip-qemu)");
    } else {
        match QemuGuest::find(args.artifacts.as_deref(), QEMU_ROOTFS) {
            Ok(guest) => {
                rep.about("QEMU", guest.version.clone()).about(
                    "pauses",
                    "pause window = longest stretch in which the guest's vCPU thread (the QEMU\n\
                     thread busy with a loop in the guest) is not runnable, sampled from\n\
                     /proc/PID/task/TID/stat every ~0.2 ms during the snapshot call",
                );
                run_part(&mut rep, &tmp, "ae-snaprest-q-", "qemu", c.keep, |h| {
                    let config = daemon::Config {
                        max_memory_mib: Some(GUEST_MIB * (u64::from(p.fork_count) + 8)),
                        ..daemon::qemu_config(&guest, GUEST_MIB, 2)
                    };
                    // The guests' RAM files go in the tmpfs tier; the daemon wants it there.
                    std::fs::create_dir_all(daemon::in_run(&config, h.root()).guest_memory_dir())?;
                    h.write_config(&config)?;
                    run_qemu(h, &agentenv, &p)
                });
            }
            Err(why) => {
                progress(format!("qemu: skipped: {why}"));
                rep.about("QEMU", format!("skipped: {why}"));
            }
        }
    }
    if args.skip_fc {
        rep.about("fc-double", "not run (--skip-fc)");
    } else {
        rep.about("fc-double", fc_double.display().to_string());
        run_part(
            &mut rep,
            &tmp,
            "ae-snaprest-fc-",
            "fc-double",
            c.keep,
            |h| run_fc(h, &agentenv, &fc_double, &p),
        );
    }
    rep.finish(c.json)
}

/// What a part of the run found: its tables, and the phases that failed.
struct Part {
    tables: Vec<Table>,
    fails: Vec<String>,
}

/// One part of the run with a daemon of its own in a fresh temporary
/// directory; its tables, cleanup and failures go to the report.
fn run_part(
    rep: &mut Report,
    tmp: &Path,
    prefix: &str,
    part: &str,
    keep: bool,
    f: impl FnOnce(&mut Harness) -> Result<Part>,
) {
    let mut h = match Harness::new(Some(tmp), prefix, &["work"]) {
        Ok(h) => h,
        Err(e) => {
            rep.fail(format!("{part}: setting up: {e:#}"));
            return;
        }
    };
    let result = f(&mut h);
    let (result, cleanup) = h.finish(result, keep);
    rep.cleanup(part, cleanup.cleaned());
    match result {
        Ok(part) => {
            for t in part.tables {
                rep.table(t);
            }
            for f in part.fails {
                rep.fail(f);
            }
        }
        Err(e) => {
            rep.fail(format!("{part}: {e:#}"));
        }
    }
}

// ---------------------------------------------------------------- QEMU

fn exec_req(cmd: &str) -> ExecRequest {
    serde_json::from_value(json!({"cmd": ["sh", "-c", cmd]})).expect("an exec body")
}

/// Runs `cmd` in the guest; its stdout, or an error with its output.
fn sh(api: &ApiClient, vm_id: &str, cmd: &str) -> Result<String> {
    let r = api
        .exec(vm_id, &exec_req(cmd))
        .with_context(|| format!("{vm_id}: exec {cmd:?}"))?;
    ensure!(r.exit_code == Some(0), "{vm_id}: `{cmd}` failed: {r:?}");
    Ok(r.stdout)
}

/// Execs `true` until one is answered: the agent of a VM just restored or
/// reset may not be back yet (503), which is retried every 2 ms.
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

fn boot_body(vm_id: &str, timeout_s: u64) -> Value {
    json!({"vm_id": vm_id, "disk": {"kind": "overlay", "rootfs_id": QEMU_ROOTFS},
           "wait_ready": true, "wait_ready_timeout_s": timeout_s})
}

fn full_snapshot(api: &ApiClient, vm_id: &str, id: &str) -> Result<SnapshotInfo> {
    let req = CreateSnapshotRequest {
        snapshot_id: Some(id.into()),
        memory: true,
    };
    api.snapshot_vm_with(vm_id, &req)
        .with_context(|| format!("full snapshot {id} of {vm_id}"))
}

fn vm_pid(api: &ApiClient, vm_id: &str) -> Result<u32> {
    api.get_vm(vm_id)?
        .pid
        .with_context(|| format!("{vm_id} has no VMM pid"))
}

/// The QEMU part: each phase that fails is reported and the next one still
/// runs (a signal stops them all).
fn run_qemu(h: &mut Harness, agentenv: &Path, p: &Params) -> Result<Part> {
    let tier = h.root().join("snap/tmpfs");
    let d = h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    let (server, token) = (format!("http://{}", d.addr), d.token.clone());
    let api = &d.api;
    progress("qemu: booting the source VM");
    call(
        api,
        "POST",
        "/v1/vm",
        Some(&boot_body("src", p.boot_timeout_s)),
        201,
    )?;
    first_exec(api, "src")?;
    let mut fails = Vec::new();
    let mut phase = |what: &str, r: Result<()>| -> Result<()> {
        signals::check()?;
        if let Err(e) = r {
            progress(format!("qemu: {what}: FAILED: {e:#}"));
            fails.push(format!("qemu: {what}: {e:#}"));
        }
        Ok(())
    };
    phase(
        "full snapshot of the source",
        full_snapshot(api, "src", "base").map(drop),
    )?;

    // Restore against a cold boot, each up to its first exec.
    let n = Counter::new(0usize);
    let next = |prefix: &str| {
        n.set(n.get() + 1);
        format!("{prefix}{}", n.get())
    };
    let mut boot = Sides::<2>::default();
    let r = (|| -> Result<()> {
        boot = interleaved(
            "qemu: restore vs cold boot → first exec",
            p.warmup,
            p.runs,
            [
                &mut || {
                    let id = next("r");
                    let t0 = Instant::now();
                    api.restore_vm(&id, "base", true)
                        .with_context(|| format!("restore {id}"))?;
                    first_exec(api, &id)?;
                    let t = t0.elapsed();
                    api.delete_vm(&id)?;
                    Ok(t)
                },
                &mut || {
                    let id = next("b");
                    let t0 = Instant::now();
                    call(
                        api,
                        "POST",
                        "/v1/vm",
                        Some(&boot_body(&id, p.boot_timeout_s)),
                        201,
                    )?;
                    first_exec(api, &id)?;
                    let t = t0.elapsed();
                    api.delete_vm(&id)?;
                    Ok(t)
                },
            ],
        )?;
        Ok(())
    })();
    phase("restore vs cold boot", r)?;

    // The reset loop.
    let mut resets = Sides::<1>::default();
    let r = (|| -> Result<()> {
        api.restore_vm("rs", "base", true)?;
        first_exec(api, "rs")?;
        rounds(
            "qemu: reset → first exec",
            p.warmup,
            p.resets,
            |_, keep| {
                let t0 = Instant::now();
                api.reset_vm("rs", "base").context("reset")?;
                first_exec(api, "rs")?;
                if keep {
                    resets.push([t0.elapsed()]);
                }
                Ok(())
            },
        )?;
        api.delete_vm("rs")?;
        Ok(())
    })();
    phase("reset loop", r)?;

    // Fork: all clones exec-ready, then their memory when idle.
    let (mut fork_call, mut fork_ready) = (Sides::<1>::default(), Sides::<1>::default());
    let (mut pss, mut rss) = (Vec::new(), Vec::new());
    let r = rounds("qemu: fork", 0, p.forks, |_, _| {
        let t0 = Instant::now();
        let f = api
            .fork_vm(
                "src",
                &ForkRequest {
                    count: p.fork_count,
                    vm_ids: None,
                },
            )
            .context("fork")?;
        fork_call.push([t0.elapsed()]);
        let ids: Vec<String> = f.vms.iter().map(|v| v.vm_id.clone()).collect();
        let ready: Vec<JoinHandle<Result<()>>> = ids
            .iter()
            .map(|id| {
                let (id, server, token) = (id.clone(), server.clone(), token.clone());
                std::thread::spawn(move || {
                    let mut api = ApiClient::new(&server)?.with_timeout(IO_TIMEOUT);
                    if let Some(t) = token {
                        api = api.with_token(t);
                    }
                    first_exec(&api, &id)
                })
            })
            .collect();
        for r in ready {
            r.join().expect("an exec thread")?;
        }
        fork_ready.push([t0.elapsed()]);
        // Idle for a while, then what each clone's QEMU costs the host.
        std::thread::sleep(Duration::from_secs(3));
        for v in &f.vms {
            let pid = v.pid.context("a clone without a pid")?;
            pss.push(procfs::pss_kib(pid).context("smaps_rollup of a clone")? as f64 / 1024.0);
            rss.push(procfs::status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0);
        }
        for id in &ids {
            api.delete_vm(id)?;
        }
        Ok(())
    });
    phase("fork", r)?;
    let src_pid = vm_pid(api, "src")?;
    let src_pss = procfs::pss_kib(src_pid).unwrap_or(0) as f64 / 1024.0;

    // Pause windows: memory touched, a busy loop keeping the vCPU runnable.
    let (mut busy, mut vcpu) = (None, None);
    let r = (|| -> Result<()> {
        progress(format!(
            "qemu: touching {} MiB of guest memory and starting a busy loop",
            p.touch_mib
        ));
        sh(
            api,
            "src",
            &format!(
            "mkdir -p {GUEST_TOUCH_DIR} && mount -t tmpfs -o size={}m tmpfs {GUEST_TOUCH_DIR} && \
             dd if=/dev/urandom of={GUEST_TOUCH_DIR}/x bs=1M count={} 2>/dev/null",
            p.touch_mib + 16,
            p.touch_mib
        ),
        )?;
        busy = Some(sh(
            api,
            "src",
            "setsid sh -c 'renice -n 19 -p $$ >/dev/null; while :; do :; done' \
         </dev/null >/dev/null 2>&1 & echo $!",
        )?);
        vcpu = Some(Vcpu::find(src_pid)?);
        Ok(())
    })();
    phase("touching guest memory, starting a busy loop", r)?;
    let (mut full_pause, mut full_call) = (Sides::<1>::default(), Sides::<1>::default());
    let r = (|| -> Result<()> {
        let vcpu = vcpu.context("no busy loop in the guest")?;
        rounds("qemu: full snapshot pause window", 0, p.pauses, |i, _| {
            let s = Stalls::start(vcpu);
            let t0 = Instant::now();
            let r = full_snapshot(api, "src", &format!("pw{i}"));
            let took = t0.elapsed();
            let pause = s.stop()?;
            r?;
            full_pause.push([pause]);
            full_call.push([took]);
            api.delete_snapshot(&format!("pw{i}"))?;
            Ok(())
        })?;
        sh(
            api,
            "src",
            &format!("rm -f {GUEST_TOUCH_DIR}/x; umount {GUEST_TOUCH_DIR}"),
        )?;
        Ok(())
    })();
    phase("pause window of full snapshots", r)?;

    let mut disk = Sides::<2>::default();
    let r = (|| -> Result<()> {
        let vcpu = vcpu.context("no busy loop in the guest")?;
        progress(format!(
            "qemu: writing {} MiB to the guest's disk",
            p.disk_mib
        ));
        sh(
            api,
            "src",
            &format!(
                "dd if=/dev/urandom of=/root/ae-disk.bin bs=1M count={} 2>/dev/null && sync",
                p.disk_mib
            ),
        )?;
        let overlay = PathBuf::from(api.get_vm("src")?.disk.writable_path);
        let copy = tier.join("cp-baseline.ext4");
        let k = Counter::new(0usize);
        disk = interleaved(
            "qemu: disk snapshot pause vs cp --sparse=always",
            p.warmup,
            p.disk_runs,
            [
                &mut || {
                    k.set(k.get() + 1);
                    let id = format!("ds{}", k.get());
                    let s = Stalls::start(vcpu);
                    let r = api.snapshot_vm("src", Some(id.clone()));
                    let pause = s.stop()?;
                    r.with_context(|| format!("disk snapshot {id}"))?;
                    api.delete_snapshot(&id)?;
                    Ok(pause)
                },
                &mut || {
                    let t0 = Instant::now();
                    daemon::run(
                        Command::new("cp")
                            .arg("--sparse=always")
                            .arg(&overlay)
                            .arg(&copy),
                    )?;
                    let t = t0.elapsed();
                    std::fs::remove_file(&copy)?;
                    Ok(t)
                },
            ],
        )?;
        sh(api, "src", "rm -f /root/ae-disk.bin").map(drop)
    })();
    phase("pause window of disk snapshots vs cp", r)?;
    if let Some(pid) = busy {
        let r = sh(api, "src", &format!("kill {}", pid.trim()));
        phase("stopping the busy loop", r.map(drop))?;
    }

    // The tables.
    let mut t = Table::new(
        &format!("QEMU/TCG, {GUEST_MIB} MiB guest, agent ready (ms)"),
        ["p50", "p99", "min", "max", "n"],
    );
    let stat_row = |t: &mut Table, name: &str, s: &[Duration], target: Option<Target>| {
        if let Some(x) = Summary::of(s) {
            let cells = vec![
                Cell::ms(x.p50),
                Cell::ms(x.p99),
                Cell::ms(x.min),
                Cell::ms(x.max),
                Cell::Num(x.n as f64, 0),
            ];
            t.row(name, cells, target);
        }
    };
    let p50 = |s: &[Duration]| Summary::of(s).map_or(f64::NAN, |x| x.p50);
    let (restore_p50, boot_p50) = (p50(boot.side(0)), p50(boot.side(1)));
    stat_row(
        &mut t,
        "restore → first exec",
        boot.side(0),
        Some(Target::at_most(
            "restore_p50",
            restore_p50,
            TARGET_RESTORE_P50_MS,
            " ms",
        )),
    );
    stat_row(&mut t, "cold boot → first exec", boot.side(1), None);
    if boot.summaries().is_some() {
        t.row(
            "speedup (cold boot p50 ÷ restore p50)",
            vec![Cell::Ratio(boot_p50 / restore_p50)],
            Some(Target::at_least(
                "restore_speedup",
                boot_p50 / restore_p50,
                TARGET_SPEEDUP,
                "x",
            )),
        );
    }
    stat_row(
        &mut t,
        "reset → first exec",
        resets.side(0),
        Some(Target::at_most(
            "reset_p50",
            p50(resets.side(0)),
            TARGET_RESET_P50_MS,
            " ms",
        )),
    );
    let worst_fork = fork_ready
        .side(0)
        .iter()
        .max()
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    stat_row(
        &mut t,
        &format!("fork {} → all exec-ready", p.fork_count),
        fork_ready.side(0),
        Some(Target::at_most(
            "fork_all_ready",
            worst_fork,
            TARGET_FORK_READY_MS,
            " ms (max)",
        )),
    );
    stat_row(&mut t, "  fork call (201)", fork_call.side(0), None);
    stat_row(
        &mut t,
        &format!("pause window, full snapshot ({} MiB touched)", p.touch_mib),
        full_pause.side(0),
        Some(Target::at_most(
            "full_pause_p50",
            p50(full_pause.side(0)),
            TARGET_PAUSE_P50_MS,
            " ms",
        )),
    );
    stat_row(
        &mut t,
        "  snapshot call (201, seal included)",
        full_call.side(0),
        None,
    );
    t.note("restore and cold boot ran interleaved; each from POST /v1/vm (wait_ready) to the first `exec true` answered");
    t.note(
        "reset: POST /v1/vm/rs/reset, then `exec true` retried on 503 every 2 ms until answered",
    );

    let mut disk_t = Table::latency(
        &format!("disk snapshot of a {} MiB-written overlay: pause window vs `cp --sparse=always` of the same file (ms)", p.disk_mib),
        &["snapshot pause", "cp"],
    );
    disk_t.latency_row(
        "pause vs cp",
        &disk,
        Some(Limit::Ratio(TARGET_DISK_PAUSE_RATIO)),
    );
    disk_t.note(format!(
        "cp copies the VM's overlay into the tmpfs tier's directory ({}), where the snapshot goes;\n\
         snapshot_copy measures the store's copy, hash and persist against cp on their own",
        procfs::fs_type(&tier)
    ));

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let pct = |mib: f64| mib / GUEST_MIB as f64 * 100.0;
    let max_pss = pss.iter().copied().fold(f64::NAN, f64::max);
    let mut mem = Table::new(
        &format!("host memory of idle clones, {GUEST_MIB} MiB guests"),
        ["MiB", "% of guest"],
    );
    mem.row(
        "PSS per clone, mean",
        vec![Cell::Num(mean(&pss), 1), Cell::Num(pct(mean(&pss)), 1)],
        Some(Target::at_most("clone_pss", pct(mean(&pss)), TARGET_CLONE_PSS_PCT, " %")),
    )
    .row("PSS, largest clone", vec![Cell::Num(max_pss, 1), Cell::Num(pct(max_pss), 1)], None)
    .row("VmRSS per clone, mean", vec![Cell::Num(mean(&rss), 1), Cell::Num(pct(mean(&rss)), 1)], None)
    .row("PSS of the booted source VM", vec![Cell::Num(src_pss, 1), Cell::Num(pct(src_pss), 1)], None)
    .note("PSS from /proc/PID/smaps_rollup of each clone's QEMU, 3 s after all answered: pages shared\n\
           copy-on-write from the snapshot's memory file count for their share");
    let mut tables = vec![t, disk_t];
    if !pss.is_empty() {
        tables.push(mem);
    }
    Ok(Part { tables, fails })
}

/// The guest's vCPU thread: the QEMU thread that uses the CPU while the
/// guest runs a busy loop.
#[derive(Debug, Clone, Copy)]
struct Vcpu {
    pid: u32,
    tid: u32,
}

impl Vcpu {
    fn find(pid: u32) -> Result<Vcpu> {
        let before = procfs::thread_cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(500));
        let after = procfs::thread_cpu_ticks(pid);
        let (tid, used) = after
            .iter()
            .map(|(tid, t)| {
                let t0 = before.iter().find(|(b, _)| b == tid).map_or(0, |b| b.1);
                (*tid, t - t0)
            })
            .max_by_key(|(_, used)| *used)
            .context("QEMU has no threads")?;
        ensure!(
            used > 0,
            "no QEMU thread used the CPU: is the guest's busy loop running?"
        );
        Ok(Vcpu { pid, tid })
    }
}

/// Samples the vCPU thread's state until stopped.
struct Stalls {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, bool)>>,
}

impl Stalls {
    fn start(v: Vcpu) -> Stalls {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::with_capacity(1 << 14);
            while !flag.load(Ordering::Relaxed) {
                let runnable = procfs::thread_state(v.pid, v.tid) == Some('R');
                samples.push((Instant::now(), runnable));
                std::thread::sleep(Duration::from_micros(200));
            }
            samples
        });
        Stalls { stop, thread }
    }

    /// The longest stretch in which the thread was not runnable: from its
    /// first sample not `R` to the next sample `R`.
    fn stop(self) -> Result<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        longest_stall(&self.thread.join().expect("the sampler"))
    }
}

/// The longest run of samples not runnable, from its first sample to the
/// next runnable one; an error if the last run never ended.
fn longest_stall(samples: &[(Instant, bool)]) -> Result<Duration> {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for &(t, runnable) in samples {
        match (runnable, since) {
            (false, None) => since = Some(t),
            (true, Some(s)) => {
                longest = longest.max(t - s);
                since = None;
            }
            _ => {}
        }
    }
    ensure!(
        since.is_none(),
        "the vCPU thread was still stopped after the snapshot"
    );
    Ok(longest)
}

// ---------------------------------------------------------------- fc-double

fn run_fc(h: &mut Harness, agentenv: &Path, fc_double: &Path, p: &Params) -> Result<Part> {
    let root = h.root().to_path_buf();
    let config = daemon::fc_double_config(fc_double.to_path_buf(), &root, FC_GUEST_MIB)?;
    File::create(root.join("rootfs/base.ext4"))?.set_len(8 << 20)?;
    h.write_config(&daemon::Config {
        max_memory_mib: Some(FC_GUEST_MIB * 16),
        ..config
    })?;
    let d = h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    let api = &d.api;
    let body = json!({"vm_id": "src", "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}});
    call(api, "POST", "/v1/vm", Some(&body), 201)?;
    let snap = full_snapshot(api, "src", "base")?;
    let dir = PathBuf::from(
        snap.tmpfs_path
            .or(snap.durable_path)
            .context("no snapshot path")?,
    );
    // The record names the snapshot's disk file; the other files are beside it.
    let dir = match dir.is_dir() {
        true => dir,
        false => dir
            .parent()
            .context("a snapshot path without a parent")?
            .to_path_buf(),
    };
    let files = FcSnapshot::find(&dir)?;
    let bare = BareLoad {
        fc_double: fc_double.to_path_buf(),
        work: root.join("work"),
        files,
    };
    let n = Counter::new(0usize);
    let next = || {
        n.set(n.get() + 1);
        n.get()
    };
    let s = interleaved(
        "fc-double: daemon restore vs bare snapshot/load",
        p.warmup.max(3),
        p.fc_iterations,
        [
            &mut || {
                let id = format!("r{}", next());
                let t0 = Instant::now();
                api.restore_vm(&id, "base", false)
                    .with_context(|| format!("restore {id}"))?;
                let t = t0.elapsed();
                api.delete_vm(&id)?;
                Ok(t)
            },
            &mut || bare.load(next()),
        ],
    )?;
    let mut t = Table::latency(
        &format!("restore of a {FC_GUEST_MIB} MiB fc-double VM (ms)"),
        &["daemon", "bare"],
    );
    t.latency_row("fc-double restore → running", &s, Some(Limit::OverheadMs(TARGET_FC_OVERHEAD_MS)))
        .note("daemon: POST /v1/vm {\"restore\"} until the 201 (disk copy, records, spawn, load, resume)\n\
               bare: spawn fc-double, wait for its socket, PUT /snapshot/load (resume_vm) on the\n\
               snapshot's own state and memory files until the 204");
    Ok(Part {
        tables: vec![t],
        fails: Vec::new(),
    })
}

/// A full snapshot's files as the store keeps them, and the paths inside
/// the session directory (relative) that its state names.
struct FcSnapshot {
    state: PathBuf,
    memory: PathBuf,
    disk: PathBuf,
    /// Drive paths relative to the VMM's working directory.
    relative_drives: Vec<PathBuf>,
}

impl FcSnapshot {
    /// The state file is the one fc-double wrote (its first line is its
    /// magic); the memory file is the other one beside the disk and meta.
    fn find(dir: &Path) -> Result<FcSnapshot> {
        let (mut state, mut memory) = (None, None);
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == DISK_FILE || name == META_FILE || name.starts_with('.') || !path.is_file() {
                continue;
            }
            let mut head = [0u8; 18];
            let n = std::io::Read::read(&mut File::open(&path)?, &mut head)?;
            match &head[..n] == b"fc-double snapshot" {
                true => state = Some(path),
                false => memory = Some(path),
            }
        }
        let state =
            state.with_context(|| format!("no fc-double state file in {}", dir.display()))?;
        let memory = memory.with_context(|| format!("no memory file in {}", dir.display()))?;
        let text = std::fs::read_to_string(&state)?;
        let saved: Value = serde_json::from_str(text.split_once('\n').map_or("", |x| x.1))
            .context("the state file's JSON")?;
        let relative_drives = saved["drives"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["path_on_host"].as_str().map(PathBuf::from))
            .filter(|p| p.is_relative())
            .collect();
        Ok(FcSnapshot {
            state,
            memory,
            disk: dir.join(DISK_FILE),
            relative_drives,
        })
    }
}

/// The baseline: a fresh fc-double loading the snapshot files itself.
struct BareLoad {
    fc_double: PathBuf,
    work: PathBuf,
    files: FcSnapshot,
}

impl BareLoad {
    /// Times spawn → `PUT /snapshot/load` answered. The VMM's working
    /// directory gets (untimed) a link to the snapshot's disk at each
    /// relative drive path its state names, as a session directory would.
    fn load(&self, n: usize) -> Result<Duration> {
        let dir = self.work.join(format!("b{n}"));
        std::fs::create_dir_all(&dir)?;
        for rel in &self.files.relative_drives {
            let link = dir.join(rel);
            std::fs::create_dir_all(link.parent().unwrap_or(&dir))?;
            std::fs::hard_link(&self.files.disk, &link)?;
        }
        let sock = dir.join("api.sock");
        let log = dir.join("fc.log");
        let load = SnapshotLoadParams {
            snapshot_path: self.files.state.clone(),
            mem_backend: Some(MemBackend {
                backend_path: self.files.memory.clone(),
                backend_type: MemBackendType::File,
            }),
            resume_vm: true,
            ..Default::default()
        };
        let body = serde_json::to_value(&load)?;
        let t0 = Instant::now();
        let out = File::create(&log)?;
        let mut cmd = Command::new(&self.fc_double);
        cmd.arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(format!("b{n}"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stderr(out.try_clone()?)
            .stdout(out);
        let mut child = Some(signals::spawn_group(&mut cmd, libc::SIGKILL)?);
        let result = (|| {
            let c = child.as_mut().expect("spawned");
            wait_for_socket(c, &sock, &log, "fc-double", Duration::from_micros(100))?;
            let mut api = Client::new(Endpoint::Unix(sock.clone()), IO_TIMEOUT);
            let deadline = t0 + Duration::from_secs(10);
            while let Err(e) = api.connect() {
                ensure!(
                    Instant::now() < deadline,
                    "cannot connect to fc-double: {e}"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
            let r = api.request_json("PUT", "/snapshot/load", &body)?;
            ensure!(
                r.status == 204,
                "PUT /snapshot/load: HTTP {}: {}",
                r.status,
                r.text()
            );
            Ok(t0.elapsed())
        })();
        kill(child.take());
        std::fs::remove_dir_all(&dir)?;
        result
    }
}

fn kill(child: Option<Child>) {
    if let Some(c) = child {
        signals::kill_group(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_stall_runs_from_its_first_sleeping_sample_to_the_next_runnable_one() {
        let t0 = Instant::now();
        let at = |ms: u64, r: bool| (t0 + Duration::from_millis(ms), r);
        let s = [
            at(0, true),
            at(1, false),
            at(3, true),
            at(4, false),
            at(5, false),
            at(9, true),
            at(10, true),
        ];
        assert_eq!(longest_stall(&s).unwrap(), Duration::from_millis(5));
        assert_eq!(longest_stall(&s[..1]).unwrap(), Duration::ZERO);
        assert!(longest_stall(&s[..5]).is_err());
    }
}
