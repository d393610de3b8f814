//! `agent_io`: exec and file transfers through the daemon against the same
//! work done straight to the guest agent (and through fc-double's vsock bridge
//! alone), interleaved in one run; the daemon's memory during a slow download;
//! with `--qemu`, the same through the daemon against a real QEMU guest.
//! See `bench/README.md`.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv_bench::args::{Common, Warmup};
use agentenv_bench::daemon::{self, call, find_in_path, Harness, QemuGuest};
use agentenv_bench::procfs::{self, Rss};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, progress, rotated, rounds, Sides};
use agentenv_bench::signals;
use agentenv_bench::stats::{Spread, Summary};
use agentenv_client::{ApiClient, UploadOptions};
use agentenv_core::agent::{AgentLink, ExecEvent};
use agentenv_core::backend::AgentChannel;
use agentenv_core::config::AgentConfig;
use agentenv_core::engine::AGENT_SOCKET;
use agentenv_host::agent::AgentClient;
use agentenv_proto::{ExecRequest, GetFile, PutFile, INITIAL_WINDOW, VSOCK_PORT};
use agentenv_testkit::agent::HostAgent;
use anyhow::{ensure, Context, Result};
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
    #[command(flatten)]
    warmup: Warmup,
    #[command(flatten)]
    common: Common,
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

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    let p = Params {
        execs: args.execs.unwrap_or(c.pick(300, 100)).max(1),
        warmup: args.warmup.get(c, 20, 10),
        file_bytes: args.file_mib.unwrap_or(c.pick(256, 64)).max(1) * MIB,
        file_runs: args.file_runs.unwrap_or(c.pick(6, 3)).max(1),
        rss_bytes: args.rss_mib.unwrap_or(1024).max(1) * MIB,
        qemu_file_bytes: args.qemu_file_mib.unwrap_or(c.pick(64, 16)).max(1) * MIB,
    };
    // Not `agentenv_testkit::paths::guest_agent()`: that one expects to run
    // from target/<profile>/deps (a test) and builds a debug agent.
    let [agentenv, fc_double, guest] = or_exit(
        daemon::find_binaries(
            c.bin_dir.as_deref(),
            ["agentenv", "fc-double", "agentenv-guest"],
            "build them first with:\n\n    \
             cargo build --release -p agentenv -p agentenv-testkit -p agentenv-guest\n",
        ),
        2,
        "",
    );
    let mut rep = Report::new(
        "agentenv agent I/O: through the daemon vs straight to the agent, same run",
        json!({"execs": p.execs, "warmup": p.warmup, "file_bytes": p.file_bytes,
               "file_runs": p.file_runs, "rss_download_bytes": p.rss_bytes,
               "qemu_file_bytes": p.qemu_file_bytes, "qemu": args.qemu}),
    );
    let mut env = or_exit(FcEnv::new(c, &fc_double, &guest), 1, "setting up: ");
    rep.about(
        "daemon",
        format!(
            "{}, VMM {} bridging guest vsock port {VSOCK_PORT} to the agent",
            agentenv.display(),
            fc_double.display()
        ),
    )
    .about(
        "agent",
        format!("{} --listen-unix, on the host", guest.display()),
    )
    .about(
        "files",
        format!(
            "in the run's temp dir on {} (the agent fsyncs every upload before renaming it)",
            env.h.fs()
        ),
    )
    .about(
        "sides",
        "daemon = the HTTP API (HTTP, engine, fc-double's vsock bridge, agent)\n\
         bridge = this program's AgentClient (the daemon's client code) through fc-double's\n\
         \x20        hybrid vsock: the daemon's path without HTTP and engine\n\
         direct = the same AgentClient on the agent's own Unix socket: the baseline",
    );
    let result = run_fc(&mut env, &agentenv, &p, &mut rep);
    // The agent names the run's directory: stop it before the leak scan.
    env.agent.stop();
    let (result, cleanup) = env.h.finish(result, c.keep);
    rep.settle(result, "fc-double", cleanup.cleaned());
    if args.qemu {
        run_qemu_part(&args, &agentenv, &p, &mut rep);
    } else {
        rep.about("QEMU", "not run (pass --qemu)");
    }
    rep.finish(c.json)
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
                    user: None,
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
            let mut dl = self
                .client
                .get_file(&GetFile {
                    path: path.display().to_string(),
                    user: None,
                })
                .await?;
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

/// The daemon's API through `agentenv-client`: execs on its keep-alive
/// connection, file bodies streamed on connections of their own.
struct ViaDaemon {
    api: ApiClient,
    vm_id: String,
    exec: agentenv_api::ExecRequest,
    pid: u32,
}

impl ViaDaemon {
    fn new(d: &daemon::Daemon, vm_id: &str) -> Result<ViaDaemon> {
        Ok(ViaDaemon {
            api: d.client(IO_TIMEOUT)?,
            vm_id: vm_id.into(),
            exec: serde_json::from_value(json!({"cmd": ["true"]}))?,
            pid: d.pid,
        })
    }

    fn rss(&self) -> Result<Rss> {
        Rss::of(self.pid).context("cannot read the daemon's /proc/PID/status")
    }

    fn exec_true(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let r = self.api.exec(&self.vm_id, &self.exec).context("exec")?;
        let took = t0.elapsed();
        ensure!(
            r.exit_code == Some(0),
            "exec of true through the daemon: {r:?}"
        );
        Ok(took)
    }

    /// `PUT …/files?path=` with `src` streamed as the body (`Content-Length`
    /// set, [`BUF`]-sized writes).
    fn put(&self, src: &str, guest_path: &str, size: u64) -> Result<Duration> {
        let file = BufReader::with_capacity(BUF, File::open(src)?);
        let t0 = Instant::now();
        let opts = UploadOptions::default();
        let w = self
            .api
            .upload(&self.vm_id, guest_path, &opts, file, Some(size))
            .context("PUT files")?;
        let took = t0.elapsed();
        ensure!(
            w.bytes == size,
            "PUT files: wrote {} bytes, sent {size}",
            w.bytes
        );
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
        let mut body = self
            .api
            .download(&self.vm_id, guest_path)
            .context("GET files")?;
        ensure!(
            body.size == Some(size),
            "GET files: x-agentenv-file-size {:?}, expected {size}",
            body.size
        );
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

    /// Its rows in a table whose first columns are MiB and growth.
    fn rows(&self, t: &mut Table, target: &str) {
        let growth = self.growth_mib();
        let limit = INITIAL_WINDOW as f64 / MIB as f64 + TARGET_RSS_SLACK_MIB;
        t.row("VmRSS before", vec![Cell::Num(mib(self.before.rss_kib), 1)], None)
            .row(
                &format!("VmRSS peak ({} samples)", self.samples),
                vec![Cell::Num(mib(self.peak_rss_kib), 1), Cell::Signed(growth, 1)],
                Some(Target::at_most(target, growth, limit, " MiB")),
            )
            .row("VmRSS after", vec![Cell::Num(mib(self.after.rss_kib), 1)], None)
            .row("VmHWM before", vec![Cell::Num(mib(self.before.hwm_kib), 1)], None)
            .row("VmHWM after", vec![Cell::Num(mib(self.after.hwm_kib), 1)], None)
            .note(format!(
                "{:.2} s, {:.0} MB/s (pauses included); growth target: the agent's window ({} MiB) + {TARGET_RSS_SLACK_MIB} MiB",
                self.took.as_secs_f64(),
                self.bytes as f64 / self.took.as_secs_f64() / 1e6,
                INITIAL_WINDOW as u64 / MIB
            ));
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------- CPU time

/// CPU time used by each process on the path, in the order of the CPU
/// table's columns: this program (the HTTP client, or the direct
/// AgentClient), the daemon, fc-double's vsock bridge, the agent.
type CpuUse = [Duration; 4];

/// The processes whose CPU time is counted.
struct Procs {
    daemon: u32,
    bridge: Option<u32>,
    agent: u32,
}

impl Procs {
    fn sample(&self) -> CpuUse {
        let pids = [
            Some(std::process::id()),
            Some(self.daemon),
            self.bridge,
            Some(self.agent),
        ];
        pids.map(|p| p.and_then(procfs::cpu_time).unwrap_or_default())
    }

    /// Runs `f`, adding the CPU time each process used meanwhile to `acc`.
    fn count<T>(&self, acc: &mut CpuUse, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.sample();
        let r = f()?;
        for ((a, now), then) in acc.iter_mut().zip(self.sample()).zip(before) {
            *a += now.saturating_sub(then);
        }
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
    fn new(c: &Common, fc_double: &Path, guest: &Path) -> Result<FcEnv> {
        let mut h = Harness::new(c.tmp_dir.as_deref(), "ae-agentio-", &["files"])?;
        let root = h.root().to_path_buf();
        let sock = root.join("agent.sock");
        // The double, told to bridge guest vsock port 10789 to the agent.
        let wrapper = root.join("fc-agent");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --vsock-agent '{VSOCK_PORT}={}' \"$@\"\n",
                fc_double.display(),
                sock.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        h.write_config(&daemon::fc_double_config(
            wrapper,
            &root,
            MEMORY_MIB_PER_SLOT,
        )?)?;
        File::create(root.join("disks/root.img"))?.set_len(MIB)?;
        let agent = HostAgent::spawn(guest, &sock, Some(&root.join("agent.log")))
            .context("agentenv-guest")?;
        Ok(FcEnv { h, root, agent })
    }
}

/// The ways the same work is done.
const SIDES: [&str; 3] = ["daemon", "bridge", "direct"];

/// Throughputs in MB/s (10^6 bytes per second) of `bytes` moved in each time.
fn throughputs(bytes: u64, times: &[Duration]) -> Vec<f64> {
    times
        .iter()
        .map(|t| bytes as f64 / t.as_secs_f64() / 1e6)
        .collect()
}

fn create_ready(api: &ApiClient, body: &Value) -> Result<Duration> {
    let (took, r) = call(api, "POST", "/v1/vm", Some(body), 201)?;
    let v = r.json()?;
    ensure!(
        v["state"] == "running" && v["ready"] == true,
        "the VM is not running with a ready agent: {v}"
    );
    Ok(took)
}

/// The daemon's memory during a download of `bytes` of sparse file, after a
/// first one to warm the path (connection pool, buffers) up.
fn watch_download(via: &ViaDaemon, path: &Path, bytes: u64) -> Result<RssWatch> {
    File::create(path)?.set_len(bytes)?;
    let p = path.display().to_string();
    via.get(&p, bytes, Content::Zeros, false)?;
    signals::check()?;
    let before = via.rss()?;
    let sampler = RssSampler::start(via.pid);
    let took = via.get(&p, bytes, Content::Zeros, true);
    let (peak, samples) = sampler.finish();
    std::fs::remove_file(path)?;
    Ok(RssWatch {
        before,
        peak_rss_kib: peak,
        samples,
        after: via.rss()?,
        bytes,
        took: took?,
    })
}

fn run_fc(env: &mut FcEnv, agentenv: &Path, p: &Params, rep: &mut Report) -> Result<()> {
    let d = env
        .h
        .start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    let mut via = ViaDaemon::new(d, "io")?;
    let disk = env.root.join("disks/root.img");
    let ready = create_ready(
        &via.api,
        &json!({"vm_id": "io", "disk": {"kind": "direct", "path": disk},
                "wait_ready": true, "wait_ready_timeout_s": READY_TIMEOUT_S}),
    )?;
    rep.about(
        "VM",
        format!(
            "POST /v1/vm with wait_ready answered in {:.3} s",
            ready.as_secs_f64()
        ),
    );
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

    let exec = interleaved(
        "exec `true`",
        p.warmup,
        p.execs,
        [
            &mut || via.exec_true(),
            &mut || bridge.exec_true(),
            &mut || direct.exec_true(),
        ],
    )?;
    let mut t = Table::latency("exec `true` (ms)", &SIDES);
    t.latency_row(
        "round trip",
        &exec,
        Some(Limit::OverheadMs(TARGET_EXEC_OVERHEAD_P50_MS)),
    );
    if let Some([d, v, b]) = exec.summaries() {
        t.note(format!(
            "overhead at p50: {:+.3} ms in fc-double's vsock bridge, {:+.3} ms in HTTP and the engine;\n\
             median of the per-round differences daemon − direct: {:+.3} ms",
            v.p50 - b.p50,
            d.p50 - v.p50,
            exec.paired_diff_ms(0, 2).unwrap_or(f64::NAN)
        ));
    }
    rep.table(t);

    progress(format!(
        "memory: the daemon's VmRSS during a {} MiB download (sparse file; the client \
         stops reading for {} ms every {} MiB)",
        p.rss_bytes / MIB,
        THROTTLE_PAUSE.as_millis(),
        THROTTLE_EVERY / MIB
    ));
    let files = env.root.join("files");
    let watch = watch_download(&via, &files.join("sparse.bin"), p.rss_bytes)?;

    // File throughput, each way.
    progress(format!(
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
    let procs = Procs {
        daemon: via.pid,
        bridge: procfs::processes_mentioning(&env.root)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("fc-double"))
            .map(|(pid, _)| pid),
        agent: env.agent.pid(),
    };
    let mut cpu: [[CpuUse; 3]; 2] = Default::default();
    let (mut upload, mut download) = (Sides::<3>::default(), Sides::<3>::default());
    let n = p.file_bytes;
    rounds(
        &format!("files: {} MiB each way per side", n / MIB),
        0,
        p.file_runs,
        |i, _| {
            let [[c0, c1, c2], [d0, d1, d2]] = &mut cpu;
            upload.push(rotated(
                i,
                [
                    &mut || procs.count(c0, || via.put(&src_s, &up_daemon_s, n)),
                    &mut || procs.count(c1, || bridge.put(&src, &up[1], n)),
                    &mut || procs.count(c2, || direct.put(&src, &up[2], n)),
                ],
            )?);
            for f in &up {
                check_file(f, n)?;
            }
            download.push(rotated(
                i,
                [
                    &mut || procs.count(d0, || via.get(&src_s, n, Content::Noise, false)),
                    &mut || procs.count(d1, || bridge.get(&src, n, Content::Noise)),
                    &mut || procs.count(d2, || direct.get(&src, n, Content::Noise)),
                ],
            )?);
            Ok(())
        },
    )?;
    let idle_after = via.rss()?;
    std::fs::remove_file(&src)?;
    for f in &up {
        std::fs::remove_file(f)?;
    }
    bridge.client.shutdown();
    direct.client.shutdown();

    let mut t = Table::new(
        &format!("files, {} MiB (MB/s, medians of {})", n / MIB, p.file_runs),
        [
            "daemon",
            "bridge",
            "direct",
            "daemon/direct",
            "bridge/direct",
            "daemon min",
            "daemon max",
            "direct min",
            "direct max",
        ],
    );
    for (name, s) in [("upload", &upload), ("download", &download)] {
        let r = s.0.each_ref().map(|v| Spread::of(&throughputs(n, v)));
        let [Some(d), Some(v), Some(b)] = r else {
            continue;
        };
        let ratio = d.median / b.median;
        let mut cells: Vec<Cell> = [d.median, v.median, b.median]
            .map(|x| Cell::Num(x, 1))
            .into();
        cells.extend([Cell::Ratio(ratio), Cell::Ratio(v.median / b.median)]);
        cells.extend([d.min, d.max, b.min, b.max].map(|x| Cell::Num(x, 0)));
        t.row(
            name,
            cells,
            Some(Target::at_least(name, ratio, TARGET_FILE_RATIO, "x")),
        );
    }
    t.note("MB = 10^6 bytes; an upload is timed to the answer (the file fsynced and in place), a download to its last byte");
    rep.table(t);

    let mut t = Table::new(
        "CPU per transfer (ms, mean)",
        ["wall", "client", "daemon", "fc-double", "agent", "total"],
    );
    for (i, (dir, s)) in [("upload", &upload), ("download", &download)]
        .into_iter()
        .enumerate()
    {
        for (j, side) in SIDES.iter().enumerate() {
            let k = s.side(j).len().max(1) as f64;
            let c = cpu[i][j];
            let times = [s.side(j).iter().sum()]
                .into_iter()
                .chain(c)
                .chain([c.iter().sum()]);
            let cells = times.map(|d: Duration| Cell::Num(d.as_secs_f64() * 1e3 / k, 0));
            t.row(&format!("{dir}, {side}"), cells.collect(), None);
        }
    }
    t.note(format!(
        "user + system, from /proc/PID/stat (10 ms ticks); {} CPUs{}",
        rep.host().cpus,
        if procs.bridge.is_some() {
            ""
        } else {
            "; fc-double's process was not found (its column is 0)"
        }
    ));
    rep.table(t);

    let mut t = Table::new(
        &format!(
            "daemon memory during a {} MiB download (MiB; a sparse file, the client stops reading for {} ms every {} MiB)",
            watch.bytes / MIB,
            THROTTLE_PAUSE.as_millis(),
            THROTTLE_EVERY / MIB
        ),
        ["MiB", "growth"],
    );
    watch.rows(&mut t, "rss_growth");
    t.row(
        "VmRSS before the file runs",
        vec![Cell::Num(mib(idle_before.rss_kib), 1)],
        None,
    )
    .row(
        "VmRSS after the file runs",
        vec![Cell::Num(mib(idle_after.rss_kib), 1)],
        None,
    )
    .row(
        "VmHWM after the file runs",
        vec![Cell::Num(mib(idle_after.hwm_kib), 1)],
        None,
    );
    rep.table(t);
    Ok(())
}

// ---------------------------------------------------------------- the QEMU part

/// The rootfs must carry the agent (older images do not).
fn has_agent(guest: &QemuGuest) -> Result<(), String> {
    let Some(debugfs) = find_in_path("debugfs") else {
        return Ok(());
    };
    let out = Command::new(debugfs)
        .args(["-R", "stat /usr/sbin/agentenv-guest"])
        .arg(guest.artifacts.join("rootfs").join(QEMU_ROOTFS))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run debugfs: {e}"))?;
    if !String::from_utf8_lossy(&out.stdout).contains("Inode:") {
        return Err(format!(
            "rootfs/{QEMU_ROOTFS} has no /usr/sbin/agentenv-guest (rebuild it with \
             scripts/build-artifacts.sh)"
        ));
    }
    Ok(())
}

/// The same work through the daemon against a QEMU guest, with a daemon of
/// its own; adds its figures, cleanup or failure to the report.
fn run_qemu_part(args: &Args, agentenv: &Path, p: &Params, rep: &mut Report) {
    let guest = match QemuGuest::find(args.artifacts.as_deref(), QEMU_ROOTFS)
        .and_then(|g| has_agent(&g).map(|()| g))
    {
        Ok(g) => g,
        Err(why) => {
            progress(format!("qemu: skipped: {why}"));
            rep.about("QEMU", format!("skipped: {why}"));
            return;
        }
    };
    let mut h = match Harness::new(args.common.tmp_dir.as_deref(), "ae-agentio-q-", &["files"]) {
        Ok(h) => h,
        Err(e) => {
            rep.fail(format!("qemu: setting up: {e:#}"));
            return;
        }
    };
    let result = h
        .write_config(&daemon::qemu_config(&guest, MEMORY_MIB_PER_SLOT, 2))
        .and_then(|()| run_qemu(&mut h, agentenv, p, args.boot_timeout_s, &guest));
    let (result, cleanup) = h.finish(result, args.common.keep);
    rep.cleanup("qemu", cleanup.cleaned());
    match result {
        Ok(t) => {
            rep.table(t);
        }
        Err(e) => {
            rep.fail(format!("qemu: {e:#}"));
        }
    }
}

fn run_qemu(
    h: &mut Harness,
    agentenv: &Path,
    p: &Params,
    boot_timeout_s: u64,
    guest: &QemuGuest,
) -> Result<Table> {
    let root = h.root().to_path_buf();
    let d = h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    let mut via = ViaDaemon::new(d, "q1")?;
    progress("qemu: booting a guest (create with wait_ready)");
    let ready = create_ready(
        &via.api,
        &json!({"vm_id": "q1", "disk": {"kind": "overlay", "rootfs_id": QEMU_ROOTFS},
                "wait_ready": true, "wait_ready_timeout_s": boot_timeout_s}),
    )?;
    progress(format!("qemu: ready after {:.1} s", ready.as_secs_f64()));
    let exec = interleaved(
        "qemu: exec `true`",
        p.warmup,
        p.execs,
        [&mut || via.exec_true()],
    )?;
    let src = root.join("files/src.bin");
    write_noise(&src, p.qemu_file_bytes)?;
    let src_s = src.display().to_string();
    // On the guest's overlay disk (its /tmp may be in its RAM).
    let guest_path = "/root/agent-io.bin";
    let n = p.qemu_file_bytes;
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let (mut before, mut peak, mut samples) = (None, 0u64, 0usize);
    rounds(
        &format!("qemu: files: {} MiB each way", n / MIB),
        0,
        p.file_runs,
        |_, _| {
            up.push(via.put(&src_s, guest_path, n)?);
            signals::check()?;
            if before.is_none() {
                before = Some(via.rss()?);
            }
            let sampler = RssSampler::start(via.pid);
            let took = via.get(guest_path, n, Content::Noise, false);
            let (pk, k) = sampler.finish();
            (peak, samples) = (peak.max(pk), samples + k);
            down.push(took?);
            Ok(())
        },
    )?;
    std::fs::remove_file(&src)?;
    let watch = RssWatch {
        before: before.context("no download ran")?,
        peak_rss_kib: peak,
        samples,
        after: via.rss()?,
        bytes: n * p.file_runs as u64,
        took: down.iter().sum(),
    };
    let mut t = Table::new(
        "QEMU TCG guest, through the daemon only (no baseline: the daemon holds the VM's virtio-serial socket)",
        ["value", "growth", "min", "max"],
    );
    t.note(format!("qemu: {}", guest.version));
    t.row(
        "POST /v1/vm → ready (s)",
        vec![Cell::Num(ready.as_secs_f64(), 2)],
        None,
    );
    if let Some(s) = Summary::of(exec.side(0)) {
        t.row("exec `true` p50 (ms)", vec![Cell::ms(s.p50)], None)
            .row("exec `true` p99 (ms)", vec![Cell::ms(s.p99)], None);
    }
    for (name, v) in [("upload", &up), ("download", &down)] {
        if let Some(s) = Spread::of(&throughputs(n, v)) {
            let cells = vec![
                Cell::Num(s.median, 1),
                Cell::Empty,
                Cell::Num(s.min, 1),
                Cell::Num(s.max, 1),
            ];
            t.row(
                &format!("{name} {} MiB (MB/s, median)", n / MIB),
                cells,
                None,
            );
        }
    }
    watch.rows(&mut t, "qemu_rss_growth");
    Ok(t)
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
}
