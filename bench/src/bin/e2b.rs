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
use agentenv_bench::args::{count, Common};
use agentenv_bench::daemon::{self, Harness, QemuGuest};
use agentenv_bench::report::{skip, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, progress, timed};
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
    /// Timed create → first command pairs [--quick: 5].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "5"))]
    #[arg(value_parser = count)]
    creates: usize,
    /// Timed `commands.run("true")` / exec pairs [--quick: 30].
    #[arg(long, default_value_t = 100, default_value_if("quick", "true", "30"))]
    #[arg(value_parser = count)]
    execs: usize,
    /// Untimed rounds before the creates, and 5× that before the execs [--quick: 1].
    #[arg(long, default_value_t = 2, default_value_if("quick", "true", "1"))]
    warmup: usize,
    /// The Python with the `e2b` package [default:
    /// /var/cache/agentenv/e2b-venvs/e2b-2.63.0/bin/python, then python3].
    #[arg(long, value_name = "PY")]
    python: Option<PathBuf>,
    /// The guest artifacts [default: $AGENTENV_ARTIFACTS, else <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// The base template's image, under the artifacts' rootfs/.
    #[arg(long, default_value = "e2b-base.ext4", value_name = "FILE")]
    image: String,
    /// Seconds to wait for the template's warm snapshot (a cold boot).
    #[arg(long, default_value_t = 600, value_name = "S")]
    warm_timeout_s: u64,
    #[command(flatten)]
    common: Common,
}

/// The SDK driver, `bench/py/e2b_driver.py`: one JSON line per request, one per answer.
struct Driver {
    child: Option<Child>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Driver {
    /// Starts the driver against the E2B listener at `url`; returns it and the SDK's version.
    fn start(python: &Path, script: &Path, url: &str, key: &str) -> Result<(Driver, String)> {
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .env("E2B_API_URL", url)
            .env("E2B_SANDBOX_URL", url)
            .env("E2B_API_KEY", key)
            .env_remove("E2B_DOMAIN")
            .env_remove("E2B_DEBUG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = signals::spawn_group(&mut cmd, libc::SIGKILL)
            .with_context(|| format!("cannot start the SDK driver with {}", python.display()))?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        let mut d = Driver {
            child: Some(child),
            stdin,
            stdout,
        };
        let hello = d.read().context("the SDK driver's first line")?;
        Ok((d, hello["sdk"].as_str().unwrap_or("?").into()))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line)?;
        ensure!(read > 0, "the SDK driver exited");
        let v: Value = serde_json::from_str(&line).with_context(|| format!("driver: {line}"))?;
        if let Some(e) = v.get("error") {
            bail!("SDK driver: {e}");
        }
        Ok(v)
    }

    fn call(&mut self, op: &str) -> Result<Value> {
        writeln!(self.stdin, "{}", json!({ "op": op }))?;
        self.stdin.flush()?;
        self.read().with_context(|| format!("SDK driver op {op}"))
    }

    /// A timed op: the driver's own measurement.
    fn timed(&mut self, op: &str) -> Result<Duration> {
        let answer = self.call(op)?;
        let ms = answer["ms"].as_f64().context("driver answer without ms")?;
        Ok(Duration::from_secs_f64(ms / 1e3))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            signals::stop_group(child, &[(libc::SIGTERM, Duration::from_secs(10))]);
        }
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let image_hint = "(the base template image: scripts/build-artifacts.sh --e2b)";
    let guest = QemuGuest::find(args.artifacts.as_deref(), &args.image)
        .unwrap_or_else(|why| skip(&format!("{why} {image_hint}"), c.json));
    let Some(python) = find_python(args.python.as_deref()) else {
        skip(
            "no Python with the e2b package (tests/e2b/setup-venvs.sh makes one; or --python)",
            c.json,
        )
    };
    let [agentenv] = daemon::binaries(c.bin_dir.as_deref(), ["agentenv"]);
    let mut rep = Report::new(
        "agentenv E2B API: the official SDK vs the native API, same daemon, same run",
        json!({"creates": args.creates, "execs": args.execs, "warmup": args.warmup,
               "image": args.image}),
    );
    rep.about("vmm", guest.version.clone()).about(
        "sides",
        "sdk = the e2b Python SDK against the daemon's E2B listener (timed in Python)\n\
         native = agentenv-client against /v1: the baseline",
    );
    let h = Harness::new(c.tmp_dir.as_deref(), "ae-e2b-", &[]);
    let ran = rep.part("daemon", h, c.keep, |h| {
        run(h, &guest, &agentenv, &python, &args)
    });
    if let Some((sdk, table)) = ran {
        rep.about("sdk", format!("e2b {sdk} ({})", python.display()))
            .table(table);
    }
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

/// Starts the daemon with the `base` template, waits for it to be warm, and measures; returns
/// the SDK's version and the table.
fn run(
    h: &mut Harness,
    guest: &QemuGuest,
    agentenv: &Path,
    python: &Path,
    args: &Args,
) -> Result<(String, Table)> {
    let e2b_port = daemon::free_port()?;
    let mut cfg = daemon::qemu_config(guest, MEMORY_MIB_PER_SLOT, 4);
    cfg.default_slots = 1;
    // The E2B listener, and the template `base` with a warm snapshot (a create restores it).
    let base = E2bTemplate {
        image: args.image.clone(),
        slots: Some(1),
        kernel: None,
        initrd: None,
        boot_args: None,
        snapshot: true,
    };
    cfg.e2b = E2bConfig {
        listen: vec![format!("127.0.0.1:{e2b_port}")],
        templates: [("base".to_string(), base)].into(),
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
    let (mut sdk, version) = Driver::start(python, &script, &e2b_url, &key)?;
    progress(format!("SDK driver: e2b {version}"));

    // The same login shell as the SDK's: its startup files are read from
    // HOME, so HOME and cwd are the user's (root's own ~/.profile runs more).
    let exec_req = ExecRequest {
        cmd: SDK_ARGV.map(String::from).to_vec(),
        env: [("HOME".to_string(), "/home/user".to_string())].into(),
        cwd: Some("/home/user".into()),
        ..ExecRequest::default()
    };
    let native_exec = |vm: &str| -> Result<Duration> {
        let send = || {
            api.exec(vm, &exec_req)
                .with_context(|| format!("{vm}: native exec"))
        };
        let (r, took) = timed(send)?;
        ensure!(r.exit_code == Some(0), "{vm}: native exec: {r:?}");
        Ok(took)
    };
    // A native VM restored from the warm snapshot, its agent ready.
    let restore = |vm: &str| {
        let restored = api.restore_vm(vm, &warm, true);
        restored.with_context(|| format!("{vm}: restoring {warm}"))
    };

    let mut round = 0usize;
    let created = interleaved(
        "create → first run(\"true\")",
        args.warmup,
        args.creates,
        [&mut || sdk.timed("create_first"), &mut || {
            round += 1;
            let id = format!("n{round}");
            let ((), took) = timed(|| {
                restore(&id)?;
                native_exec(&id)?;
                Ok(())
            })?;
            api.delete_vm(&id).with_context(|| format!("DELETE {id}"))?;
            Ok(took)
        }],
    )?;

    progress("one sandbox and one native VM for the exec round trips");
    sdk.call("open")?;
    restore("x")?;
    native_exec("x")?;
    let exec = interleaved(
        "run(\"true\") round trip",
        args.warmup * 5,
        args.execs,
        [&mut || sdk.timed("run_true"), &mut || native_exec("x")],
    )?;
    sdk.call("close")?;
    api.delete_vm("x").context("DELETE x")?;

    let create_limit = Some(Limit::Ratio(TARGET_CREATE_RATIO));
    let exec_limit = Some(Limit::Ratio(TARGET_EXEC_RATIO));
    let mut t = Table::latency("E2B SDK vs native API (QEMU, TCG)", &["sdk", "native"]);
    t.latency_row("create → first run(\"true\")", &created, create_limit)
        .latency_row("run(\"true\") round trip", &exec, exec_limit);
    if let Some([s, _]) = created.summaries() {
        let name = "sdk create → first command p50";
        let target = Target::at_most(name, s.p50, TARGET_CREATE_P50_MS, " ms");
        t.row(name, vec![Cell::ms(s.p50)], Some(target));
    }
    t.note(format!(
        "create: sdk = Sandbox.create() + commands.run(\"true\"), killed untimed; native = \
         POST /v1/vm {{restore: {warm}, wait_ready}} + exec, deleted untimed"
    ))
    .note(format!(
        "exec: both run {} (what the SDK's commands.run sends) in /home/user with \
         HOME=/home/user (the same startup files); sdk as user `user`, native as root (the \
         native exec has no user)",
        SDK_ARGV.join(" ")
    ));
    Ok((version, t))
}

/// Waits for the `base` template's warm snapshot; returns its id.
fn wait_warm(api: &ApiClient, timeout: Duration) -> Result<String> {
    progress("waiting for the base template's warm snapshot (a cold boot under TCG)");
    let deadline = Instant::now() + timeout;
    loop {
        signals::check()?;
        let snapshots = api.list_snapshots()?.snapshots;
        if let Some(s) = snapshots
            .into_iter()
            .find(|s| s.snapshot_id.starts_with(WARM_PREFIX))
        {
            return Ok(s.snapshot_id);
        }
        let secs = timeout.as_secs();
        ensure!(
            Instant::now() < deadline,
            "the base template was not warm within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
