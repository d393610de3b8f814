//! The real `agentenv` daemon as a separate process, for the benchmarks that
//! measure through it: finding the binaries, a temporary directory with a
//! generated config, start and health wait, and an orderly teardown.
//!
//! A [`Harness`] owns the run's temporary directory and, once started, the
//! daemon. [`Harness::teardown`] (or dropping the harness) deletes every VM
//! through the API, stops the daemon with SIGTERM, kills and reports any
//! process still naming the directory, and removes the directory.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use agentenv_core::config::{AuthConfig, CgroupConfig, NetworkConfig, OnShutdown, VmmChoice};
use serde_json::Value;

use crate::report::Cleaned;
use crate::{procfs, signals};
use agentenv_api::{ExecRequest, VmInfo, VmState};
use agentenv_client::{ApiClient, Body, Request, Response};
use agentenv_testkit::leaks::processes_mentioning;

pub use agentenv_testkit::paths::workspace_root as workspace;

/// Finds all of `names` in one directory: `bin_dir` if given, else this
/// program's own directory, then `<workspace>/target/release`; canonical, in
/// the order of `names`. When no directory holds them all, it exits 2 saying
/// where it looked and how to build them.
pub fn binaries<const N: usize>(bin_dir: Option<&Path>, names: [&str; N]) -> [PathBuf; N] {
    crate::report::or_exit(find_binaries(bin_dir, names), 2, "")
}

fn find_binaries<const N: usize>(bin_dir: Option<&Path>, names: [&str; N]) -> Result<[PathBuf; N]> {
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let dirs: Vec<PathBuf> = match bin_dir {
        Some(d) => vec![d.to_path_buf()],
        None => own_dir
            .into_iter()
            .chain([workspace().join("target/release")])
            .collect(),
    };
    for d in &dirs {
        let paths = names.map(|n| d.join(n));
        if paths.iter().all(|p| p.is_file()) {
            return Ok(paths.map(|p| std::fs::canonicalize(&p).unwrap_or(p)));
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    // fc-double is a binary of the test kit; the others are their packages.
    let packages = names.map(|n| {
        if n == "fc-double" {
            "agentenv-testkit"
        } else {
            n
        }
    });
    bail!(
        "cannot find all of {} (looked in {}).\n\
         This benchmark builds nothing itself; build them first with:\n\n    \
         cargo build --release -p {}\n",
        names.join(", "),
        looked.join(", "),
        packages.join(" -p ")
    )
}

/// The first file called `name` in `$PATH`, then `/usr/sbin` and `/sbin`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The last `n` lines of a text file (empty when it cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits up to 10 s for `child` (`what`, logging to `log`) to make its
/// socket, polling every `poll`; an early exit fails with the log's end.
pub fn wait_for_socket(
    child: &mut Child,
    sock: &Path,
    log: &Path,
    what: &str,
    poll: Duration,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited at start ({status}): {}", tail_lines(log, 5));
        }
        ensure!(
            Instant::now() < deadline,
            "{what} made no socket within 10 s"
        );
        std::thread::sleep(poll);
    }
    Ok(())
}

/// Runs a command to completion (stdin closed); its stderr is in the error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A QEMU guest this machine can boot: `qemu-system-x86_64` and the guest
/// artifacts (`kernels/vmlinuz`, `initramfs/initrd.img`, `rootfs/ROOTFS`).
#[derive(Debug, Clone)]
pub struct QemuGuest {
    pub qemu: PathBuf,
    /// The first line of `qemu-system-x86_64 --version`.
    pub version: String,
    /// The artifacts directory, canonical.
    pub artifacts: PathBuf,
}

impl QemuGuest {
    /// [`QemuGuest::find`], or the benchmark skips (exit 0) saying why.
    pub fn find_or_skip(artifacts: Option<&Path>, rootfs: &str, json: bool) -> QemuGuest {
        QemuGuest::find(artifacts, rootfs).unwrap_or_else(|why| crate::report::skip(&why, json))
    }

    /// Finds QEMU, `mkfs.ext4` and the artifacts (`artifacts`, by default
    /// `<workspace>/artifacts`); the error says what is missing.
    pub fn find(artifacts: Option<&Path>, rootfs: &str) -> Result<QemuGuest, String> {
        let qemu = find_in_path("qemu-system-x86_64").ok_or(
            "qemu-system-x86_64 not found in PATH (Debian: apt-get install qemu-system-x86)",
        )?;
        if find_in_path("mkfs.ext4").is_none() {
            return Err(
                "mkfs.ext4 not found (the daemon makes overlays with it; Debian: \
                        e2fsprogs)"
                    .into(),
            );
        }
        let art = artifacts.map_or_else(agentenv_testkit::paths::artifacts, Path::to_path_buf);
        let missing: Vec<String> = [
            "kernels/vmlinuz".to_string(),
            "initramfs/initrd.img".to_string(),
            format!("rootfs/{rootfs}"),
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
        let artifacts =
            std::fs::canonicalize(&art).map_err(|e| format!("{}: {e}", art.display()))?;
        let version = Command::new(&qemu)
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
            .unwrap_or_else(|| "version unknown".into());
        Ok(QemuGuest {
            qemu,
            version,
            artifacts,
        })
    }
}

/// A free TCP port on loopback (another process may take it before it is used).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------- config

/// The daemon's own config type: a benchmark sets what it chooses, and
/// [`Harness::write_config`] the rest.
pub use agentenv_core::config::{AuthMode, Config};

/// fc-double (or a wrapper of it, `binary`) as the VMM, in the run's
/// directory `root`: empty `rootfs/`, `kernels/` (with the fake kernel
/// fc-double only opens) and `initramfs/`, and direct disks in `disks/`.
pub fn fc_double_config(binary: PathBuf, root: &Path, memory_mib_per_slot: u64) -> Result<Config> {
    for d in ["rootfs", "kernels", "initramfs", "disks"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(
        root.join("kernels/vmlinux"),
        b"not a kernel: fc-double only opens it",
    )?;
    Ok(Config {
        vmm: VmmChoice::Firecracker,
        firecracker_binary: binary,
        rootfs_root: root.join("rootfs"),
        kernel_root: root.join("kernels"),
        initramfs_root: root.join("initramfs"),
        memory_mib_per_slot,
        default_disk_size_gib: 1,
        direct_disk_roots: vec![root.join("disks")],
        startup_timeout_ms: 10000,
        request_timeout_ms: 10000,
        ..Config::default()
    })
}

/// QEMU booting the guest artifacts (`vmlinuz`, `initrd.img`).
pub fn qemu_config(guest: &QemuGuest, memory_mib_per_slot: u64, disk_gib: u64) -> Config {
    let a = &guest.artifacts;
    Config {
        vmm: VmmChoice::Qemu,
        qemu_binary: guest.qemu.clone(),
        rootfs_root: a.join("rootfs"),
        kernel_root: a.join("kernels"),
        initramfs_root: a.join("initramfs"),
        default_kernel: "vmlinuz".into(),
        default_initrd: Some("initrd.img".into()),
        memory_mib_per_slot,
        default_disk_size_gib: disk_gib,
        startup_timeout_ms: 30000,
        request_timeout_ms: 30000,
        ..Config::default()
    }
}

/// `config` for a run whose directory is `root`: the roots of the daemon's
/// own state (`sessions/`, sockets in `s/`, snapshots in `snap/`) under it,
/// one slot per VM, its VMs stopped with it (even when the benchmark is
/// interrupted), and networking off: the benchmarks run in the host's own
/// network namespace and must never create TAPs or firewall rules there.
pub fn in_run(config: &Config, root: &Path) -> Config {
    Config {
        session_root: root.join("sessions"),
        socket_root: root.join("s"),
        snapshots_root: root.join("snap"),
        tmpfs_snapshot_root: root.join("snap/tmpfs"),
        hdfs_snapshot_root: root.join("snap/durable"),
        default_slots: 1,
        shutdown_timeout_s: 5,
        on_shutdown: OnShutdown::Stop,
        network: NetworkConfig {
            enable: false,
            ..config.network.clone()
        },
        // Auth as configured; the tokens file in the run, created by the
        // daemon's first start with an admin token in `admin.token`.
        auth: AuthConfig {
            tokens_file: root.join("tokens"),
            ..config.auth.clone()
        },
        // A parent cgroup of its own: two daemons of one run (jail on and
        // off, say) may give a VM the same id, and a shared parent would
        // give both VMs one cgroup.
        cgroup: CgroupConfig {
            parent: format!(
                "agentenv-bench-{}",
                root.file_name()
                    .map(|n| n
                        .to_string_lossy()
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
                    .unwrap_or_default()
            ),
            ..config.cgroup.clone()
        },
        ..config.clone()
    }
}

// ---------------------------------------------------------------- the daemon

/// One request through `api`, timed, checked for the status `want`.
pub fn call(
    api: &ApiClient,
    method: &str,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> Result<(Duration, Response)> {
    let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON values serialise"));
    let req = Request::new(method, path).body(bytes.as_deref().map_or(Body::Empty, Body::Bytes));
    let t0 = Instant::now();
    let r = api.send(req).with_context(|| format!("{method} {path}"))?;
    let took = t0.elapsed();
    ensure!(
        r.status == want,
        "{method} {path}: HTTP {} (wanted {want}): {}",
        r.status,
        r.text()
    );
    Ok((took, r))
}

/// `POST /v1/vm` with `body`, timed up to its 201; the VM must be running.
pub fn create_vm(api: &ApiClient, body: &Value) -> Result<(Duration, VmInfo)> {
    let (took, r) = call(api, "POST", "/v1/vm", Some(body), 201)?;
    let vm: VmInfo = serde_json::from_slice(&r.body).context("POST /v1/vm: the answer")?;
    ensure!(
        vm.state == VmState::Running,
        "created VM is {:?}: {vm:?}",
        vm.state
    );
    Ok((took, vm))
}

/// An exec of `true` in VM `vm_id`, timed; it must exit 0.
pub fn exec_true(api: &ApiClient, vm_id: &str) -> Result<Duration> {
    let req = ExecRequest {
        cmd: vec!["true".into()],
        ..ExecRequest::default()
    };
    let t0 = Instant::now();
    let r = api
        .exec(vm_id, &req)
        .with_context(|| format!("{vm_id}: exec of true"))?;
    let took = t0.elapsed();
    ensure!(r.exit_code == Some(0), "{vm_id}: exec of true: {r:?}");
    Ok(took)
}

/// A running daemon, started by [`Harness::start_daemon`].
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// A client for its HTTP API (one keep-alive connection), with the
    /// admin token its first start made (when auth is on).
    pub api: ApiClient,
    /// That token (`None` with `[auth] mode = "none"`).
    pub token: Option<String>,
    /// Its stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on a free loopback port and waits until it answers
    /// `GET /v1/health`.
    fn start(
        agentenv: &Path,
        config: &Path,
        log: &Path,
        io_timeout: Duration,
        health_timeout: Duration,
    ) -> Result<Daemon> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let api = ApiClient::new(&format!("http://{addr}"))?.with_timeout(io_timeout);
        let log_file = File::create(log)?;
        let mut cmd = Command::new(agentenv);
        cmd.arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // If the benchmark dies without cleaning up, the daemon gets SIGTERM
        // and stops its VMs itself.
        let child = signals::spawn_group(&mut cmd, libc::SIGTERM)?;
        let mut d = Daemon {
            pid: child.id(),
            child,
            addr,
            api,
            token: None,
            log: log.to_path_buf(),
        };
        let token_file = config.with_file_name("admin.token");
        let start = Instant::now();
        loop {
            if let Some(status) = d.child.try_wait()? {
                let tail = tail_lines(&d.log, 10);
                bail!("the daemon exited at start ({status}): {tail}");
            }
            if signals::received().is_some() || start.elapsed() > health_timeout {
                let _ = d.child.kill();
                let _ = d.child.wait();
                signals::check()?;
                bail!(
                    "the daemon did not answer /v1/health within {} s",
                    health_timeout.as_secs()
                );
            }
            if d.api.health().is_ok() {
                // The first start writes the admin token before it serves.
                if let Ok(t) = std::fs::read_to_string(&token_file) {
                    d.token = Some(t.trim().to_string());
                    d.api = d.client(io_timeout)?;
                }
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new client of this daemon (its own connection), with its token.
    pub fn client(&self, io_timeout: Duration) -> Result<ApiClient> {
        let c = ApiClient::new(&format!("http://{}", self.addr))?.with_timeout(io_timeout);
        Ok(match &self.token {
            Some(t) => c.with_token(t),
            None => c,
        })
    }

    /// Deletes every VM through the API, then stops the daemon with SIGTERM
    /// (SIGKILL after 30 s), recording what happened in `c`.
    fn stop(mut self, c: &mut Cleanup) {
        let t0 = Instant::now();
        let ids: Vec<String> = match self.api.list_vms() {
            Ok(l) => l.vms.into_iter().map(|vm| vm.vm_id).collect(),
            Err(e) => {
                c.errors.push(format!("listing VMs: {e}"));
                Vec::new()
            }
        };
        if !ids.is_empty() {
            eprintln!("cleanup: deleting {} VMs …", ids.len());
        }
        for id in &ids {
            match self.api.delete_vm(id) {
                Ok(()) => c.deleted += 1,
                Err(e) => c.errors.push(format!("DELETE {id}: {e}")),
            }
        }
        c.delete_s = t0.elapsed().as_secs_f64();
        // SAFETY: plain kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        let t1 = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if t1.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    c.errors
                        .push("the daemon did not exit within 30 s of SIGTERM; killed".into());
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        c.daemon_exit = status.map(|s| s.to_string());
        c.daemon_exit_ok = status.is_some_and(|s| s.success());
        c.daemon_stop_s = t1.elapsed().as_secs_f64();
    }
}

// ---------------------------------------------------------------- the harness

/// A benchmark run's temporary directory, the daemon's config in it, and the
/// daemon once started. Torn down by [`Harness::teardown`], or when dropped.
pub struct Harness {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    fs: String,
    config: Option<PathBuf>,
    daemon: Option<Daemon>,
}

impl Harness {
    /// Makes a temporary directory named `prefix…` in `parent` (default:
    /// `$TMPDIR` or `/tmp`), with the daemon's state roots and `subdirs` in it.
    pub fn new(parent: Option<&Path>, prefix: &str, subdirs: &[&str]) -> Result<Harness> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .with_context(|| {
                format!("cannot make a temporary directory in {}", parent.display())
            })?;
        let root = std::fs::canonicalize(tmp.path())?;
        for sub in ["sessions", "s", "snap"].iter().chain(subdirs) {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Harness {
            fs: procfs::fs_type(&root),
            tmp: Some(tmp),
            root,
            config: None,
            daemon: None,
        })
    }

    /// The run's directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file system the run's directory is on.
    pub fn fs(&self) -> &str {
        &self.fs
    }

    /// Writes the daemon's config ([`in_run`] of `config`) to
    /// `agentenv.toml` in the run's directory.
    pub fn write_config(&mut self, config: &Config) -> Result<()> {
        let path = self.root.join("agentenv.toml");
        let text = toml::to_string(&in_run(config, &self.root))?;
        let name = crate::runner::name();
        std::fs::write(&path, format!("# agentenv-bench {name}\n{text}"))?;
        self.config = Some(path);
        Ok(())
    }

    /// Starts `agentenv` with the config written before, stderr to
    /// `daemon.log`, and waits up to `health_timeout` for it to answer.
    /// Its API client gives up on any single read or write after `io_timeout`.
    pub fn start_daemon(
        &mut self,
        agentenv: &Path,
        io_timeout: Duration,
        health_timeout: Duration,
    ) -> Result<&mut Daemon> {
        let config = self
            .config
            .as_deref()
            .context("no config written for the daemon")?;
        ensure!(self.daemon.is_none(), "the daemon is already running");
        let log = self.root.join("daemon.log");
        let mut last_err = None;
        crate::runner::progress(format!(
            "temp dir {} ({}); starting the daemon {}",
            self.root.display(),
            self.fs,
            agentenv.display()
        ));
        for _ in 0..3 {
            match Daemon::start(agentenv, config, &log, io_timeout, health_timeout) {
                Ok(d) => {
                    crate::runner::progress(format!("daemon pid {} on http://{}", d.pid, d.addr));
                    return Ok(self.daemon.insert(d));
                }
                // Another process may have taken the free port; try another one.
                Err(e) if format!("{e:#}").contains("cannot listen") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("three attempts"))
    }

    /// The running daemon's API client.
    pub fn api(&self) -> Result<&ApiClient> {
        Ok(&self
            .daemon
            .as_ref()
            .context("the daemon is not running")?
            .api)
    }

    /// The daemon, if it runs.
    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// Ends a benchmark's run. After a failure that no signal caused, it
    /// first shows the end of the daemon's log; then it tears down (see
    /// [`Harness::teardown`]). The run's result comes back with the cleanup.
    pub fn finish<R>(&mut self, result: Result<R>, keep: bool) -> (Result<R>, Cleanup) {
        let failed = result.is_err() && signals::received().is_none();
        if let Some(d) = self.daemon.as_ref().filter(|_| failed) {
            let tail = tail_lines(&d.log, 20);
            eprintln!("--- last lines of the daemon log ---\n{tail}\n---");
        }
        (result, self.teardown(keep))
    }

    /// Deletes every VM, stops the daemon with SIGTERM, kills (and reports)
    /// any process still naming the run's directory, then removes the
    /// directory, or keeps it if `keep`.
    pub fn teardown(&mut self, keep: bool) -> Cleanup {
        let mut c = Cleanup::default();
        match self.daemon.take() {
            Some(d) => d.stop(&mut c),
            None => c.daemon_exit_ok = true,
        }
        // Any process still naming the run's directory: a VMM, a build step.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut left = processes_mentioning(&self.root);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = processes_mentioning(&self.root);
        }
        for (pid, cmd) in &left {
            c.leftover.push(format!("{pid} {cmd}"));
            // SAFETY: plain kill(2) of a leftover of this run, by its pid.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if keep {
                c.kept_dir = Some(tmp.keep().display().to_string());
            } else if let Err(e) = tmp.close() {
                c.errors
                    .push(format!("removing {}: {e}", self.root.display()));
            } else {
                c.dir_removed = true;
            }
        }
        c
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.daemon.is_some() || self.tmp.is_some() {
            let _ = self.teardown(false);
        }
    }
}

// ---------------------------------------------------------------- cleanup

/// What [`Harness::teardown`] did.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// VMs deleted through the API.
    pub deleted: usize,
    /// Seconds spent deleting them.
    pub delete_s: f64,
    /// The daemon's exit status, if it ran.
    pub daemon_exit: Option<String>,
    /// The daemon exited successfully after SIGTERM (or never ran).
    pub daemon_exit_ok: bool,
    /// Seconds from SIGTERM to the daemon's exit.
    pub daemon_stop_s: f64,
    /// Processes still naming the run's directory (killed), as "PID command".
    pub leftover: Vec<String>,
    pub dir_removed: bool,
    pub kept_dir: Option<String>,
    pub errors: Vec<String>,
}

impl Cleanup {
    /// Nothing left over, no errors, and the daemon stopped cleanly.
    pub fn clean(&self) -> bool {
        self.leftover.is_empty() && self.errors.is_empty() && self.daemon_exit_ok
    }

    /// What happened to the VMs, the daemon, the directory and any leftover
    /// process, and each error, on a line of its own.
    pub fn summary(&self) -> String {
        let mut s = match &self.daemon_exit {
            Some(exit) => format!(
                "deleted {} VMs in {:.1} s; daemon stopped by SIGTERM in {:.2} s ({exit}); ",
                self.deleted, self.delete_s, self.daemon_stop_s,
            ),
            None => String::new(),
        };
        s.push_str(&format!("{} leftover processes; ", self.leftover.len()));
        match (&self.kept_dir, self.dir_removed) {
            (Some(d), _) => s.push_str(&format!("temp dir kept at {d}")),
            (None, true) => s.push_str("temp dir removed"),
            (None, false) => s.push_str("temp dir NOT removed"),
        }
        for l in &self.leftover {
            s.push_str(&format!("\n  leftover (killed): {l}"));
        }
        for e in &self.errors {
            s.push_str(&format!("\n  error: {e}"));
        }
        s
    }

    /// For the report.
    pub fn cleaned(&self) -> Cleaned {
        Cleaned {
            clean: self.clean(),
            summary: self.summary(),
            details: serde_json::json!({
                "deleted_vms": self.deleted,
                "delete_s": crate::stats::round3(self.delete_s),
                "daemon_exit": self.daemon_exit,
                "daemon_exit_ok": self.daemon_exit_ok,
                "daemon_stop_s": crate::stats::round3(self.daemon_stop_s),
                "leftover_processes": self.leftover,
                "temp_dir_removed": self.dir_removed,
                "temp_dir_kept": self.kept_dir,
                "errors": self.errors,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_with_the_roots_in_the_run_and_networking_off() {
        let root = Path::new("/r \"x\"");
        let fc = Config {
            max_memory_mib: Some(4096),
            direct_disk_roots: vec![root.join("disks"), "/d2".into()],
            vmm: VmmChoice::Qemu,
            default_initrd: Some("initrd.img".into()),
            ..Config::default()
        };
        let c = Config::parse(&toml::to_string(&in_run(&fc, root)).unwrap()).unwrap();
        assert_eq!(c.session_root, root.join("sessions"));
        assert_eq!(c.socket_root, root.join("s"));
        assert_eq!(c.snapshots_root, root.join("snap"));
        assert_eq!(c.tmpfs_snapshot_root, root.join("snap/tmpfs"));
        assert_eq!(c.hdfs_snapshot_root, root.join("snap/durable"));
        assert_eq!(c.max_memory_mib, Some(4096));
        assert_eq!(c.direct_disk_roots, [root.join("disks"), "/d2".into()]);
        assert_eq!(c.on_shutdown, OnShutdown::Stop);
        assert!(!c.network.enable);
        assert_eq!(c, in_run(&fc, root));
    }

    #[test]
    fn missing_binaries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let [a] = find_binaries(Some(dir.path()), ["a"]).unwrap();
        assert_eq!(a, std::fs::canonicalize(dir.path().join("a")).unwrap());
        let e = find_binaries(Some(dir.path()), ["a", "fc-double"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot find all of a, fc-double (looked in "),
            "{e}"
        );
        assert!(
            e.ends_with("cargo build --release -p a -p agentenv-testkit\n"),
            "{e}"
        );
    }
}
