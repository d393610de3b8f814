//! `net_setup`: what one VM's network costs with 0, 100 and 1,000 VMs already
//! configured (`LinuxNetwork::setup` + `teardown`), and the TAP work done over
//! netlink against `ip(8)`, interleaved, in network namespaces of its own
//! (deleted at the end, also on error or Ctrl-C). Needs root.
//! See `bench/README.md`.

use std::future::Future;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon;
use agentenv_bench::report::{or_exit, Cell, Cleaned, Report, Table, Target};
use agentenv_bench::runner::{self, rotated, rounds, Sides};
use agentenv_bench::signals;
use agentenv_bench::stats::Summary;
use agentenv_core::config::NetworkConfig;
use agentenv_core::net::{HostNetwork, NetError, NetLease, NetPlan};
use agentenv_host::net::rtnl::Rtnl;
use agentenv_host::net::{tap, LinuxNetwork, NetnsThread};
use agentenv_testkit::netns::{self, NetnsPair};
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;

/// Target: setup+teardown p50 with 1,000 VMs at most this times that with 0.
const TARGET_GROWTH: f64 = 1.2;
/// VMs already configured while measuring.
const LEVELS: [u32; 3] = [0, 100, 1000];
/// /30 subnets: 16,383 fit in the /16.
const NETMASK: &str = "255.255.255.252";
/// The veth in the host namespace (NAT leaves through it).
const HOST_VETH: &str = "veth0";
/// TAP name used by the TAP-only comparison (outside the plan's prefix).
const BENCH_TAP: &str = "agbench0";

/// Per-VM network setup+teardown at 0, 100 and 1,000 VMs; netlink against `ip`.
#[derive(Debug, Parser)]
#[command(name = "net_setup", version, about, long_about = None)]
struct Args {
    /// Measured samples per row [default: 200; --quick: 30].
    #[arg(long)]
    samples: Option<usize>,
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let (samples, warmup) = (c.pick(200, 30).max(1), args.warmup.get(c, 5, 2));
    let samples = args.samples.unwrap_or(samples).max(1);
    if let Some(why) = netns::unavailable() {
        or_exit::<()>(Err(anyhow::anyhow!("{why}")), 2, "");
    }
    let namespaces = or_exit(
        NetnsPair::new("bench").map_err(anyhow::Error::msg),
        1,
        "setting up: ",
    );
    let mut rep = Report::new(
        "net_setup: one more VM's network with N VMs configured",
        json!({"samples": samples, "warmup": warmup, "netmask": NETMASK}),
    );
    rep.about(
        "run",
        format!(
            "{samples} samples per cell (+{warmup} warm-up), /30 subnets, namespace {}",
            namespaces.host
        ),
    );
    let result = run(samples, warmup, &namespaces, &mut rep);
    let cleaned = remove(namespaces, c.keep);
    rep.settle(result, "namespaces", cleaned);
    rep.finish(c.json)
}

// ------------------------------------------------------------ namespaces --

/// Deletes the namespaces (unless `keep`: then they are left for a look),
/// and checks that they are gone.
fn remove(ns: NetnsPair, keep: bool) -> Cleaned {
    let names = [ns.host.clone(), ns.outside.clone()];
    if keep {
        std::mem::forget(ns);
    } else {
        drop(ns);
    }
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let left: Vec<&str> = names
        .iter()
        .filter(|n| listed.contains(n.as_str()))
        .map(String::as_str)
        .collect();
    let summary = match (keep, left.is_empty()) {
        (true, _) => format!("namespaces kept: {}", left.join(", ")),
        (false, true) => format!("namespaces {} deleted", names.join(", ")),
        (false, false) => format!("namespaces NOT deleted: {}", left.join(", ")),
    };
    Cleaned {
        clean: keep || left.is_empty(),
        summary,
        details: json!({"left": left}),
    }
}

/// Runs `ip` with `args`; its stderr is in the error.
fn ip(args: &[&str]) -> Result<()> {
    daemon::run(Command::new("ip").args(args))
}

// ------------------------------------------------------------- measuring --

fn run(samples: usize, warmup: usize, ns: &NetnsPair, rep: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in_rt = rt.enter();
    let cfg = NetworkConfig {
        enable: true,
        netmask: NETMASK.into(),
        host_interface: Some(HOST_VETH.into()),
        ..NetworkConfig::default()
    };
    let plan = NetPlan::new(&cfg);
    let net = LinuxNetwork::new(&cfg, Some(ns.host_path())).map_err(anyhow::Error::msg)?;
    rt.block_on(net.init(&plan, &[]))
        .map_err(anyhow::Error::msg)?;
    // The TAP-only comparison runs on its own thread in the host namespace.
    let worker = NetnsThread::spawn(Some(&ns.host_path())).map_err(anyhow::Error::msg)?;
    let rtnl = Arc::new(Mutex::new(
        worker
            .run_blocking(Rtnl::open)
            .map_err(anyhow::Error::msg)?
            .context("open rtnetlink in the host namespace")?,
    ));

    let mut vm_table = Table::new(
        "LinuxNetwork (ms): TAP over netlink + nft set elements",
        [
            "setup p50",
            "setup p99",
            "teardown p50",
            "teardown p99",
            "both p50",
            "both p99",
            "vs 0 VMs",
        ],
    );
    let mut tap_table = Table::latency(
        "TAP alone (ms): create = persistent TAP + address + up",
        &["ip(8)", "netlink"],
    );
    let mut fill = Vec::new();
    let mut configured = 0u32;
    let mut base_p50 = None;
    for vms in LEVELS {
        let started = Instant::now();
        while configured < vms {
            signals::check()?;
            configured += 1;
            block(&rt, net.setup(&lease(&plan, configured)?))?;
        }
        if vms > 0 {
            fill.push(format!(
                "to {vms} in {:.2} s",
                started.elapsed().as_secs_f64()
            ));
        }
        let probe = lease(&plan, vms + 1)?;
        let side = lease(&plan, vms + 2)?;
        let (mut setup, mut teardown, mut both) = (vec![], vec![], vec![]);
        let [mut make, mut del, mut total] = [(); 3].map(|_| Sides::<2>::default());
        rounds(
            &format!("{vms} VMs configured"),
            warmup,
            samples,
            |i, timed| {
                let t0 = Instant::now();
                block(&rt, net.setup(&probe))?;
                let t1 = Instant::now();
                block(&rt, net.teardown(&probe))?;
                let t2 = Instant::now();
                let mut split = [(Duration::ZERO, Duration::ZERO); 2];
                let [s_ip, s_nl] = &mut split;
                let t = rotated(
                    i,
                    [&mut || keep(s_ip, tap_via_ip(&worker, &side)?), &mut || {
                        keep(s_nl, tap_via_netlink(&worker, &rtnl, &side)?)
                    }],
                )?;
                if timed {
                    setup.push(t1 - t0);
                    teardown.push(t2 - t1);
                    both.push(t2 - t0);
                    make.push(split.map(|s| s.0));
                    del.push(split.map(|s| s.1));
                    total.push(t);
                }
                Ok(())
            },
        )?;
        let [s, t, b] = [&setup, &teardown, &both].map(|v| Summary::of(v).expect("samples"));
        let base = *base_p50.get_or_insert(b.p50);
        let growth = b.p50 / base;
        let target = (vms == LEVELS[2])
            .then(|| Target::at_most("growth 0 → 1,000 VMs", growth, TARGET_GROWTH, "x"));
        let mut cells: Vec<Cell> = [s, t, b]
            .iter()
            .flat_map(|x| [Cell::ms(x.p50), Cell::ms(x.p99)])
            .collect();
        cells.push(Cell::Ratio(growth));
        vm_table.row(&format!("{vms} VMs"), cells, target);
        tap_table
            .latency_row(&format!("create, {vms} VMs"), &make, None)
            .latency_row(&format!("delete, {vms} VMs"), &del, None)
            .latency_row(&format!("total, {vms} VMs"), &total, None);
    }
    vm_table.note(format!("filling (setup only): {}", fill.join(", ")));
    tap_table.note("ratio: ip(8) ÷ netlink; both from a thread inside the host namespace");
    rep.table(vm_table).table(tap_table);
    Ok(())
}

/// Runs a step of the network code to completion.
fn block(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<(), NetError>>,
) -> Result<()> {
    rt.block_on(f).map_err(anyhow::Error::msg)
}

/// Keeps a round's (create, delete) split and returns its total.
fn keep(slot: &mut Split, s: Split) -> Result<Duration> {
    *slot = s;
    Ok(s.0 + s.1)
}

fn lease(plan: &NetPlan, n: u32) -> Result<NetLease> {
    plan.lease(n)
        .with_context(|| format!("no lease {n} in the plan"))
}

/// (create + address + up, delete) times of one round of TAP work.
type Split = (Duration, Duration);

/// Creates, addresses, raises and deletes the bench TAP over netlink.
fn tap_via_netlink(worker: &NetnsThread, rtnl: &Arc<Mutex<Rtnl>>, l: &NetLease) -> Result<Split> {
    let (ip, len) = (l.host_ip, l.prefix_len);
    let rtnl = rtnl.clone();
    worker
        .run_blocking(move || -> Result<Split> {
            let mut rtnl = rtnl.lock().unwrap_or_else(|p| p.into_inner());
            let t0 = Instant::now();
            tap::create_persistent(BENCH_TAP).context("create tap")?;
            let index = rtnl.link_index(BENCH_TAP)?.context("the tap vanished")?;
            rtnl.add_ipv4(index, ip, len)?;
            rtnl.set_up(index)?;
            let t1 = Instant::now();
            ensure!(rtnl.delete_link(BENCH_TAP)?, "the tap was already gone");
            Ok((t1 - t0, t1.elapsed()))
        })
        .map_err(anyhow::Error::msg)?
}

/// The same work with `ip` commands, started from inside the namespace.
fn tap_via_ip(worker: &NetnsThread, l: &NetLease) -> Result<Split> {
    let addr = format!("{}/{}", l.host_ip, l.prefix_len);
    worker
        .run_blocking(move || -> Result<Split> {
            let t0 = Instant::now();
            ip(&["tuntap", "add", "dev", BENCH_TAP, "mode", "tap", "vnet_hdr"])?;
            ip(&["addr", "add", &addr, "dev", BENCH_TAP])?;
            ip(&["link", "set", BENCH_TAP, "up"])?;
            let t1 = Instant::now();
            ip(&["link", "del", BENCH_TAP])?;
            Ok((t1 - t0, t1.elapsed()))
        })
        .map_err(anyhow::Error::msg)?
}
