//! `agent_io`: exec and file transfers through the daemon against the same work done straight
//! to the guest agent (and through fc-double's vsock bridge alone), interleaved in one run;
//! and the daemon's memory during a slow download. See `bench/README.md`.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_bench::args::{count, Common};
use agentenv_bench::daemon::{self, create_vm, Harness};
use agentenv_bench::procfs::{self, mib, Rss};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, progress, rotated, rounds, timed, Side, Sides};
use agentenv_bench::{signals, stats::Spread};
use agentenv_client::{ApiClient, UploadOptions};
use agentenv_core::agent::{AgentLink, ExecEvent};
use agentenv_core::{backend::AgentChannel, config::AgentConfig, engine::AGENT_SOCKET};
use agentenv_host::agent::AgentClient;
use agentenv_proto::{ExecRequest, GetFile, PutFile, INITIAL_WINDOW, VSOCK_PORT};
use agentenv_testkit::agent::HostAgent;
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::json;
use tokio::runtime::{Handle, Runtime};

/// Target: the daemon adds at most this much to an exec's p50, in ms.
const TARGET_EXEC_OVERHEAD_P50_MS: f64 = 2.0;
/// Target: throughput through the daemon at least this fraction of direct.
const TARGET_FILE_RATIO: f64 = 0.7;
/// Target: during a download, the daemon's VmRSS grows by at most the agent's window + this.
const TARGET_RSS_SLACK_MIB: f64 = 4.0;
const MIB: u64 = 1 << 20;
/// Size of the warm-up file sent each way before the timed transfers.
const WARMUP_FILE_BYTES: u64 = 4 * MIB;
/// The client's read and file-read buffer.
const BUF: usize = 256 * 1024;
/// The memory download pauses for [`THROTTLE_PAUSE`] after every this many bytes.
const THROTTLE_EVERY: u64 = 64 * MIB;
const THROTTLE_PAUSE: Duration = Duration::from_millis(100);
/// One byte in this many is checked in all read back (a prime, so it walks pages and words).
const CHECK_STRIDE: u64 = 4093;
/// How long any single HTTP read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The VM's id.
const VM: &str = "io";
/// The ways the same work is done, in the order of every table and of `run`'s `ways`.
const SIDES: [&str; 3] = ["daemon", "bridge", "direct"];

/// Exec and file transfers through the daemon vs straight to the guest agent, same run.
#[derive(Debug, Parser)]
#[command(name = "agent_io", version, about, long_about = None)]
struct Args {
    /// Timed execs of `true` per side [--quick: 100].
    #[arg(long, default_value_t = 300, default_value_if("quick", "true", "100"))]
    #[arg(value_parser = count)]
    execs: usize,
    /// Untimed execs per side before them [--quick: 10].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "10"))]
    warmup: usize,
    /// Size of the file moved each way, in MiB [--quick: 64].
    #[arg(long, default_value_t = 256, default_value_if("quick", "true", "64"))]
    #[arg(value_parser = count)]
    file_mib: usize,
    /// Timed transfers per side and direction [--quick: 3].
    #[arg(long, default_value_t = 6, default_value_if("quick", "true", "3"))]
    #[arg(value_parser = count)]
    file_runs: usize,
    /// Size of the sparse file downloaded while the daemon's memory is watched, in MiB.
    #[arg(long, default_value_t = 1024)]
    #[arg(value_parser = count)]
    rss_mib: usize,
    #[command(flatten)]
    common: Common,
}

/// The sizes in bytes (the flags give MiB; `count` parses them as `usize`).
impl Args {
    fn file_bytes(&self) -> u64 {
        self.file_mib as u64 * MIB
    }

    fn rss_bytes(&self) -> u64 {
        self.rss_mib as u64 * MIB
    }
}

fn main() {
    let args: Args = runner::start();
    let c = &args.common;
    // Not `agentenv_testkit::paths::guest_agent()`: that one expects to run
    // from target/<profile>/deps (a test) and builds a debug agent.
    let bins = daemon::binaries(
        c.bin_dir.as_deref(),
        ["agentenv", "fc-double", "agentenv-guest"],
    );
    let mut rep = Report::new(
        "agentenv agent I/O: through the daemon vs straight to the agent, same run",
        json!({"execs": args.execs, "warmup": args.warmup, "file_bytes": args.file_bytes(),
               "file_runs": args.file_runs, "rss_download_bytes": args.rss_bytes()}),
    );
    let h = Harness::new(c.tmp_dir.as_deref(), "ae-agentio-", &["files", "agent"]);
    let mut h = or_exit(h, 1, "setting up: ");
    let result = run(&mut h, &bins, &args, &mut rep);
    let (result, cleanup) = h.finish(result, c.keep);
    rep.settle(result, "fc-double", cleanup.cleaned());
    rep.finish(c.json)
}

// ---------------------------------------------------------------- the three ways

/// One way to the agent: the daemon's HTTP API (execs on its keep-alive connection,
/// file bodies on connections of their own), or this program's `AgentClient` (the
/// daemon's client code) in a multi-threaded tokio runtime like the daemon's.
enum Way {
    Daemon(ApiClient),
    Agent(Handle, AgentClient),
}

impl Way {
    /// Times an exec of `true`, checking that it exited 0.
    fn exec_true(&self) -> Result<Duration> {
        let (rt, client) = match self {
            Way::Daemon(api) => return daemon::exec_true(api, VM),
            Way::Agent(rt, client) => (rt, client),
        };
        // What the engine sends the agent for `{"cmd": ["true"]}` (engine/agent.rs).
        let defaults = AgentConfig::default();
        let req = ExecRequest {
            cmd: vec!["true".into()],
            timeout_ms: Some(defaults.default_exec_timeout_s * 1000),
            max_output: Some(defaults.max_output_bytes),
            ..ExecRequest::default()
        };
        let (status, took) = timed(|| {
            rt.block_on(async {
                let mut exec = client.exec(&req, None).await?;
                loop {
                    if let ExecEvent::Exit(status) = exec.next().await? {
                        return Ok(status);
                    }
                }
            })
        })?;
        ensure!(status.exit_code == Some(0), "exec of true: {status:?}");
        Ok(took)
    }

    /// Times an upload of `src` (`size` bytes, read [`BUF`] at a time) to `dst`,
    /// checking the size the agent wrote. The buffer is made before the timer starts.
    fn put(&self, src: &Path, dst: &Path, size: u64) -> Result<Duration> {
        let mut file = BufReader::with_capacity(BUF, File::open(src)?);
        let put = PutFile {
            path: dst.display().to_string(),
            ..PutFile::default()
        };
        let (wrote, took) = timed(|| match self {
            Way::Daemon(api) => {
                let opts = UploadOptions::default();
                let wrote = api.upload(VM, &put.path, &opts, &mut file, Some(size));
                Ok(wrote.context("PUT files")?.bytes)
            }
            Way::Agent(rt, client) => rt.block_on(async {
                let mut upload = client.put_file(&put).await?;
                loop {
                    let chunk = file.fill_buf()?;
                    let n = chunk.len();
                    if n == 0 {
                        break;
                    }
                    upload.write(chunk).await?;
                    file.consume(n);
                }
                Ok(upload.finish().await?.bytes)
            }),
        })?;
        ensure!(wrote == size, "the upload wrote {wrote} bytes, not {size}");
        Ok(took)
    }

    /// Times a download of `path` (`size` bytes) into `check`, which checks it
    /// as it streams. The daemon side's read buffer is made before the timer starts.
    fn get(&self, path: &Path, size: u64, mut check: Check) -> Result<Duration> {
        let req = GetFile {
            path: path.display().to_string(),
            user: None,
        };
        let mut buf = vec![0u8; BUF];
        let (announced, took) = timed(|| match self {
            Way::Daemon(api) => {
                let mut body = api.download(VM, &req.path).context("GET files")?;
                copy_through(&mut buf, &mut body, &mut check)?;
                Ok(body.size)
            }
            Way::Agent(rt, client) => rt.block_on(async {
                let mut download = client.get_file(&req).await?;
                while let Some(chunk) = download.next_chunk().await? {
                    check.write_all(&chunk)?;
                }
                Ok(Some(download.info.size))
            }),
        })?;
        ensure!(
            announced == Some(size),
            "announced {announced:?} bytes, not {size}"
        );
        check.finish(size)?;
        Ok(took)
    }
}

/// Runs `step(way, its index in SIDES)` once on each side, in the order
/// [`rotated`] gives round `round` (it starts with side `round % 3`), and
/// returns the three times in the order of [`SIDES`]. An error names its side.
fn each_way(
    ways: &[Way; 3],
    round: usize,
    step: impl Fn(&Way, usize) -> Result<Duration>,
) -> Result<[Duration; 3]> {
    let step = &step;
    let mut sides = [0, 1, 2].map(|k| move || step(&ways[k], k).context(SIDES[k]));
    rotated(round, sides.each_mut().map(|side| side as Side<'_>))
}

// ---------------------------------------------------------------- what is read back

/// The byte at `offset` of every file written here: noise that is a pure
/// function of the offset (splitmix64 of the 8-byte word's index).
fn noise(offset: u64) -> u8 {
    let mut z = (offset / 8).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()[(offset % 8) as usize]
}

/// Writes `bytes` of [`noise`] to a new file, a MiB at a time.
fn write_noise(path: &Path, bytes: u64) -> Result<()> {
    let mut f = File::create(path)?;
    for at in (0..bytes).step_by(MIB as usize) {
        f.write_all(&(at..bytes.min(at + MIB)).map(noise).collect::<Vec<u8>>())?;
    }
    Ok(())
}

/// Where what is read back goes: counted, one byte in every [`CHECK_STRIDE`] checked
/// against `want(offset)`; if `slow`, pausing after every [`THROTTLE_EVERY`] bytes.
struct Check {
    want: fn(u64) -> u8,
    slow: bool,
    pos: u64,
}

impl Check {
    fn new(want: fn(u64) -> u8, slow: bool) -> Check {
        Check { want, slow, pos: 0 }
    }

    fn finish(&self, size: u64) -> Result<()> {
        ensure!(self.pos == size, "read {} bytes, not {size}", self.pos);
        Ok(())
    }
}

impl Write for Check {
    fn write(&mut self, chunk: &[u8]) -> std::io::Result<usize> {
        let (start, end) = (self.pos, self.pos + chunk.len() as u64);
        for o in (start.div_ceil(CHECK_STRIDE) * CHECK_STRIDE..end).step_by(CHECK_STRIDE as usize) {
            let (got, want) = (chunk[(o - start) as usize], (self.want)(o));
            if got != want {
                let e = format!("byte {o} read is {got:#04x}, not {want:#04x}");
                return Err(std::io::Error::other(e));
            }
        }
        if self.slow && start / THROTTLE_EVERY < end / THROTTLE_EVERY {
            std::thread::sleep(THROTTLE_PAUSE);
        }
        self.pos = end;
        Ok(chunk.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies `from` into `to` through `buf`, as `std::io::copy` does with a buffer of its own.
fn copy_through(buf: &mut [u8], from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    loop {
        match from.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Checks an uploaded file on the host as a download is checked.
fn check_file(path: &Path, size: u64) -> Result<()> {
    let check_it = || {
        let mut check = Check::new(noise, false);
        copy_through(&mut vec![0u8; BUF], &mut File::open(path)?, &mut check)?;
        check.finish(size)
    };
    check_it().with_context(|| path.display().to_string())
}

// ---------------------------------------------------------------- the run

/// `guest`: `agentenv-guest`, the agent, run on the host.
fn run(
    h: &mut Harness,
    [agentenv, fc_double, guest]: &[PathBuf; 3],
    args: &Args,
    rep: &mut Report,
) -> Result<()> {
    let root = h.root().to_path_buf();
    // The agent's socket in a directory of its own, seen by fc-double in the jail (as root).
    let agent_dir = root.join("agent");
    let agent_sock = agent_dir.join("agent.sock");
    let wrapper = write_wrapper(&root, fc_double, &agent_sock)?;
    // 256 MiB of guest memory per VM, only accounted with the double (it runs no guest).
    let mut config = daemon::fc_double_config(wrapper, &root, 256)?;
    config.jail.read_only_paths = vec![fc_double.clone(), agent_dir];
    h.write_config(&config)?;
    let disk = root.join("disks/root.img");
    File::create(&disk)?.set_len(MIB)?;
    // Killed when `run` returns, before the leak scan (it names the run's directory).
    let log = root.join("agent.log");
    let _agent = HostAgent::spawn(guest, &agent_sock, Some(&log)).context("agentenv-guest")?;
    let (daemon_path, vmm_path) = (agentenv.display(), fc_double.display());
    let (agent_path, fs) = (guest.display(), h.fs());
    let vmm = format!("VMM {vmm_path} bridging guest vsock port {VSOCK_PORT} to the agent");
    rep.about("daemon", format!("{daemon_path}, {vmm}"))
        .about("agent", format!("{agent_path} --listen-unix, on the host"))
        .about("files", format!("in the temp dir on {fs}; uploads fsynced"))
        .about(
            "sides",
            "daemon = the HTTP API (HTTP, engine, fc-double's vsock bridge, agent)\n\
             bridge = the daemon's AgentClient via fc-double's hybrid vsock: no HTTP, no engine\n\
             direct = the same AgentClient on the agent's own Unix socket: the baseline",
        );

    let daemon = h.start_daemon(agentenv, IO_TIMEOUT, Duration::from_secs(15))?;
    let (daemon_pid, api) = (daemon.pid, daemon.client(IO_TIMEOUT)?);
    let body = json!({"vm_id": VM, "disk": {"kind": "direct", "path": disk},
                      "wait_ready": true, "wait_ready_timeout_s": 30});
    let (took, vm) = create_vm(&api, &body)?;
    ensure!(vm.ready, "the VM runs without a ready agent: {vm:?}");
    let took = took.as_secs_f64();
    rep.about("VM", format!("created with wait_ready in {took:.3} s"));
    // The runtime, and with it the two connections, go when `run` returns.
    let rt = Runtime::new()?;
    let connect = |ch: AgentChannel| -> Result<Way> {
        let c = rt.block_on(AgentClient::connect(&ch, Duration::from_secs(5)));
        let c = c.with_context(|| format!("cannot connect to the agent ({ch:?})"))?;
        Ok(Way::Agent(rt.handle().clone(), c))
    };
    // The VM's vsock device socket, which fc-double serves (the daemon has
    // its own connection on it; each connection is bridged separately).
    let bridge = AgentChannel::HybridVsock {
        socket: root.join("sessions").join(VM).join(AGENT_SOCKET),
        port: VSOCK_PORT,
    };
    let direct = AgentChannel::Stream(agent_sock);
    let ways = [Way::Daemon(api), connect(bridge)?, connect(direct)?];

    rep.table(exec_part(&ways, args.warmup, args.execs)?);
    let memory = memory_part(&ways, &root, daemon_pid, args.rss_bytes())?;
    let (files, idle) = files_part(&ways, &root, daemon_pid, args.file_bytes(), args.file_runs)?;
    rep.table(files).table(memory.table(idle));
    Ok(())
}

/// Writes `fc-agent`, the VMM of the daemon's config: fc-double bridging the
/// guest's vsock port to the agent's socket (as crates/agentenv/tests/agent_api.rs does).
fn write_wrapper(root: &Path, fc_double: &Path, agent_sock: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = root.join("fc-agent");
    let (fc_double, sock) = (fc_double.display(), agent_sock.display());
    let script =
        format!("#!/bin/sh\nexec '{fc_double}' --vsock-agent '{VSOCK_PORT}={sock}' \"$@\"\n");
    std::fs::write(&wrapper, script)?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

fn daemon_rss(pid: u32) -> Result<Rss> {
    Rss::of(pid).context("cannot read the daemon's /proc/PID/status")
}

/// Exec: `warmup` + `execs` rounds of `true`, each side once per round.
fn exec_part(ways: &[Way; 3], warmup: usize, execs: usize) -> Result<Table> {
    let mut exec = Sides::<3>::default();
    let what = "exec `true`, 3 sides interleaved, order rotating";
    rounds(what, warmup, execs, |round, keep| {
        let times = each_way(ways, round, |way, _| way.exec_true())?;
        if keep {
            exec.push(times);
        }
        Ok(())
    })?;
    let mut t = Table::latency("exec `true` (ms)", &SIDES);
    let limit = Limit::OverheadMs(TARGET_EXEC_OVERHEAD_P50_MS);
    t.latency_row("round trip", &exec, Some(limit));
    if let Some([daemon, bridge, direct]) = exec.summaries() {
        let in_bridge = bridge.p50 - direct.p50;
        let in_http_engine = daemon.p50 - bridge.p50;
        // Sides 0 and 2: daemon − direct.
        let paired = exec.paired_diff_ms(0, 2).unwrap_or(f64::NAN);
        t.note(format!(
            "p50 overhead: {in_bridge:+.3} ms in fc-double's bridge, \
             {in_http_engine:+.3} ms in HTTP + engine;\n\
             median of the per-round differences daemon − direct: {paired:+.3} ms"
        ));
    }
    Ok(t)
}

/// The daemon's memory during a slow download of a sparse file.
struct Memory {
    /// The download, for the table's title.
    what: String,
    took_s: f64,
    mb_per_s: f64,
    before: Rss,
    after: Rss,
    /// `VmRSS` every 2 ms during it, KiB.
    samples_kib: Vec<u64>,
}

/// Memory: a warm-up download of `bytes` through the daemon, then a slow one
/// on a thread of its own while this one samples the daemon's VmRSS every 2 ms.
fn memory_part(ways: &[Way; 3], root: &Path, daemon_pid: u32, bytes: u64) -> Result<Memory> {
    let [daemon, _, _] = ways;
    let every = THROTTLE_EVERY / MIB;
    let slow = format!("the client stops reading for {THROTTLE_PAUSE:?} every {every} MiB");
    let what = format!("a {} MiB download (a sparse file; {slow})", bytes / MIB);
    progress(format!("memory: the daemon's VmRSS during {what}"));
    let sparse = root.join("files/sparse.bin");
    File::create(&sparse)?.set_len(bytes)?;
    daemon.get(&sparse, bytes, Check::new(|_| 0, false))?;
    signals::check()?;
    let before = daemon_rss(daemon_pid)?;
    let (took, samples_kib) = std::thread::scope(|s| {
        let slow = s.spawn(|| daemon.get(&sparse, bytes, Check::new(|_| 0, true)));
        let mut samples_kib = Vec::new();
        while !slow.is_finished() {
            samples_kib.extend(procfs::status_kib(daemon_pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(2));
        }
        (slow.join(), samples_kib)
    });
    let took_s = took
        .expect("the download thread does not panic")?
        .as_secs_f64();
    let after = daemon_rss(daemon_pid)?;
    std::fs::remove_file(&sparse)?;
    Ok(Memory {
        what,
        took_s,
        mb_per_s: bytes as f64 / took_s / 1e6,
        before,
        after,
        samples_kib,
    })
}

impl Memory {
    /// Its table, with the daemon's idle memory before and after the file runs.
    fn table(&self, [idle_before, idle_after]: [Rss; 2]) -> Table {
        let one = |kib| vec![Cell::Num(mib(kib), 1)];
        let peak = self.samples_kib.iter().copied().max().unwrap_or(0);
        let growth = mib(peak.max(self.before.rss_kib) - self.before.rss_kib);
        let window = INITIAL_WINDOW as u64 / MIB;
        let limit = window as f64 + TARGET_RSS_SLACK_MIB;
        let target = Target::at_most("rss_growth", growth, limit, " MiB");
        let title = format!("daemon memory (MiB) during {}", self.what);
        let (took, rate) = (self.took_s, self.mb_per_s);
        let mut t = Table::new(&title, ["MiB", "growth"]);
        t.row("VmRSS before", one(self.before.rss_kib), None)
            .row(
                &format!("VmRSS peak ({} samples)", self.samples_kib.len()),
                vec![Cell::Num(mib(peak), 1), Cell::Signed(growth, 1)],
                Some(target),
            )
            .row("VmRSS after", one(self.after.rss_kib), None)
            .row("VmHWM before", one(self.before.hwm_kib), None)
            .row("VmHWM after", one(self.after.hwm_kib), None)
            .row("VmRSS before the file runs", one(idle_before.rss_kib), None)
            .row("VmRSS after the file runs", one(idle_after.rss_kib), None)
            .row("VmHWM after the file runs", one(idle_after.hwm_kib), None)
            .note(format!(
                "{took:.2} s, {rate:.0} MB/s, pauses in; \
                 target: agent window ({window} MiB) + {TARGET_RSS_SLACK_MIB} MiB"
            ));
        t
    }
}

/// Files: after a small file each way on each side, `runs` rounds upload a
/// `bytes` file (each side to a target of its own) and download it. Also the
/// daemon's idle memory before and after these rounds.
fn files_part(
    ways: &[Way; 3],
    root: &Path,
    daemon_pid: u32,
    bytes: u64,
    runs: usize,
) -> Result<(Table, [Rss; 2])> {
    progress(format!("files: writing a {} MiB source file", bytes / MIB));
    let (src, warm) = (root.join("files/src.bin"), root.join("files/warm.bin"));
    write_noise(&src, bytes)?;
    write_noise(&warm, WARMUP_FILE_BYTES)?;
    let targets = SIDES.map(|side| root.join(format!("files/up-{side}.bin")));
    each_way(ways, 0, |way, k| {
        way.put(&warm, &targets[k], WARMUP_FILE_BYTES)?;
        way.get(&warm, WARMUP_FILE_BYTES, Check::new(noise, false))
    })?;
    std::fs::remove_file(&warm)?;
    let idle_before = daemon_rss(daemon_pid)?;
    let (mut upload, mut download) = (Sides::<3>::default(), Sides::<3>::default());
    let what = format!("files: {} MiB each way per side", bytes / MIB);
    rounds(&what, 0, runs, |round, _| {
        let put = |way: &Way, k: usize| way.put(&src, &targets[k], bytes);
        upload.push(each_way(ways, round, put)?);
        // Untimed: every upload read back from the host and checked.
        targets.iter().try_for_each(|f| check_file(f, bytes))?;
        let get = |way: &Way, _| way.get(&src, bytes, Check::new(noise, false));
        download.push(each_way(ways, round, get)?);
        Ok(())
    })?;
    let idle_after = daemon_rss(daemon_pid)?;
    for file in targets.iter().chain([&src]) {
        std::fs::remove_file(file)?;
    }

    let mut t = Table::new(
        &format!("files, {} MiB (MB/s, medians of {runs})", bytes / MIB),
        "daemon,bridge,direct,daemon/direct,bridge/direct,\
         daemon min,daemon max,direct min,direct max"
            .split(','),
    );
    let mb_per_s = |times: &Vec<Duration>| -> Vec<f64> {
        let mb = bytes as f64 / 1e6;
        times.iter().map(|t| mb / t.as_secs_f64()).collect()
    };
    for (name, sides) in [("upload", &upload), ("download", &download)] {
        let spreads = sides.0.each_ref().map(|times| Spread::of(&mb_per_s(times)));
        let [Some(daemon), Some(bridge), Some(direct)] = spreads else {
            continue;
        };
        let (daemon_ratio, bridge_ratio) =
            (daemon.median / direct.median, bridge.median / direct.median);
        let medians = [daemon.median, bridge.median, direct.median];
        let mut cells = Vec::from(medians.map(|x| Cell::Num(x, 1)));
        cells.extend([Cell::Ratio(daemon_ratio), Cell::Ratio(bridge_ratio)]);
        cells.extend([daemon.min, daemon.max, direct.min, direct.max].map(|x| Cell::Num(x, 0)));
        let target = Target::at_least(name, daemon_ratio, TARGET_FILE_RATIO, "x");
        t.row(name, cells, Some(target));
    }
    t.note("MB = 10^6 B; uploads timed to the answer (file fsynced), downloads to the last byte");
    Ok((t, [idle_before, idle_after]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_files_match_the_checker() {
        let (dir, size) = (tempfile::tempdir().unwrap(), 3 * MIB + 5);
        let f = dir.path().join("n.bin");
        write_noise(&f, size).unwrap();
        check_file(&f, size).unwrap();
        assert!(check_file(&f, size + 1).is_err());
        // Fed in odd pieces, the whole file checks out.
        let data = std::fs::read(&f).unwrap();
        let mut c = Check::new(noise, false);
        data.chunks(7777).try_for_each(|p| c.write_all(p)).unwrap();
        c.finish(size).unwrap();
        assert!(c.finish(size + 1).is_err());
        // A flipped sampled byte is found, as is noise where zeros belong.
        let mut bad = data.clone();
        bad[CHECK_STRIDE as usize * 3] ^= 1;
        assert!(Check::new(noise, false).write_all(&bad).is_err());
        assert!(Check::new(|_| 0, false).write_all(&data).is_err());
    }
}
