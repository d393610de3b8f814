//! `net_setup`: what one VM's network costs with 0, 100 and 1,000 VMs already
//! configured (`LinuxNetwork::setup` + `teardown`), in network namespaces of
//! its own (deleted at the end, also on error or Ctrl-C). Needs root.
//! See `bench/README.md`.

use std::future::Future;
use std::path::Path;
use std::time::Instant;

use agentenv_bench::args::{count, Common};
use agentenv_bench::report::{or_exit, Cell, Cleaned, Report, Table, Target};
use agentenv_bench::runner::{self, rounds, Sides};
use agentenv_bench::signals;
use agentenv_core::config::NetworkConfig;
use agentenv_core::net::{HostNetwork, NetError, NetLease, NetPlan};
use agentenv_host::net::LinuxNetwork;
use agentenv_testkit::netns::{self, NetnsPair};
use anyhow::{Context, Result};
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

/// Per-VM network setup+teardown at 0, 100 and 1,000 VMs already configured.
#[derive(Debug, Parser)]
#[command(name = "net_setup", version, about, long_about = None)]
struct Args {
    /// Measured samples per row [--quick: 30].
    #[arg(long, default_value_t = 200, default_value_if("quick", "true", "30"))]
    #[arg(value_parser = count)]
    samples: usize,
    /// Untimed rounds before each row's samples [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    warmup: usize,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    if let Some(why) = netns::unavailable() {
        eprintln!("{}: {why}", runner::name());
        std::process::exit(2);
    }
    let namespaces = or_exit(
        NetnsPair::new("bench").map_err(anyhow::Error::msg),
        1,
        "setting up: ",
    );
    let mut rep = Report::new(
        "net_setup: one more VM's network with N VMs configured",
        json!({"samples": args.samples, "warmup": args.warmup, "netmask": NETMASK}),
    );
    let ns = &namespaces.host;
    let (samples, warmup) = (args.samples, args.warmup);
    let run_about = format!("{samples} samples per cell (+{warmup} warm-up), /30 subnets");
    rep.about("run", format!("{run_about}, namespace {ns}"));
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
    // `ip netns` keeps a namespace as a file under /run/netns.
    let left: Vec<&str> = names
        .iter()
        .filter(|n| Path::new("/run/netns").join(n).exists())
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
    block(&rt, net.init(&plan, &[]))?;
    let mut columns: Vec<String> = ["setup", "teardown", "both"]
        .iter()
        .flat_map(|s| [format!("{s} p50"), format!("{s} p99")])
        .collect();
    columns.push("vs 0 VMs".into());
    let title = "LinuxNetwork (ms): TAP over netlink + nft set elements";
    let mut t = Table::new(title, columns);
    // How long filling up to each level took, for the note.
    let mut fill = Vec::new();
    // VMs configured so far, kept from one level to the next.
    let mut configured = 0u32;
    // Setup + teardown p50 with 0 VMs: what the growth is against.
    let mut base_p50 = None;
    for vms in LEVELS {
        let started = Instant::now();
        while configured < vms {
            signals::check()?;
            configured += 1;
            block(&rt, net.setup(&lease(&plan, configured)?))?;
        }
        if vms > 0 {
            let s = started.elapsed().as_secs_f64();
            fill.push(format!("to {vms} in {s:.2} s"));
        }
        // One more VM's lease, set up and torn down each round.
        let probe = lease(&plan, vms + 1)?;
        // Per round: setup, teardown, and both (the sum of the two, from the same clock reads).
        let mut times = Sides::<3>::default();
        let what = format!("{vms} VMs configured");
        rounds(&what, warmup, samples, |_, timed| {
            let t0 = Instant::now();
            block(&rt, net.setup(&probe))?;
            let t1 = Instant::now();
            block(&rt, net.teardown(&probe))?;
            let t2 = Instant::now();
            if timed {
                times.push([t1 - t0, t2 - t1, t2 - t0]);
            }
            Ok(())
        })?;
        let [setup, teardown, both] = times.summaries().context("no samples")?;
        let growth = both.p50 / *base_p50.get_or_insert(both.p50);
        let target = (vms == LEVELS[2])
            .then(|| Target::at_most("growth 0 → 1,000 VMs", growth, TARGET_GROWTH, "x"));
        let mut cells: Vec<Cell> = [setup, teardown, both]
            .iter()
            .flat_map(|x| [Cell::ms(x.p50), Cell::ms(x.p99)])
            .collect();
        cells.push(Cell::Ratio(growth));
        t.row(&format!("{vms} VMs"), cells, target);
    }
    t.note(format!("filling (setup only): {}", fill.join(", ")));
    rep.table(t);
    Ok(())
}

/// Runs a step of the network code to completion.
fn block<T>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T, NetError>>,
) -> Result<T> {
    rt.block_on(f).map_err(anyhow::Error::msg)
}

fn lease(plan: &NetPlan, n: u32) -> Result<NetLease> {
    plan.lease(n)
        .with_context(|| format!("no lease {n} in the plan"))
}
