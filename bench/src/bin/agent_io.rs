//! `agent_io`: exec and file transfers through the daemon against the same work done straight
//! to the guest agent (and through fc-double's vsock bridge alone), interleaved in one run;
//! and the daemon's memory during a slow download. See `bench/README.md`.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_bench::args::Common;
use agentenv_bench::daemon::{self, call, Harness};
use agentenv_bench::procfs::{self, Rss};
use agentenv_bench::report::{or_exit, Cell, Limit, Report, Table, Target};
use agentenv_bench::runner::{self, interleaved, progress, rotated, rounds, Side, Sides};
use agentenv_bench::{signals, stats::Spread};
use agentenv_client::{ApiClient, UploadOptions};
use agentenv_core::agent::{AgentLink, ExecEvent};
use agentenv_core::{backend::AgentChannel, config::AgentConfig, engine::AGENT_SOCKET};
use agentenv_host::agent::AgentClient;
use agentenv_proto::{ExecRequest, GetFile, PutFile, INITIAL_WINDOW, VSOCK_PORT};
use agentenv_testkit::agent::HostAgent;
use anyhow::{ensure, Context, Result};
use clap::{builder::RangedU64ValueParser, Parser};
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
/// The ways the same work is done, in the order of every table.
const SIDES: [&str; 3] = ["daemon", "bridge", "direct"];

/// Exec and file transfers through the daemon vs straight to the guest agent, same run.
#[derive(Debug, Parser)]
#[command(name = "agent_io", version, about, long_about = None)]
struct Args {
    /// Timed execs of `true` per side [--quick: 100].
    #[arg(long, default_value_t = 300, default_value_if("quick", "true", "100"))]
    #[arg(value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    execs: usize,
    /// Untimed execs per side before them [--quick: 10].
    #[arg(long, default_value_t = 20, default_value_if("quick", "true", "10"))]
    warmup: usize,
    /// Size of the file moved each way, in MiB [--quick: 64].
    #[arg(long, default_value_t = 256, default_value_if("quick", "true", "64"))]
    #[arg(value_parser = RangedU64ValueParser::<u64>::new().range(1..))]
    file_mib: u64,
    /// Timed transfers per side and direction [--quick: 3].
    #[arg(long, default_value_t = 6, default_value_if("quick", "true", "3"))]
    #[arg(value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    file_runs: usize,
    /// Size of the sparse file downloaded while the daemon's memory is watched, in MiB.
    #[arg(long, default_value_t = 1024)]
    #[arg(value_parser = RangedU64ValueParser::<u64>::new().range(1..))]
    rss_mib: u64,
    #[command(flatten)]
    common: Common,
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
        json!({"execs": args.execs, "warmup": args.warmup, "file_bytes": args.file_mib * MIB,
               "file_runs": args.file_runs, "rss_download_bytes": args.rss_mib * MIB}),
    );
    let h = Harness::new(c.tmp_dir.as_deref(), "ae-agentio-", &["files", "agent"]);
    let mut h = or_exit(h, 1, "setting up: ");
    let result = run(&mut h, &bins, &args, &mut rep);
    let (result, cleanup) = h.finish(result, c.keep);
    rep.settle(result, "fc-double", cleanup.cleaned());
    rep.finish(c.json)
}

/// One way to the agent: the daemon's HTTP API (execs on its keep-alive connection,
/// file bodies on connections of their own), or this program's `AgentClient` (the
/// daemon's client code) in a multi-threaded tokio runtime like the daemon's.
enum Way {
    Daemon(ApiClient),
    Agent(Handle, AgentClient),
}

/// What `f` returns, and how long it took.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t0 = Instant::now();
    Ok((f()?, t0.elapsed()))
}

impl Way {
    /// Times an exec of `true`, checking that it exited 0.
    fn exec_true(&self) -> Result<Duration> {
        let body = serde_json::from_value(json!({"cmd": ["true"]}))?;
        // What the engine sends the agent for that body (engine/agent.rs).
        let d = AgentConfig::default();
        let req: ExecRequest = serde_json::from_value(json!({"cmd": ["true"],
            "timeout_ms": d.default_exec_timeout_s * 1000, "max_output": d.max_output_bytes}))?;
        let (code, took) = timed(|| match self {
            Way::Daemon(api) => Ok(api.exec("io", &body).context("exec")?.exit_code),
            Way::Agent(rt, client) => rt.block_on(async {
                let mut e = client.exec(&req, None).await?;
                loop {
                    if let ExecEvent::Exit(st) = e.next().await? {
                        return Ok(st.exit_code);
                    }
                }
            }),
        })?;
        ensure!(code == Some(0), "exec of true: exit code {code:?}");
        Ok(took)
    }

    /// Times an upload of `src` (`size` bytes, read [`BUF`] at a time) to
    /// `dst`, checking the size the agent wrote.
    fn put(&self, src: &Path, dst: &Path, size: u64) -> Result<Duration> {
        let (mut file, dst) = (File::open(src)?, dst.display().to_string());
        let (wrote, took) = timed(|| match self {
            Way::Daemon(api) => {
                let body = BufReader::with_capacity(BUF, file);
                let w = api.upload("io", &dst, &UploadOptions::default(), body, Some(size));
                Ok(w.context("PUT files")?.bytes)
            }
            Way::Agent(rt, client) => rt.block_on(async {
                let put: PutFile = serde_json::from_value(json!({"path": dst}))?;
                let (mut up, mut buf) = (client.put_file(&put).await?, vec![0u8; BUF]);
                while let n @ 1.. = file.read(&mut buf)? {
                    up.write(&buf[..n]).await?;
                }
                Ok(up.finish().await?.bytes)
            }),
        })?;
        ensure!(wrote == size, "the upload wrote {wrote} bytes, not {size}");
        Ok(took)
    }

    /// Times a download of `path` (`size` bytes) into `check`.
    fn get(&self, path: &Path, size: u64, mut check: Check) -> Result<Duration> {
        let path = path.display().to_string();
        let (told, took) = timed(|| match self {
            Way::Daemon(api) => {
                let mut body = api.download("io", &path).context("GET files")?;
                std::io::copy(&mut BufReader::with_capacity(BUF, &mut body), &mut check)?;
                Ok(body.size)
            }
            Way::Agent(rt, client) => rt.block_on(async {
                let mut dl = client.get_file(&GetFile { path, user: None }).await?;
                while let Some(chunk) = dl.next_chunk().await? {
                    check.write_all(&chunk)?;
                }
                Ok(Some(dl.info.size))
            }),
        })?;
        ensure!(told == Some(size), "announced {told:?} bytes, not {size}");
        check.finish(size)?;
        Ok(took)
    }
}

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

/// Checks an uploaded file on the host as a download is checked.
fn check_file(path: &Path, size: u64) -> Result<()> {
    let (mut check, what) = (Check::new(noise, false), path.display().to_string());
    let f = File::open(path).context(what.clone())?;
    std::io::copy(&mut BufReader::with_capacity(BUF, f), &mut check).context(what.clone())?;
    check.finish(size).context(what)
}

/// `f(way, its index)` on each side, as the runner's sides (errors name it).
fn each<'a, F>(ways: &'a [Way; 3], f: F) -> [impl FnMut() -> Result<Duration> + 'a; 3]
where
    F: Fn(&Way, usize) -> Result<Duration> + Copy + 'a,
{
    [0, 1, 2].map(move |k| move || f(&ways[k], k).context(SIDES[k]))
}

fn sides<F: FnMut() -> Result<Duration>>(fs: &mut [F; 3]) -> [Side<'_>; 3] {
    fs.each_mut().map(|f| f as Side<'_>)
}

fn run(h: &mut Harness, bins: &[PathBuf; 3], args: &Args, rep: &mut Report) -> Result<()> {
    let [agentenv, fc_double, guest] = bins.each_ref().map(|b| b.display());
    let root = h.root().to_path_buf();
    // The agent's socket in a directory of its own, seen by fc-double in the jail (as root).
    let (agent_dir, wrapper) = (root.join("agent"), root.join("fc-agent"));
    let sock = agent_dir.join("agent.sock");
    let s = sock.display();
    let script = format!("#!/bin/sh\nexec '{fc_double}' --vsock-agent '{VSOCK_PORT}={s}' \"$@\"\n");
    std::fs::write(&wrapper, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    // 256 MiB of guest memory per VM, only accounted with the double (it runs no guest).
    let mut config = daemon::fc_double_config(wrapper, &root, 256)?;
    config.jail.read_only_paths = vec![bins[1].clone(), agent_dir];
    h.write_config(&config)?;
    let disk = root.join("disks/root.img");
    File::create(&disk)?.set_len(MIB)?;
    // Killed when `run` returns, before the leak scan (it names the run's directory).
    let log = root.join("agent.log");
    let _agent = HostAgent::spawn(&bins[2], &sock, Some(&log)).context("agentenv-guest")?;
    let vmm = format!("VMM {fc_double} bridging guest vsock port {VSOCK_PORT} to the agent");
    let fs = h.fs();
    rep.about("daemon", format!("{agentenv}, {vmm}"))
        .about("agent", format!("{guest} --listen-unix, on the host"))
        .about("files", format!("in the temp dir on {fs}; uploads fsynced"))
        .about(
            "sides",
            "daemon = the HTTP API (HTTP, engine, fc-double's vsock bridge, agent)\n\
             bridge = the daemon's AgentClient via fc-double's hybrid vsock: no HTTP, no engine\n\
             direct = the same AgentClient on the agent's own Unix socket: the baseline",
        );

    let d = h.start_daemon(&bins[0], IO_TIMEOUT, Duration::from_secs(15))?;
    let (pid, api) = (d.pid, d.client(IO_TIMEOUT)?);
    let rss = || Rss::of(pid).context("cannot read the daemon's /proc/PID/status");
    let body = json!({"vm_id": "io", "disk": {"kind": "direct", "path": disk},
                      "wait_ready": true, "wait_ready_timeout_s": 30});
    let (ready, r) = call(&api, "POST", "/v1/vm", Some(&body), 201)?;
    let v = r.json()?;
    let ok = v["state"] == "running" && v["ready"] == true;
    ensure!(ok, "the VM is not running with a ready agent: {v}");
    let ready = ready.as_secs_f64();
    rep.about("VM", format!("created with wait_ready in {ready:.3} s"));
    // The runtime, and with it the two connections, go when `run` returns.
    let rt = Runtime::new()?;
    let agent = |ch: AgentChannel| -> Result<Way> {
        let c = rt.block_on(AgentClient::connect(&ch, Duration::from_secs(5)));
        let c = c.with_context(|| format!("cannot connect to the agent ({ch:?})"))?;
        Ok(Way::Agent(rt.handle().clone(), c))
    };
    // The VM's vsock device socket, which fc-double serves (the daemon has
    // its own connection on it; each connection is bridged separately).
    let bridge = AgentChannel::HybridVsock {
        socket: root.join("sessions/io").join(AGENT_SOCKET),
        port: VSOCK_PORT,
    };
    let direct = AgentChannel::Stream(sock);
    let ways = [Way::Daemon(api), agent(bridge)?, agent(direct)?];

    let mut fs = each(&ways, |w, _| w.exec_true());
    let exec = interleaved("exec `true`", args.warmup, args.execs, sides(&mut fs))?;
    let mut t = Table::latency("exec `true` (ms)", &SIDES);
    let limit = Limit::OverheadMs(TARGET_EXEC_OVERHEAD_P50_MS);
    t.latency_row("round trip", &exec, Some(limit));
    if let Some([d, v, b]) = exec.summaries() {
        let (bridge, http) = (v.p50 - b.p50, d.p50 - v.p50);
        let paired = exec.paired_diff_ms(0, 2).unwrap_or(f64::NAN);
        t.note(format!(
            "p50 overhead: {bridge:+.3} ms in fc-double's bridge, {http:+.3} ms in HTTP + engine;\n\
             median of the per-round differences daemon − direct: {paired:+.3} ms"
        ));
    }
    rep.table(t);

    // Memory: a warm-up download, then a slow one on a thread of its own while this one
    // samples the daemon's VmRSS every 2 ms.
    let (n, every) = (args.rss_mib * MIB, THROTTLE_EVERY / MIB);
    let slow = format!("the client stops reading for {THROTTLE_PAUSE:?} every {every} MiB");
    let what = format!("a {} MiB download (a sparse file; {slow})", n / MIB);
    progress(format!("memory: the daemon's VmRSS during {what}"));
    let sparse = root.join("files/sparse.bin");
    File::create(&sparse)?.set_len(n)?;
    ways[0].get(&sparse, n, Check::new(|_| 0, false))?;
    signals::check()?;
    let before = rss()?;
    let (took, kib) = std::thread::scope(|s| {
        let slow = s.spawn(|| ways[0].get(&sparse, n, Check::new(|_| 0, true)));
        let mut kib = Vec::new();
        while !slow.is_finished() {
            kib.extend(procfs::status_kib(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(2));
        }
        (slow.join(), kib)
    });
    let took = took
        .expect("the download thread does not panic")?
        .as_secs_f64();
    let (after, rate) = (rss()?, n as f64 / took / 1e6);
    std::fs::remove_file(&sparse)?;

    // File throughput, each way, after a small file each way on each side.
    let n = args.file_mib * MIB;
    progress(format!("files: writing a {} MiB source file", n / MIB));
    let (src, warm) = (root.join("files/src.bin"), root.join("files/warm.bin"));
    write_noise(&src, n)?;
    write_noise(&warm, WARMUP_FILE_BYTES)?;
    let up = SIDES.map(|side| root.join(format!("files/up-{side}.bin")));
    let mut fs = each(&ways, |w, k| {
        w.put(&warm, &up[k], WARMUP_FILE_BYTES)?;
        w.get(&warm, WARMUP_FILE_BYTES, Check::new(noise, false))
    });
    rotated(0, sides(&mut fs))?;
    std::fs::remove_file(&warm)?;
    let idle_before = rss()?;
    let (mut upload, mut download) = (Sides::<3>::default(), Sides::<3>::default());
    let mut puts = each(&ways, |w, k| w.put(&src, &up[k], n));
    let mut gets = each(&ways, |w, _| w.get(&src, n, Check::new(noise, false)));
    let runs = args.file_runs;
    let what_files = format!("files: {} MiB each way per side", n / MIB);
    rounds(&what_files, 0, runs, |i, _| {
        upload.push(rotated(i, sides(&mut puts))?);
        up.iter().try_for_each(|f| check_file(f, n))?;
        download.push(rotated(i, sides(&mut gets))?);
        Ok(())
    })?;
    let idle_after = rss()?;
    up.iter().chain([&src]).try_for_each(std::fs::remove_file)?;

    let mut t = Table::new(
        &format!("files, {} MiB (MB/s, medians of {runs})", n / MIB),
        "daemon,bridge,direct,daemon/direct,bridge/direct,\
         daemon min,daemon max,direct min,direct max"
            .split(','),
    );
    let mbps = |v: &Vec<Duration>| -> Vec<f64> {
        v.iter().map(|t| n as f64 / t.as_secs_f64() / 1e6).collect()
    };
    for (name, s) in [("upload", &upload), ("download", &download)] {
        let [Some(d), Some(v), Some(b)] = s.0.each_ref().map(|v| Spread::of(&mbps(v))) else {
            continue;
        };
        let ratio = d.median / b.median;
        let mut cells = Vec::from([d.median, v.median, b.median].map(|x| Cell::Num(x, 1)));
        cells.extend([Cell::Ratio(ratio), Cell::Ratio(v.median / b.median)]);
        cells.extend([d.min, d.max, b.min, b.max].map(|x| Cell::Num(x, 0)));
        let target = Target::at_least(name, ratio, TARGET_FILE_RATIO, "x");
        t.row(name, cells, Some(target));
    }
    t.note("MB = 10^6 B; uploads timed to the answer (file fsynced), downloads to the last byte");
    rep.table(t);

    let mib = |kib: u64| kib as f64 / 1024.0;
    let one = |kib| vec![Cell::Num(mib(kib), 1)];
    let peak = kib.iter().copied().max().unwrap_or(0);
    let growth = mib(peak.max(before.rss_kib) - before.rss_kib);
    let (window, slack) = (INITIAL_WINDOW as u64 / MIB, TARGET_RSS_SLACK_MIB);
    let target = Target::at_most("rss_growth", growth, window as f64 + slack, " MiB");
    let title = format!("daemon memory (MiB) during {what}");
    let mut t = Table::new(&title, ["MiB", "growth"]);
    t.row("VmRSS before", one(before.rss_kib), None)
        .row(
            &format!("VmRSS peak ({} samples)", kib.len()),
            vec![Cell::Num(mib(peak), 1), Cell::Signed(growth, 1)],
            Some(target),
        )
        .row("VmRSS after", one(after.rss_kib), None)
        .row("VmHWM before", one(before.hwm_kib), None)
        .row("VmHWM after", one(after.hwm_kib), None)
        .row("VmRSS before the file runs", one(idle_before.rss_kib), None)
        .row("VmRSS after the file runs", one(idle_after.rss_kib), None)
        .row("VmHWM after the file runs", one(idle_after.hwm_kib), None)
        .note(format!(
            "{took:.2} s, {rate:.0} MB/s, pauses in; target: agent window ({window} MiB) + {slack} MiB"
        ));
    rep.table(t);
    Ok(())
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
