//! `boot_ready`: create → `AGENTENV_READY` through the agentenv daemon against
//! the very same QEMU command line launched by hand (the daemon's `qemu.json`
//! replayed with the by-hand VM's id and session directory), interleaved in
//! one run. See `bench/README.md`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_api::VmInfo;
use agentenv_bench::args::{count, Common};
use agentenv_bench::daemon::{self, call, create_vm, tail_lines, Harness, QemuGuest};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table};
use agentenv_bench::runner::{self, interleaved, progress};
use agentenv_bench::{signals, stats::median, stats::ms};
use agentenv_client::ApiClient;
use agentenv_core::{engine::CONSOLE_LOG, host::DiskImages};
use agentenv_host::{disk::Ext4Templates, LocalHost};
use anyhow::{bail, Context, Result};
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
/// Both sides read what is new in the console log once per this interval:
/// QEMU writes it a few bytes at a time, and looking after each write would
/// cost the guest CPU. It bounds the detection latency on both sides alike.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// How long a single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Boot to AGENTENV_READY: the agentenv daemon against the same QEMU command
/// line by hand, interleaved in one run.
#[derive(Debug, Parser)]
#[command(name = "boot_ready", version, about, long_about = None)]
struct Args {
    /// Timed boots per side (daemon and by hand, interleaved) [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    #[arg(value_parser = count)]
    runs: usize,
    /// The guest artifacts to boot (kernels/vmlinuz, initramfs/initrd.img,
    /// rootfs/minimal.ext4) [default: $AGENTENV_ARTIFACTS, else <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Give up on a boot that has not printed AGENTENV_READY after this many seconds.
    #[arg(long, default_value_t = 120, value_name = "S", value_parser = count)]
    boot_timeout_s: usize,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let guest = QemuGuest::find_or_skip(args.artifacts.as_deref(), ROOTFS_ID, c.json);
    let [agentenv] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv"]);
    let mut rep = Report::new(
        "agentenv boot to AGENTENV_READY: the daemon vs the same QEMU command line by hand",
        json!({"runs": args.runs, "boot_timeout_s": args.boot_timeout_s, "memory_mib": MEMORY_MIB,
               "vcpus": 1, "overlay_gib": OVERLAY_GIB, "rootfs": ROOTFS_ID}),
    );
    let h = Harness::new(c.tmp_dir.as_deref(), "ae-boot-", &["hand"]);
    let mut h = or_exit(h, 1, "setting up: ");
    let disk = format!("overlay ({OVERLAY_GIB} GiB) on {ROOTFS_ID}, 1 vCPU, {MEMORY_MIB} MiB");
    let art = format!("{}/kernels/vmlinuz + initrd.img", guest.artifacts.display());
    let how = format!("vmm = \"qemu\", no networking; temp dir on {}", h.fs());
    rep.about("guest", format!("{art}, {disk}"));
    rep.about("daemon", format!("{} ({how})", agentenv.display()));
    let result = run(&mut h, &agentenv, &args, &guest, &mut rep);
    let (result, cleanup) = h.finish(result, c.keep);
    rep.settle(result, "daemon", cleanup.cleaned());
    rep.finish(c.json)
}

// ---------------------------------------------------------------- the command line

/// `argv` (a VM's command line, the binary first) with every `(from, to)` of
/// `swaps` replaced in turn. Fails on an argument that hands QEMU a file
/// descriptor: that cannot be replayed.
fn replay(argv: &[String], swaps: &[(&str, &str)]) -> Result<Vec<String>> {
    let one = |a: &String| {
        if a == "-add-fd" || a.contains("/proc/self/fd/") {
            bail!("QEMU is handed a descriptor ({a}): it cannot be replayed");
        }
        Ok(swaps.iter().fold(a.clone(), |a, (x, y)| a.replace(x, y)))
    };
    argv.iter().map(one).collect()
}

/// The value after `key` in `argv` (e.g. `mem-path=`), up to the next comma.
fn value<'a>(argv: &'a [String], key: &str) -> Option<&'a str> {
    argv.iter()
        .find_map(|a| a.split_once(key)?.1.split(',').next())
}

// ---------------------------------------------------------------- waiting for READY

/// Waits until the console log `log` holds `READY`, reading what is new every
/// `CHECK_EVERY` (the daemon rotates it only past 4 MiB; a boot prints
/// ~20 KiB). `qemu`: a QEMU whose exit fails the wait at once.
fn wait_ready(log: &Path, deadline: Instant, mut qemu: Option<&mut Child>) -> Result<()> {
    let mut f = File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
    let mut text = Vec::new();
    loop {
        // Only what is new is searched, with the end of what came before
        // (READY may straddle two reads).
        let from = text.len().saturating_sub(READY.len() - 1);
        f.read_to_end(&mut text)?;
        if text[from..].windows(READY.len()).any(|w| w == READY) {
            return Ok(());
        }
        let why = match qemu.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
            Some(status) => format!("QEMU exited ({status})"),
            None if Instant::now() >= deadline => "--boot-timeout-s passed".into(),
            None => {
                signals::check()?;
                std::thread::sleep(CHECK_EVERY);
                continue;
            }
        };
        let (log, tail) = (log.display(), tail_lines(log, 8));
        bail!("no AGENTENV_READY in {log} ({why}); its last lines:\n{tail}");
    }
}

// ---------------------------------------------------------------- the two sides

/// One boot: `ready` is the timed figure, `part` a part of it (daemon: POST
/// /v1/vm → 201; by hand: making the overlay), `end` the untimed teardown
/// (daemon: DELETE /v1/vm/{id}; by hand: kill, reap and remove its files).
#[derive(Debug, Clone, Copy)]
struct Boot {
    ready: Duration,
    part: Duration,
    end: Duration,
}

/// A VM booted through the daemon, and the command line it ran.
struct DaemonVm {
    info: VmInfo,
    /// Its `qemu.json`: the binary, then the arguments.
    argv: Vec<String>,
}

/// POST /v1/vm → AGENTENV_READY in the VM's console log.
fn daemon_boot(api: &ApiClient, id: &str, timeout: Duration) -> Result<(Boot, DaemonVm)> {
    let disk = json!({"kind": "overlay", "rootfs_id": ROOTFS_ID});
    let body = json!({"vm_id": id, "slots": 1, "disk": disk});
    let t0 = Instant::now();
    // The part of the boot reported beside it: POST /v1/vm → 201.
    let (part, info) = create_vm(api, &body)?;
    let log = Path::new(&info.console_log);
    wait_ready(log, t0 + timeout, None).with_context(|| format!("daemon VM {id}"))?;
    let ready = t0.elapsed();
    // Untimed: what the daemon ran, then delete.
    let argv = read_qemu_json(&Path::new(&info.session_dir).join("qemu.json"))?;
    let (end, _) = call(api, "DELETE", &format!("/v1/vm/{id}"), None, 204)?;
    Ok((Boot { ready, part, end }, DaemonVm { info, argv }))
}

/// The command line in a `qemu.json`: its binary, then its arguments.
fn read_qemu_json(path: &Path) -> Result<Vec<String>> {
    let read = || -> Result<Vec<String>> {
        let doc: Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let args = doc["args"].as_array().context("no \"args\"")?;
        let mut argv = vec![doc["binary"].clone()];
        argv.extend_from_slice(args);
        Ok(serde_json::from_value(argv.into())?)
    };
    read().with_context(|| format!("reading {}", path.display()))
}

/// A QEMU started by hand and its files: when dropped, QEMU is killed (its
/// process group) and reaped, and the files are removed.
struct HandVm {
    qemu: Option<Child>,
    files: Vec<PathBuf>,
}

impl Drop for HandVm {
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            signals::kill_group(qemu);
        }
        for p in &self.files {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// The by-hand side: VMs with their sessions in `root/hand`, each with an
/// overlay made by the daemon's own code: from the daemon's template when it
/// made one (`Ext4Templates::create_disk`: a sparse copy plus a new UUID),
/// else with `mkfs.ext4` (`LocalHost`).
struct ByHand {
    root: PathBuf,
    rt: tokio::runtime::Runtime,
    template: Option<Ext4Templates>,
}

impl ByHand {
    fn new(root: &Path) -> Result<ByHand> {
        let t = Ext4Templates::new(root.join("snap/templates"));
        let template = t.path_for(OVERLAY_GIB << 30).is_file().then_some(t);
        let mut rt = tokio::runtime::Builder::new_current_thread();
        let (root, rt) = (root.into(), rt.enable_all().build()?);
        Ok(ByHand { root, rt, template })
    }

    /// Makes the overlay at `path`; says how (for the report).
    fn overlay(&self, path: &Path) -> Result<String> {
        let size = OVERLAY_GIB << 30;
        let Some(t) = &self.template else {
            let host = LocalHost::new();
            self.rt.block_on(host.create_ext4_disk(path, size))?;
            return Ok("truncate + mkfs.ext4 (the daemon left no template)".into());
        };
        let how = self.rt.block_on(t.create_disk(path, size))?.method;
        Ok(how.as_str().to_string() + " of the daemon's template + a new UUID")
    }

    /// Boots VM `id` with the command line of `reference` replayed for it:
    /// makes its overlay, starts QEMU, waits for READY.
    fn boot(&self, reference: &DaemonVm, id: &str, timeout: Duration) -> Result<(Boot, String)> {
        let dir = self.root.join("hand").join(id);
        let s = dir.display().to_string();
        let DaemonVm { info, argv } = reference;
        let argv = replay(argv, &[(&info.session_dir, &s), (&info.vm_id, id)])?;
        // Its own RAM file, QMP socket, overlay and console log: nothing of the daemon's.
        let sessions = self.root.join("sessions").display().to_string();
        if let Some(a) = argv.iter().find(|a| a.contains(&sessions)) {
            bail!("the by-hand command line names a daemon session: {a}");
        }
        let [overlay, sock, mem] =
            ["id=overlay,file=", "unix:", "mem-path="].map(|k| value(&argv, k).map(PathBuf::from));
        let overlay = overlay.context("qemu.json has no overlay drive")?;
        let log = dir.join(CONSOLE_LOG);
        let t0 = Instant::now();
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {s}"))?;
        let files = [Some(dir), sock, mem].into_iter().flatten().collect();
        let mut vm = HandVm { qemu: None, files };
        let how = self.overlay(&overlay)?;
        // The part of the boot reported beside it: making the overlay.
        let part = t0.elapsed();
        // Stdin closed, own process group, as the daemon spawns it; stdout and
        // stderr straight into the console log (the daemon copies them there).
        let out = File::create(&log)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        cmd.stdout(out.try_clone()?).stderr(out);
        // Should this benchmark die, QEMU dies too.
        let child = signals::spawn_group(&mut cmd, libc::SIGKILL)?;
        let qemu = vm.qemu.insert(child);
        let wait = wait_ready(&log, t0 + timeout, Some(qemu));
        wait.with_context(|| format!("QEMU by hand ({id})"))?;
        let ready = t0.elapsed();
        let t1 = Instant::now();
        drop(vm);
        let end = t1.elapsed();
        Ok((Boot { ready, part, end }, how))
    }
}

// ---------------------------------------------------------------- the run

fn run(
    h: &mut Harness,
    agentenv: &Path,
    args: &Args,
    guest: &QemuGuest,
    rep: &mut Report,
) -> Result<()> {
    h.write_config(&daemon::qemu_config(guest, MEMORY_MIB, OVERLAY_GIB))?;
    h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(30))?;
    let api = h.api()?;
    let runs = args.runs;
    let limit = Duration::from_secs(args.boot_timeout_s as u64);
    progress("reference boot through the daemon (untimed: makes its overlay template)");
    let (ref_daemon, reference) = daemon_boot(api, "bd-000", limit)?;
    let (ref_daemon_ms, ref_post_ms) = (ms(ref_daemon.ready), ms(ref_daemon.part));
    progress(format!(
        "  ready after {ref_daemon_ms:.0} ms (POST → 201 {ref_post_ms:.0} ms)"
    ));
    let by_hand = ByHand::new(h.root())?;
    progress("reference boot by hand (untimed: checks the replayed command line)");
    let (ref_hand, how) = by_hand.boot(&reference, "bh-000", limit)?;
    let (ref_hand_ms, ref_overlay_ms) = (ms(ref_hand.ready), ms(ref_hand.part));
    progress(format!(
        "  ready after {ref_hand_ms:.0} ms (overlay {ref_overlay_ms:.1} ms)"
    ));

    let (mut daemon_boots, mut hand_boots) = (Vec::new(), Vec::new());
    let mut mismatches = Vec::new();
    let mut daemon_side = || {
        let id = format!("bd-{:03}", daemon_boots.len() + 1);
        let (boot, vm) = daemon_boot(api, &id, limit)?;
        // The reference's command line with only the VM id changed?
        let expected = replay(&reference.argv, &[(&reference.info.vm_id, &id)]);
        if !expected.is_ok_and(|argv| argv == vm.argv) {
            mismatches.push(id);
        }
        daemon_boots.push(boot);
        Ok(boot.ready)
    };
    let mut hand_side = || {
        let id = format!("bh-{:03}", hand_boots.len() + 1);
        let (boot, _) = by_hand.boot(&reference, &id, limit)?;
        hand_boots.push(boot);
        Ok(boot.ready)
    };
    let ready = interleaved("boots", 0, runs, [&mut daemon_side, &mut hand_side])?;

    let mut t = Table::latency("boot → AGENTENV_READY (ms)", &["daemon", "by hand"]);
    let rough = if runs < 5 {
        "; fewer than 5 runs: a rough figure"
    } else {
        ""
    };
    let refs = format!(
        "untimed reference boots: daemon {ref_daemon_ms:.0} ms, by hand {ref_hand_ms:.0} ms{rough}"
    );
    t.latency_row("boot → ready", &ready, Some(Limit::Ratio(TARGET_RATIO)))
        .note("daemon: POST /v1/vm → ready in its console_log; by hand: overlay + QEMU → ready")
        .note(refs);
    let cols = ["first", "daemon", "by hand", "ratio", "POST→201", "overlay"];
    let mut per_run = Table::new("runs (ms)", cols);
    for (i, (daemon, hand)) in daemon_boots.iter().zip(&hand_boots).enumerate() {
        let [daemon_ms, hand_ms] = [daemon.ready, hand.ready].map(ms);
        // interleaved() starts round i with side i % 2: the daemon in even rounds.
        let first = if i % 2 == 0 { "daemon" } else { "by hand" };
        let mut cells = vec![Cell::from(first)];
        cells.extend([daemon_ms, hand_ms].map(|x| Cell::Num(x, 0)));
        cells.push(Cell::Ratio(daemon_ms / hand_ms));
        cells.extend([daemon.part, hand.part].map(|part| Cell::Num(ms(part), 1)));
        per_run.row(&(i + 1).to_string(), cells, None);
    }
    let teardown_p50 = |boots: &[Boot]| {
        let ends: Vec<f64> = boots.iter().map(|b| ms(b.end)).collect();
        median(&ends).unwrap_or_default()
    };
    let (delete_ms, kill_ms) = (teardown_p50(&daemon_boots), teardown_p50(&hand_boots));
    let delete = format!("teardown (untimed, p50): DELETE /v1/vm/{{id}} {delete_ms:.1} ms");
    let ends = format!("{delete}; by hand kill + reap + remove its files {kill_ms:.1} ms");
    per_run
        .note("POST→201: the daemon's create (overlay, records, QEMU spawn, QMP handshake)")
        .note("overlay: making the by-hand overlay (part of its boot)")
        .note(ends);

    let argv = &reference.argv;
    let has = |a: &str| argv.iter().any(|x| x == a);
    let accel = if has("kvm") { "kvm" } else { "tcg" };
    let jail = match has("-sandbox") {
        true => "the daemon runs it in its jail (on as root); by hand unjailed, -sandbox kept",
        false => "neither side jails it",
    };
    let check = match mismatches.join(", ") {
        m if m.is_empty() => format!("all {runs} timed daemon VMs ran it with their own id"),
        m => format!("DIFFERENT command lines in daemon VMs {m}"),
    };
    let qemu = format!("{} ({})", argv[0], guest.version);
    let n_args = argv.len() - 1;
    let fresh = "with its own VM id and session directory";
    let spawn = "stdin /dev/null, stdout+stderr to its console log, own process group";
    let hand =
        format!("the reference daemon VM's qemu.json ({n_args} args) {fresh};\n{check};\n{spawn}");
    rep.about("qemu", format!("{qemu}, -accel {accel};\n{jail}"));
    rep.about("by hand", hand);
    let how = format!("made inside the timed part on both sides; by hand: {how}");
    rep.about("overlay", how).table(t).table(per_run);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_is_found_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(CONSOLE_LOG);
        std::fs::write(&log, "boot...\nAGENTENV_RE").unwrap();
        let err = wait_ready(&log, Instant::now(), None).unwrap_err();
        let e = err.to_string();
        assert!(e.contains("(--boot-timeout-s passed)") && e.ends_with(":\nboot...\nAGENTENV_RE"));
        // The rest of the line comes while it waits: found across two reads.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::io::Write::write_all(&mut f, b"ADY vm_id=x boots=1\n").unwrap();
        });
        wait_ready(&log, Instant::now() + Duration::from_secs(10), None).unwrap();
        writer.join().unwrap();
    }

    #[test]
    fn command_lines_are_replayed_for_another_vm() {
        // A command line of VM I with its session in /t/D/I, as the daemon writes it.
        let argv = |id: &str, dir: &str| -> Vec<String> {
            let a = "/q -object mem-path=/t/mem/I.mem -name I -append ttyS0,agentenv.vm_id=I \
                     -drive id=overlay,file=/t/D/I/overlay.ext4,if=none \
                     -qmp unix:/t/s/I.sock,wait=off";
            let a = a.replace('I', id).replace('D', dir);
            a.split(' ').map(str::to_string).collect()
        };
        let reference = argv("bd-000", "d");
        let swaps = [("/t/d/bd-000", "/t/h/bh-001"), ("bd-000", "bh-001")];
        let hand = replay(&reference, &swaps).unwrap();
        assert_eq!(hand, argv("bh-001", "h"));
        assert_eq!(value(&hand, "mem-path="), Some("/t/mem/bh-001.mem"));
        assert_eq!(value(&hand, "unix:"), Some("/t/s/bh-001.sock"));
        let overlay = value(&hand, "id=overlay,file=");
        assert_eq!(overlay, Some("/t/h/bh-001/overlay.ext4"));
        let mut other = reference.clone();
        other[1] = "-add-fd".into();
        assert!(replay(&other, &swaps).is_err());
        other[1] = "file=/proc/self/fd/7".into();
        assert!(replay(&other, &swaps).is_err());
    }
}
