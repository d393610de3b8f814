//! `net_setup`: what one VM's network costs, and whether that cost grows with
//! the number of VMs already configured.
//!
//! In network namespaces of its own (a "host" with the TAPs and agentenv's
//! nftables table, and an "outside" behind a veth pair, both deleted at the
//! end, also on error or Ctrl-C) it measures, interleaved sample by sample:
//!
//! - `LinuxNetwork::setup` + `teardown` of one more VM with 0, 100 and 1,000
//!   VMs already set up (/30 subnets, so 1,000+ fit in the /16);
//! - the TAP part of that work done directly over netlink (create the
//!   persistent TAP, add the address, set it up, delete it) against the same
//!   work done by running `ip tuntap add`, `ip addr add`, `ip link set up` and
//!   `ip link del` — both from a thread inside the host namespace, so neither
//!   pays for entering it.
//!
//! Needs root. Targets are printed as PASS/MISS for information; the exit
//! status is 0 whenever the run itself completes and cleans up.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentenv_bench::signals;
use agentenv_bench::stats::{pass, round3, Summary};
use agentenv_core::config::NetworkConfig;
use agentenv_core::net::{HostNetwork, NetLease, NetPlan};
use agentenv_host::net::rtnl::Rtnl;
use agentenv_host::net::{tap, LinuxNetwork, NetnsThread};
use anyhow::{bail, ensure, Context, Result};
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
struct Args {
    /// Measured samples per row (after a few warm-up rounds).
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    signals::install();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("net_setup: needs root (it creates network namespaces and TAPs)");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let namespaces = match Namespaces::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("net_setup: setting up: {e:#}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(&args, &namespaces));
    let names = namespaces.names();
    drop(namespaces);
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let left: Vec<&String> = names
        .iter()
        .filter(|n| listed.contains(n.as_str()))
        .collect();
    match result {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.to_json()).expect("json serialises")
                );
            } else {
                print!("{}", report.to_text());
                println!(
                    "cleanup: namespaces {} {}",
                    names.join(", "),
                    if left.is_empty() {
                        "deleted"
                    } else {
                        "NOT deleted"
                    }
                );
            }
            if !left.is_empty() {
                eprintln!("net_setup: namespaces left behind: {left:?}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("net_setup: {e:#}");
            std::process::exit(1);
        }
    }
}

// ------------------------------------------------------------ namespaces --

/// The benchmark's two namespaces, deleted on drop (the kernel then removes
/// every TAP, address, route and nft table in them).
struct Namespaces {
    host: String,
    outside: String,
    created: Vec<String>,
}

impl Namespaces {
    fn create() -> Result<Namespaces> {
        for (tool, arg) in [("ip", "-V"), ("nft", "--version")] {
            let ok = Command::new(tool)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success());
            ensure!(ok, "`{tool}` is missing");
        }
        let id = format!(
            "{:x}{:04x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() & 0xffff)
                .unwrap_or(0)
        );
        let mut ns = Namespaces {
            host: format!("agentenv-b-{id}-h"),
            outside: format!("agentenv-b-{id}-o"),
            created: Vec::new(),
        };
        for name in [ns.host.clone(), ns.outside.clone()] {
            sh("ip", &["netns", "add", &name])?;
            ns.created.push(name);
        }
        let (h, o) = (ns.host.as_str(), ns.outside.as_str());
        // Built inside the namespaces; the root namespace is never touched.
        sh(
            "ip",
            &[
                "-n", h, "link", "add", HOST_VETH, "type", "veth", "peer", "name", "veth1",
                "netns", o,
            ],
        )?;
        sh(
            "ip",
            &["-n", o, "addr", "add", "198.18.0.1/24", "dev", "veth1"],
        )?;
        sh("ip", &["-n", o, "link", "set", "veth1", "up"])?;
        sh(
            "ip",
            &["-n", h, "addr", "add", "198.18.0.2/24", "dev", HOST_VETH],
        )?;
        sh("ip", &["-n", h, "link", "set", HOST_VETH, "up"])?;
        sh(
            "ip",
            &["-n", h, "route", "add", "default", "via", "198.18.0.1"],
        )?;
        Ok(ns)
    }

    fn host_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.host)
    }

    fn names(&self) -> Vec<String> {
        self.created.clone()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.created {
            if let Err(e) = sh("ip", &["netns", "del", name]) {
                eprintln!("net_setup: cleanup: {e:#}");
            }
        }
    }
}

/// Runs a command to completion; its stderr is in the error.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ------------------------------------------------------------- measuring --

/// One level's samples.
struct Level {
    vms: u32,
    setup: Vec<Duration>,
    teardown: Vec<Duration>,
    cycle: Vec<Duration>,
    /// TAP work over netlink: (create + address + up, delete).
    netlink: Vec<Split>,
    /// The same with `ip` commands.
    ip: Vec<Split>,
    fill: Duration,
}

/// A part of the TAP work.
#[derive(Clone, Copy)]
enum Part {
    Make,
    Delete,
    Both,
}

fn part(v: &[Split], which: Part) -> Vec<Duration> {
    v.iter()
        .map(|(make, del)| match which {
            Part::Make => *make,
            Part::Delete => *del,
            Part::Both => *make + *del,
        })
        .collect()
}

struct Report {
    samples: usize,
    host_ns: String,
    levels: Vec<Level>,
}

async fn run(args: &Args, ns: &Namespaces) -> Result<Report> {
    ensure!(args.samples > 0, "--samples must be at least 1");
    let cfg = NetworkConfig {
        enable: true,
        netmask: NETMASK.into(),
        host_interface: Some(HOST_VETH.into()),
        ..NetworkConfig::default()
    };
    let plan = NetPlan::new(&cfg);
    let net = LinuxNetwork::new(&cfg, Some(ns.host_path())).map_err(anyhow::Error::msg)?;
    net.init(&plan, &[]).await.map_err(anyhow::Error::msg)?;
    // The TAP-only comparison runs on its own thread in the host namespace.
    let worker = NetnsThread::spawn(Some(&ns.host_path())).map_err(anyhow::Error::msg)?;
    let rtnl = Arc::new(Mutex::new(
        worker
            .run_blocking(Rtnl::open)
            .map_err(anyhow::Error::msg)?
            .context("open rtnetlink in the host namespace")?,
    ));

    let mut configured = 0u32;
    let mut levels = Vec::new();
    for vms in LEVELS {
        let started = Instant::now();
        while configured < vms {
            signals::check()?;
            configured += 1;
            net.setup(&lease(&plan, configured)?)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let fill = started.elapsed();
        let probe = lease(&plan, vms + 1)?;
        let side = lease(&plan, vms + 2)?;
        let mut level = Level {
            vms,
            setup: Vec::new(),
            teardown: Vec::new(),
            cycle: Vec::new(),
            netlink: Vec::new(),
            ip: Vec::new(),
            fill,
        };
        let warmup = 5;
        for i in 0..warmup + args.samples {
            signals::check()?;
            let t0 = Instant::now();
            net.setup(&probe).await.map_err(anyhow::Error::msg)?;
            let t1 = Instant::now();
            net.teardown(&probe).await.map_err(anyhow::Error::msg)?;
            let t2 = Instant::now();
            let nl = tap_via_netlink(&worker, &rtnl, &side)?;
            let via_ip = tap_via_ip(&worker, &side)?;
            if i >= warmup {
                level.setup.push(t1 - t0);
                level.teardown.push(t2 - t1);
                level.cycle.push(t2 - t0);
                level.netlink.push(nl);
                level.ip.push(via_ip);
            }
        }
        levels.push(level);
    }
    Ok(Report {
        samples: args.samples,
        host_ns: ns.host.clone(),
        levels,
    })
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
            sh(
                "ip",
                &["tuntap", "add", "dev", BENCH_TAP, "mode", "tap", "vnet_hdr"],
            )?;
            sh("ip", &["addr", "add", &addr, "dev", BENCH_TAP])?;
            sh("ip", &["link", "set", BENCH_TAP, "up"])?;
            let t1 = Instant::now();
            sh("ip", &["link", "del", BENCH_TAP])?;
            Ok((t1 - t0, t1.elapsed()))
        })
        .map_err(anyhow::Error::msg)?
}

// ---------------------------------------------------------------- output --

fn summary(v: &[Duration]) -> Summary {
    Summary::of(v).expect("at least one sample")
}

impl Report {
    fn growth(&self) -> f64 {
        let first = summary(&self.levels[0].cycle).p50;
        let last = summary(&self.levels[self.levels.len() - 1].cycle).p50;
        last / first
    }

    fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let cell = |v: &[Duration]| {
            let m = summary(v);
            format!("{:.3} / {:.3}", m.p50, m.p99)
        };
        let ratio = |a: &[Duration], b: &[Duration]| summary(a).p50 / summary(b).p50;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "net_setup: one more VM's network with N VMs configured \
             ({} samples per cell, /30 subnets, namespace {})",
            self.samples, self.host_ns
        );
        let _ = writeln!(s, "times in ms, p50 / p99\n");
        let _ = writeln!(
            s,
            "LinuxNetwork::setup / teardown (TAP over netlink + nft set elements):"
        );
        let _ = writeln!(
            s,
            "{:>6}  {:>15}  {:>15}  {:>15}  {:>9}",
            "VMs", "setup", "teardown", "setup+teardown", "vs 0 VMs"
        );
        let base = &self.levels[0].cycle;
        for l in &self.levels {
            let _ = writeln!(
                s,
                "{:>6}  {:>15}  {:>15}  {:>15}  {:>8.2}×",
                l.vms,
                cell(&l.setup),
                cell(&l.teardown),
                cell(&l.cycle),
                ratio(&l.cycle, base)
            );
        }
        let g = self.growth();
        let _ = writeln!(
            s,
            "growth 0 → 1,000 VMs (setup+teardown p50): {g:.2}× (target ≤ {TARGET_GROWTH}×) {}\n",
            pass(g <= TARGET_GROWTH)
        );
        let _ = writeln!(
            s,
            "The TAP work alone, netlink (this crate) vs ip(8) commands; \
             create = persistent TAP + address + up:"
        );
        let _ = writeln!(
            s,
            "{:>6}  {:>15}  {:>15}  {:>6}  {:>15}  {:>15}  {:>6}  {:>6}",
            "VMs",
            "create: netlink",
            "create: ip",
            "ratio",
            "delete: netlink",
            "delete: ip",
            "ratio",
            "total"
        );
        for l in &self.levels {
            let (nm, im) = (part(&l.netlink, Part::Make), part(&l.ip, Part::Make));
            let (nd, id) = (part(&l.netlink, Part::Delete), part(&l.ip, Part::Delete));
            let (nb, ib) = (part(&l.netlink, Part::Both), part(&l.ip, Part::Both));
            let _ = writeln!(
                s,
                "{:>6}  {:>15}  {:>15}  {:>5.1}×  {:>15}  {:>15}  {:>5.1}×  {:>5.1}×",
                l.vms,
                cell(&nm),
                cell(&im),
                ratio(&im, &nm),
                cell(&nd),
                cell(&id),
                ratio(&id, &nd),
                ratio(&ib, &nb)
            );
        }
        let fill: Vec<String> = self
            .levels
            .iter()
            .filter(|l| l.vms > 0)
            .map(|l| format!("to {} in {:.2} s", l.vms, l.fill.as_secs_f64()))
            .collect();
        let _ = writeln!(s, "\nfilling (setup only): {}", fill.join(", "));
        s
    }

    fn to_json(&self) -> serde_json::Value {
        let levels: Vec<_> = self
            .levels
            .iter()
            .map(|l| {
                json!({
                    "vms": l.vms,
                    "setup": summary(&l.setup).to_json(),
                    "teardown": summary(&l.teardown).to_json(),
                    "setup_teardown": summary(&l.cycle).to_json(),
                    "tap_netlink_create": summary(&part(&l.netlink, Part::Make)).to_json(),
                    "tap_netlink_delete": summary(&part(&l.netlink, Part::Delete)).to_json(),
                    "tap_ip_create": summary(&part(&l.ip, Part::Make)).to_json(),
                    "tap_ip_delete": summary(&part(&l.ip, Part::Delete)).to_json(),
                    "fill_s": round3(l.fill.as_secs_f64()),
                })
            })
            .collect();
        let g = self.growth();
        json!({
            "samples": self.samples,
            "netmask": NETMASK,
            "levels": levels,
            "growth_0_to_1000_p50": round3(g),
            "target_growth": TARGET_GROWTH,
            "pass": g <= TARGET_GROWTH,
        })
    }
}
