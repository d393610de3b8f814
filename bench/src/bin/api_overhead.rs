//! `api_overhead`: what the daemon adds over driving the VMM (fc-double) bare,
//! what a token and TLS cost, and the daemon with many VMs. See bench/README.md.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_bench::args::{count, Common};
use agentenv_bench::bare::BareVmm;
use agentenv_bench::daemon::{self, call, create_vm, tail_lines, Harness};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, rotated, rounds, Side, Sides};
use agentenv_bench::{procfs::mib, procfs::Rss, signals, stats::Summary};
use agentenv_client::{ApiClient, TlsOptions};
use agentenv_host::firecracker::models::VmState::{Paused, Resumed};
use agentenv_host::firecracker::models::{ActionType, Drive, FullVmConfiguration};
use agentenv_host::firecracker::models::{InstanceActionInfo, Vm};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::json;

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
    #[arg(value_parser = count)]
    iterations: usize,
    /// VMs created for the list and memory figures [--quick: 100].
    #[arg(long, default_value_t = 1000, default_value_if("quick", "true", "100"))]
    #[arg(value_parser = count)]
    vms: usize,
    /// Timed `GET /v1/vm` requests, at 0 VMs and at --vms VMs [--quick: 50].
    #[arg(long, default_value_t = 200, default_value_if("quick", "true", "50"))]
    #[arg(value_parser = count)]
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
    let [agentenv, fc_double] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv", "fc-double"]);
    let mut env = or_exit(Env::new(&p, agentenv, fc_double), 1, "setting up: ");
    let mut rep = Report::new(
        "agentenv API overhead: the daemon vs a bare Firecracker API client, same run",
        json!({"iterations": p.iterations, "vms": p.vms, "list_requests": p.list_requests,
               "warmup": p.warmup}),
    );
    let (agentenv, fc_double) = (env.agentenv.display(), env.fc_double.display());
    let daemon = format!("{agentenv} with VMM {fc_double}");
    let fs = format!("on {} (the daemon fsyncs its VM records there)", env.h.fs());
    let bare = "this program spawning fc-double and making the same API calls over its socket";
    rep.about("daemon", daemon)
        .about("temp dir", fs)
        .about("baseline", bare);
    let result = run(&mut env, &p, &mut rep);
    let (result, cleanup) = env.h.finish(result, c.keep);
    rep.settle(result, "daemon", cleanup.cleaned());
    rep.finish(c.json)
}

/// The run's directory and first daemon, and the binaries.
struct Env {
    h: Harness,
    agentenv: PathBuf,
    fc_double: PathBuf,
    /// `--keep`, for the second daemons' directories too.
    keep: bool,
}

impl Env {
    fn new(p: &Args, agentenv: PathBuf, fc_double: PathBuf) -> Result<Env> {
        check_limits(p.vms)?;
        let c = &p.common;
        let mut h = Harness::new(c.tmp_dir.as_deref(), "ae-bench-", &["bare", "pki"])?;
        let root = h.root();
        let mut config = daemon::fc_double_config(fc_double.clone(), root, MEMORY_MIB_PER_SLOT)?;
        config.max_memory_mib = Some((p.vms as u64 + 1024) * MEMORY_MIB_PER_SLOT);
        // 1 MiB sparse direct disks: the latency series' daemon side (`lat`),
        // its bare side (`bare`), and one for each VM of the scale figures.
        let disks = ["lat".into(), "bare".into()].into_iter();
        for name in disks.chain((0..p.vms).map(|j| format!("d-{j:05}"))) {
            File::create(root.join(format!("disks/{name}.img")))?.set_len(1 << 20)?;
        }
        h.write_config(&config)?;
        let keep = c.keep;
        Ok(Env {
            h,
            agentenv,
            fc_double,
            keep,
        })
    }

    /// The first daemon's memory figures.
    fn rss(&self) -> Result<Rss> {
        let pid = self.h.daemon().context("the daemon is not running")?.pid;
        Rss::of(pid).context("cannot read the daemon's memory")
    }

    /// A VM started bare on the direct disk `bare.img`, timed to InstanceStart.
    fn bare(&self, name: &str) -> Result<(Duration, BareVmm)> {
        let root = self.h.root();
        let (vm, took) = runner::timed(|| {
            let mut vm = BareVmm::start(&self.fc_double, &root.join("bare"), name, IO_TIMEOUT)?;
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
            Ok(vm)
        })?;
        Ok((took, vm))
    }

    /// Runs the part `part` of the run with a second daemon's directory
    /// (`prefix…`, beside the first one's) and config (fc-double's, changed
    /// by `edit`) written; it starts no daemon: `f` does, and gives the
    /// part's result. The part's cleanup goes to the report; a failure of
    /// `f` or of its cleanup is recorded there (exit status 1), the error
    /// kept whole, and a failed part gives `None`: the run goes on.
    fn second<T>(
        &self,
        rep: &mut Report,
        part: &str,
        prefix: &str,
        edit: impl FnOnce(&mut daemon::Config),
        f: impl FnOnce(&mut Harness) -> Result<T>,
    ) -> Option<T> {
        let h = Harness::new(self.h.root().parent(), prefix, &[]);
        rep.part(part, h, self.keep, |h| {
            let fc_double = self.fc_double.clone();
            let mut config = daemon::fc_double_config(fc_double, h.root(), MEMORY_MIB_PER_SLOT)?;
            edit(&mut config);
            h.write_config(&config)?;
            f(h)
        })
    }
}

/// `POST /v1/vm/{vm_id}/{op}` (pause, resume), timed; the VM must end in `want_state`.
fn flip(api: &ApiClient, vm_id: &str, op: &str, want_state: &str) -> Result<Duration> {
    let (took, r) = call(api, "POST", &format!("/v1/vm/{vm_id}/{op}"), None, 200)?;
    let v = r.json()?;
    ensure!(v["state"] == want_state, "{op}: vm is {}: {v}", v["state"]);
    Ok(took)
}

fn delete_vm(api: &ApiClient, vm_id: &str) -> Result<Duration> {
    Ok(call(api, "DELETE", &format!("/v1/vm/{vm_id}"), None, 204)?.0)
}

/// The soft open-file limit, as raised to the hard one (the daemon inherits it).
fn raise_nofile() -> Result<u64> {
    let read = || {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a local struct.
        match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
            0 => Ok(lim),
            _ => Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)"),
        }
    };
    let mut lim = read()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads a local struct. If it fails, the limit
        // read again below says so.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    Ok(read()?.rlim_cur)
}

/// Raises the open-file limit and checks that `vms` VMs fit in it (the
/// daemon keeps ~4 descriptors a VM: two output pipes, the console log, the
/// API connection) and in the kernel's task limits.
fn check_limits(vms: usize) -> Result<()> {
    let vms = vms as u64;
    let (need_fds, fds) = (vms * 5 + 512, raise_nofile()?);
    ensure!(
        fds >= need_fds,
        "the open-file limit is {fds} but {vms} VMs need about {need_fds}; raise it \
         (`ulimit -n {need_fds}`) or pass a smaller --vms"
    );
    // Each fc-double has two threads (main and one per API connection).
    let need_tasks = vms * 3 + 1024;
    for knob in ["/proc/sys/kernel/threads-max", "/proc/sys/kernel/pid_max"] {
        let text = std::fs::read_to_string(knob).with_context(|| format!("reading {knob}"))?;
        let max: u64 = text
            .trim()
            .parse()
            .with_context(|| format!("{knob}: {text:?}"))?;
        ensure!(
            max >= need_tasks,
            "{knob} is {max} but {vms} VMs need about {need_tasks} tasks; pass a smaller --vms"
        );
    }
    Ok(())
}

/// Back-to-back GET, pause and resume of one VM (at 1 VM and at N VMs), in that order.
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

/// Starts the first daemon, then runs the parts in turn.
fn run(env: &mut Env, p: &Args, rep: &mut Report) -> Result<()> {
    let agentenv = &env.agentenv;
    env.h.start_daemon(agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
    parts(env, p, rep)
}

/// The parts of the run, each adding its table: auth, latency, scale, TLS.
fn parts(env: &Env, p: &Args, rep: &mut Report) -> Result<()> {
    // A moment for the fresh daemon to settle before its memory is read.
    std::thread::sleep(Duration::from_millis(200));
    let rss_fresh = env.rss()?;
    let list0 = list(env.h.api()?, 0, p)?;
    auth_cost(env, p, rep)?;
    latency(env, p, rep)?;
    scale(env, p, rss_fresh, &list0, rep)?;
    tls_handshake(env, p, rep)
}

/// A token's cost: a 404 lookup, to the daemon vs to a second one with
/// `[auth] mode = "none"`.
fn auth_cost(env: &Env, p: &Args, rep: &mut Report) -> Result<()> {
    let api = env.h.api()?;
    let none = |c: &mut daemon::Config| c.auth.mode = daemon::AuthMode::None;
    let s = env.second(rep, "no-auth daemon", "ae-bench-noauth-", none, |h| {
        let no_auth = h.start_daemon(&env.agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
        let get = |api| Ok(call(api, "GET", "/v1/vm/none", None, 404)?.0);
        let sides: [Side; 2] = [&mut || get(api), &mut || get(&no_auth.api)];
        let what = "auth on/off: GET /v1/vm/none";
        interleaved(what, p.warmup * 10, p.list_requests * 4, sides)
    });
    if let Some(s) = s {
        let title = "auth (ms): GET /v1/vm/{id} (404), a token vs [auth] mode = \"none\"";
        let mut t = Table::latency(title, &["token", "none"]);
        let limit = Some(Limit::OverheadMs(TARGET_AUTH_P50_MS));
        let note = "two empty daemons of one build; \"none\" makes every caller admin";
        t.latency_row("per request", &s, limit).note(note);
        rep.table(t);
    }
    Ok(())
}

/// Create, pause, resume and delete, through the daemon and bare, each pair
/// in turn (the side going first alternating by round).
fn latency(env: &Env, p: &Args, rep: &mut Report) -> Result<()> {
    let api = env.h.api()?;
    let lat_disk = env.h.root().join("disks/lat.img");
    let mut create = Sides::default();
    let mut pause = Sides::default();
    let mut resume = Sides::default();
    let mut delete = Sides::default();
    rounds("latency", p.warmup, p.iterations, |i, timed| {
        let id = format!("lat-{i:04}");
        let body = json!({"vm_id": id, "disk": {"kind": "direct", "path": lat_disk}});
        let mut bare_vm = None;
        let mut bare_start = || {
            let (took, vm) = env.bare(&format!("b-{i:04}"))?;
            bare_vm = Some(vm);
            Ok(took)
        };
        let created = rotated(i, [&mut || Ok(create_vm(api, &body)?.0), &mut bare_start])?;
        let vm = bare_vm.as_mut().expect("the bare side ran");
        let mut daemon_pause = || flip(api, &id, "pause", "paused");
        let mut bare_pause = || vm.call("PATCH", "/vm", &json!(Vm { state: Paused }));
        let paused = rotated(i, [&mut daemon_pause, &mut bare_pause])?;
        let mut daemon_resume = || flip(api, &id, "resume", "running");
        let mut bare_resume = || vm.call("PATCH", "/vm", &json!(Vm { state: Resumed }));
        let resumed = rotated(i, [&mut daemon_resume, &mut bare_resume])?;
        let mut daemon_delete = || delete_vm(api, &id);
        let mut bare_kill = || Ok(vm.kill());
        let deleted = rotated(i, [&mut daemon_delete, &mut bare_kill])?;
        if timed {
            create.push(created);
            pause.push(paused);
            resume.push(resumed);
            delete.push(deleted);
        }
        Ok(())
    })?;
    let mut t = Table::latency("latency (ms)", &["daemon", "bare"]);
    let limit = Some(Limit::OverheadMs(TARGET_OVERHEAD_P50_MS));
    t.latency_row("create → running (direct disk)", &create, limit)
        .latency_row("pause", &pause, limit)
        .latency_row("resume", &resume, limit)
        .latency_row("delete (bare: kill, reap)", &delete, None);
    rep.table(t);
    Ok(())
}

/// The list, per-VM operation and memory figures with `p.vms` VMs, against
/// those at 0 VMs (`rss_fresh`, `list0`) and at 1 VM.
fn scale(env: &Env, p: &Args, rss_fresh: Rss, list0: &[Duration], rep: &mut Report) -> Result<()> {
    let api = env.h.api()?;
    let mut at_1_vm = Sides::default();
    let what = format!("creating {} VMs (direct disks)", p.vms);
    rounds(&what, 0, p.vms, |j, _| {
        let disk = env.h.root().join(format!("disks/d-{j:05}.img"));
        let vm_id = format!("vm-{j:05}");
        let body = json!({"vm_id": vm_id, "disk": {"kind": "direct", "path": disk}});
        create_vm(api, &body)?;
        if j == 0 {
            at_1_vm = per_vm_ops(api, &vm_id, p)?;
        }
        Ok(())
    })?;
    let list_n = list(api, p.vms, p)?;
    let at_n_vms = per_vm_ops(api, &format!("vm-{:05}", p.vms / 2), p)?;
    let rss = env.rss()?;
    let summary =
        |what: &str, v: &[Duration]| Summary::of(v).with_context(|| format!("no samples: {what}"));
    let list_at_n = summary("GET /v1/vm at N VMs", &list_n)?;
    let list_at_0 = summary("GET /v1/vm at 0 VMs", list0)?;
    let title = format!("with {} VMs", p.vms);
    let mut t = Table::new(&title, ["value", "baseline", "ratio"]);
    let mut row = |name: &str, value: f64, baseline: f64, target: Option<Target>| {
        let cells = vec![
            Cell::Num(value, 3),
            Cell::Num(baseline, 3),
            Cell::Ratio(value / baseline),
        ];
        t.row(name, cells, target);
    };
    let name = "GET /v1/vm p50 (ms; baseline: at 0 VMs)";
    row(name, list_at_n.p50, list_at_0.p50, None);
    let target = Target::at_most("list_p99", list_at_n.p99, TARGET_LIST_P99_MS, " ms");
    let name = "GET /v1/vm p99 (ms; baseline: at 0 VMs)";
    row(name, list_at_n.p99, list_at_0.p99, Some(target));
    let rss_mib = mib(rss.rss_kib);
    let target = Target::at_most("rss", rss_mib, TARGET_RSS_MIB, " MiB");
    let name = "daemon VmRSS (MiB; baseline: at 0 VMs, fresh)";
    row(name, rss_mib, mib(rss_fresh.rss_kib), Some(target));
    let name = "daemon VmHWM (MiB; peak over the whole run)";
    row(name, mib(rss.hwm_kib), mib(rss_fresh.hwm_kib), None);
    // per_vm_ops's sides, in its order.
    for (i, op) in ["GET /v1/vm/{id}", "pause", "resume"].iter().enumerate() {
        let at_n = summary(op, at_n_vms.side(i))?;
        let at_1 = summary(op, at_1_vm.side(i))?;
        row(
            &format!("{op} p50 (ms; baseline: at 1 VM)"),
            at_n.p50,
            at_1.p50,
            None,
        );
    }
    if p.vms < 1000 {
        t.note("the list and memory targets are stated for 1,000 VMs");
    }
    rep.table(t);
    Ok(())
}

/// Waits up to [`HEALTH_TIMEOUT`] until `answers` succeeds against a daemon
/// started by hand (`child`, its stderr in `log`); its log's end is in the
/// error when it exits or does not answer in time.
fn wait_answering(
    child: &mut Child,
    log: &Path,
    answers: impl Fn() -> Result<Duration>,
) -> Result<()> {
    let t0 = Instant::now();
    while let Err(e) = answers() {
        signals::check()?;
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon exited at start ({status}): {}",
                tail_lines(log, 10)
            );
        }
        ensure!(
            t0.elapsed() < HEALTH_TIMEOUT,
            "the daemon did not answer within {} s ({e:#}): {}",
            HEALTH_TIMEOUT.as_secs(),
            tail_lines(log, 10)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// New connection + `GET /v1/health`, HTTPS to a second daemon vs plain TCP
/// to the first, interleaved.
fn tls_handshake(env: &Env, p: &Args, rep: &mut Report) -> Result<()> {
    let first = env.h.daemon().context("the daemon is not running")?;
    let plain = format!("http://{}", first.addr);
    let pki = env.h.root().join("pki");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])?;
    std::fs::write(pki.join("server.crt"), cert.cert.pem())?;
    std::fs::write(pki.join("server.key"), cert.key_pair.serialize_pem())?;
    let tls = TlsOptions {
        cacert: Some(pki.join("server.crt")),
        ..TlsOptions::default()
    };
    // A new client, so a new connection (TLS handshake included), each time.
    let one = |server: &str| -> Result<Duration> {
        let api = ApiClient::with_tls(server, &tls)?.with_timeout(IO_TIMEOUT);
        Ok(call(&api, "GET", "/v1/health", None, 200)?.0)
    };
    let serve_https = |c: &mut daemon::Config| {
        c.tls.cert_file = tls.cacert.clone();
        c.tls.key_file = Some(pki.join("server.key"));
    };
    let s = env.second(rep, "TLS daemon", "ae-bench-tls-", serve_https, |h| {
        // Started here: `Harness::start_daemon` waits for plain HTTP.
        let port = daemon::free_port()?;
        let log = h.root().join("daemon.log");
        let mut cmd = Command::new(&env.agentenv);
        cmd.arg("--config").arg(h.root().join("agentenv.toml"));
        cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(File::create(&log)?);
        let mut child = signals::spawn_group(&mut cmd, libc::SIGTERM)?;
        let https = format!("https://127.0.0.1:{port}");
        let result = wait_answering(&mut child, &log, || one(&https)).and_then(|()| {
            let sides: [Side; 2] = [&mut || one(&https), &mut || one(&plain)];
            interleaved("TLS handshake", p.warmup, p.iterations, sides)
        });
        signals::stop_group(child, &[(libc::SIGTERM, Duration::from_secs(30))]);
        result
    });
    if let Some(s) = s {
        let mut t = Table::latency("new connection + one request (ms)", &["https", "http"]);
        let name = "connect (+ TLS handshake) + GET /v1/health";
        let note =
            "https: TLS 1.3 (rustls), a self-signed P-256 certificate; http: the daemon above";
        t.latency_row(name, &s, None).note(note);
        rep.table(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_zero_are_refused_and_quick_shortens_the_run() {
        let parse = |a: &[&str]| Args::try_parse_from([&["api_overhead"], a].concat());
        assert!(parse(&["--vms", "0"]).is_err());
        assert!(parse(&["--iterations", "0"]).is_err());
        let q = parse(&["--quick"]).unwrap();
        let counts = (q.iterations, q.vms, q.list_requests, q.warmup);
        assert_eq!(counts, (30, 100, 50, 2));
    }
}
