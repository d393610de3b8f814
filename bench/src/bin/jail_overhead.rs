//! `jail_overhead`: what the VMM jail costs. Two daemons in the same run,
//! one with `[jail] enable = true`, one with it off, both starting QEMU (TCG)
//! guests from the artifacts: create → running (the API answers once QEMU
//! runs and its QMP answered; no wait for the guest), and the round trip of
//! an exec of `true` in a booted guest, interleaved sample by sample.
//! Needs root (the jail does). See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon::{self, call, Harness, QemuGuest};
use agentenv_bench::report::{or_exit, skip, Limit, Report, Table};
use agentenv_bench::runner::{self, interleaved, progress};
use agentenv_client::ApiClient;
use agentenv_core::config::JailConfig;
use anyhow::{anyhow, Result};
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
    /// Timed creates per side [default: 30; --quick: 10].
    #[arg(long)]
    creates: Option<usize>,
    /// Timed execs of `true` per side [default: 200; --quick: 50].
    #[arg(long)]
    execs: Option<usize>,
    /// The guest artifacts [default: <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// A guest whose agent has not answered after S s fails the run.
    #[arg(long, default_value_t = 180, value_name = "S")]
    boot_timeout_s: u64,
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
}

/// One daemon of the run.
struct Side {
    h: Harness,
    name: &'static str,
}

impl Side {
    fn start(c: &Common, agentenv: &Path, guest: &QemuGuest, jail: bool) -> Result<Side> {
        let name = if jail { "jail" } else { "no jail" };
        let prefix = if jail { "ae-jail-on-" } else { "ae-jail-off-" };
        let mut h = Harness::new(c.tmp_dir.as_deref(), prefix, &[])?;
        let mut cfg = daemon::qemu_config(guest, MEMORY_MIB_PER_SLOT, 2);
        cfg.jail = JailConfig {
            enable: Some(jail),
            ..JailConfig::default()
        };
        h.write_config(&cfg)?;
        h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
        Ok(Side { h, name })
    }

    fn api(&self) -> &ApiClient {
        &self.h.daemon().expect("the daemon runs").api
    }

    /// POST /v1/vm until it answers `running` (timed), then DELETE (untimed).
    fn create(&self, round: usize) -> Result<Duration> {
        let id = format!("c{round}");
        let body = json!({"vm_id": id, "disk": {"kind": "overlay", "rootfs_id": ROOTFS}});
        let (took, r) = call(self.api(), "POST", "/v1/vm", Some(&body), 201)?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        anyhow::ensure!(v["state"] == "running", "{}: {v}", self.name);
        call(self.api(), "DELETE", &format!("/v1/vm/{id}"), None, 204)?;
        Ok(took)
    }

    fn exec_true(&self, vm: &str) -> Result<Duration> {
        let path = format!("/v1/vm/{vm}/exec");
        Ok(call(
            self.api(),
            "POST",
            &path,
            Some(&json!({"cmd": ["true"]})),
            200,
        )?
        .0)
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    if agentenv_host::jail::euid() != 0 {
        or_exit::<()>(
            Err(anyhow!("needs root (the jail mounts and changes uid)")),
            2,
            "",
        );
    }
    let guest =
        QemuGuest::find(args.artifacts.as_deref(), ROOTFS).unwrap_or_else(|why| skip(&why, c.json));
    let [agentenv] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv"]);
    let creates = args.creates.unwrap_or(c.pick(30, 10)).max(1);
    let execs = args.execs.unwrap_or(c.pick(200, 50)).max(1);
    let warmup = args.warmup.get(c, 3, 1);
    let mut rep = Report::new(
        "agentenv VMM jail: jail on vs off, same run",
        json!({"creates": creates, "execs": execs, "warmup": warmup}),
    );
    rep.about("vmm", guest.version.clone()).about(
        "sides",
        "jail = [jail] enable = true (namespaces, pivot_root, uid, seccomp sandbox)\n\
         no jail = [jail] enable = false: the baseline",
    );
    let on = or_exit(Side::start(c, &agentenv, &guest, true), 1, "jail daemon: ");
    let off = or_exit(
        Side::start(c, &agentenv, &guest, false),
        1,
        "baseline daemon: ",
    );
    let mut sides = [on, off];
    let result = run(&sides, creates, execs, warmup, args.boot_timeout_s);
    for s in &mut sides {
        rep.cleanup(s.name, s.h.teardown(c.keep).cleaned());
    }
    match result {
        Ok(t) => rep.table(t),
        Err(e) => rep.fail(format!("{e:#}")),
    };
    rep.finish(c.json)
}

fn run(
    sides: &[Side; 2],
    creates: usize,
    execs: usize,
    warmup: usize,
    boot_timeout_s: u64,
) -> Result<Table> {
    let [on, off] = sides;
    let created = interleaved(
        "create → running",
        warmup,
        creates,
        [&mut || on.create(0), &mut || off.create(0)],
    )?;
    progress("booting one guest per daemon (create with wait_ready)");
    for s in sides {
        let body = json!({"vm_id": "x", "disk": {"kind": "overlay", "rootfs_id": ROOTFS},
                          "wait_ready": true, "wait_ready_timeout_s": boot_timeout_s});
        call(s.api(), "POST", "/v1/vm", Some(&body), 201)?;
    }
    let exec = interleaved(
        "exec `true`",
        warmup * 5,
        execs,
        [&mut || on.exec_true("x"), &mut || off.exec_true("x")],
    )?;
    let mut t = Table::latency("jail on vs off (QEMU, TCG)", &["jail", "no jail"]);
    t.latency_row(
        "create → running",
        &created,
        Some(Limit::OverheadMs(TARGET_CREATE_OVERHEAD_P50_MS)),
    )
    .latency_row("exec round trip", &exec, Some(Limit::Ratio(TARGET_EXEC_RATIO)))
    .note("create → running: POST /v1/vm until QEMU runs and its QMP answered (no wait for the guest); each VM deleted untimed");
    Ok(t)
}
