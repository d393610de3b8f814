//! `jail_overhead`: what the VMM jail costs. Two daemons in the same run,
//! one with `[jail] enable = true`, one with it off, both starting QEMU (TCG)
//! guests from the artifacts: create → running (the API answers once QEMU
//! runs and its QMP answered; no wait for the guest), and the round trip of
//! an exec of `true` in a booted guest, interleaved sample by sample.
//! Needs root (the jail does). See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_bench::args::{count, Common};
use agentenv_bench::daemon::{self, Harness, QemuGuest};
use agentenv_bench::report::{Limit, Report, Table};
use agentenv_bench::runner::{self, interleaved, progress};
use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

/// Target: the jail adds at most this much to create → running, p50, in ms.
const TARGET_CREATE_OVERHEAD_P50_MS: f64 = 20.0;
/// Target: an exec round trip in a jailed guest at most this many times the
/// unjailed one's, p50.
const TARGET_EXEC_RATIO: f64 = 1.05;
/// Guest memory per VM.
const MEMORY_MIB_PER_SLOT: u64 = 256;
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The rootfs the guests boot (it carries the agent).
const ROOTFS: &str = "minimal.ext4";

/// Create → running and exec with the jail on against off, same run.
#[derive(Debug, Parser)]
#[command(name = "jail_overhead", version, about, long_about = None)]
struct Args {
    /// Timed creates per side [--quick: 10].
    #[arg(long, default_value_t = 30, default_value_if("quick", "true", "10"))]
    #[arg(value_parser = count)]
    creates: usize,
    /// Timed execs of `true` per side [--quick: 50].
    #[arg(long, default_value_t = 200, default_value_if("quick", "true", "50"))]
    #[arg(value_parser = count)]
    execs: usize,
    /// Untimed rounds before the creates, and 5× that before the execs [--quick: 1].
    #[arg(long, default_value_t = 3, default_value_if("quick", "true", "1"))]
    warmup: usize,
    /// The guest artifacts [default: $AGENTENV_ARTIFACTS, else <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// A guest whose agent has not answered after S s fails the run.
    #[arg(long, default_value_t = 180, value_name = "S")]
    boot_timeout_s: u64,
    #[command(flatten)]
    common: Common,
}

/// One daemon of the run, in a run directory of its own.
struct Side {
    h: Harness,
    jail: bool,
    name: &'static str,
}

impl Side {
    /// The side's run directory; [`Side::start`] starts its daemon.
    fn new(c: &Common, jail: bool) -> Result<Side> {
        let name = if jail { "jail" } else { "no jail" };
        let prefix = if jail { "ae-jail-on-" } else { "ae-jail-off-" };
        let h = Harness::new(c.tmp_dir.as_deref(), prefix, &[])
            .with_context(|| format!("{name}: setting up"))?;
        Ok(Side { h, jail, name })
    }

    /// Writes the side's config (the jail on or off) and starts its daemon.
    fn start(&mut self, agentenv: &Path, guest: &QemuGuest) -> Result<()> {
        let mut cfg = daemon::qemu_config(guest, MEMORY_MIB_PER_SLOT, 2);
        cfg.jail.enable = Some(self.jail);
        self.h.write_config(&cfg)?;
        self.h
            .start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
        Ok(())
    }

    /// POST /v1/vm until it answers `running` (timed), then DELETE (untimed).
    fn create(&self) -> Result<Duration> {
        let api = self.h.api()?;
        let body = json!({"vm_id": "c", "disk": {"kind": "overlay", "rootfs_id": ROOTFS}});
        let created = daemon::create_vm(api, &body);
        let (took, _) = created.with_context(|| format!("{}: creating c", self.name))?;
        let deleted = api.delete_vm("c");
        deleted.with_context(|| format!("{}: DELETE c", self.name))?;
        Ok(took)
    }

    /// Boots the guest `x` that the execs run in: a create that waits for its agent.
    fn boot(&self, timeout_s: u64) -> Result<()> {
        let body = json!({"vm_id": "x", "disk": {"kind": "overlay", "rootfs_id": ROOTFS},
                          "wait_ready": true, "wait_ready_timeout_s": timeout_s});
        let created = daemon::create_vm(self.h.api()?, &body);
        created.with_context(|| format!("{}: booting x", self.name))?;
        Ok(())
    }

    /// An exec of `true` in the guest `x`, checked to exit 0.
    fn exec_true(&self) -> Result<Duration> {
        daemon::exec_true(self.h.api()?, "x").with_context(|| self.name)
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    if agentenv_host::jail::euid() != 0 {
        eprintln!("jail_overhead: needs root (the jail mounts and changes uid)");
        std::process::exit(2);
    }
    let guest = QemuGuest::find_or_skip(args.artifacts.as_deref(), ROOTFS, c.json);
    let [agentenv] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv"]);
    let mut rep = Report::new(
        "agentenv VMM jail: jail on vs off, same run",
        json!({"creates": args.creates, "execs": args.execs, "warmup": args.warmup}),
    );
    rep.about("vmm", guest.version.clone()).about(
        "sides",
        "jail = [jail] enable = true (namespaces, pivot_root, uid, seccomp sandbox)\n\
         no jail = [jail] enable = false: the baseline",
    );
    // A side joins `sides` also when its daemon fails to start, so that its cleanup is
    // reported (and --keep holds); the second is not started when the first fails.
    let mut sides = Vec::new();
    let mut result = (|| {
        for jail in [true, false] {
            let mut side = Side::new(c, jail)?;
            let started = side.start(&agentenv, &guest);
            let name = side.name;
            sides.push(side);
            started.with_context(|| format!("{name}: starting the daemon"))?;
        }
        run(&sides[0], &sides[1], &args)
    })();
    // After a failure, `finish` shows each running daemon's log tail before its teardown.
    for s in &mut sides {
        progress(format!("{}: teardown", s.name));
        let (r, cleanup) = s.h.finish(result, c.keep);
        result = r;
        rep.cleanup(s.name, cleanup.cleaned());
    }
    match result {
        Ok(t) => rep.table(t),
        Err(e) => rep.fail(format!("{e:#}")),
    };
    rep.finish(c.json)
}

fn run(on: &Side, off: &Side, args: &Args) -> Result<Table> {
    let created = interleaved(
        "create → running",
        args.warmup,
        args.creates,
        [&mut || on.create(), &mut || off.create()],
    )?;
    progress("booting one guest per daemon (create with wait_ready)");
    for s in [on, off] {
        s.boot(args.boot_timeout_s)?;
    }
    let exec = interleaved(
        "exec `true`",
        args.warmup * 5,
        args.execs,
        [&mut || on.exec_true(), &mut || off.exec_true()],
    )?;
    let create_limit = Limit::OverheadMs(TARGET_CREATE_OVERHEAD_P50_MS);
    let exec_limit = Limit::Ratio(TARGET_EXEC_RATIO);
    let mut t = Table::latency("jail on vs off (QEMU, TCG)", &["jail", "no jail"]);
    t.latency_row("create → running", &created, Some(create_limit))
        .latency_row("exec round trip", &exec, Some(exec_limit))
        .note(
            "create → running: POST /v1/vm until QEMU runs and its QMP answered (no wait for \
             the guest); each VM deleted untimed",
        );
    Ok(t)
}
