//! `api_overhead`: what the daemon adds over driving the VMM (fc-double) bare,
//! what a token and TLS cost, and the daemon with many VMs. See bench/README.md.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_bench::args::Common;
use agentenv_bench::bare::BareVmm;
use agentenv_bench::daemon::{self, call, Harness};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, rotated, rounds, Side, Sides};
use agentenv_bench::{procfs::Rss, signals, stats::Summary};
use agentenv_client::{ApiClient, TlsOptions};
use agentenv_host::firecracker::models::{ActionType, Drive, FullVmConfiguration};
use agentenv_host::firecracker::models::{InstanceActionInfo, Vm, VmState};
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
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

/// The agentenv daemon against a bare Firecracker API client, same run.
#[derive(Debug, Parser)]
#[command(name = "api_overhead", version, about, long_about = None)]
struct Args {
    /// Timed rounds of create, pause, resume, delete and TLS [--quick: 30].
    #[arg(long, default_value_t = 200, default_value_if("quick", "true", "30"))]
    iterations: usize,
    /// VMs created for the list and memory figures [--quick: 100].
    #[arg(long, default_value_t = 1000, default_value_if("quick", "true", "100"))]
    vms: usize,
    /// Timed `GET /v1/vm` requests, at 0 VMs and at --vms VMs [--quick: 50].
    #[arg(long, default_value_t = 200, default_value_if("quick", "true", "50"))]
    list_requests: usize,
    /// Untimed rounds before each timed series (auth: 10×) [--quick: 2].
    #[arg(long, default_value_t = 5, default_value_if("quick", "true", "2"))]
    warmup: usize,
    #[command(flatten)]
    common: Common,
}

fn main() {
    let p: Args = runner::start();
    let c = &p.common;
    let bins = daemon::binaries(c.bin_dir.as_deref(), ["agentenv", "fc-double"]);
    let mut env = or_exit(Env::new(c, bins, &p), 1, "setting up: ");
    let mut rep = Report::new(
        "agentenv API overhead: the daemon vs a bare Firecracker API client, same run",
        json!({"iterations": p.iterations, "vms": p.vms, "list_requests": p.list_requests,
               "warmup": p.warmup}),
    );
    let [a, f] = env.bins.each_ref().map(|b| b.display());
    let fs = format!("on {} (the daemon fsyncs its VM records there)", env.h.fs());
    rep.about("daemon", format!("{a} with VMM {f}"));
    let bare = "this program spawning fc-double and making the same API calls over its socket";
    rep.about("temp dir", fs).about("baseline", bare);
    let result = run(&mut env, &p, &mut rep);
    let (result, cleanup) = env.h.finish(result, c.keep);
    rep.settle(result, "daemon", cleanup.cleaned());
    rep.finish(c.json)
}

/// The run's directory and daemon, and the binaries: `agentenv`, `fc-double`.
struct Env {
    h: Harness,
    bins: [PathBuf; 2],
}

impl Env {
    fn new(c: &Common, bins: [PathBuf; 2], p: &Args) -> Result<Env> {
        raise_nofile(p.vms as u64)?;
        let mut h = Harness::new(c.tmp_dir.as_deref(), "ae-bench-", &["bare", "pki"])?;
        let root = h.root();
        let mut config = daemon::fc_double_config(bins[1].clone(), root, MEMORY_MIB_PER_SLOT)?;
        config.max_memory_mib = Some((p.vms as u64 + 1024) * MEMORY_MIB_PER_SLOT);
        let disks = ["lat".into(), "bare".into()].into_iter();
        for name in disks.chain((0..p.vms).map(|j| format!("d-{j:05}"))) {
            File::create(root.join(format!("disks/{name}.img")))?.set_len(1 << 20)?;
        }
        h.write_config(&config)?;
        Ok(Env { h, bins })
    }

    fn api(&self) -> Result<&ApiClient> {
        Ok(&self.h.daemon().context("the daemon runs")?.api)
    }

    fn rss(&self) -> Result<Rss> {
        Rss::of(self.h.daemon().map_or(0, |d| d.pid)).context("cannot read the daemon's memory")
    }

    /// A VM started bare on the direct disk `bare.img`, timed to InstanceStart.
    fn bare(&self, name: &str) -> Result<(Duration, BareVmm)> {
        let (root, t0) = (self.h.root(), Instant::now());
        let mut vm = BareVmm::start(&self.bins[1], &root.join("bare"), name, IO_TIMEOUT)?;
        let mut config = FullVmConfiguration::default();
        let boot_args = format!("{BOOT_ARGS} agentenv.vm_id={name} agentenv.root=/dev/vda");
        config.boot_source.boot_args = Some(boot_args);
        config.boot_source.kernel_image_path = root.join("kernels/vmlinux");
        config.machine_config.mem_size_mib = MEMORY_MIB_PER_SLOT as usize;
        let disk = root.join("disks/bare.img");
        config.drives.push(Drive::file("rootfs", disk, true, false));
        for (path, body) in &config.api_calls() {
            vm.call("PUT", path, body)?;
        }
        let action_type = ActionType::InstanceStart;
        let start = json!(InstanceActionInfo { action_type });
        vm.call("PUT", "/actions", &start)?;
        Ok((t0.elapsed(), vm))
    }

    /// `f` with a second daemon's run directory (config changed by `edit`), torn down.
    fn second<T, E, F>(&self, prefix: &str, edit: E, f: F) -> Result<T>
    where
        E: FnOnce(&mut daemon::Config),
        F: FnOnce(&mut Harness) -> Result<T>,
    {
        let mut h = Harness::new(self.h.root().parent(), prefix, &[])?;
        let fc_double = self.bins[1].clone();
        let mut config = daemon::fc_double_config(fc_double, h.root(), MEMORY_MIB_PER_SLOT)?;
        edit(&mut config);
        h.write_config(&config)?;
        let result = f(&mut h);
        let (result, cleanup) = h.finish(result, false);
        ensure!(cleanup.clean(), "{prefix}: {}", cleanup.summary());
        result
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

/// Raises the open-file limit (the daemon inherits it, ~4 fds a VM) to fit `vms`.
fn raise_nofile(vms: u64) -> Result<()> {
    // SAFETY: getrlimit/setrlimit on a local struct.
    let fds = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        let read = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0;
        lim.rlim_cur = lim.rlim_max;
        (read && libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0).then_some(lim.rlim_max)
    };
    let (need, fds) = (vms * 5 + 512, fds.unwrap_or(u64::MAX));
    if fds < need {
        bail!("{vms} VMs need {need} open files, the limit is {fds}: raise it or pass fewer");
    }
    Ok(())
}

/// Back-to-back GET, pause and resume of one VM (at 1 VM and at N VMs).
fn per_vm_ops(api: &ApiClient, id: &str, p: &Args) -> Result<Sides<3>> {
    let mut out = Sides::default();
    let what = format!("GET, pause and resume {id}");
    rounds(&what, p.warmup, p.iterations.min(50), |_, timed| {
        let get = call(api, "GET", &format!("/v1/vm/{id}"), None, 200)?.0;
        let pause = flip(api, id, "pause", "paused")?;
        let resume = flip(api, id, "resume", "running")?;
        if timed {
            out.push([get, pause, resume]);
        }
        Ok(())
    })?;
    Ok(out)
}

/// `GET /v1/vm` timed `--list-requests` times, once the count is checked.
fn list(api: &ApiClient, vms: usize, p: &Args) -> Result<Vec<Duration>> {
    let listed = call(api, "GET", "/v1/vm", None, 200)?.1.json()?;
    let n = listed["vms"].as_array().map_or(0, Vec::len);
    ensure!(n == vms, "GET /v1/vm listed {n} VMs, not {vms}");
    let mut get = || Ok(call(api, "GET", "/v1/vm", None, 200)?.0);
    let what = format!("GET /v1/vm at {vms} VMs");
    let [s] = interleaved(&what, p.warmup, p.list_requests, [&mut get])?.0;
    Ok(s)
}

fn run(env: &mut Env, p: &Args, rep: &mut Report) -> Result<()> {
    let Env { h, bins } = env;
    h.start_daemon(&bins[0], IO_TIMEOUT, HEALTH_TIMEOUT)?;
    let (env, root) = (&*env, env.h.root());
    std::thread::sleep(Duration::from_millis(200));
    let (rss_fresh, api) = (env.rss()?, env.api()?);
    let list0 = list(api, 0, p)?;
    let title = "auth (ms): GET /v1/vm/{id} (404), a token vs [auth] mode = \"none\"";
    let mut t = Table::latency(title, &["token", "none"]);
    let limit = Some(Limit::OverheadMs(TARGET_AUTH_P50_MS));
    let note = "two empty daemons of one build; \"none\" makes every caller admin";
    let s = auth_cost(env, p)?;
    t.latency_row("per request", &s, limit).note(note);
    rep.table(t);
    // create, pause, resume and delete, daemon and bare, each pair in turn.
    let lat_disk = root.join("disks/lat.img");
    let mut s: [Sides<2>; 4] = Default::default();
    rounds("latency", p.warmup, p.iterations, |i, timed| {
        let id = format!("lat-{i:04}");
        let body = json!({"vm_id": id, "disk": {"kind": "direct", "path": lat_disk}});
        let mut vm = None;
        let mut bare = || {
            let (took, v) = env.bare(&format!("b-{i:04}"))?;
            vm = Some(v);
            Ok(took)
        };
        let mut t = vec![rotated(i, [&mut || create(api, &body), &mut bare])?];
        let vm = vm.as_mut().expect("created");
        use VmState::{Paused, Resumed};
        for (op, want, state) in [("pause", "paused", Paused), ("resume", "running", Resumed)] {
            let mut bare = || vm.call("PATCH", "/vm", &json!(Vm { state }));
            t.push(rotated(i, [&mut || flip(api, &id, op, want), &mut bare])?);
        }
        let mut bare = || Ok(vm.kill());
        t.push(rotated(i, [&mut || delete(api, &id), &mut bare])?);
        if timed {
            s.iter_mut().zip(t).for_each(|(s, t)| s.push(t));
        }
        Ok(())
    })?;
    let mut lat = Table::latency("latency (ms)", &["daemon", "bare"]);
    let limit = Some(Limit::OverheadMs(TARGET_OVERHEAD_P50_MS));
    lat.latency_row("create → running (direct disk)", &s[0], limit)
        .latency_row("pause", &s[1], limit)
        .latency_row("resume", &s[2], limit)
        .latency_row("delete (bare: kill, reap)", &s[3], None);
    rep.table(lat);
    scale(env, p, rss_fresh, &list0, rep)?;
    let mut t = Table::latency("new connection + one request (ms)", &["https", "http"]);
    let name = "connect (+ TLS handshake) + GET /v1/health";
    let note = "https: TLS 1.3 (rustls), a self-signed P-256 certificate; http: the daemon above";
    let s = tls_handshake(env, p)?;
    t.latency_row(name, &s, None).note(note);
    rep.table(t);
    Ok(())
}

/// A token's cost: a 404 lookup, to the daemon vs to one with `[auth] mode = "none"`.
fn auth_cost(env: &Env, p: &Args) -> Result<Sides<2>> {
    let none = |c: &mut daemon::Config| c.auth.mode = daemon::AuthMode::None;
    env.second("ae-bench-noauth-", none, |h| {
        let open = h.start_daemon(&env.bins[0], IO_TIMEOUT, HEALTH_TIMEOUT)?;
        let (open, api) = (&open.api, env.api()?);
        let get = |api| Ok(call(api, "GET", "/v1/vm/none", None, 404)?.0);
        let sides: [Side; 2] = [&mut || get(api), &mut || get(open)];
        let (what, n) = ("auth on/off: GET /v1/vm/none", p.list_requests * 4);
        interleaved(what, p.warmup * 10, n, sides)
    })
}

/// The list, per-VM operation and memory figures with `p.vms` VMs.
fn scale(env: &Env, p: &Args, fresh: Rss, list0: &[Duration], rep: &mut Report) -> Result<()> {
    let (api, mut at1) = (env.api()?, Sides::default());
    let what = format!("creating {} VMs (direct disks)", p.vms);
    rounds(&what, 0, p.vms, |j, _| {
        let disk = env.h.root().join(format!("disks/d-{j:05}.img"));
        let vm_id = format!("vm-{j:05}");
        let body = json!({"vm_id": vm_id, "disk": {"kind": "direct", "path": disk}});
        create(api, &body)?;
        if j == 0 {
            at1 = per_vm_ops(api, &vm_id, p)?;
        }
        Ok(())
    })?;
    let list_n = list(api, p.vms, p)?;
    let at_n = per_vm_ops(api, &format!("vm-{:05}", p.vms / 2), p)?;
    let rss = env.rss()?;
    let title = format!("with {} VMs", p.vms);
    let mut t = Table::new(&title, ["value", "baseline", "ratio"]);
    let mut row = |name: &str, v: f64, b: f64, target: Option<Target>| {
        let cells = vec![Cell::Num(v, 3), Cell::Num(b, 3), Cell::Ratio(v / b)];
        t.row(name, cells, target);
    };
    let s = |v: &[Duration]| Summary::of(v).context("no samples");
    let (ln, l0, mib) = (s(&list_n)?, s(list0)?, |kib: u64| kib as f64 / 1024.0);
    let name = "GET /v1/vm p50 (ms; baseline: at 0 VMs)";
    row(name, ln.p50, l0.p50, None);
    let target = Target::at_most("list_p99", ln.p99, TARGET_LIST_P99_MS, " ms");
    let name = "GET /v1/vm p99 (ms; baseline: at 0 VMs)";
    row(name, ln.p99, l0.p99, Some(target));
    let (now, then) = (mib(rss.rss_kib), mib(fresh.rss_kib));
    let target = Target::at_most("rss", now, TARGET_RSS_MIB, " MiB");
    let name = "daemon VmRSS (MiB; baseline: at 0 VMs, fresh)";
    row(name, now, then, Some(target));
    let (now, then) = (mib(rss.hwm_kib), mib(fresh.hwm_kib));
    let name = "daemon VmHWM (MiB; peak over the whole run)";
    row(name, now, then, None);
    for (i, name) in ["GET /v1/vm/{id}", "pause", "resume"].iter().enumerate() {
        let name = format!("{name} p50 (ms; baseline: at 1 VM)");
        row(&name, s(at_n.side(i))?.p50, s(at1.side(i))?.p50, None);
    }
    if p.vms < 1000 {
        t.note("the list and memory targets are stated for 1,000 VMs");
    }
    rep.table(t);
    Ok(())
}

/// New connection + `GET /v1/health`, HTTPS (second daemon) vs plain TCP, interleaved.
fn tls_handshake(env: &Env, p: &Args) -> Result<Sides<2>> {
    let plain = format!("http://{}", env.h.daemon().context("the daemon runs")?.addr);
    let pki = env.h.root().join("pki");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])?;
    std::fs::write(pki.join("server.crt"), cert.cert.pem())?;
    std::fs::write(pki.join("server.key"), cert.key_pair.serialize_pem())?;
    let tls = TlsOptions {
        cacert: Some(pki.join("server.crt")),
        ..TlsOptions::default()
    };
    // A new client, so a new connection (TLS handshake included), each time.
    let one = |server: &str| {
        let api = ApiClient::with_tls(server, &tls)?.with_timeout(IO_TIMEOUT);
        Ok(call(&api, "GET", "/v1/health", None, 200)?.0)
    };
    let config = |c: &mut daemon::Config| {
        c.tls.cert_file = tls.cacert.clone();
        c.tls.key_file = Some(pki.join("server.key"));
    };
    // Started by hand: `Harness::start_daemon` waits for plain HTTP.
    env.second("ae-bench-tls-", config, |h| {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut cmd = Command::new(&env.bins[0]);
        let (config, listen) = (h.root().join("agentenv.toml"), addr.to_string());
        cmd.arg("--config").arg(config).arg("--listen").arg(listen);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(File::create(h.root().join("daemon.log"))?);
        let child = signals::spawn_group(&mut cmd, libc::SIGTERM)?;
        let (https, t0) = (format!("https://{addr}"), Instant::now());
        let result = (|| {
            while let Err(e) = one(&https) {
                signals::check()?;
                if t0.elapsed() > HEALTH_TIMEOUT {
                    bail!("the HTTPS daemon did not answer: {e:#}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let sides: [Side; 2] = [&mut || one(&https), &mut || one(&plain)];
            interleaved("TLS handshake", p.warmup, p.iterations, sides)
        })();
        signals::stop_group(child, &[(libc::SIGTERM, Duration::from_secs(30))]);
        result
    })
}
