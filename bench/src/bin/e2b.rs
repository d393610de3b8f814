//! `e2b`: what the E2B-compatible API costs over the native one. One daemon
//! serves both; its `base` template is warm (a full snapshot of the booted,
//! idle guest), so `Sandbox.create()` is a restore.
//!
//! - create → first `commands.run("true")` through the official `e2b` SDK (a
//!   small Python driver, `bench/py/e2b_driver.py`, times it with
//!   `time.perf_counter`) against the native API doing the same (restore of
//!   the same warm snapshot with `wait_ready`, then one exec), interleaved;
//! - the round trip of `commands.run("true")` in a running sandbox against a
//!   native exec of the same command line (`/bin/bash -l -c true`).
//!
//! See `bench/README.md`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_api::ExecRequest;
use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon::{self, Harness, QemuGuest};
use agentenv_bench::report::{or_exit, skip, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, progress};
use agentenv_bench::signals;
use agentenv_client::ApiClient;
use agentenv_core::config::{E2bConfig, E2bTemplate};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Target: SDK create → first command at most this many times the native one, p50.
const TARGET_CREATE_RATIO: f64 = 1.1;
/// Target: SDK `commands.run("true")` at most this many times a native exec, p50.
const TARGET_EXEC_RATIO: f64 = 1.2;
/// Target: SDK create → first command, p50, in ms (snapshot-backed template).
const TARGET_CREATE_P50_MS: f64 = 500.0;
/// Guest memory per slot (the template has one).
const MEMORY_MIB_PER_SLOT: u64 = 512;
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(300);
/// What the SDK runs for `commands.run("true")`; the native side runs the same.
const SDK_ARGV: [&str; 4] = ["/bin/bash", "-l", "-c", "true"];
/// The warm snapshot ids of the `base` template start with this.
const WARM_PREFIX: &str = "e2b-tpl-base";
/// The driver, written into the run's directory.
const DRIVER: &str = include_str!("../../py/e2b_driver.py");

/// The E2B API through the official SDK against the native API, same run.
#[derive(Debug, Parser)]
#[command(name = "e2b", version, about, long_about = None)]
struct Args {
    /// Timed create → first command pairs [default: 20; --quick: 5].
    #[arg(long)]
    creates: Option<usize>,
    /// Timed `commands.run("true")` / exec pairs [default: 100; --quick: 30].
    #[arg(long)]
    execs: Option<usize>,
    /// The Python with the `e2b` package [default:
    /// /var/cache/agentenv/e2b-venvs/e2b-2.63.0/bin/python, then python3].
    #[arg(long, value_name = "PY")]
    python: Option<PathBuf>,
    /// The guest artifacts [default: $AGENTENV_ARTIFACTS, else <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// The base template's image, under the artifacts' rootfs/ [default: e2b-base.ext4].
    #[arg(long, default_value = "e2b-base.ext4", value_name = "FILE")]
    image: String,
    /// Seconds to wait for the template's warm snapshot (a cold boot).
    #[arg(long, default_value_t = 600, value_name = "S")]
    warm_timeout_s: u64,
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
}

/// The Python SDK driver: one JSON line per request, one per answer.
struct Driver {
    child: Option<Child>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    sdk: String,
}

impl Driver {
    fn start(python: &Path, script: &Path, e2b_url: &str, key: &str) -> Result<Driver> {
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .env("E2B_API_URL", e2b_url)
            .env("E2B_SANDBOX_URL", e2b_url)
            .env("E2B_API_KEY", key)
            .env_remove("E2B_DOMAIN")
            .env_remove("E2B_DEBUG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = signals::spawn_group(&mut cmd, libc::SIGKILL)?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        let mut d = Driver {
            child: Some(child),
            stdin,
            stdout,
            sdk: String::new(),
        };
        let hello = d.read()?;
        d.sdk = hello["sdk"].as_str().unwrap_or("?").to_string();
        Ok(d)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        ensure!(
            self.stdout.read_line(&mut line)? > 0,
            "the SDK driver exited"
        );
        let v: Value = serde_json::from_str(&line).with_context(|| format!("driver: {line}"))?;
        if let Some(e) = v.get("error") {
            bail!("SDK driver: {e}");
        }
        Ok(v)
    }

    fn call(&mut self, op: &str) -> Result<Value> {
        writeln!(self.stdin, "{}", json!({ "op": op }))?;
        self.stdin.flush()?;
        self.read()
    }

    /// A timed op: the driver's own measurement.
    fn timed(&mut self, op: &str) -> Result<Duration> {
        let v = self.call(op)?;
        let ms = v["ms"].as_f64().context("driver answer without ms")?;
        Ok(Duration::from_secs_f64(ms / 1e3))
    }

    fn quit(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        if let Some(child) = self.child.take() {
            signals::stop_group(child, &[(libc::SIGTERM, Duration::from_secs(10))]);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.quit();
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let guest = match QemuGuest::find(args.artifacts.as_deref(), &args.image) {
        Ok(g) => g,
        Err(why) => skip(
            &format!("{why} (the base template image: scripts/build-artifacts.sh --e2b)"),
            c.json,
        ),
    };
    let Some(python) = find_python(args.python.as_deref()) else {
        skip(
            "no Python with the e2b package (tests/e2b/setup-venvs.sh makes one; or --python)",
            c.json,
        )
    };
    let [agentenv] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv"]);
    let creates = args.creates.unwrap_or(c.pick(20, 5)).max(1);
    let execs = args.execs.unwrap_or(c.pick(100, 30)).max(1);
    let warmup = args.warmup.get(c, 2, 1);
    let mut rep = Report::new(
        "agentenv E2B API: the official SDK vs the native API, same daemon, same run",
        json!({"creates": creates, "execs": execs, "warmup": warmup, "image": args.image}),
    );
    rep.about("vmm", guest.version.clone()).about(
        "sides",
        "sdk = the e2b Python SDK against the daemon's E2B listener (timed in Python)\n\
         native = agentenv-client against /v1: the baseline",
    );
    let mut h = or_exit(
        Harness::new(c.tmp_dir.as_deref(), "ae-e2b-", &[]),
        1,
        "temp dir: ",
    );
    let result = run(
        &mut h, &guest, &agentenv, &python, &args, creates, execs, warmup,
    );
    let (result, cleanup) = h.finish(result, c.keep);
    let (table, sdk) = rep.settle(result, "daemon", cleanup.cleaned());
    rep.about("sdk", format!("e2b {sdk} ({})", python.display()));
    rep.table(table);
    rep.finish(c.json)
}

/// `--python`, else the CI venv of the newest pinned SDK, else `python3` if
/// it has the `e2b` package.
fn find_python(given: Option<&Path>) -> Option<PathBuf> {
    let venv = Path::new("/var/cache/agentenv/e2b-venvs/e2b-2.63.0/bin/python");
    let has_e2b = || {
        let import = daemon::run(Command::new("python3").args(["-c", "import e2b"]));
        import.is_ok().then(|| PathBuf::from("python3"))
    };
    given
        .or(venv.is_file().then_some(venv))
        .map(Path::to_path_buf)
        .or_else(has_e2b)
}

#[allow(clippy::too_many_arguments)]
fn run(
    h: &mut Harness,
    guest: &QemuGuest,
    agentenv: &Path,
    python: &Path,
    args: &Args,
    creates: usize,
    execs: usize,
    warmup: usize,
) -> Result<(Table, String)> {
    let e2b_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = daemon::qemu_config(guest, MEMORY_MIB_PER_SLOT, 4);
    cfg.default_slots = 1;
    cfg.e2b = E2bConfig {
        listen: vec![format!("127.0.0.1:{e2b_port}")],
        templates: [(
            "base".to_string(),
            E2bTemplate {
                image: args.image.clone(),
                slots: Some(1),
                kernel: None,
                initrd: None,
                boot_args: None,
                snapshot: true,
            },
        )]
        .into(),
        ..E2bConfig::default()
    };
    h.write_config(&cfg)?;
    let d = h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(30))?;
    let key = d.token.clone().context("the daemon wrote no admin token")?;
    let api = d.client(IO_TIMEOUT)?;
    let warm = wait_warm(&api, Duration::from_secs(args.warm_timeout_s))?;
    progress(format!("template base warm: snapshot {warm}"));

    let script = h.root().join("e2b_driver.py");
    std::fs::write(&script, DRIVER)?;
    let e2b_url = format!("http://127.0.0.1:{e2b_port}");
    let mut sdk = Driver::start(python, &script, &e2b_url, &key)?;
    progress(format!("SDK driver: e2b {}", sdk.sdk));

    // The same login shell as the SDK's: its startup files are read from
    // HOME, so HOME and cwd are the user's (root's own ~/.profile runs more).
    let exec_req: ExecRequest = serde_json::from_value(json!({"cmd": SDK_ARGV,
        "env": {"HOME": "/home/user"}, "cwd": "/home/user"}))?;
    let native_exec = |vm: &str| -> Result<Duration> {
        let t0 = Instant::now();
        let r = api.exec(vm, &exec_req)?;
        let took = t0.elapsed();
        ensure!(r.exit_code == Some(0), "native exec: {r:?}");
        Ok(took)
    };

    let mut round = 0usize;
    let created = interleaved(
        "create → first run(\"true\")",
        warmup,
        creates,
        [&mut || sdk.timed("create_first"), &mut || {
            round += 1;
            let id = format!("n{round}");
            let t0 = Instant::now();
            api.restore_vm(&id, &warm, true)?;
            native_exec(&id)?;
            let took = t0.elapsed();
            api.delete_vm(&id)?;
            Ok(took)
        }],
    )?;

    progress("one sandbox and one native VM for the exec round trips");
    sdk.call("open")?;
    api.restore_vm("x", &warm, true)?;
    native_exec("x")?;
    let exec = interleaved(
        "run(\"true\") round trip",
        warmup * 5,
        execs,
        [&mut || sdk.timed("run_true"), &mut || native_exec("x")],
    )?;
    sdk.call("close")?;
    api.delete_vm("x")?;
    let sdk_version = sdk.sdk.clone();
    drop(sdk);

    let mut t = Table::latency("E2B SDK vs native API (QEMU, TCG)", &["sdk", "native"]);
    t.latency_row(
        "create → first run(\"true\")",
        &created,
        Some(Limit::Ratio(TARGET_CREATE_RATIO)),
    )
    .latency_row(
        "run(\"true\") round trip",
        &exec,
        Some(Limit::Ratio(TARGET_EXEC_RATIO)),
    );
    if let Some([s, _]) = created.summaries() {
        let name = "sdk create → first command p50";
        let target = Target::at_most(name, s.p50, TARGET_CREATE_P50_MS, " ms");
        t.row(name, vec![Cell::ms(s.p50)], Some(target));
    }
    t.note(format!(
        "create: sdk = Sandbox.create() + commands.run(\"true\"), killed untimed; native = POST /v1/vm \
         {{restore: {warm}, wait_ready}} + exec, deleted untimed"
    ))
    .note(format!(
        "exec: both run {} (what the SDK's commands.run sends) in /home/user with HOME=/home/user (the same \
         startup files); sdk as user `user`, native as root (the native exec has no user)",
        SDK_ARGV.join(" ")
    ));
    Ok((t, sdk_version))
}

/// Waits for the `base` template's warm snapshot; returns its id.
fn wait_warm(api: &ApiClient, timeout: Duration) -> Result<String> {
    progress("waiting for the base template's warm snapshot (a cold boot under TCG)");
    let t0 = Instant::now();
    loop {
        signals::check()?;
        let snaps = api.list_snapshots()?;
        if let Some(s) = snaps
            .snapshots
            .iter()
            .find(|s| s.snapshot_id.starts_with(WARM_PREFIX))
        {
            return Ok(s.snapshot_id.clone());
        }
        ensure!(
            t0.elapsed() < timeout,
            "the base template was not warm within {} s",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
