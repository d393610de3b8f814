//! `agent_io`: what the daemon adds to talking to the guest agent yourself.
//!
//! It starts the real `agentenv` daemon (from `target/release`) with the
//! Firecracker API double `fc-double` as its VMM. The double bridges guest
//! vsock port 10789 to the real `agentenv-guest`, which runs on the host with
//! `--listen-unix` (as in `crates/agentenv/tests/agent_api.rs`). One VM is
//! created with `wait_ready: true`, and the same work is done three ways,
//! interleaved in the same run, the order rotating:
//!
//! - **daemon**: the HTTP API (`POST /v1/vm/{id}/exec`, `PUT`/`GET
//!   /v1/vm/{id}/files`): HTTP, the engine, the hybrid-vsock bridge, the agent;
//! - **bridge**: this program's own `AgentClient` (the client code the daemon
//!   uses) through the double's hybrid vsock: the daemon's path without HTTP
//!   and the engine, to split the overhead;
//! - **direct**: the same client on the agent's Unix socket: the agent's own
//!   cost, the baseline the targets compare with.
//!
//! Measured: the round trip of an exec of `true` (p50/p99, and the daemon's
//! overhead at p50), upload and download throughput of a file (streamed on
//! both sides, never held in memory), and the daemon's resident memory while
//! a client downloads 1 GiB slowly. With `--qemu`, the exec and file figures
//! are taken again through the daemon against a real QEMU (TCG) guest; there
//! the daemon holds the VM's virtio-serial socket, so there is no direct
//! baseline.
//!
//! Targets are printed beside the figures as PASS/MISS, for information: the
//! exit status is 0 whenever the run itself completes and cleans up.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv_bench::daemon::{self, find_in_path, tail_lines, Cleanup, Harness, Vmm};
use agentenv_bench::http::Client;
use agentenv_bench::procfs::{self, HostInfo, Rss};
use agentenv_bench::signals;
use agentenv_bench::stats::{pass, round3, Summary};
use agentenv_core::agent::{AgentLink, ExecEvent};
use agentenv_core::backend::AgentChannel;
use agentenv_core::config::AgentConfig;
use agentenv_core::engine::AGENT_SOCKET;
use agentenv_host::agent::AgentClient;
use agentenv_proto::{ExecRequest, PutFile, INITIAL_WINDOW, VSOCK_PORT};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// Target: the daemon adds at most this much to an exec's p50, in ms.
const TARGET_EXEC_OVERHEAD_P50_MS: f64 = 2.0;
/// Target: throughput through the daemon at least this fraction of direct.
const TARGET_FILE_RATIO: f64 = 0.7;
/// Target: the daemon's VmRSS grows by at most the agent's flow-control
/// window plus this many MiB during a download.
const TARGET_RSS_SLACK_MIB: f64 = 4.0;

/// One MiB.
const MIB: u64 = 1 << 20;
/// Size of the warm-up file sent each way before the timed transfers.
const WARMUP_FILE_BYTES: u64 = 4 * MIB;
/// The client's read and file-read buffer.
const BUF: usize = 256 * 1024;
/// During the memory download the client stops reading for
/// [`THROTTLE_PAUSE`] after every this many bytes.
const THROTTLE_EVERY: u64 = 64 * MIB;
const THROTTLE_PAUSE: Duration = Duration::from_millis(100);
/// How often the daemon's VmRSS is sampled during a download.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// One byte in this many is checked in everything read back (a prime, so
/// the checked byte moves through every position of a page and of a word).
const CHECK_STRIDE: u64 = 4093;

/// Guest memory per VM (only accounted with the double, which runs no guest).
const MEMORY_MIB_PER_SLOT: u64 = 256;
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemon may take to answer `/v1/health` after its start.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);
/// `wait_ready_timeout_s` for the double (the agent answers at once).
const READY_TIMEOUT_S: u64 = 30;
/// The rootfs the QEMU guest boots (it carries the agent).
const QEMU_ROOTFS: &str = "minimal.ext4";

/// Exec and file transfers through the daemon against the same work done
/// straight to the guest agent, same run.
#[derive(Debug, Parser)]
#[command(name = "agent_io", version, about, long_about = None)]
struct Args {
    /// Timed execs of `true` per side [default: 300; --quick: 100].
    #[arg(long)]
    execs: Option<usize>,
    /// Untimed execs per side before them [default: 20; --quick: 10].
    #[arg(long)]
    warmup: Option<usize>,
    /// Size of the file moved each way, in MiB [default: 256; --quick: 64].
    #[arg(long)]
    file_mib: Option<u64>,
    /// Timed transfers per side and direction [default: 6; --quick: 3].
    #[arg(long)]
    file_runs: Option<usize>,
    /// Size of the download during which the daemon's memory is watched, in
    /// MiB (a sparse file) [default: 1024].
    #[arg(long)]
    rss_mib: Option<u64>,
    /// Also measure through the daemon against a real QEMU (TCG) guest
    /// booted from the artifacts.
    #[arg(long)]
    qemu: bool,
    /// Size of the file moved each way in the QEMU guest, in MiB
    /// [default: 64; --quick: 16].
    #[arg(long)]
    qemu_file_mib: Option<u64>,
    /// The guest artifacts for --qemu [default: <workspace>/artifacts].
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// With --qemu: a guest whose agent has not answered after S s fails the run.
    #[arg(long, default_value_t = 180, value_name = "S")]
    boot_timeout_s: u64,
    /// A short run (well under a minute without --qemu).
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Directory holding `agentenv`, `fc-double` and `agentenv-guest`
    /// [default: this binary's directory, then <workspace>/target/release].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the run's temporary directory is made; the agent writes the
    /// uploaded files there (and fsyncs them) [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Keep the temporary directories (config, logs, sessions) at the end.
    #[arg(long)]
    keep: bool,
}

/// The resolved run parameters.
#[derive(Debug, Clone)]
struct Params {
    execs: usize,
    warmup: usize,
    file_bytes: u64,
    file_runs: usize,
    rss_bytes: u64,
    qemu_file_bytes: u64,
}

impl Params {
    fn from(a: &Args) -> Params {
        let (execs, warmup, file_mib, runs, qemu_mib) = if a.quick {
            (100, 10, 64, 3, 16)
        } else {
            (300, 20, 256, 6, 64)
        };
        Params {
            execs: a.execs.unwrap_or(execs).max(1),
            warmup: a.warmup.unwrap_or(warmup),
            file_bytes: a.file_mib.unwrap_or(file_mib).max(1) * MIB,
            file_runs: a.file_runs.unwrap_or(runs).max(1),
            rss_bytes: a.rss_mib.unwrap_or(1024).max(1) * MIB,
            qemu_file_bytes: a.qemu_file_mib.unwrap_or(qemu_mib).max(1) * MIB,
        }
    }
}

fn progress(msg: &str) {
    eprintln!("[agent_io] {msg}");
}

fn main() {
    let args = Args::parse();
    signals::install();
    let p = Params::from(&args);
    let bins = match find_binaries(args.bin_dir.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("agent_io: {e:#}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let load_start = procfs::loadavg();

    let mut env = match FcEnv::new(&args, &bins) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("agent_io: setting up: {e:#}");
            std::process::exit(1);
        }
    };
    let result = run_fc(&mut env, &bins, &p);
    // The agent names the run's directory: stop it before the leak scan.
    env.agent.stop();
    let files_fs = env.h.fs().to_string();
    let (fc, fc_cleanup) = env.h.finish("agent_io", result, args.keep, cleanup_summary);

    let qemu = if args.qemu {
        run_qemu_part(&args, &bins, &p)
    } else {
        QemuOutcome::NotRun
    };
    let report = Report {
        fc,
        fc_cleanup,
        files_fs,
        qemu,
        wall: started.elapsed(),
        load: (load_start, procfs::loadavg()),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(&bins, &p)).expect("json serialises")
        );
    } else {
        print!("{}", report.to_text(&bins, &p));
    }
    let mut ok = true;
    for (part, c) in report.cleanups() {
        if !c.clean() {
            eprintln!(
                "agent_io: {part}: cleanup was not complete: {}",
                cleanup_summary(c)
            );
            ok = false;
        }
    }
    if let QemuOutcome::Failed { error, .. } = &report.qemu {
        eprintln!("agent_io: qemu: {error}");
        ok = false;
    }
    if !ok {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- binaries

struct Binaries {
    agentenv: PathBuf,
    fc_double: PathBuf,
    guest: PathBuf,
}

fn find_binaries(bin_dir: Option<&Path>) -> Result<Binaries> {
    // Not `agentenv_testkit::paths::guest_agent()`: that one expects to run
    // from target/<profile>/deps (a test) and builds a debug agent.
    let [agentenv, fc_double, guest] = daemon::find_binaries(
        bin_dir,
        ["agentenv", "fc-double", "agentenv-guest"],
        "build them first with:\n\n    \
         cargo build --release -p agentenv -p agentenv-testkit -p agentenv-guest\n",
    )?;
    Ok(Binaries {
        agentenv,
        fc_double,
        guest,
    })
}

// ---------------------------------------------------------------- the host agent

/// `agentenv-guest --listen-unix SOCK` on the host; killed when dropped.
struct HostAgent {
    child: Option<Child>,
    socket: PathBuf,
}

impl HostAgent {
    fn start(bin: &Path, socket: &Path, log: &Path) -> Result<HostAgent> {
        let log_file = File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen-unix")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0);
        signals::die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut agent = HostAgent {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = agent.child.as_mut().expect("spawned").try_wait()? {
                bail!(
                    "agentenv-guest exited at start ({status}): {}",
                    tail_lines(log, 5)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "agentenv-guest made no socket within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            signals::kill_group(child);
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- the client sides

/// This program's own `AgentClient` (the daemon's client code), in a
/// multi-threaded tokio runtime like the daemon's: on the agent's Unix socket
/// (the baseline, "direct"), or through fc-double's hybrid vsock ("bridge").
struct AgentSide {
    rt: Arc<tokio::runtime::Runtime>,
    client: AgentClient,
    exec: ExecRequest,
    /// "direct" or "bridge", for error messages.
    name: &'static str,
}

impl AgentSide {
    fn connect(
        rt: Arc<tokio::runtime::Runtime>,
        endpoint: AgentChannel,
        name: &'static str,
    ) -> Result<AgentSide> {
        let client = rt
            .block_on(AgentClient::connect(&endpoint, Duration::from_secs(5)))
            .with_context(|| format!("{name}: cannot connect to the agent ({endpoint:?})"))?;
        // What the daemon sends for `{"cmd": ["true"]}` (engine/agent.rs):
        // the default timeout and the output cap from the config's defaults.
        let defaults = AgentConfig::default();
        let exec = ExecRequest {
            cmd: vec!["true".into()],
            timeout_ms: Some(defaults.default_exec_timeout_s * 1000),
            max_output: Some(defaults.max_output_bytes),
            ..ExecRequest::default()
        };
        Ok(AgentSide {
            rt,
            client,
            exec,
            name,
        })
    }

    fn exec_true(&self) -> Result<Duration> {
        let t0 = Instant::now();
        self.rt.block_on(async {
            let mut e = self.client.exec(&self.exec, None).await?;
            loop {
                if let ExecEvent::Exit(st) = e.next().await? {
                    ensure!(
                        st.exit_code == Some(0),
                        "{}: exec of true: {st:?}",
                        self.name
                    );
                    return Ok(());
                }
            }
        })?;
        Ok(t0.elapsed())
    }

    /// Uploads `src` (of `size` bytes) to `path`, read in [`BUF`] pieces.
    fn put(&self, src: &Path, path: &Path, size: u64) -> Result<Duration> {
        let mut file = File::open(src)?;
        let mut buf = vec![0u8; BUF];
        let t0 = Instant::now();
        let done = self.rt.block_on(async {
            let mut up = self
                .client
                .put_file(&PutFile {
                    path: path.display().to_string(),
                    mode: None,
                    make_parents: false,
                })
                .await?;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                up.write(&buf[..n]).await?;
            }
            Ok::<_, anyhow::Error>(up.finish().await?)
        })?;
        let took = t0.elapsed();
        ensure!(
            done.bytes == size,
            "{}: the upload wrote {} bytes, not {size}",
            self.name,
            done.bytes
        );
        Ok(took)
    }

    /// Downloads `path`, checking it against `content` as it comes.
    fn get(&self, path: &Path, size: u64, content: Content) -> Result<Duration> {
        let mut check = Check::new(content);
        let t0 = Instant::now();
        self.rt.block_on(async {
            let mut dl = self.client.get_file(&path.display().to_string()).await?;
            ensure!(
                dl.info.size == size,
                "{}: the agent reports {} bytes to download, not {size}",
                self.name,
                dl.info.size
            );
            while let Some(chunk) = dl.next_chunk().await? {
                check.feed(&chunk)?;
            }
            Ok(())
        })?;
        let took = t0.elapsed();
        check.finish(size)?;
        Ok(took)
    }
}

// ---------------------------------------------------------------- the daemon side

/// The daemon's API: the benchmarks' own HTTP client for execs (one keep-alive
/// connection), ureq for the streamed file bodies.
struct ViaDaemon {
    api: Client,
    http: ureq::Agent,
    files_url: String,
    exec_path: String,
    pid: u32,
}

impl ViaDaemon {
    fn new(d: &daemon::Daemon, vm_id: &str) -> ViaDaemon {
        ViaDaemon {
            api: Client::new(agentenv_bench::http::Endpoint::Tcp(d.addr), IO_TIMEOUT),
            http: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout_read(IO_TIMEOUT)
                .timeout_write(IO_TIMEOUT)
                .build(),
            files_url: format!("http://{}/v1/vm/{vm_id}/files", d.addr),
            exec_path: format!("/v1/vm/{vm_id}/exec"),
            pid: d.pid,
        }
    }

    fn rss(&self) -> Result<Rss> {
        Rss::of(self.pid).context("cannot read the daemon's /proc/PID/status")
    }

    fn exec_true(&mut self) -> Result<Duration> {
        let body = br#"{"cmd":["true"]}"#;
        let t0 = Instant::now();
        let r = self
            .api
            .request("POST", &self.exec_path, Some(body))
            .with_context(|| format!("POST {}", self.exec_path))?;
        let took = t0.elapsed();
        ensure!(
            r.status == 200,
            "POST {}: HTTP {}: {}",
            self.exec_path,
            r.status,
            r.text()
        );
        let v = r.json()?;
        ensure!(v["exit_code"] == 0, "exec of true through the daemon: {v}");
        Ok(took)
    }

    /// `PUT …/files?path=` with `src` streamed as the body (`Content-Length`
    /// set, [`BUF`]-sized writes).
    fn put(&self, src: &str, guest_path: &str, size: u64) -> Result<Duration> {
        let file = BufReader::with_capacity(BUF, File::open(src)?);
        let t0 = Instant::now();
        let r = self
            .http
            .put(&self.files_url)
            .query("path", guest_path)
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &size.to_string())
            .send(file)
            .map_err(ureq_error)
            .context("PUT files")?;
        let v: Value = r.into_json().context("PUT files: the answer")?;
        let took = t0.elapsed();
        ensure!(v["bytes"] == size, "PUT files: {v} (sent {size} bytes)");
        Ok(took)
    }

    /// `GET …/files?path=`, checked against `content` as it comes; with
    /// `throttle`, the client stops reading for a while every so often.
    fn get(
        &self,
        guest_path: &str,
        size: u64,
        content: Content,
        throttle: bool,
    ) -> Result<Duration> {
        let mut check = Check::new(content);
        let mut buf = vec![0u8; BUF];
        let t0 = Instant::now();
        let r = self
            .http
            .get(&self.files_url)
            .query("path", guest_path)
            .call()
            .map_err(ureq_error)
            .context("GET files")?;
        let announced = r.header("x-agentenv-file-size").map(str::to_string);
        ensure!(
            announced.as_deref() == Some(size.to_string().as_str()),
            "GET files: x-agentenv-file-size {announced:?}, expected {size}"
        );
        let mut body = r.into_reader();
        let mut next_pause = THROTTLE_EVERY;
        loop {
            let n = body.read(&mut buf).context("GET files: reading the body")?;
            if n == 0 {
                break;
            }
            check.feed(&buf[..n])?;
            if throttle && check.pos >= next_pause {
                std::thread::sleep(THROTTLE_PAUSE);
                next_pause += THROTTLE_EVERY;
            }
        }
        let took = t0.elapsed();
        check.finish(size)?;
        Ok(took)
    }
}

fn ureq_error(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        other => anyhow::Error::new(other),
    }
}

// ---------------------------------------------------------------- content

/// What a file holds: noise that is a pure function of the offset, or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Noise,
    Zeros,
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Content {
    /// The byte at `offset`.
    fn byte(self, offset: u64) -> u8 {
        match self {
            Content::Noise => splitmix64(offset / 8).to_le_bytes()[(offset % 8) as usize],
            Content::Zeros => 0,
        }
    }
}

/// Writes `bytes` of [`Content::Noise`] to a new file, a MiB at a time.
fn write_noise(path: &Path, bytes: u64) -> Result<()> {
    let mut f = File::create(path)?;
    let mut block = vec![0u8; MIB as usize];
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(MIB) as usize;
        for (i, w) in block[..n].chunks_mut(8).enumerate() {
            let word = splitmix64(at / 8 + i as u64).to_le_bytes();
            w.copy_from_slice(&word[..w.len()]);
        }
        f.write_all(&block[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Counts a stream and checks one byte in every [`CHECK_STRIDE`].
struct Check {
    content: Content,
    pos: u64,
}

impl Check {
    fn new(content: Content) -> Check {
        Check { content, pos: 0 }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let end = self.pos + chunk.len() as u64;
        let mut o = self.pos.div_ceil(CHECK_STRIDE) * CHECK_STRIDE;
        while o < end {
            let got = chunk[(o - self.pos) as usize];
            let want = self.content.byte(o);
            ensure!(
                got == want,
                "byte {o} read back is {got:#04x}, not {want:#04x}"
            );
            o += CHECK_STRIDE;
        }
        self.pos = end;
        Ok(())
    }

    fn finish(&self, size: u64) -> Result<()> {
        ensure!(self.pos == size, "read back {} bytes, not {size}", self.pos);
        Ok(())
    }
}

/// Checks an uploaded file on the host: its size, and a byte in every MiB.
fn check_file(path: &Path, size: u64) -> Result<()> {
    let f = File::open(path).with_context(|| format!("{}", path.display()))?;
    let len = f.metadata()?.len();
    ensure!(len == size, "{} is {len} bytes, not {size}", path.display());
    let mut b = [0u8; 1];
    let mut o = 7;
    while o < size {
        f.read_exact_at(&mut b, o)?;
        ensure!(
            b[0] == Content::Noise.byte(o),
            "{}: byte {o} differs from what was sent",
            path.display()
        );
        o += MIB + 13;
    }
    Ok(())
}

// ---------------------------------------------------------------- memory

/// Samples a process's VmRSS on a thread of its own until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut n) = (0u64, 0usize);
            while !flag.load(Ordering::Relaxed) {
                if let Some(kib) = procfs::status_kib(pid, "VmRSS") {
                    peak = peak.max(kib);
                    n += 1;
                }
                std::thread::sleep(RSS_SAMPLE_EVERY);
            }
            (peak, n)
        });
        RssSampler { stop, thread }
    }

    /// The highest VmRSS seen (KiB) and the number of samples.
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

/// The daemon's memory around downloads.
#[derive(Debug, Clone, Copy)]
struct RssWatch {
    before: Rss,
    peak_rss_kib: u64,
    samples: usize,
    after: Rss,
    /// Bytes downloaded while watching.
    bytes: u64,
    took: Duration,
}

impl RssWatch {
    fn growth_mib(&self) -> f64 {
        mib(self.peak_rss_kib.max(self.before.rss_kib) - self.before.rss_kib)
    }

    fn target_mib() -> f64 {
        INITIAL_WINDOW as f64 / MIB as f64 + TARGET_RSS_SLACK_MIB
    }

    fn pass(&self) -> bool {
        self.growth_mib() <= Self::target_mib()
    }

    fn to_json(self) -> Value {
        json!({
            "vm_rss_kib_before": self.before.rss_kib,
            "vm_rss_kib_peak": self.peak_rss_kib,
            "vm_rss_kib_after": self.after.rss_kib,
            "vm_hwm_kib_before": self.before.hwm_kib,
            "vm_hwm_kib_after": self.after.hwm_kib,
            "growth_mib": round3(self.growth_mib()),
            "samples": self.samples,
            "bytes": self.bytes,
            "seconds": round3(self.took.as_secs_f64()),
            "target": {"growth_mib_max": Self::target_mib(), "pass": self.pass()},
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------- CPU time

/// CPU time used by each process on the path.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// This program (the HTTP client, or the direct AgentClient).
    client: Duration,
    daemon: Duration,
    /// fc-double's vsock bridge.
    bridge: Duration,
    agent: Duration,
}

impl CpuUse {
    fn total(&self) -> Duration {
        self.client + self.daemon + self.bridge + self.agent
    }

    fn since(&self, before: &CpuUse) -> CpuUse {
        CpuUse {
            client: self.client.saturating_sub(before.client),
            daemon: self.daemon.saturating_sub(before.daemon),
            bridge: self.bridge.saturating_sub(before.bridge),
            agent: self.agent.saturating_sub(before.agent),
        }
    }

    fn add(&mut self, o: &CpuUse) {
        self.client += o.client;
        self.daemon += o.daemon;
        self.bridge += o.bridge;
        self.agent += o.agent;
    }

    fn to_json(self, n: usize) -> Value {
        let ms = |d: Duration| round3(d.as_secs_f64() * 1e3 / n.max(1) as f64);
        json!({
            "client_ms": ms(self.client),
            "daemon_ms": ms(self.daemon),
            "fc_double_ms": ms(self.bridge),
            "agent_ms": ms(self.agent),
            "total_ms": ms(self.total()),
        })
    }
}

/// The processes whose CPU time is counted.
struct Procs {
    daemon: u32,
    bridge: Option<u32>,
    agent: u32,
}

impl Procs {
    fn sample(&self) -> CpuUse {
        let t = |pid: u32| procfs::cpu_time(pid).unwrap_or_default();
        CpuUse {
            client: t(std::process::id()),
            daemon: t(self.daemon),
            bridge: self.bridge.map(t).unwrap_or_default(),
            agent: t(self.agent),
        }
    }

    /// Runs `f`, adding the CPU time each process used meanwhile to `acc`.
    fn count<T>(&self, acc: &mut CpuUse, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.sample();
        let r = f()?;
        acc.add(&self.sample().since(&before));
        Ok(r)
    }
}

// ---------------------------------------------------------------- the double part

/// The run's directory, the daemon and the host agent.
struct FcEnv {
    h: Harness,
    root: PathBuf,
    agent: HostAgent,
}

impl FcEnv {
    fn new(args: &Args, bins: &Binaries) -> Result<FcEnv> {
        let mut h = Harness::new(
            args.tmp_dir.as_deref(),
            "ae-agentio-",
            &["rootfs", "kernels", "initramfs", "disks", "files"],
        )?;
        let root = h.root().to_path_buf();
        std::fs::write(
            root.join("kernels/vmlinux"),
            b"not a kernel: fc-double only opens it",
        )?;
        File::create(root.join("disks/root.img"))?.set_len(MIB)?;
        let sock = root.join("agent.sock");
        // The double, told to bridge guest vsock port 10789 to the agent.
        let wrapper = root.join("fc-agent");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --vsock-agent '{VSOCK_PORT}={}' \"$@\"\n",
                bins.fc_double.display(),
                sock.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        h.write_config(
            "agent_io",
            &daemon::Config {
                vmm: Vmm::Firecracker(wrapper),
                rootfs_root: root.join("rootfs"),
                kernel_root: root.join("kernels"),
                initramfs_root: root.join("initramfs"),
                default_kernel: None,
                default_initrd: None,
                memory_mib_per_slot: MEMORY_MIB_PER_SLOT,
                default_disk_size_gib: 1,
                max_memory_mib: None,
                direct_disk_roots: vec![root.join("disks")],
                startup_timeout_ms: 10000,
                request_timeout_ms: 10000,
            },
        )?;
        let agent = HostAgent::start(&bins.guest, &sock, &root.join("agent.log"))?;
        Ok(FcEnv { h, root, agent })
    }
}

/// The ways the same work is done.
const SIDES: [&str; 3] = ["daemon", "bridge", "direct"];

/// Samples of one measurement, indexed like [`SIDES`]: through the daemon,
/// through fc-double's vsock bridge only, straight to the agent.
#[derive(Debug, Default)]
struct Sides([Vec<Duration>; 3]);

impl Sides {
    fn daemon(&self) -> &[Duration] {
        &self.0[0]
    }

    fn bridge(&self) -> &[Duration] {
        &self.0[1]
    }

    fn direct(&self) -> &[Duration] {
        &self.0[2]
    }

    fn push(&mut self, t: [Duration; 3]) {
        for (v, t) in self.0.iter_mut().zip(t) {
            v.push(t);
        }
    }
}

/// Throughputs in MB/s (10^6 bytes per second) of `bytes` moved in each time.
fn throughputs(bytes: u64, times: &[Duration]) -> Vec<f64> {
    times
        .iter()
        .map(|t| bytes as f64 / t.as_secs_f64() / 1e6)
        .collect()
}

/// Median, minimum and maximum.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: s[0],
            max: s[n - 1],
        })
    }

    fn to_json(self) -> Value {
        json!({"median": round3(self.median), "min": round3(self.min), "max": round3(self.max)})
    }
}

/// Transfer throughputs, each side.
struct Rates {
    daemon: Spread,
    bridge: Spread,
    direct: Spread,
}

impl Rates {
    fn of(bytes: u64, p: &Sides) -> Option<Rates> {
        Some(Rates {
            daemon: Spread::of(&throughputs(bytes, p.daemon()))?,
            bridge: Spread::of(&throughputs(bytes, p.bridge()))?,
            direct: Spread::of(&throughputs(bytes, p.direct()))?,
        })
    }

    fn ratio(&self) -> f64 {
        self.daemon.median / self.direct.median
    }

    fn pass(&self) -> bool {
        self.ratio() >= TARGET_FILE_RATIO
    }

    fn to_json(&self) -> Value {
        json!({
            "daemon_mb_s": self.daemon.to_json(),
            "bridge_mb_s": self.bridge.to_json(),
            "direct_mb_s": self.direct.to_json(),
            "ratio": round3(self.ratio()),
            "target": {"ratio_min": TARGET_FILE_RATIO, "pass": self.pass()},
        })
    }
}

/// What the part against the double measured.
#[derive(Debug, Default)]
struct FcReport {
    ready: Duration,
    exec: Sides,
    file_bytes: u64,
    upload: Sides,
    download: Sides,
    /// CPU time used during the timed transfers: [upload, download] × the
    /// [`SIDES`], summed over the runs.
    cpu: [[CpuUse; 3]; 2],
    /// Whether fc-double's process was found (its CPU time is then counted).
    bridge_found: bool,
    rss: Option<RssWatch>,
    /// The daemon's memory before and after all the timed transfers.
    rss_idle: Option<(Rss, Rss)>,
}

/// Runs the three sides once each, starting with side `i % 3`; the times
/// come back in the sides' order.
fn rotated(i: usize, sides: [&mut dyn FnMut() -> Result<Duration>; 3]) -> Result<[Duration; 3]> {
    let mut out = [Duration::ZERO; 3];
    for k in 0..3 {
        let j = (i + k) % 3;
        out[j] = sides[j]()?;
    }
    Ok(out)
}

fn create_ready(api: &mut Client, body: &Value) -> Result<Duration> {
    let t0 = Instant::now();
    let r = api
        .request_json("POST", "/v1/vm", body)
        .context("POST /v1/vm")?;
    let took = t0.elapsed();
    ensure!(
        r.status == 201,
        "POST /v1/vm: HTTP {}: {}",
        r.status,
        r.text()
    );
    let v = r.json()?;
    ensure!(
        v["state"] == "running" && v["ready"] == true,
        "the VM is not running with a ready agent: {v}"
    );
    Ok(took)
}

fn run_fc(env: &mut FcEnv, bins: &Binaries, p: &Params) -> Result<FcReport> {
    let mut rep = FcReport {
        file_bytes: p.file_bytes,
        ..FcReport::default()
    };
    progress(&format!(
        "temp dir {} ({}); starting the daemon",
        env.root.display(),
        env.h.fs()
    ));
    let d = env
        .h
        .start_daemon(&bins.agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
    progress(&format!("daemon pid {} on http://{}", d.pid, d.addr));
    let mut via = ViaDaemon::new(d, "io");
    let disk = env.root.join("disks/root.img");
    rep.ready = create_ready(
        &mut via.api,
        &json!({"vm_id": "io", "disk": {"kind": "direct", "path": disk},
                "wait_ready": true, "wait_ready_timeout_s": READY_TIMEOUT_S}),
    )?;
    let rt = Arc::new(tokio::runtime::Runtime::new()?);
    // The VM's vsock device socket, which fc-double serves (the daemon has
    // its own connection on it; each connection is bridged separately).
    let vsock = env.root.join("sessions/io").join(AGENT_SOCKET);
    let bridge = AgentSide::connect(
        rt.clone(),
        AgentChannel::HybridVsock {
            socket: vsock,
            port: VSOCK_PORT,
        },
        "bridge",
    )?;
    let direct = AgentSide::connect(rt, AgentChannel::Stream(env.agent.socket.clone()), "direct")?;

    // Exec round trips.
    progress(&format!(
        "exec: {} round trips of `true` (+{} warm-up) per side, interleaved",
        p.execs, p.warmup
    ));
    for i in 0..(p.warmup + p.execs) {
        signals::check()?;
        let t = rotated(
            i,
            [
                &mut || via.exec_true(),
                &mut || bridge.exec_true(),
                &mut || direct.exec_true(),
            ],
        )?;
        if i >= p.warmup {
            rep.exec.push(t);
        }
    }

    // The daemon's memory during a long download that the client reads slowly.
    progress(&format!(
        "memory: the daemon's VmRSS during a {} MiB download (sparse file; the client \
         stops reading for {} ms every {} MiB)",
        p.rss_bytes / MIB,
        THROTTLE_PAUSE.as_millis(),
        THROTTLE_EVERY / MIB
    ));
    let files = env.root.join("files");
    let sparse = files.join("sparse.bin");
    File::create(&sparse)?.set_len(p.rss_bytes)?;
    let sparse_s = sparse.display().to_string();
    // Warm the path (connection pool, buffers) so the growth is the download's.
    via.get(&sparse_s, p.rss_bytes, Content::Zeros, false)?;
    signals::check()?;
    let before = via.rss()?;
    let sampler = RssSampler::start(via.pid);
    let took = via.get(&sparse_s, p.rss_bytes, Content::Zeros, true);
    let (peak, samples) = sampler.finish();
    let took = took?;
    rep.rss = Some(RssWatch {
        before,
        peak_rss_kib: peak,
        samples,
        after: via.rss()?,
        bytes: p.rss_bytes,
        took,
    });
    std::fs::remove_file(&sparse)?;

    // File throughput, each way.
    progress(&format!(
        "files: writing a {} MiB source file",
        p.file_bytes / MIB
    ));
    let src = files.join("src.bin");
    let warm = files.join("warm.bin");
    write_noise(&src, p.file_bytes)?;
    write_noise(&warm, WARMUP_FILE_BYTES)?;
    let src_s = src.display().to_string();
    let warm_s = warm.display().to_string();
    let up = SIDES.map(|side| files.join(format!("up-{side}.bin")));
    let up_daemon_s = up[0].display().to_string();
    // Warm-up: one small file each way on each side.
    via.put(&warm_s, &up_daemon_s, WARMUP_FILE_BYTES)?;
    bridge.put(&warm, &up[1], WARMUP_FILE_BYTES)?;
    direct.put(&warm, &up[2], WARMUP_FILE_BYTES)?;
    via.get(&warm_s, WARMUP_FILE_BYTES, Content::Noise, false)?;
    bridge.get(&warm, WARMUP_FILE_BYTES, Content::Noise)?;
    direct.get(&warm, WARMUP_FILE_BYTES, Content::Noise)?;
    std::fs::remove_file(&warm)?;
    let idle_before = via.rss()?;
    progress(&format!(
        "files: {} × {} MiB each way per side, interleaved",
        p.file_runs,
        p.file_bytes / MIB
    ));
    let procs = Procs {
        daemon: via.pid,
        bridge: procfs::processes_mentioning(&env.root)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("fc-double"))
            .map(|(pid, _)| pid),
        agent: env.agent.pid(),
    };
    rep.bridge_found = procs.bridge.is_some();
    let [mut cpu_up, mut cpu_down] = rep.cpu;
    let n = p.file_bytes;
    for i in 0..p.file_runs {
        signals::check()?;
        let [c0, c1, c2] = &mut cpu_up;
        let t = rotated(
            i,
            [
                &mut || procs.count(c0, || via.put(&src_s, &up_daemon_s, n)),
                &mut || procs.count(c1, || bridge.put(&src, &up[1], n)),
                &mut || procs.count(c2, || direct.put(&src, &up[2], n)),
            ],
        )?;
        for f in &up {
            check_file(f, n)?;
        }
        rep.upload.push(t);
        signals::check()?;
        let [c0, c1, c2] = &mut cpu_down;
        let t = rotated(
            i,
            [
                &mut || procs.count(c0, || via.get(&src_s, n, Content::Noise, false)),
                &mut || procs.count(c1, || bridge.get(&src, n, Content::Noise)),
                &mut || procs.count(c2, || direct.get(&src, n, Content::Noise)),
            ],
        )?;
        rep.download.push(t);
        progress(&format!("  {}/{}", i + 1, p.file_runs));
    }
    rep.cpu = [cpu_up, cpu_down];
    rep.rss_idle = Some((idle_before, via.rss()?));
    std::fs::remove_file(&src)?;
    for f in &up {
        std::fs::remove_file(f)?;
    }
    bridge.client.shutdown();
    direct.client.shutdown();
    Ok(rep)
}

// ---------------------------------------------------------------- the QEMU part

/// What the QEMU part measured, through the daemon only.
#[derive(Debug, Default)]
struct QemuReport {
    qemu_version: String,
    ready: Duration,
    exec: Vec<Duration>,
    file_bytes: u64,
    upload: Vec<Duration>,
    download: Vec<Duration>,
    rss: Option<RssWatch>,
}

enum QemuOutcome {
    NotRun,
    Skipped(String),
    Done(Box<QemuReport>, Cleanup),
    Failed { error: String, cleanup: Cleanup },
}

/// Why the QEMU part cannot run here, if it cannot.
fn qemu_preflight(args: &Args) -> Result<(PathBuf, PathBuf), String> {
    let qemu = find_in_path("qemu-system-x86_64")
        .ok_or("qemu-system-x86_64 not found in PATH (Debian: apt-get install qemu-system-x86)")?;
    if find_in_path("mkfs.ext4").is_none() {
        return Err("mkfs.ext4 not found (the daemon makes overlays with it)".into());
    }
    let art = args
        .artifacts
        .clone()
        .unwrap_or_else(|| daemon::workspace().join("artifacts"));
    let missing: Vec<String> = [
        "kernels/vmlinuz".to_string(),
        "initramfs/initrd.img".to_string(),
        format!("rootfs/{QEMU_ROOTFS}"),
    ]
    .into_iter()
    .filter(|f| !art.join(f).is_file())
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "guest artifacts missing in {}: {}; build them with \
             `scripts/build-artifacts.sh --output artifacts`",
            art.display(),
            missing.join(", ")
        ));
    }
    // The rootfs must carry the agent (older images do not).
    if let Some(debugfs) = find_in_path("debugfs") {
        let out = Command::new(debugfs)
            .args(["-R", "stat /usr/sbin/agentenv-guest"])
            .arg(art.join("rootfs").join(QEMU_ROOTFS))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run debugfs: {e}"))?;
        if !String::from_utf8_lossy(&out.stdout).contains("Inode:") {
            return Err(format!(
                "rootfs/{QEMU_ROOTFS} has no /usr/sbin/agentenv-guest (rebuild it with \
                 scripts/build-artifacts.sh)"
            ));
        }
    }
    let art = std::fs::canonicalize(&art).map_err(|e| format!("{}: {e}", art.display()))?;
    Ok((qemu, art))
}

fn run_qemu_part(args: &Args, bins: &Binaries, p: &Params) -> QemuOutcome {
    let (qemu, art) = match qemu_preflight(args) {
        Ok(x) => x,
        Err(why) => {
            progress(&format!("qemu: skipped: {why}"));
            return QemuOutcome::Skipped(why);
        }
    };
    let mut h = match Harness::new(args.tmp_dir.as_deref(), "ae-agentio-q-", &["files"]) {
        Ok(h) => h,
        Err(e) => {
            return QemuOutcome::Failed {
                error: format!("setting up: {e:#}"),
                cleanup: Cleanup::default(),
            }
        }
    };
    let result = (|| {
        h.write_config(
            "agent_io",
            &daemon::Config {
                vmm: Vmm::Qemu(qemu.clone()),
                rootfs_root: art.join("rootfs"),
                kernel_root: art.join("kernels"),
                initramfs_root: art.join("initramfs"),
                default_kernel: Some("vmlinuz".into()),
                default_initrd: Some("initrd.img".into()),
                memory_mib_per_slot: MEMORY_MIB_PER_SLOT,
                default_disk_size_gib: 2,
                max_memory_mib: None,
                direct_disk_roots: Vec::new(),
                startup_timeout_ms: 30000,
                request_timeout_ms: 30000,
            },
        )?;
        run_qemu(&mut h, bins, p, args.boot_timeout_s, &qemu)
    })();
    if result.is_err() && signals::received().is_none() {
        let tail = h.daemon_log_tail(20);
        if !tail.is_empty() {
            eprintln!("--- last lines of the QEMU daemon's log ---\n{tail}\n---");
        }
    }
    let cleanup = h.teardown(args.keep);
    match result {
        Ok(r) => QemuOutcome::Done(Box::new(r), cleanup),
        Err(e) => QemuOutcome::Failed {
            error: format!("{e:#}"),
            cleanup,
        },
    }
}

fn run_qemu(
    h: &mut Harness,
    bins: &Binaries,
    p: &Params,
    boot_timeout_s: u64,
    qemu: &Path,
) -> Result<QemuReport> {
    let mut rep = QemuReport {
        qemu_version: Command::new(qemu)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "version unknown".into()),
        file_bytes: p.qemu_file_bytes,
        ..QemuReport::default()
    };
    let root = h.root().to_path_buf();
    progress(&format!(
        "qemu: temp dir {}; starting the daemon",
        root.display()
    ));
    let d = h.start_daemon(&bins.agentenv, IO_TIMEOUT, HEALTH_TIMEOUT)?;
    let mut via = ViaDaemon::new(d, "q1");
    progress("qemu: booting a guest (create with wait_ready)");
    rep.ready = create_ready(
        &mut via.api,
        &json!({"vm_id": "q1", "disk": {"kind": "overlay", "rootfs_id": QEMU_ROOTFS},
                "wait_ready": true, "wait_ready_timeout_s": boot_timeout_s}),
    )?;
    progress(&format!(
        "qemu: ready after {:.1} s; {} execs of `true` (+{} warm-up)",
        rep.ready.as_secs_f64(),
        p.execs,
        p.warmup
    ));
    for i in 0..(p.warmup + p.execs) {
        signals::check()?;
        let t = via.exec_true()?;
        if i >= p.warmup {
            rep.exec.push(t);
        }
    }
    let src = root.join("files/src.bin");
    write_noise(&src, p.qemu_file_bytes)?;
    let src_s = src.display().to_string();
    // On the guest's overlay disk (its /tmp may be in its RAM).
    let guest = "/root/agent-io.bin";
    progress(&format!(
        "qemu: files: {} × {} MiB each way",
        p.file_runs,
        p.qemu_file_bytes / MIB
    ));
    let mut before = None;
    let mut peak = (0u64, 0usize);
    let mut down_total = Duration::ZERO;
    for i in 0..p.file_runs {
        signals::check()?;
        rep.upload.push(via.put(&src_s, guest, p.qemu_file_bytes)?);
        signals::check()?;
        if before.is_none() {
            before = Some(via.rss()?);
        }
        let sampler = RssSampler::start(via.pid);
        let took = via.get(guest, p.qemu_file_bytes, Content::Noise, false);
        let (pk, n) = sampler.finish();
        let took = took?;
        peak = (peak.0.max(pk), peak.1 + n);
        down_total += took;
        rep.download.push(took);
        progress(&format!("  {}/{}", i + 1, p.file_runs));
    }
    rep.rss = Some(RssWatch {
        before: before.context("no download ran")?,
        peak_rss_kib: peak.0,
        samples: peak.1,
        after: via.rss()?,
        bytes: p.qemu_file_bytes * p.file_runs as u64,
        took: down_total,
    });
    std::fs::remove_file(&src)?;
    Ok(rep)
}

// ---------------------------------------------------------------- cleanup

fn cleanup_summary(c: &Cleanup) -> String {
    c.summary(&format!(
        "deleted {} VMs; daemon stopped by SIGTERM in {:.2} s ({}); {} leftover processes; ",
        c.deleted,
        c.daemon_stop_s,
        c.daemon_exit.as_deref().unwrap_or("not running"),
        c.leftover.len(),
    ))
}

// ---------------------------------------------------------------- output

struct Report {
    fc: FcReport,
    fc_cleanup: Cleanup,
    files_fs: String,
    qemu: QemuOutcome,
    wall: Duration,
    load: (f64, f64),
}

/// Exec latencies, each side.
struct ExecRow {
    d: Summary,
    v: Summary,
    b: Summary,
    /// Median over the rounds of (daemon − direct) within the round, ms: less
    /// sensitive than the difference of the p50s to the load changing.
    paired: f64,
}

impl ExecRow {
    fn of(p: &Sides) -> Option<ExecRow> {
        let mut diffs: Vec<f64> = p
            .daemon()
            .iter()
            .zip(p.direct())
            .map(|(d, b)| (d.as_secs_f64() - b.as_secs_f64()) * 1e3)
            .collect();
        diffs.sort_by(f64::total_cmp);
        Some(ExecRow {
            d: Summary::of(p.daemon())?,
            v: Summary::of(p.bridge())?,
            b: Summary::of(p.direct())?,
            paired: Spread::of(&diffs)?.median,
        })
    }

    fn overhead(&self) -> f64 {
        self.d.p50 - self.b.p50
    }

    fn pass(&self) -> bool {
        self.overhead() <= TARGET_EXEC_OVERHEAD_P50_MS
    }
}

impl Report {
    fn cleanups(&self) -> Vec<(&'static str, &Cleanup)> {
        let mut v = vec![("fc-double", &self.fc_cleanup)];
        match &self.qemu {
            QemuOutcome::Done(_, c) | QemuOutcome::Failed { cleanup: c, .. } => v.push(("qemu", c)),
            QemuOutcome::NotRun | QemuOutcome::Skipped(_) => {}
        }
        v
    }

    fn targets(&self) -> Vec<(&'static str, bool)> {
        let mut t = Vec::new();
        if let Some(r) = ExecRow::of(&self.fc.exec) {
            t.push(("exec_overhead", r.pass()));
        }
        if let Some(r) = Rates::of(self.fc.file_bytes, &self.fc.upload) {
            t.push(("upload_ratio", r.pass()));
        }
        if let Some(r) = Rates::of(self.fc.file_bytes, &self.fc.download) {
            t.push(("download_ratio", r.pass()));
        }
        if let Some(r) = &self.fc.rss {
            t.push(("rss_growth", r.pass()));
        }
        if let QemuOutcome::Done(q, _) = &self.qemu {
            if let Some(r) = &q.rss {
                t.push(("qemu_rss_growth", r.pass()));
            }
        }
        t
    }

    fn to_json(&self, bins: &Binaries, p: &Params) -> Value {
        let fc = &self.fc;
        let exec = ExecRow::of(&fc.exec).map_or(Value::Null, |r| {
            json!({
                "daemon": r.d.to_json(),
                "bridge": r.v.to_json(),
                "direct": r.b.to_json(),
                "overhead_p50_ms": round3(r.overhead()),
                "bridge_overhead_p50_ms": round3(r.v.p50 - r.b.p50),
                "paired_overhead_median_ms": round3(r.paired),
                "overhead_p99_ms": round3(r.d.p99 - r.b.p99),
                "target": {"overhead_p50_ms_max": TARGET_EXEC_OVERHEAD_P50_MS, "pass": r.pass()},
            })
        });
        let rates =
            |pair: &Sides| Rates::of(fc.file_bytes, pair).map_or(Value::Null, |r| r.to_json());
        let rss =
            |r: Option<Rss>| r.map(|r| json!({"vm_rss_kib": r.rss_kib, "vm_hwm_kib": r.hwm_kib}));
        let qemu = match &self.qemu {
            QemuOutcome::NotRun => json!({"run": false}),
            QemuOutcome::Skipped(why) => json!({"run": false, "skipped": why}),
            QemuOutcome::Failed { error, cleanup } => {
                json!({"run": true, "error": error, "cleanup": cleanup.to_json()})
            }
            QemuOutcome::Done(q, cleanup) => {
                let mbs = |v: &[Duration]| {
                    Spread::of(&throughputs(q.file_bytes, v)).map_or(Value::Null, |s| s.to_json())
                };
                json!({
                    "run": true,
                    "baseline": "none: the daemon holds the VM's virtio-serial socket",
                    "qemu": q.qemu_version,
                    "create_to_ready_s": round3(q.ready.as_secs_f64()),
                    "exec_true": Summary::of(&q.exec).map(|s| s.to_json()),
                    "file_bytes": q.file_bytes,
                    "upload_mb_s": mbs(&q.upload),
                    "download_mb_s": mbs(&q.download),
                    "memory_during_downloads": q.rss.map(RssWatch::to_json),
                    "cleanup": cleanup.to_json(),
                })
            }
        };
        let targets = self.targets();
        json!({
            "benchmark": "agent_io",
            "params": {
                "execs": p.execs,
                "warmup": p.warmup,
                "file_bytes": p.file_bytes,
                "file_runs": p.file_runs,
                "rss_download_bytes": p.rss_bytes,
                "qemu_file_bytes": p.qemu_file_bytes,
            },
            "host": HostInfo::read().to_json(),
            "temp_dir_fs": self.files_fs,
            "binaries": {
                "agentenv": bins.agentenv,
                "fc_double": bins.fc_double,
                "agentenv_guest": bins.guest,
            },
            "create_to_ready_s": round3(fc.ready.as_secs_f64()),
            "exec_true": exec,
            "upload": rates(&fc.upload),
            "download": rates(&fc.download),
            "cpu_per_transfer": {
                "upload": cpu_json(&fc.cpu[0], &fc.upload),
                "download": cpu_json(&fc.cpu[1], &fc.download),
            },
            "memory": {
                "during_slow_download": fc.rss.map(RssWatch::to_json),
                "before_file_transfers": rss(fc.rss_idle.map(|r| r.0)),
                "after_file_transfers": rss(fc.rss_idle.map(|r| r.1)),
            },
            "qemu": qemu,
            "targets": targets.iter().map(|(n, ok)| json!({"name": n, "pass": ok})).collect::<Vec<_>>(),
            "targets_met": targets.iter().filter(|(_, ok)| *ok).count(),
            "targets_total": targets.len(),
            "wall_s": round3(self.wall.as_secs_f64()),
            "loadavg_1min": {"start": self.load.0, "end": self.load.1},
            "cleanup": self.fc_cleanup.to_json(),
        })
    }

    fn to_text(&self, bins: &Binaries, p: &Params) -> String {
        let mut o = String::new();
        let w = &mut o;
        let host = HostInfo::read();
        let fc = &self.fc;
        let _ = writeln!(
            w,
            "\nagentenv agent I/O: through the daemon vs straight to the agent, same run"
        );
        let _ = writeln!(w, "  host      {host}");
        let _ = writeln!(
            w,
            "  daemon    {}, VMM {} bridging guest vsock port {VSOCK_PORT} to the agent",
            bins.agentenv.display(),
            bins.fc_double.display()
        );
        let _ = writeln!(
            w,
            "  agent     {} --listen-unix, on the host",
            bins.guest.display()
        );
        let _ = writeln!(
            w,
            "  files     in the run's temp dir on {} (the agent fsyncs every upload before renaming it)",
            self.files_fs
        );
        let _ = writeln!(
            w,
            "  run       {} execs (+{} warm-up) and {} × {} MiB each way per side, the three \
             sides interleaved, order rotating; {:.0} s in all",
            p.execs,
            p.warmup,
            p.file_runs,
            p.file_bytes / MIB,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(
            w,
            "{}",
            host.load_line(
                self.load,
                " (the machine was busy: expect noisy figures, p99 above all)"
            )
        );
        let _ = writeln!(
            w,
            "  sides     daemon = the HTTP API (HTTP, engine, fc-double's vsock bridge, agent)\n\
             \x20           bridge = this program's AgentClient (the daemon's client code) through \
             fc-double's\n\
             \x20                    hybrid vsock: the daemon's path without HTTP and engine\n\
             \x20           direct = the same AgentClient on the agent's own Unix socket: the \
             baseline"
        );
        let _ = writeln!(
            w,
            "  VM        POST /v1/vm with wait_ready answered in {:.3} s\n",
            fc.ready.as_secs_f64()
        );

        let _ = writeln!(
            w,
            "{:<16} {:>17} {:>17} {:>17} {:>17} {:>9}  target",
            "exec `true` (ms)", "daemon", "bridge", "direct", "daemon/direct", "overhead"
        );
        let _ = writeln!(
            w,
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            "", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "p50"
        );
        if let Some(r) = ExecRow::of(&fc.exec) {
            let _ = writeln!(
                w,
                "{:<16} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7.2}x {:>7.2}x {:>+9.3}  \
                 ≤ {} ms   {}",
                "round trip",
                r.d.p50,
                r.d.p99,
                r.v.p50,
                r.v.p99,
                r.b.p50,
                r.b.p99,
                r.d.p50 / r.b.p50,
                r.d.p99 / r.b.p99,
                r.overhead(),
                TARGET_EXEC_OVERHEAD_P50_MS,
                pass(r.pass())
            );
            let _ = writeln!(
                w,
                "  overhead at p50: {:+.3} ms in fc-double's vsock bridge, {:+.3} ms in HTTP and \
                 the engine;\n  median of the per-round differences daemon − direct: {:+.3} ms",
                r.v.p50 - r.b.p50,
                r.d.p50 - r.v.p50,
                r.paired
            );
        }

        let _ = writeln!(
            w,
            "\n{:<16} {:>17} {:>17} {:>17} {:>17}  target",
            format!("files, {} MiB", p.file_bytes / MIB),
            "daemon MB/s",
            "bridge MB/s",
            "direct MB/s",
            "daemon/direct"
        );
        for (name, pair) in [("upload", &fc.upload), ("download", &fc.download)] {
            if let Some(r) = Rates::of(fc.file_bytes, pair) {
                let _ = writeln!(
                    w,
                    "{:<16} {:>17.1} {:>17.1} {:>17.1} {:>16.2}x  ≥ {TARGET_FILE_RATIO}×   {}",
                    name,
                    r.daemon.median,
                    r.bridge.median,
                    r.direct.median,
                    r.ratio(),
                    pass(r.pass())
                );
                let range = |s: Spread| format!("{:.0} – {:.0}", s.min, s.max);
                let _ = writeln!(
                    w,
                    "{:<16} {:>17} {:>17} {:>17} {:>16.2}x  (bridge/direct)",
                    "  min – max",
                    range(r.daemon),
                    range(r.bridge),
                    range(r.direct),
                    r.bridge.median / r.direct.median
                );
            }
        }
        let _ = writeln!(
            w,
            "  median of {} runs; MB = 10^6 bytes; an upload is timed to the answer (the file \
             fsynced and in place), a download to its last byte",
            p.file_runs
        );

        let _ = writeln!(
            w,
            "\n{:<24} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
            "CPU per transfer (ms)", "wall", "client", "daemon", "fc-double", "agent", "total"
        );
        for (i, (dir, pair)) in [("upload", &fc.upload), ("download", &fc.download)]
            .into_iter()
            .enumerate()
        {
            for (j, side) in SIDES.iter().enumerate() {
                let times = &pair.0[j];
                let n = times.len().max(1) as f64;
                let c = fc.cpu[i][j];
                let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
                let _ = writeln!(
                    w,
                    "{:<24} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0} {:>8.0}",
                    format!("{dir}, {side}"),
                    ms(times.iter().sum()),
                    ms(c.client),
                    ms(c.daemon),
                    ms(c.bridge),
                    ms(c.agent),
                    ms(c.total())
                );
            }
        }
        let _ = writeln!(
            w,
            "  mean per transfer, user + system, from /proc/PID/stat (10 ms ticks); {} CPUs{}",
            host.cpus,
            if fc.bridge_found {
                ""
            } else {
                "; fc-double's process was not found (its column is 0)"
            }
        );

        if let Some(r) = fc.rss {
            let _ = writeln!(
                w,
                "\ndaemon memory during a {} MiB download (a sparse file; the client stops reading \
                 for {} ms every {} MiB)",
                r.bytes / MIB,
                THROTTLE_PAUSE.as_millis(),
                THROTTLE_EVERY / MIB
            );
            rss_lines(w, &r);
            let _ = writeln!(
                w,
                "  {:<30} {:.2} s, {:.0} MB/s (pauses included)",
                "download",
                r.took.as_secs_f64(),
                r.bytes as f64 / r.took.as_secs_f64() / 1e6
            );
        }
        if let Some((a, b)) = fc.rss_idle {
            let _ = writeln!(
                w,
                "  {:<30} {:.1} MiB before, {:.1} MiB after (VmHWM {:.1} MiB)",
                "VmRSS around the file runs",
                mib(a.rss_kib),
                mib(b.rss_kib),
                mib(b.hwm_kib)
            );
        }

        let _ = writeln!(w);
        match &self.qemu {
            QemuOutcome::NotRun => {
                let _ = writeln!(w, "QEMU guest: not run (pass --qemu)");
            }
            QemuOutcome::Skipped(why) => {
                let _ = writeln!(w, "QEMU guest: skipped: {why}");
            }
            QemuOutcome::Failed { error, cleanup } => {
                let _ = writeln!(w, "QEMU guest: FAILED: {error}");
                let _ = writeln!(w, "  cleanup: {}", cleanup_summary(cleanup));
            }
            QemuOutcome::Done(q, cleanup) => {
                let _ = writeln!(
                    w,
                    "QEMU TCG guest, through the daemon only: the daemon holds the VM's \
                     virtio-serial\nsocket, so there is no direct baseline to compare with"
                );
                let _ = writeln!(w, "  {:<30} {}", "qemu", q.qemu_version);
                let _ = writeln!(
                    w,
                    "  {:<30} {:.2} s",
                    "POST /v1/vm → ready (boot)",
                    q.ready.as_secs_f64()
                );
                if let Some(s) = Summary::of(&q.exec) {
                    let _ = writeln!(
                        w,
                        "  {:<30} p50 {:.3} ms, p99 {:.3} ms ({} runs)",
                        "exec `true`", s.p50, s.p99, s.n
                    );
                }
                for (name, v) in [("upload", &q.upload), ("download", &q.download)] {
                    if let Some(s) = Spread::of(&throughputs(q.file_bytes, v)) {
                        let _ = writeln!(
                            w,
                            "  {:<30} {:.1} MB/s (median of {}; {:.1} – {:.1})",
                            format!("{name} {} MiB", q.file_bytes / MIB),
                            s.median,
                            v.len(),
                            s.min,
                            s.max
                        );
                    }
                }
                if let Some(r) = &q.rss {
                    let _ = writeln!(w, "  daemon memory during the downloads (VmRSS before: after the first upload)");
                    rss_lines(w, r);
                }
                let _ = writeln!(w, "  cleanup: {}", cleanup_summary(cleanup));
            }
        }

        let targets = self.targets();
        let met = targets.iter().filter(|(_, ok)| *ok).count();
        let missed: Vec<&str> = targets
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        let _ = writeln!(w, "\ncleanup: {}", cleanup_summary(&self.fc_cleanup));
        let _ = writeln!(
            w,
            "targets: {met} of {} met{} (informational: the exit status does not depend on them)",
            targets.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!("; missed: {}", missed.join(", "))
            }
        );
        o
    }
}

fn cpu_json(cpu: &[CpuUse; 3], times: &Sides) -> Value {
    let mut v = json!({});
    for (j, side) in SIDES.iter().enumerate() {
        let n = times.0[j].len();
        let mut c = cpu[j].to_json(n);
        let wall: Duration = times.0[j].iter().sum();
        c["wall_ms"] = json!(round3(wall.as_secs_f64() * 1e3 / n.max(1) as f64));
        v[*side] = c;
    }
    v
}

fn rss_lines(w: &mut String, r: &RssWatch) {
    let _ = writeln!(
        w,
        "  {:<30} {:.1} MiB",
        "VmRSS before",
        mib(r.before.rss_kib)
    );
    let _ = writeln!(
        w,
        "  {:<30} {:.1} MiB  {:+.1} MiB   ≤ +{:.0} MiB (window {} MiB + {TARGET_RSS_SLACK_MIB})   {}",
        format!("VmRSS peak ({} samples)", r.samples),
        mib(r.peak_rss_kib),
        r.growth_mib(),
        RssWatch::target_mib(),
        INITIAL_WINDOW as u64 / MIB,
        pass(r.pass())
    );
    let _ = writeln!(w, "  {:<30} {:.1} MiB", "VmRSS after", mib(r.after.rss_kib));
    let _ = writeln!(
        w,
        "  {:<30} {:.1} → {:.1} MiB",
        "VmHWM before → after",
        mib(r.before.hwm_kib),
        mib(r.after.hwm_kib)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_files_match_the_checker() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("n.bin");
        let size = 3 * MIB + 5;
        write_noise(&f, size).unwrap();
        check_file(&f, size).unwrap();
        let data = std::fs::read(&f).unwrap();
        assert_eq!(data.len() as u64, size);
        // Fed in odd pieces, the whole file checks out.
        let mut c = Check::new(Content::Noise);
        for piece in data.chunks(7777) {
            c.feed(piece).unwrap();
        }
        c.finish(size).unwrap();
        // A flipped sampled byte is found; a short stream is refused.
        let mut bad = data.clone();
        bad[CHECK_STRIDE as usize * 3] ^= 1;
        let mut c = Check::new(Content::Noise);
        assert!(c.feed(&bad).is_err());
        let mut c = Check::new(Content::Noise);
        c.feed(&data[..100]).unwrap();
        assert!(c.finish(size).is_err());
        assert!(Check::new(Content::Zeros).feed(&data).is_err());
    }

    #[test]
    fn spreads_take_the_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }
}
