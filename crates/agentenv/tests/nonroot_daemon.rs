//! The daemon as a non-root user, the way the seed documents it:
//! `sudo setcap cap_net_admin+ep target/release/agentenv`, then the daemon run
//! by an ordinary user (issue 13; `docs/seed-commands.md`).
//!
//! Each case runs a copy of the daemon binary (the build output is never given
//! a capability) as `nobody`, inside a network namespace this test makes, with
//! its own `/dev/net/tun` node bind-mounted in the namespace's private mount
//! table (the host's node is never changed): one only root may open, and one
//! `nobody` may open, as most distributions' mode 0666 allows. HTTP calls run
//! inside the namespace (`curl` through `ip netns exec`), so nothing listens on
//! the machine's own interfaces.
//!
//! - without the capability and with `[network] enable = true`: a clear
//!   startup error naming the key and `setcap`, before anything is changed;
//! - without the capability and networking off: the daemon serves;
//! - with the capability and networking off: the daemon drops it, in every
//!   thread;
//! - with the capability but no access to `/dev/net/tun`: a clear error;
//! - with the capability: networking works end to end (a TAP owned by the
//!   daemon's user, a VM that is ready and pings its host address), the VMM runs
//!   without any capability, and delete/stop leave nothing behind.
//!
//! Needs root, `setcap` (libcap2-bin), `setpriv`, `ip`, `nft`, `curl`, QEMU and
//! the guest artifacts; it fails (never skips) without them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agentenv_testkit::netns::NetnsPair;
use serde_json::{json, Value};

const NOBODY: u32 = 65534;
const LISTEN: &str = "127.0.0.1:8080";

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).is_file())
    })
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything the cases share: binaries, device nodes, artifacts, a directory
/// `nobody` owns.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// A copy of the daemon without any capability.
    plain: PathBuf,
    /// A copy with `cap_net_admin+ep`.
    capable: PathBuf,
    /// `/dev/net/tun` as only root may open it (mode 0600, owner root).
    tun_root_only: PathBuf,
    /// `/dev/net/tun` as `nobody` may open it.
    tun_nobody: PathBuf,
    artifacts: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the non-root daemon test needs root to prepare (setcap, namespaces); it must run"
        );
        for (tool, package) in [
            ("setcap", "libcap2-bin"),
            ("getcap", "libcap2-bin"),
            ("setpriv", "util-linux"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("curl", "curl"),
            ("mknod", "coreutils"),
            ("qemu-system-x86_64", "qemu-system-x86"),
        ] {
            assert!(
                on_path(tool),
                "`{tool}` is missing (Debian package {package}); this test must run"
            );
        }
        let artifacts = agentenv_testkit::paths::artifacts();
        for f in [
            "kernels/vmlinuz",
            "initramfs/initrd.img",
            "rootfs/minimal.ext4",
        ] {
            let path = artifacts.join(f);
            let mode = fs::metadata(&path)
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {e} (scripts/build-artifacts.sh; AGENTENV_ARTIFACTS)",
                        path.display()
                    )
                })
                .permissions()
                .mode();
            assert!(
                mode & 0o004 != 0,
                "{} is not world-readable: the VMM runs as nobody",
                path.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("agentenv-nonroot")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let daemon = Path::new(env!("CARGO_BIN_EXE_agentenv"));
        let plain = root.join("agentenv-plain");
        let capable = root.join("agentenv");
        for copy in [&plain, &capable] {
            fs::copy(daemon, copy).unwrap();
            fs::set_permissions(copy, fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The documented command, on the copy.
        run_ok(Command::new("setcap").arg("cap_net_admin+ep").arg(&capable));
        let caps = run_ok(Command::new("getcap").arg(&capable));
        assert!(caps.contains("cap_net_admin"), "getcap: {caps}");
        assert!(run_ok(Command::new("getcap").arg(&plain)).trim().is_empty());

        let tun_root_only = root.join("tun-root-only");
        let tun_nobody = root.join("tun-nobody");
        for node in [&tun_root_only, &tun_nobody] {
            run_ok(
                Command::new("mknod")
                    .args(["-m", "0600"])
                    .arg(node)
                    .args(["c", "10", "200"]),
            );
        }
        std::os::unix::fs::chown(&tun_nobody, Some(NOBODY), Some(NOBODY)).unwrap();
        Setup {
            _dir: dir,
            root,
            plain,
            capable,
            tun_root_only,
            tun_nobody,
            artifacts,
        }
    }

    /// A working directory owned by `nobody` with a config in it.
    fn workdir(&self, name: &str, network: bool) -> PathBuf {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
        let a = self.artifacts.display();
        fs::write(
            dir.join("agentenv.toml"),
            format!(
                "vmm = \"qemu\"\nkernel_root = \"{a}/kernels\"\ninitramfs_root = \"{a}/initramfs\"\n\
                 rootfs_root = \"{a}/rootfs\"\ndefault_kernel = \"vmlinuz\"\ndefault_initrd = \"initrd.img\"\n\
                 [network]\nenable = {network}\ntap_prefix = \"nrtap\"\nsubnet_prefix = \"172.29\"\n"
            ),
        )
        .unwrap();
        dir
    }
}

/// A daemon started as `nobody` in the namespace `ns`.
struct Daemon {
    child: Child,
    log: PathBuf,
    ns: String,
    /// The admin token the daemon's first start saved (`data/admin.token`).
    token_file: PathBuf,
}

impl Daemon {
    fn start(ns: &NetnsPair, bin: &Path, tun: &Path, workdir: &Path) -> Daemon {
        let log = workdir.join("daemon.log");
        let script =
            "mount --bind \"$1\" /dev/net/tun && exec setpriv --reuid=65534 --regid=65534 \
                      --clear-groups -- \"$2\" --config agentenv.toml --listen \"$3\"";
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.host, "sh", "-c", script, "sh"])
            .arg(tun)
            .arg(bin)
            .arg(LISTEN)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("ip netns exec starts");
        Daemon {
            child,
            log,
            ns: ns.host.clone(),
            token_file: workdir.join("data/admin.token"),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon answers `/v1/health` (`Ok`) or exits (`Err`).
    fn wait_up(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if self.call("GET", "/v1/health", None).0 == 200 {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon neither serves nor exits: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One HTTP call from inside the namespace: (status, JSON body).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "curl", "-s", "-m", "240"])
            .args(["-X", method, "-w", "\n%{http_code}"]);
        // The token the first start created, as the quickstart uses it.
        if let Ok(token) = fs::read_to_string(&self.token_file) {
            cmd.args(["-H", &format!("authorization: Bearer {}", token.trim())]);
        }
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "-d"])
                .arg(body.to_string());
        }
        let out = cmd.arg(format!("http://{LISTEN}{path}")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or(0);
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon does not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `CapEff` and the real uid of a process, from `/proc/PID/status`.
fn caps_and_uid(pid: u32) -> (u64, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        field("Uid:").parse().unwrap(),
    )
}

/// Starts the daemon in `ns` and checks that it refuses to start: exit 1, every
/// needle in its log, the namespace unchanged (no table, no link).
fn assert_refused(ns: &NetnsPair, bin: &Path, tun: &Path, workdir: &Path, needles: &[&str]) {
    let before = ns.state();
    let mut d = Daemon::start(ns, bin, tun, workdir);
    let status = d.wait_up().expect_err("the daemon served");
    assert_eq!(status.code(), Some(1), "{}", d.log());
    let log = d.log();
    for needle in needles {
        assert!(log.contains(needle), "lacks {needle:?}: {log}");
    }
    assert!(!has_agentenv_table(ns), "a refused start loaded the table");
    assert_eq!(ns.state(), before, "a refused start changed the namespace");
}

/// `CapPrm` of every thread of a process.
fn permitted_caps_of_threads(pid: u32) -> Vec<u64> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let status = fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            let prm = status
                .lines()
                .find_map(|l| l.strip_prefix("CapPrm:"))
                .expect("CapPrm");
            u64::from_str_radix(prm.trim(), 16).unwrap()
        })
        .collect()
}

fn has_agentenv_table(ns: &NetnsPair) -> bool {
    ns.exec(&["nft", "list", "tables"])
        .unwrap()
        .contains("agentenv")
}

#[test]
fn without_cap_net_admin_networking_is_refused_clearly() {
    let setup = Setup::new();
    let ns = NetnsPair::new("nr-plain").unwrap();
    let before = ns.state();
    let workdir = setup.workdir("plain-net", true);
    assert_refused(
        &ns,
        &setup.plain,
        &setup.tun_nobody,
        &workdir,
        &[
            "config table `[network]`: enable = true needs root or CAP_NET_ADMIN",
            "uid 65534",
            "setcap cap_net_admin+ep",
            "[network] enable = false",
        ],
    );

    // Networking off: an ordinary user's daemon needs no capability.
    let workdir = setup.workdir("plain-nonet", false);
    let mut d = Daemon::start(&ns, &setup.plain, &setup.tun_root_only, &workdir);
    if let Err(status) = d.wait_up() {
        panic!("networking off, the daemon exited ({status}): {}", d.log());
    }
    let (code, body) = d.call("GET", "/v1/vm", None);
    assert_eq!(code, 200, "{body}");
    let log = d.log();
    assert!(log.contains("automatic networking off"), "{log}");
    assert!(d.stop().success(), "{log}");
    assert_eq!(ns.state(), before);
}

#[test]
fn with_cap_net_admin_and_networking_off_the_capability_is_dropped() {
    let setup = Setup::new();
    let ns = NetnsPair::new("nr-drop").unwrap();
    let workdir = setup.workdir("cap-nonet", false);
    let mut d = Daemon::start(&ns, &setup.capable, &setup.tun_root_only, &workdir);
    if let Err(status) = d.wait_up() {
        panic!("networking off, the daemon exited ({status}): {}", d.log());
    }
    let threads = permitted_caps_of_threads(d.child.id());
    assert!(threads.len() > 1, "the runtime's threads: {threads:?}");
    assert!(
        threads.iter().all(|&c| c == 0),
        "a thread kept a capability: {threads:?}"
    );
    let log = d.log();
    assert!(log.contains("dropped CAP_NET_ADMIN"), "{log}");
    assert!(d.stop().success(), "{log}");
}

#[test]
fn with_cap_net_admin_but_no_tun_access_the_start_is_refused_clearly() {
    let setup = Setup::new();
    let ns = NetnsPair::new("nr-tun").unwrap();
    let workdir = setup.workdir("cap-notun", true);
    assert_refused(
        &ns,
        &setup.capable,
        &setup.tun_root_only,
        &workdir,
        &[
            "config table `[network]`: enable = true needs /dev/net/tun",
            "uid 65534",
            "Permission denied",
        ],
    );
}

#[test]
fn with_cap_net_admin_a_non_root_daemon_networks_its_vms() {
    let setup = Setup::new();
    let ns = NetnsPair::new("nr-cap").unwrap();
    let before = ns.state();
    let workdir = setup.workdir("cap-net", true);
    let mut d = Daemon::start(&ns, &setup.capable, &setup.tun_nobody, &workdir);
    if let Err(status) = d.wait_up() {
        panic!("the capable daemon exited ({status}): {}", d.log());
    }
    assert!(has_agentenv_table(&ns), "{}", d.log());
    let daemon_pid = d.child.id();
    let (caps, uid) = caps_and_uid(daemon_pid);
    assert_eq!(uid, NOBODY);
    assert_eq!(caps, 1 << 12, "the daemon holds exactly CAP_NET_ADMIN");
    let threads = permitted_caps_of_threads(daemon_pid);
    assert!(threads.iter().all(|&c| c == 1 << 12), "{threads:?}");

    let (code, vm) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({
            "vm_id": "n1",
            "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"},
            "wait_ready": true,
        })),
    );
    assert_eq!(code, 201, "{vm}\n{}", d.log());
    assert_eq!(vm["ready"], true, "{vm}");
    let tap = vm["tap_name"].as_str().expect("a TAP").to_string();
    assert_eq!(tap, "nrtap1");
    let link = ns.ip(&["-d", "link", "show", &tap]).unwrap();
    assert!(
        link.contains("user nobody"),
        "the TAP is not nobody's: {link}"
    );
    // The VMM runs as the daemon's user without any capability.
    let vmm_pid = vm["pid"].as_u64().expect("a VMM pid") as u32;
    assert_eq!(caps_and_uid(vmm_pid), (0, NOBODY));

    // The guest reaches its host address over the TAP.
    let host_ip = vm["host_ip"].as_str().unwrap();
    let (code, ran) = d.call(
        "POST",
        "/v1/vm/n1/exec",
        Some(json!({"cmd": ["ping", "-c", "2", "-W", "3", host_ip]})),
    );
    assert_eq!(code, 200, "{ran}");
    assert_eq!(ran["exit_code"], 0, "{ran}");

    let (code, body) = d.call("DELETE", "/v1/vm/n1", None);
    assert_eq!(code, 204, "{body}");
    assert!(ns.ip(&["link", "show", &tap]).is_err(), "{tap} left");
    let log = d.log();
    assert!(d.stop().success(), "{log}");
    assert!(
        !Path::new(&format!("/proc/{vmm_pid}")).exists(),
        "the VMM outlived its VM"
    );
    let left = agentenv_testkit::leaks::processes_mentioning(&workdir);
    assert!(left.is_empty(), "processes left: {left:?}");
    // Links, addresses and routes are as before; only agentenv's own table stays
    // (as a root daemon leaves it).
    assert!(!before.contains("table inet agentenv"), "{before}");
    let after = ns.state();
    let (rest, _table) = after
        .split_once("table inet agentenv")
        .expect("the table stays");
    assert_eq!(rest.trim_end(), before.trim_end());
}
