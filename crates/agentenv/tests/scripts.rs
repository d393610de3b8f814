//! The shell scripts in `scripts/`, run for real: their `--help`, argument errors that name
//! the argument, `setup-runtime.sh` on a temporary config, `setup-remote-host.sh
//! --print-unit`/`--dry-run`, `get-firecracker.sh` without network (and from a cached
//! release), the static guest agent build, and builds of the minimal rootfs (with the agent)
//! and of the kernel artifacts.
//!
//! The `seed_*` tests at the end run the seed's documented commands verbatim and need
//! root (network namespaces, a loopback sshd); the others do not. The guest agent is built in `target/guest` (shared with
//! `scripts/build-guest-agent.sh` runs outside the tests), so only the first build is slow. Tests that need tools which may be missing (mkfs.ext4, debugfs,
//! busybox-static, a cached kernel package) print why they skip. Every script runs with a
//! timeout, in its own process group, which is killed if the timeout passes.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn script(name: &str) -> PathBuf {
    repo().join("scripts").join(name)
}

/// What a finished script left behind.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// One script invocation.
struct Run {
    cmd: Command,
    what: String,
    timeout: Duration,
}

impl Run {
    fn new(name: &str, args: &[&str]) -> Run {
        let path = script(name);
        let mut cmd = if name.ends_with(".py") {
            let mut c = Command::new("python3");
            c.arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.args(args).current_dir(repo());
        Run::command(cmd, &format!("{name} {}", args.join(" ")))
    }

    /// Any command (a script of another tree, a script under `unshare`), with the
    /// same pipes, process group and timeout as [`Run::new`].
    fn command(mut cmd: Command, what: &str) -> Run {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        Run {
            cmd,
            what: what.to_string(),
            timeout: Duration::from_secs(60),
        }
    }

    fn cwd(mut self, dir: &Path) -> Run {
        self.cmd.current_dir(dir);
        self
    }

    fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Run {
        self.cmd.env(key, value);
        self
    }

    fn timeout(mut self, secs: u64) -> Run {
        self.timeout = Duration::from_secs(secs);
        self
    }

    /// Runs to completion; panics (after killing the process group) on timeout.
    fn run(mut self) -> Ran {
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.what));
        let pgid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let mut out_pipe = child.stdout.take().expect("stdout piped");
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out_pipe.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the script") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                panic!("{} did not finish within {:?}", self.what, self.timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Children the script left running in its group must not outlive it.
        let _ = killpg(pgid, Signal::SIGKILL);
        Ran {
            code: status.code(),
            stdout: out.join().expect("stdout reader"),
            stderr: err.join().expect("stderr reader"),
        }
    }
}

fn on_path(tool: &str) -> bool {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(PathBuf::from)
    .chain(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths),
    )
    .any(|d| d.join(tool).is_file())
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("agentenv-scripts")
        .tempdir()
        .expect("temporary directory")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Every script's `--help` exits 0 and names each of its options.
#[test]
fn help_names_every_option() {
    let cases: &[(&str, &[&str])] = &[
        (
            "build-kernel.sh",
            &[
                "--output",
                "--package",
                "--deb",
                "--module",
                "--busybox",
                "--version",
                "--fragment",
                "--jobs",
                "--force",
                "AGENTENV_CACHE",
            ],
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "--size-mib",
                "--flavor",
                "minimal",
                "debian",
                "e2b",
                "/home/user",
                "--dockerfile",
                "--tar",
                "--busybox",
                "--suite",
                "--mirror",
                "--include",
                "--ssh-key",
                "--agent",
                "/usr/sbin/agentenv-guest",
                "--force",
            ],
        ),
        (
            "build-guest-agent.sh",
            &[
                "--out",
                "--force",
                "crt-static",
                "target/guest",
                "x86_64-unknown-linux-gnu",
                "CARGO",
            ],
        ),
        (
            "get-firecracker.sh",
            &[
                "--version",
                "--output",
                "--arch",
                "x86_64",
                "aarch64",
                "--force",
                "--connect-timeout",
                "--max-time",
                "--base-url",
                "--from",
            ],
        ),
        (
            "setup-runtime.sh",
            &[
                "--config",
                "--clean",
                "--force",
                "session_root",
                "initramfs_root",
                "data/snapshots/tmpfs",
            ],
        ),
        (
            "setup-remote-host.sh",
            &[
                "--host",
                "--firecracker",
                "--agentenv",
                "--hypervisor",
                "--kernel",
                "--initrd",
                "--no-initrd",
                "--prefix",
                "--rootfs",
                "--config",
                "--listen",
                "--no-service",
                "--sudo",
                "--ssh-opts",
                "--dry-run",
                "--print-unit",
                "/opt/agentenv",
            ],
        ),
        (
            "build-artifacts.sh",
            &[
                "--output",
                "--force",
                "--rootfs-size-mib",
                "--e2b",
                "--e2b-size-mib",
                "e2b-base.ext4",
                "--timings",
                "agentenv-guest",
            ],
        ),
        (
            "verify-guest.py",
            &["--kernel", "--initrd", "--rootfs", "--only", "--timeout"],
        ),
    ];
    for (name, options) in cases {
        if name.ends_with(".py") && !on_path("python3") {
            agentenv_testkit::skip::skip(&format!("{name}: python3 is not installed"));
            continue;
        }
        let ran = Run::new(name, &["--help"]).run();
        assert_eq!(ran.code, Some(0), "{name} --help: {}", ran.describe());
        for option in *options {
            assert!(
                ran.stdout.contains(option),
                "{name} --help does not mention {option}: {}",
                ran.describe()
            );
        }
    }
}

/// Bad arguments fail with a non-zero exit and a message naming the argument, before any
/// work (no download, no build).
#[test]
fn bad_arguments_are_named() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("build-kernel.sh", &["--bogus"], "--bogus"),
        ("build-kernel.sh", &["--output"], "--output needs a value"),
        ("build-kernel.sh", &["--version", "six"], "--version"),
        (
            "build-kernel.sh",
            &["--fragment", "x.fragment"],
            "--fragment needs --version",
        ),
        (
            "build-kernel.sh",
            &["--version", "6.1", "--fragment", "/nonexistent.fragment"],
            "--fragment",
        ),
        (
            "build-kernel.sh",
            &["--version", "6.1", "--jobs", "0"],
            "--jobs",
        ),
        (
            "build-kernel.sh",
            &["--jobs", "4"],
            "--jobs needs --version",
        ),
        (
            "build-kernel.sh",
            &["--version", "6.1", "--deb", "x.deb"],
            "--deb",
        ),
        ("build-kernel.sh", &["--deb", "/nonexistent.deb"], "--deb"),
        ("build-kernel.sh", &["--package", "bash"], "--package"),
        ("build-kernel.sh", &["--module", "../evil"], "--module"),
        (
            "build-kernel.sh",
            &["--busybox", "/nonexistent/busybox"],
            "--busybox",
        ),
        ("create-rootfs.sh", &[], "--output"),
        ("create-rootfs.sh", &["--output", "x.ext4"], "--size-mib"),
        (
            "create-rootfs.sh",
            &["--output", "x.ext4", "--size-mib", "lots"],
            "--size-mib",
        ),
        (
            "create-rootfs.sh",
            &["--output", "x.ext4", "--size-mib", "2"],
            "--size-mib",
        ),
        (
            "create-rootfs.sh",
            &["--output", "x.ext4", "--size-mib", "64", "--flavor", "arch"],
            "--flavor",
        ),
        (
            "create-rootfs.sh",
            &["--output", "/nonexistent/dir/x.ext4", "--size-mib", "64"],
            "--output",
        ),
        (
            "create-rootfs.sh",
            &["--output", "/tmp", "--size-mib", "64"],
            "--output",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--dockerfile",
                "/nonexistent/Dockerfile",
            ],
            "--dockerfile",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--flavor",
                "debian",
                "--dockerfile",
                "resources/rootfs/Dockerfile",
            ],
            "--flavor and --dockerfile",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--flavor",
                "debian",
                "--ssh-key",
                "/nonexistent.pub",
            ],
            "--ssh-key",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--flavor",
                "debian",
                "--suite",
                "Bookworm!",
            ],
            "--suite",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--ssh-key",
                "k.pub",
            ],
            "--ssh-key",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--agent",
                "/nonexistent/agentenv-guest",
            ],
            "--agent",
        ),
        (
            "create-rootfs.sh",
            &["--output", "x.ext4", "--size-mib", "64", "--agent"],
            "--agent needs a value",
        ),
        ("build-guest-agent.sh", &["--bogus"], "--bogus"),
        ("build-guest-agent.sh", &["--out"], "--out needs a value"),
        (
            "build-guest-agent.sh",
            &["--out", "/nonexistent/dir/agentenv-guest"],
            "--out",
        ),
        ("build-guest-agent.sh", &["--out", "/tmp"], "--out"),
        ("get-firecracker.sh", &["--output", "fc"], "--version"),
        ("get-firecracker.sh", &["--version", "1.13.1"], "--output"),
        (
            "get-firecracker.sh",
            &["--version", "latest", "--output", "fc"],
            "--version",
        ),
        (
            "get-firecracker.sh",
            &["--version", "1.13.1", "--output", "fc", "--arch", "riscv64"],
            "--arch",
        ),
        (
            "get-firecracker.sh",
            &[
                "--version",
                "1.13.1",
                "--output",
                "fc",
                "--connect-timeout",
                "soon",
            ],
            "--connect-timeout",
        ),
        (
            "get-firecracker.sh",
            &["--version", "1.13.1", "--output", "/tmp"],
            "--output",
        ),
        (
            "setup-runtime.sh",
            &["--config", "/nonexistent/agentenv.toml"],
            "--config",
        ),
        ("setup-runtime.sh", &["--force"], "--force"),
        ("setup-runtime.sh", &["--cleanup"], "--cleanup"),
        ("setup-remote-host.sh", &[], "--host"),
        (
            "setup-remote-host.sh",
            &["--host", "root@h"],
            "--firecracker",
        ),
        ("setup-remote-host.sh", &["--host", "bad host"], "--host"),
        (
            "setup-remote-host.sh",
            &[
                "--host",
                "h",
                "--firecracker",
                "/bin/sh",
                "--kernel",
                "/bin/sh",
            ],
            "--agentenv FILE is required",
        ),
        (
            "setup-remote-host.sh",
            &["--agentenv", "a", "--hypervisor", "b"],
            "--agentenv and --hypervisor both name the agentenv binary",
        ),
        (
            "setup-remote-host.sh",
            &["--hypervisor=b", "--agentenv=a"],
            "--hypervisor and --agentenv both name",
        ),
        (
            "setup-remote-host.sh",
            &["--print-unit", "--listen", "8080"],
            "--listen",
        ),
        (
            "build-artifacts.sh",
            &["--rootfs-size-mib", "big"],
            "--rootfs-size-mib",
        ),
        ("build-artifacts.sh", &["--rebuild"], "--rebuild"),
        (
            "build-artifacts.sh",
            &["--e2b", "--e2b-size-mib", "big"],
            "--e2b-size-mib",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--flavor",
                "e2b",
                "--suite",
                "Bookworm!",
            ],
            "--suite",
        ),
        (
            "setup-remote-host.sh",
            &["--print-unit", "--prefix", "opt/agentenv"],
            "--prefix",
        ),
        (
            "setup-remote-host.sh",
            &["--print-unit", "--prefix", "/opt/../etc"],
            "--prefix",
        ),
        (
            "get-firecracker.sh",
            &[
                "--version",
                "1.13.1",
                "--output",
                "fc",
                "--from",
                "/nonexistent.tgz",
            ],
            "--from",
        ),
        (
            "get-firecracker.sh",
            &["--version", "1.13.1", "--output", "artifacts/fc/"],
            "is a directory",
        ),
        (
            "get-firecracker.sh",
            &["--version", "1.13.1", "--output", "no/such/fc"],
            "does not exist, nor does its parent",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--tar",
                "/nonexistent.tar",
            ],
            "--tar",
        ),
        (
            "create-rootfs.sh",
            &[
                "--output",
                "x.ext4",
                "--size-mib",
                "64",
                "--tar",
                "/etc/hostname",
                "--flavor",
                "debian",
            ],
            "--tar cannot be combined",
        ),
    ];
    let dir = tempdir();
    for (name, args, needle) in cases {
        let ran = Run::new(name, args)
            .cwd(dir.path())
            .env("AGENTENV_CACHE", dir.path().join("cache"))
            .run();
        assert_eq!(ran.code, Some(2), "{name} {args:?}: {}", ran.describe());
        assert!(
            ran.stderr.contains(needle),
            "{name} {args:?} does not name {needle:?}: {}",
            ran.describe()
        );
        assert!(
            ran.stderr.contains("--help"),
            "{name} {args:?} does not point at --help: {}",
            ran.describe()
        );
    }
}

/// Writes a config naming every directory under `dir/rt`, and returns (config, dirs).
fn runtime_config(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let keys = [
        ("session_root", "rt/sessions"),
        ("socket_root", "rt/sockets"),
        ("rootfs_root", "rt/rootfs"),
        ("snapshots_root", "rt/snapshots"),
        ("tmpfs_snapshot_root", "rt/snapshots/tmpfs"),
        ("hdfs_snapshot_root", "rt/snapshots/durable"),
        ("kernel_root", "rt/kernels"),
        ("initramfs_root", "rt/initramfs"),
    ];
    let mut text = String::from("# test config\nvmm = \"qemu\"\n");
    for (key, value) in keys {
        text.push_str(&format!("{key} = \"{value}\"  # {key}\n"));
    }
    text.push_str("\n[network]\nenable = false\ntap_prefix = \"session_root\"\n");
    let config = dir.join("agentenv.toml");
    fs::write(&config, text).unwrap();
    (config, keys.iter().map(|(_, v)| dir.join(v)).collect())
}

#[test]
fn setup_runtime_takes_the_durable_tier_by_either_name() {
    let dir = tempdir();
    let config = dir.path().join("agentenv.toml");
    fs::write(&config, "durable_snapshot_root = \"rt/durable\"\n").unwrap();
    let config = config.to_str().unwrap();
    let ran = Run::new("setup-runtime.sh", &["--config", config])
        .cwd(dir.path())
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    assert!(dir.path().join("rt/durable").is_dir(), "{}", ran.describe());
    assert!(
        !dir.path().join("data/snapshots/durable").exists(),
        "the default durable tier was made too: {}",
        ran.describe()
    );

    fs::write(
        config,
        "hdfs_snapshot_root = \"rt/a\"\ndurable_snapshot_root = \"rt/b\"\n",
    )
    .unwrap();
    let both = Run::new("setup-runtime.sh", &["--config", config])
        .cwd(dir.path())
        .run();
    assert_eq!(both.code, Some(1), "{}", both.describe());
    assert!(
        both.stderr.contains("hdfs_snapshot_root") && both.stderr.contains("durable_snapshot_root"),
        "{}",
        both.describe()
    );
    assert!(!dir.path().join("rt/a").exists() && !dir.path().join("rt/b").exists());
}

#[test]
fn setup_runtime_creates_and_cleans_the_config_directories() {
    let dir = tempdir();
    let (config, dirs) = runtime_config(dir.path());
    let config = config.to_str().unwrap();

    let ran = Run::new("setup-runtime.sh", &["--config", config])
        .cwd(dir.path())
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    for d in &dirs {
        assert!(
            d.is_dir(),
            "{} was not created: {}",
            d.display(),
            ran.describe()
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "defaults used although the config names every key"
    );

    // Idempotent.
    let again = Run::new("setup-runtime.sh", &["--config", config])
        .cwd(dir.path())
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("exists"), "{}", again.describe());

    // A non-empty directory needs --force, and nothing is removed without it.
    fs::write(dirs[0].join("vm.json"), "{}").unwrap();
    let refused = Run::new("setup-runtime.sh", &["--config", config, "--clean"])
        .cwd(dir.path())
        .run();
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--force") && refused.stderr.contains("rt/sessions"),
        "{}",
        refused.describe()
    );
    assert!(
        dirs.iter().all(|d| d.is_dir()),
        "something was removed without --force"
    );

    // --clean --force wipes the runtime state and creates every directory again; the
    // inputs (base images, kernels, initramfs images) are kept with their contents.
    let inputs = [
        "rt/rootfs/base.ext4",
        "rt/kernels/vmlinux",
        "rt/initramfs/initrd.img",
    ];
    for f in inputs {
        fs::write(dir.path().join(f), f).unwrap();
    }
    fs::write(dirs[1].join("vm.sock"), "").unwrap();
    fs::create_dir_all(dirs[4].join("snap1")).unwrap();
    let cleaned = Run::new(
        "setup-runtime.sh",
        &["--config", config, "--clean", "--force"],
    )
    .cwd(dir.path())
    .run();
    assert_eq!(cleaned.code, Some(0), "{}", cleaned.describe());
    for d in &dirs {
        assert!(
            d.is_dir(),
            "{} was not created again: {}",
            d.display(),
            cleaned.describe()
        );
    }
    for state in [&dirs[0], &dirs[1], &dirs[3], &dirs[4], &dirs[5]] {
        let left: Vec<_> = fs::read_dir(state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "tmpfs" && n != "durable")
            .collect();
        assert!(
            left.is_empty(),
            "{} kept {left:?}: {}",
            state.display(),
            cleaned.describe()
        );
    }
    for f in inputs {
        assert_eq!(
            fs::read_to_string(dir.path().join(f)).unwrap(),
            f,
            "--clean touched {f}: {}",
            cleaned.describe()
        );
    }
    assert!(
        dir.path().join("agentenv.toml").is_file(),
        "--clean removed the config"
    );
}

#[test]
fn setup_runtime_uses_the_defaults_without_a_config() {
    let dir = tempdir();
    let ran = Run::new("setup-runtime.sh", &[]).cwd(dir.path()).run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    for sub in [
        "sessions",
        "sockets",
        "rootfs",
        "snapshots",
        "snapshots/tmpfs",
        "snapshots/durable",
        "kernels",
        "initramfs",
    ] {
        assert!(
            dir.path().join("data").join(sub).is_dir(),
            "data/{sub} missing: {}",
            ran.describe()
        );
    }
}

#[test]
fn setup_runtime_refuses_to_clean_dangerous_paths() {
    let dir = tempdir();
    let cases = [
        ("session_root = \"/\"", "refusing"),
        ("session_root = \"/usr\"", "refusing"),
        ("session_root = \".\"", "refusing"),
        ("session_root = \"..\"", "refusing"),
    ];
    for (line, needle) in cases {
        let config = dir.path().join("bad.toml");
        fs::write(&config, format!("{line}\n")).unwrap();
        let ran = Run::new(
            "setup-runtime.sh",
            &["--config", config.to_str().unwrap(), "--clean", "--force"],
        )
        .cwd(dir.path())
        .run();
        assert_eq!(ran.code, Some(1), "{line}: {}", ran.describe());
        assert!(ran.stderr.contains(needle), "{line}: {}", ran.describe());
    }
    assert!(dir.path().join("bad.toml").is_file());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let config = dir.path().join("link.toml");
    fs::write(&config, "session_root = \"link\"\n").unwrap();
    let ran = Run::new(
        "setup-runtime.sh",
        &["--config", config.to_str().unwrap(), "--clean", "--force"],
    )
    .cwd(dir.path())
    .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    assert!(ran.stderr.contains("symlink"), "{}", ran.describe());
    assert!(config.is_file(), "cleaning went through the symlink");
}

#[test]
fn remote_host_unit_runs_the_daemon_and_spares_the_vmms() {
    let ran = Run::new("setup-remote-host.sh", &["--print-unit"]).run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    for line in [
        "[Unit]",
        "[Service]",
        "ExecStart=/opt/agentenv/bin/agentenv --config /opt/agentenv/config/agentenv.toml --listen 127.0.0.1:8080",
        "Restart=on-failure",
        "KillMode=process",
        "[Install]",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            ran.stdout.lines().any(|l| l == line),
            "unit lacks the line {line:?}: {}",
            ran.describe()
        );
    }
    let other = Run::new(
        "setup-remote-host.sh",
        &["--print-unit", "--listen", "0.0.0.0:9000"],
    )
    .run();
    assert!(
        other.stdout.contains("--listen 0.0.0.0:9000"),
        "{}",
        other.describe()
    );
}

#[test]
fn remote_host_dry_run_lists_the_commands() {
    let dir = tempdir();
    for f in [
        "agentenv",
        "firecracker",
        "vmlinux",
        "initrd.img",
        "base.ext4",
        "agentenv.toml",
    ] {
        fs::write(dir.path().join(f), f).unwrap();
    }
    // The config is rewritten for the install (the keys naming installed files), so it
    // must be TOML.
    fs::write(dir.path().join("agentenv.toml"), "vmm = \"firecracker\"\n").unwrap();
    let ran = Run::new(
        "setup-remote-host.sh",
        &[
            "--host",
            "ops@vmhost.example",
            "--firecracker",
            "firecracker",
            "--hypervisor",
            "agentenv",
            "--kernel",
            "vmlinux",
            "--initrd",
            "initrd.img",
            "--rootfs",
            "base.ext4",
            "--config",
            "agentenv.toml",
            "--ssh-opts",
            "-p 2222 -i /keys/id",
            "--sudo",
            "--dry-run",
        ],
    )
    .cwd(dir.path())
    .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let lines: Vec<&str> = ran.stdout.lines().collect();
    let scp: Vec<&&str> = lines.iter().filter(|l| l.starts_with("scp ")).collect();
    assert_eq!(scp.len(), 1, "one scp: {}", ran.describe());
    for part in [
        "-P 2222",
        "-i /keys/id",
        "agentenv",
        "firecracker",
        "vmlinux",
        "initrd.img",
        "base.ext4",
        "agentenv.toml",
        "ops@vmhost.example:",
    ] {
        assert!(scp[0].contains(part), "scp lacks {part:?}: {}", scp[0]);
    }
    let ssh: Vec<&&str> = lines.iter().filter(|l| l.starts_with("ssh ")).collect();
    assert!(ssh.len() >= 4, "ssh commands: {}", ran.describe());
    assert!(ssh
        .iter()
        .all(|l| l.contains("-p 2222") && l.contains("ops@vmhost.example")));
    let all = ran.stdout.as_str();
    for needle in [
        "sudo -n install -m 0755 agentenv /opt/agentenv/bin/agentenv",
        "/opt/agentenv/bin/firecracker",
        "/opt/agentenv/kernels/vmlinux",
        "/opt/agentenv/initramfs/initrd.img",
        "/opt/agentenv/rootfs/base.ext4",
        "/opt/agentenv/config/agentenv.toml",
        "/etc/systemd/system/agentenv.service",
        "systemctl enable agentenv.service",
    ] {
        assert!(
            all.contains(needle),
            "dry run lacks {needle:?}: {}",
            ran.describe()
        );
    }

    // The fewest options, with the agentenv binary given by `agentenv`.
    let minimal = |agentenv: &[&str], extra: &[&str]| {
        let mut args = vec!["--host", "vmhost", "--firecracker", "firecracker"];
        args.extend_from_slice(agentenv);
        args.extend_from_slice(&["--kernel", "vmlinux", "--rootfs", "base.ext4"]);
        args.extend_from_slice(&["--config", "agentenv.toml", "--dry-run"]);
        args.extend_from_slice(extra);
        Run::new("setup-remote-host.sh", &args)
            .cwd(dir.path())
            .run()
    };
    let no_service = minimal(&["--hypervisor", "agentenv"], &["--no-service"]);
    assert_eq!(no_service.code, Some(0), "{}", no_service.describe());
    assert!(
        !no_service.stdout.contains("systemctl"),
        "{}",
        no_service.describe()
    );

    // --agentenv is the documented name of what --hypervisor gives.
    let named = minimal(&["--agentenv=agentenv"], &[]);
    assert_eq!(named.code, Some(0), "{}", named.describe());
    assert!(
        named
            .stdout
            .contains("install -m 0755 agentenv /opt/agentenv/bin/agentenv"),
        "{}",
        named.describe()
    );
}

#[test]
fn get_firecracker_without_network_fails_clearly() {
    let dir = tempdir();
    let out = dir.path().join("firecracker");
    let ran = Run::new(
        "get-firecracker.sh",
        &[
            "--version",
            "0.0.1",
            "--output",
            out.to_str().unwrap(),
            "--connect-timeout",
            "3",
            "--max-time",
            "20",
        ],
    )
    .env("AGENTENV_CACHE", dir.path().join("cache"))
    .timeout(60)
    .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    for needle in [
        "download of https://github.com/firecracker-microvm/firecracker/releases/download/v0.0.1/firecracker-v0.0.1-",
        "failed",
        "no internet access",
        "copy a firecracker binary",
    ] {
        assert!(ran.stderr.contains(needle), "message lacks {needle:?}: {}", ran.describe());
    }
    assert!(!out.exists(), "a failed download left {}", out.display());
}

/// Writes a release tarball laid out like Firecracker's (`release-vV-ARCH/firecracker-vV-ARCH`)
/// to `tgz`, its "binary" a script printing `Firecracker vV`; `dir` holds the tree.
fn fake_firecracker_release(dir: &Path, version: &str, tgz: &Path) {
    let arch = std::env::consts::ARCH;
    let release = format!("release-v{version}-{arch}");
    let tree = dir.join(format!("fake-release-{version}"));
    fs::create_dir_all(tree.join(&release)).unwrap();
    let fake = tree
        .join(&release)
        .join(format!("firecracker-v{version}-{arch}"));
    fs::write(&fake, format!("#!/bin/sh\necho 'Firecracker v{version}'\n")).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(tgz)
        .arg("-C")
        .arg(&tree)
        .arg(&release)
        .status()
        .unwrap();
    assert!(tar.success());
}

#[test]
fn get_firecracker_extracts_a_cached_release() {
    if !on_path("tar") || !on_path("curl") {
        agentenv_testkit::skip::skip("tar or curl is not installed");
        return;
    }
    let dir = tempdir();
    let arch = std::env::consts::ARCH;
    let cache = dir.path().join("cache");
    fs::create_dir_all(cache.join("firecracker")).unwrap();
    let tgz = cache.join(format!("firecracker/firecracker-v9.8.7-{arch}.tgz"));
    fake_firecracker_release(dir.path(), "9.8.7", &tgz);

    let out = dir.path().join("fc");
    let args = [
        "--version",
        "v9.8.7",
        "--output",
        out.to_str().unwrap(),
        "--connect-timeout",
        "2",
    ];
    let ran = Run::new("get-firecracker.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    assert!(
        ran.stdout.contains("Firecracker v9.8.7"),
        "{}",
        ran.describe()
    );
    assert!(out.is_file());
    assert_ne!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o111,
        0,
        "not executable"
    );

    let again = Run::new("get-firecracker.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("up to date"), "{}", again.describe());
}

#[test]
fn dockerfile_without_a_docker_engine_is_refused_clearly() {
    let engine_up = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if engine_up {
        agentenv_testkit::skip::skip(
            "a docker engine is running here (the test needs one that is not)",
        );
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("x.ext4");
    // An explicit agent, so that the repository's default one is neither needed nor built.
    let agent = build_guest_agent(dir.path());
    let ran = Run::new(
        "create-rootfs.sh",
        &[
            "--output",
            img.to_str().unwrap(),
            "--size-mib",
            "64",
            "--dockerfile",
            "resources/rootfs/Dockerfile",
            "--agent",
            agent.to_str().unwrap(),
        ],
    )
    .env("AGENTENV_CACHE", dir.path().join("cache"))
    .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    if !on_path("mkfs.ext4") {
        assert!(ran.stderr.contains("mkfs.ext4"), "{}", ran.describe());
        return;
    }
    // The engine is checked first (before the agent, before root): its error names
    // the other ways to an image.
    assert!(ran.stderr.contains("docker engine"), "{}", ran.describe());
    assert!(ran.stderr.contains("--flavor debian"), "{}", ran.describe());
    assert!(ran.stderr.contains("--dockerfile"), "{}", ran.describe());
    assert!(!img.exists());
}

/// Why the minimal rootfs cannot be built here, if it cannot.
fn minimal_rootfs_blocker() -> Option<String> {
    for tool in ["mkfs.ext4", "debugfs"] {
        if !on_path(tool) {
            return Some(format!("{tool} is not installed (e2fsprogs)"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (busybox-static)".into());
    }
    if !is_root() && !on_path("fakeroot") {
        return Some("not root and fakeroot is not installed".into());
    }
    None
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an ELF file's header says: (x86-64, has a program interpreter).
fn elf_facts(bytes: &[u8]) -> (bool, bool) {
    assert!(bytes.len() > 64, "too short for an ELF file");
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let x86_64 = u16_at(0x12) == 0x3e;
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    // PT_INTERP (3): the binary needs a dynamic loader.
    let interp = (0..phnum as usize).any(|i| {
        let at = phoff + i * phentsize as usize;
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) == 3
    });
    (x86_64, interp)
}

/// Builds the guest agent with `scripts/build-guest-agent.sh` into `dir`.
fn build_guest_agent(dir: &Path) -> PathBuf {
    let out = dir.join("agentenv-guest");
    // The first build compiles the agent's dependencies; later ones reuse target/guest.
    let ran = Run::new("build-guest-agent.sh", &["--out", out.to_str().unwrap()])
        .timeout(900)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    out
}

#[test]
fn guest_agent_builds_static_and_is_kept_when_up_to_date() {
    let dir = tempdir();
    let agent = build_guest_agent(dir.path());
    let bytes = fs::read(&agent).unwrap();
    let (x86_64, interp) = elf_facts(&bytes);
    assert!(x86_64, "the agent is not an x86-64 executable");
    assert!(!interp, "the agent is dynamically linked (has PT_INTERP)");
    let mode = fs::metadata(&agent).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "mode {mode:o}");
    let built = repo().join("target/guest/x86_64-unknown-linux-gnu/release/agentenv-guest");
    assert_eq!(fs::read(&built).unwrap(), bytes, "installed copy differs");

    let again = Run::new("build-guest-agent.sh", &["--out", agent.to_str().unwrap()])
        .timeout(300)
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("up to date"), "{}", again.describe());
    let forced = Run::new(
        "build-guest-agent.sh",
        &["--out", agent.to_str().unwrap(), "--force"],
    )
    .timeout(300)
    .run();
    assert_eq!(forced.code, Some(0), "{}", forced.describe());
    assert!(forced.stdout.contains("==> done"), "{}", forced.describe());
}

#[test]
fn create_rootfs_refuses_an_agent_that_is_not_static() {
    if let Some(why) = minimal_rootfs_blocker() {
        agentenv_testkit::skip::skip(&why);
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("x.ext4");
    let text = dir.path().join("agent.txt");
    fs::write(&text, "#!/bin/sh\necho not an agent\n").unwrap();
    // A dynamically linked executable from the host.
    let dynamic = ["/bin/ls", "/usr/bin/ls", "/bin/true"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file() && elf_facts(&fs::read(p).unwrap()).1);
    let mut cases = vec![(text, "not an ELF file")];
    if let Some(d) = dynamic {
        cases.push((d, "not statically linked"));
    }
    for (agent, why) in cases {
        let ran = Run::new(
            "create-rootfs.sh",
            &[
                "--output",
                img.to_str().unwrap(),
                "--size-mib",
                "32",
                "--agent",
                agent.to_str().unwrap(),
            ],
        )
        .env("AGENTENV_CACHE", dir.path().join("cache"))
        .run();
        assert_eq!(ran.code, Some(1), "{}", ran.describe());
        assert!(ran.stderr.contains("--agent"), "{}", ran.describe());
        assert!(ran.stderr.contains(why), "{}", ran.describe());
        assert!(!img.exists());
    }
}

/// The arguments that build `img` of `size` MiB of `flavor` with `agent`
/// (the agent's path last, at index 7).
fn rootfs_args<'a>(img: &'a Path, size: &'a str, flavor: &'a str, agent: &'a Path) -> [&'a str; 8] {
    [
        "--output",
        img.to_str().unwrap(),
        "--size-mib",
        size,
        "--flavor",
        flavor,
        "--agent",
        agent.to_str().unwrap(),
    ]
}

/// `create-rootfs.sh ARGS` with the cache `cache`, a build of up to
/// `timeout` seconds, checked to succeed.
fn create_rootfs_ok(args: &[&str], cache: &Path, timeout: u64) -> Ran {
    let ran = Run::new("create-rootfs.sh", args)
        .env("AGENTENV_CACHE", cache)
        .timeout(timeout)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    ran
}

/// A second `create-rootfs.sh ARGS` with the same inputs keeps the image.
fn assert_rootfs_kept(args: &[&str], cache: &Path) {
    let again = Run::new("create-rootfs.sh", args)
        .env("AGENTENV_CACHE", cache)
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("up to date"), "{}", again.describe());
}

#[test]
fn minimal_rootfs_carries_overlay_init_and_the_agent() {
    if let Some(why) = minimal_rootfs_blocker() {
        agentenv_testkit::skip::skip(&why);
        return;
    }
    let dir = tempdir();
    let agent = build_guest_agent(dir.path());
    let img = dir.path().join("minimal.ext4");
    let cache = dir.path().join("cache");
    let args = rootfs_args(&img, "32", "minimal", &agent);
    let ran = create_rootfs_ok(&args, &cache, 180);
    assert!(
        ran.stdout.contains("==> "),
        "no progress lines: {}",
        ran.describe()
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), 32 << 20);

    let stat = debugfs(&img, "stat /sbin/overlay-init");
    assert!(stat.contains("Type: regular"), "/sbin/overlay-init: {stat}");
    assert!(
        stat.contains("Mode:  0755"),
        "/sbin/overlay-init mode: {stat}"
    );
    assert!(
        stat.contains("User:     0   Group:     0"),
        "/sbin/overlay-init owner: {stat}"
    );
    let overlay_init = debugfs(&img, "cat /sbin/overlay-init");
    assert_eq!(
        overlay_init,
        fs::read_to_string(repo().join("resources/rootfs/overlay-init")).unwrap(),
        "the image's overlay-init differs from resources/rootfs/overlay-init"
    );
    assert!(
        overlay_init.contains("agentenv.agent=")
            && overlay_init.contains("/usr/sbin/agentenv-guest; sleep 1; done"),
        "overlay-init does not start the agent"
    );

    // The agent: root's, 0755, byte for byte the one given.
    let stat = debugfs(&img, "stat /usr/sbin/agentenv-guest");
    assert!(
        stat.contains("Type: regular"),
        "/usr/sbin/agentenv-guest: {stat}"
    );
    assert!(stat.contains("Mode:  0755"), "agent mode: {stat}");
    assert!(
        stat.contains("User:     0   Group:     0"),
        "agent owner: {stat}"
    );
    let dumped = dir.path().join("dumped-agent");
    debugfs(
        &img,
        &format!("dump /usr/sbin/agentenv-guest {}", dumped.display()),
    );
    assert!(
        fs::read(&dumped).unwrap() == fs::read(&agent).unwrap(),
        "the image's agent differs from {}",
        agent.display()
    );
    for (path, needle) in [
        ("/etc/inittab", "::ctrlaltdel:"),
        ("/etc/init.d/rcS", "agentenv-boot ready"),
        ("/sbin/agentenv-boot", "AGENTENV_READY vm_id="),
        ("/sbin/agentenv-boot", "agentenv-heartbeat"),
        ("/etc/acpi/PWRF/00000080", "agentenv-shutdown poweroff"),
    ] {
        let text = debugfs(&img, &format!("cat {path}"));
        assert!(text.contains(needle), "{path} lacks {needle:?}: {text}");
    }
    for path in [
        "/bin/busybox",
        "/sbin/init",
        "/bin/sh",
        "/sbin/acpid",
        "/mnt",
        "/run",
        "/proc",
        "/dev",
    ] {
        let stat = debugfs(&img, &format!("stat {path}"));
        assert!(
            stat.contains("Inode:"),
            "{path} missing from the image: {stat}"
        );
    }

    // Idempotent: a second run with the same inputs keeps the image.
    assert_rootfs_kept(&args, &cache);

    // Another agent is another image.
    let other = dir.path().join("other-agent");
    let mut bytes = fs::read(&agent).unwrap();
    bytes.extend_from_slice(b"trailing bytes");
    fs::write(&other, &bytes).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o755)).unwrap();
    let mut other_args = args;
    other_args[7] = other.to_str().unwrap();
    let rebuilt = Run::new("create-rootfs.sh", &other_args)
        .env("AGENTENV_CACHE", &cache)
        .timeout(180)
        .run();
    assert_eq!(rebuilt.code, Some(0), "{}", rebuilt.describe());
    assert!(
        !rebuilt.stdout.contains("up to date"),
        "{}",
        rebuilt.describe()
    );

    // Too small an image is refused with the size it needs.
    let small = dir.path().join("small.ext4");
    let ran = Run::new(
        "create-rootfs.sh",
        &[
            "--output",
            small.to_str().unwrap(),
            "--size-mib",
            "8",
            "--agent",
            agent.to_str().unwrap(),
        ],
    )
    .env("AGENTENV_CACHE", &cache)
    .run();
    if ran.code != Some(0) {
        assert!(
            ran.stderr.contains("--size-mib") || ran.stderr.contains("mkfs"),
            "{}",
            ran.describe()
        );
        assert!(!small.exists());
    }
}

/// Why the E2B base image cannot be built here, if it cannot.
fn e2b_rootfs_blocker() -> Option<String> {
    if !is_root() {
        return Some("--flavor e2b needs root (debootstrap)".into());
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ] {
        if !on_path(tool) {
            return Some(format!("{tool} is not installed ({package})"));
        }
    }
    None
}

/// `--flavor e2b`: E2B's base image (user `user` with passwordless sudo,
/// bash, coreutils, python3), small (no docs, no apt lists), systemd
/// trimmed, and the agentenv boot contract (overlay-init, the agent, the
/// agentenv units). Built with the shared debootstrap package cache.
#[test]
fn e2b_rootfs_has_the_user_sudo_python_and_the_agent() {
    if let Some(why) = e2b_rootfs_blocker() {
        agentenv_testkit::skip::skip(&why);
        return;
    }
    let dir = tempdir();
    let agent = build_guest_agent(dir.path());
    // Stamps in the test's cache; the packages from the shared one.
    let cache = dir.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let shared = std::env::var_os("AGENTENV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/agentenv"))
        .join("debootstrap");
    fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, cache.join("debootstrap")).unwrap();
    let img = dir.path().join("e2b-base.ext4");
    let args = rootfs_args(&img, "512", "e2b", &agent);
    let ran = create_rootfs_ok(&args, &cache, 900);
    assert_eq!(fs::metadata(&img).unwrap().len(), 512 << 20);

    let passwd = debugfs(&img, "cat /etc/passwd");
    assert!(
        passwd.contains("\nuser:x:1000:1000::/home/user:/bin/bash\n"),
        "/etc/passwd: {passwd}"
    );
    let group = debugfs(&img, "cat /etc/group");
    assert!(group.contains("\nuser:x:1000:\n"), "/etc/group: {group}");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("sudo:") && l.ends_with(":user")),
        "user is not in group sudo: {group}"
    );
    let home = debugfs(&img, "stat /home/user");
    assert!(
        home.contains("Type: directory") && home.contains("User:  1000   Group:  1000"),
        "/home/user: {home}"
    );
    let sudoers = debugfs(&img, "stat /etc/sudoers.d/user");
    assert!(
        sudoers.contains("Mode:  0440") && sudoers.contains("User:     0   Group:     0"),
        "/etc/sudoers.d/user: {sudoers}"
    );
    assert!(debugfs(&img, "cat /etc/sudoers.d/user").contains("user ALL=(ALL:ALL) NOPASSWD: ALL"));
    let sudo = debugfs(&img, "stat /usr/bin/sudo");
    assert!(
        sudo.contains("Mode:  04755"),
        "sudo is not setuid root: {sudo}"
    );
    for path in [
        "/usr/bin/python3",
        "/bin/bash",
        "/usr/bin/env",
        "/usr/bin/timeout",
        "/lib/systemd/systemd",
        "/sbin/init",
        "/sbin/overlay-init",
        "/sbin/agentenv-boot",
        "/usr/sbin/agentenv-guest",
        "/etc/systemd/system/agentenv-setup.service",
        "/etc/systemd/system/agentenv-ready.service",
        "/etc/dpkg/dpkg.cfg.d/excludes",
    ] {
        let stat = debugfs(&img, &format!("stat {path}"));
        assert!(stat.contains("Inode:"), "{path} missing: {stat}");
    }
    // Masked units point at /dev/null; the default target is multi-user.
    let masked = fs::read_to_string(repo().join("resources/e2b/masked-units")).unwrap();
    let masked: Vec<&str> = masked
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(masked.contains(&"apt-daily.timer"), "{masked:?}");
    let units = debugfs(&img, "ls -l /etc/systemd/system");
    for unit in &masked {
        let link = debugfs(&img, &format!("stat /etc/systemd/system/{unit}"));
        assert!(
            link.contains("Type: symlink") && link.contains("\"/dev/null\""),
            "{unit} is not masked: {link}\n{units}"
        );
    }
    let target = debugfs(&img, "stat /etc/systemd/system/default.target");
    assert!(target.contains("multi-user.target"), "{target}");
    // Small: no docs, man pages or apt lists; no SSH server, no udev.
    for dir in ["/usr/share/doc", "/usr/share/man", "/var/lib/apt/lists"] {
        let names: Vec<String> = debugfs(&img, &format!("ls {dir}"))
            .split_whitespace()
            .filter(|n| !n.starts_with('.') && !n.starts_with('(') && *n != "partial")
            .filter(|n| n.parse::<u64>().is_err())
            .map(String::from)
            .collect();
        assert_eq!(names, Vec::<String>::new(), "{dir} is not empty");
    }
    for path in ["/usr/sbin/sshd", "/lib/systemd/systemd-udevd"] {
        assert!(
            !debugfs(&img, &format!("stat {path}")).contains("Inode:"),
            "{path} is in the image"
        );
    }
    assert!(ran.stdout.contains("MiB of files"), "{}", ran.describe());

    // Idempotent: the same inputs keep the image.
    assert_rootfs_kept(&args, &cache);
}

/// A kernel package already in the cache, to build the kernel artifacts without network.
fn cached_kernel_deb() -> Option<PathBuf> {
    let cache = std::env::var_os("AGENTENV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/agentenv"));
    let mut debs: Vec<PathBuf> = fs::read_dir(cache.join("debs"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop()
}

#[test]
fn kernel_artifacts_from_a_cached_package() {
    let Some(deb) = cached_kernel_deb() else {
        agentenv_testkit::skip::skip(
            "no linux-image-*.deb in the cache (scripts/build-kernel.sh downloads one)",
        );
        return;
    };
    for tool in ["dpkg-deb", "depmod", "modprobe", "lz4", "cpio", "gzip"] {
        if !on_path(tool) {
            agentenv_testkit::skip::skip(&format!("{tool} is not installed"));
            return;
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        agentenv_testkit::skip::skip("/bin/busybox is missing (busybox-static)");
        return;
    }
    let dir = tempdir();
    let out = dir.path().join("artifacts");
    // An existing directory: the directory form (kernels/, initramfs/).
    fs::create_dir_all(&out).unwrap();
    let cache = dir.path().join("cache");
    let args = [
        "--deb",
        deb.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let ran = Run::new("build-kernel.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .timeout(300)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());

    let vmlinux = fs::read(out.join("kernels/vmlinux")).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF", "vmlinux is not an ELF file");
    let vmlinuz = fs::read(out.join("kernels/vmlinuz")).unwrap();
    assert_eq!(&vmlinuz[0x202..0x206], b"HdrS", "vmlinuz is not a bzImage");

    let listing = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$0\" | cpio -it --quiet")
        .arg(out.join("initramfs/initrd.img"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for needle in [
        "init",
        "bin/busybox",
        "bin/switch_root",
        "etc/agentenv/modules",
        "modules.dep",
        "virtio_blk.ko",
        "virtio_mmio.ko",
        "virtio_net.ko",
        "vmw_vsock_virtio_transport.ko",
        "virtio_console.ko",
        "overlay.ko",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(needle)),
            "initrd.img lacks {needle}"
        );
    }

    let again = Run::new("build-kernel.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("up to date"), "{}", again.describe());
}

// ---------------------------------------------------------------------------------------
// The seed's documented commands, verbatim, on a fresh tree (issue 13). Each runs the
// command exactly as the documentation writes it, from the root of a copy of what a fresh
// clone has (scripts/, resources/, config/; no artifacts/, no data/). Without the internet
// (every machine here) the downloads fail: they run in a network namespace of their own
// (`unshare --net`), so they fail at once and send nothing anywhere. These tests need root
// (namespaces, setcap, sshd) and fail, not skip, without it.

/// The tools a test needs; panics naming the missing one and its package.
fn require(tools: &[(&str, &str)]) {
    assert!(
        is_root(),
        "the seed-command tests need root (unshare, setcap, sshd)"
    );
    for (tool, package) in tools {
        assert!(
            on_path(tool) || Path::new(tool).is_file(),
            "`{tool}` is missing (Debian package {package}); this test must run"
        );
    }
}

/// A copy of what a fresh clone has, at `dir/tree`.
fn fresh_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    for sub in ["scripts", "resources", "config"] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(repo().join(sub))
            .arg(&tree)
            .status()
            .unwrap()
            .success();
        assert!(ok, "copying {sub}");
    }
    tree
}

/// `tree/scripts/SCRIPT ARGS…` from `tree`, in a network namespace with no network.
fn offline(tree: &Path, script: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new("unshare");
    cmd.arg("--net")
        .arg("--")
        .arg(tree.join("scripts").join(script))
        .args(args)
        .current_dir(tree);
    Run::command(
        cmd,
        &format!("(offline) scripts/{script} {}", args.join(" ")),
    )
}

/// `tree/scripts/SCRIPT ARGS…` from `tree`.
fn in_tree(tree: &Path, script: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(tree.join("scripts").join(script));
    cmd.args(args).current_dir(tree);
    Run::command(cmd, &format!("scripts/{script} {}", args.join(" ")))
}

#[test]
fn seed_get_firecracker_offline_names_the_url_and_takes_the_file() {
    require(&[("unshare", "util-linux"), ("tar", "tar"), ("curl", "curl")]);
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    let cache = dir.path().join("cache");
    let arch = std::env::consts::ARCH;
    let verbatim = ["--version", "1.13.1", "--output", "artifacts/firecracker"];
    let ran = offline(&tree, "get-firecracker.sh", &verbatim)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    let url = format!("https://github.com/firecracker-microvm/firecracker/releases/download/v1.13.1/firecracker-v1.13.1-{arch}.tgz");
    for needle in [url.as_str(), "no internet access", "--from"] {
        assert!(
            ran.stderr.contains(needle),
            "lacks {needle:?}: {}",
            ran.describe()
        );
    }
    assert!(
        tree.join("artifacts").is_dir(),
        "artifacts/ not created: {}",
        ran.describe()
    );
    let out = tree.join("artifacts/firecracker");
    assert!(!out.exists(), "a failed download left {}", out.display());

    // The file fetched elsewhere, given with --from.
    let tgz = dir.path().join(format!("firecracker-v1.13.1-{arch}.tgz"));
    fake_firecracker_release(dir.path(), "1.13.1", &tgz);
    let mut args = verbatim.to_vec();
    args.extend(["--from", tgz.to_str().unwrap()]);
    let ran = offline(&tree, "get-firecracker.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    assert!(
        ran.stdout.contains("Firecracker v1.13.1"),
        "{}",
        ran.describe()
    );
    let says = Command::new(&out).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&says.stdout).trim(),
        "Firecracker v1.13.1"
    );

    // A file of another release, or one that is no release at all, is refused and the
    // installed binary stays as it was.
    let other = dir.path().join("other.tgz");
    fake_firecracker_release(dir.path(), "1.12.0", &other);
    let junk = dir.path().join("junk.tgz");
    fs::write(&junk, "not a tarball").unwrap();
    // An ELF binary is taken as the firecracker binary itself, and checked.
    let not_firecracker = PathBuf::from("/bin/true");
    for (file, needle) in [
        (&other, "has no release-v1.13.1"),
        (&junk, "neither a firecracker binary"),
        (&not_firecracker, "expected v1.13.1"),
    ] {
        let mut args = verbatim.to_vec();
        args.extend(["--from", file.to_str().unwrap(), "--force"]);
        let ran = offline(&tree, "get-firecracker.sh", &args)
            .env("AGENTENV_CACHE", &cache)
            .run();
        assert_eq!(ran.code, Some(1), "{}", ran.describe());
        assert!(ran.stderr.contains(needle), "{}", ran.describe());
        let says = Command::new(&out).arg("--version").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&says.stdout).trim(),
            "Firecracker v1.13.1",
            "a refused --from replaced the binary"
        );
        assert!(!tree.join("artifacts/firecracker.tmp").exists());
    }
}

#[test]
fn seed_build_kernel_offline_names_the_source_and_the_versions_it_has() {
    require(&[
        ("unshare", "util-linux"),
        ("xz", "xz-utils"),
        ("curl", "curl"),
    ]);
    assert!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox is missing (busybox-static); this test must run"
    );
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    let fragment = fs::read_to_string(tree.join("resources/kernel/firecracker.fragment")).unwrap();
    assert!(
        fragment
            .lines()
            .any(|l| l == "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"),
        "the fragment must let the kernel find virtio-mmio devices without ACPI"
    );
    let ran = offline(
        &tree,
        "build-kernel.sh",
        &[
            "--version",
            "6.6.30",
            "--fragment",
            "resources/kernel/firecracker.fragment",
            "--output",
            "artifacts/vmlinux",
        ],
    )
    .env("AGENTENV_CACHE", dir.path().join("cache"))
    .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    for needle in [
        "https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.6.30.tar.xz",
        "needs the internet",
        // The versions apt can fetch (Debian's linux-source-X.Y), or why there are none.
        "linux-source-",
        "linux-6.6.30.tar.xz, then run this again",
    ] {
        assert!(
            ran.stderr.contains(needle),
            "lacks {needle:?}: {}",
            ran.describe()
        );
    }
    assert!(
        !tree.join("artifacts/vmlinux").exists(),
        "{}",
        ran.describe()
    );
}

#[test]
fn seed_build_kernel_output_is_the_kernel_file() {
    require(&[
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("lz4", "lz4"),
        ("cpio", "cpio"),
    ]);
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    // A cached kernel package when there is one (fast, offline); else the script's
    // default: Debian's cloud kernel through apt (the Debian mirror).
    let deb = cached_kernel_deb();
    let build = |output: &str| {
        let mut args = vec!["--output", output];
        if let Some(deb) = &deb {
            args.extend(["--deb", deb.to_str().unwrap()]);
        }
        let mut run = in_tree(&tree, "build-kernel.sh", &args).timeout(600);
        if deb.is_some() {
            run = run.env("AGENTENV_CACHE", dir.path().join("cache"));
        }
        run.run()
    };
    let ran = build("artifacts/vmlinux");
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let vmlinux = fs::read(tree.join("artifacts/vmlinux")).unwrap();
    assert_eq!(
        &vmlinux[..4],
        b"\x7fELF",
        "artifacts/vmlinux is not an ELF kernel"
    );
    let initrd = fs::read(tree.join("artifacts/initrd.img")).unwrap();
    assert_eq!(
        &initrd[..2],
        b"\x1f\x8b",
        "artifacts/initrd.img is not gzip"
    );
    assert!(
        !tree.join("artifacts/kernels").exists() && !tree.join("artifacts/initramfs").exists(),
        "the file form made the directory form's layout too"
    );
    let again = build("artifacts/vmlinux");
    assert!(again.stdout.contains("up to date"), "{}", again.describe());

    // The directory form stays, when it is unambiguous: a trailing slash.
    let ran = build("out/");
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    for f in ["kernels/vmlinux", "kernels/vmlinuz", "initramfs/initrd.img"] {
        assert!(tree.join("out").join(f).is_file(), "out/{f} missing");
    }
    // A typo'd tree is not invented.
    let ran = in_tree(
        &tree,
        "build-kernel.sh",
        &["--output", "no/such/dir/vmlinux"],
    )
    .run();
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(!tree.join("no").exists());
}

#[test]
fn seed_create_rootfs_without_docker_names_the_alternatives() {
    require(&[("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")]);
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    let ran = in_tree(
        &tree,
        "create-rootfs.sh",
        &[
            "--dockerfile",
            "resources/rootfs/Dockerfile",
            "--output",
            "artifacts/rootfs.ext4",
            "--size-mib",
            "4096",
        ],
    )
    // No engine at this address, whatever runs on the machine.
    .env(
        "DOCKER_HOST",
        "unix:///nonexistent/agentenv-test-docker.sock",
    )
    .run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    for needle in [
        "needs a running docker engine",
        "--flavor debian",
        "--flavor minimal",
        "--tar rootfs.tar",
    ] {
        assert!(
            ran.stderr.contains(needle),
            "lacks {needle:?}: {}",
            ran.describe()
        );
    }
    // Refused before anything was built or written.
    assert!(!tree.join("artifacts").exists(), "{}", ran.describe());

    // The offline alternative: a container's exported file system.
    let agent = build_guest_agent(dir.path());
    let fs_tree = dir.path().join("exported");
    fs::create_dir_all(fs_tree.join("bin")).unwrap();
    fs::create_dir_all(fs_tree.join("sbin")).unwrap();
    fs::create_dir_all(fs_tree.join("etc")).unwrap();
    fs::copy("/bin/sh", fs_tree.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("/bin/sh", fs_tree.join("sbin/init")).unwrap();
    fs::write(fs_tree.join("etc/from-the-tar"), "yes\n").unwrap();
    let tar = dir.path().join("rootfs.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&fs_tree)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let ran = in_tree(
        &tree,
        "create-rootfs.sh",
        &[
            "--tar",
            tar.to_str().unwrap(),
            "--output",
            "artifacts/rootfs.ext4",
            "--size-mib",
            "64",
            "--agent",
            agent.to_str().unwrap(),
        ],
    )
    .env("AGENTENV_CACHE", dir.path().join("cache"))
    .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let img = tree.join("artifacts/rootfs.ext4");
    assert_eq!(debugfs(&img, "cat /etc/from-the-tar"), "yes\n");
    let sbin = debugfs(&img, "ls -l /sbin");
    assert!(sbin.contains("overlay-init"), "{sbin}");
    let usr_sbin = debugfs(&img, "ls -l /usr/sbin");
    assert!(usr_sbin.contains("agentenv-guest"), "{usr_sbin}");
}

#[test]
fn seed_setup_runtime_clean_never_deletes_artifacts() {
    require(&[]);
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    let artifacts = [
        "artifacts/kernels/vmlinux",
        "artifacts/kernels/vmlinuz",
        "artifacts/initramfs/initrd.img",
        "artifacts/rootfs/minimal.ext4",
        "artifacts/vmlinux",
        "artifacts/rootfs.ext4",
        "artifacts/firecracker",
        "artifacts/agentenv-guest",
    ];
    let state = [
        "data/sessions/vm1/vm.json",
        "data/sockets/vm1.sock",
        "data/snapshots/s1/snapshot.json",
        "data/snapshots/tmpfs/s1/mem",
        "data/snapshots/durable/s1/mem",
    ];
    for f in artifacts.iter().chain(&state) {
        let path = tree.join(f);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, f).unwrap();
    }
    let intact = |what: &str| {
        for f in artifacts {
            assert_eq!(
                fs::read_to_string(tree.join(f)).ok().as_deref(),
                Some(f),
                "{what} touched {f}"
            );
        }
    };
    let verbatim = [
        "--clean",
        "--force",
        "--config",
        "config/hypervisor.artifacts.toml",
    ];
    // A running VM's socket (one that accepts connections): refused, nothing removed.
    let live = tree.join("data/sockets/vm2.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let ran = in_tree(&tree, "setup-runtime.sh", &verbatim).run();
    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    assert!(
        ran.stderr.contains("VMs are running") && ran.stderr.contains("vm2.sock"),
        "{}",
        ran.describe()
    );
    for f in state {
        assert!(tree.join(f).exists(), "{f} removed: {}", ran.describe());
    }
    // Once the VMM is gone its socket file is stale, and the clean goes ahead.
    drop(listener);
    let ran = in_tree(&tree, "setup-runtime.sh", &verbatim).run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    assert!(!live.exists(), "{}", ran.describe());
    intact("setup-runtime.sh --clean --force");
    for f in state {
        assert!(!tree.join(f).exists(), "{f} survived: {}", ran.describe());
    }
    for d in [
        "data/sessions",
        "data/sockets",
        "data/snapshots/tmpfs",
        "data/snapshots/durable",
    ] {
        assert!(
            tree.join(d).is_dir(),
            "{d} not recreated: {}",
            ran.describe()
        );
    }

    // Roots that must never be wiped: refused, and nothing is removed.
    let home = dir.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let cases = [
        ("session_root = \"/\"\n", "refusing"),
        (
            &*format!("session_root = \"{}\"\n", home.display()),
            "refusing",
        ),
        ("snapshots_root = \"artifacts\"\n", "artifacts"),
        ("session_root = \".\"\n", "refusing"),
        (
            "session_root = \"data/sessions\"\nkernel_root = \"data/sessions/kernels\"\n",
            "kernel_root",
        ),
        (
            "hdfs_snapshot_root = \"base\"\nrootfs_root = \"base/images\"\n",
            "rootfs_root",
        ),
    ];
    fs::create_dir_all(tree.join("data/sessions/kernels")).unwrap();
    fs::write(tree.join("data/sessions/kernels/k"), "k").unwrap();
    fs::create_dir_all(tree.join("base/images")).unwrap();
    fs::write(tree.join("base/images/i"), "i").unwrap();
    for (text, needle) in cases {
        let config = dir.path().join("danger.toml");
        fs::write(&config, text).unwrap();
        let ran = in_tree(
            &tree,
            "setup-runtime.sh",
            &["--clean", "--force", "--config", config.to_str().unwrap()],
        )
        .env("HOME", &home)
        .run();
        assert_eq!(ran.code, Some(1), "{text}: {}", ran.describe());
        assert!(
            ran.stderr.contains(needle) && ran.stderr.contains("refusing"),
            "{text}: {}",
            ran.describe()
        );
        intact(text);
        assert!(home.is_dir() && tree.join("config").is_dir());
        assert!(tree.join("data/sessions/kernels/k").is_file(), "{text}");
        assert!(tree.join("base/images/i").is_file(), "{text}");
    }
}

/// An sshd on a loopback port, accepting only a key made for the test; killed on drop.
struct Sshd {
    child: std::process::Child,
    port: u16,
    key: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.is_file(),
            "/usr/sbin/sshd is missing (Debian package openssh-server); this test must run"
        );
        let keygen = |name: &str| {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .unwrap()
                .success();
            assert!(ok, "ssh-keygen {name}");
        };
        keygen("host_key");
        keygen("user_key");
        fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory (what the package's service makes).
        fs::create_dir_all("/run/sshd").unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile {d}/sshd.pid\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd does not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            child,
            port,
            key: dir.join("user_key"),
        }
    }

    fn ssh_opts(&self) -> String {
        format!(
            "-p {} -i {} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            self.port,
            self.key.display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn seed_setup_remote_host_installs_a_config_that_finds_its_files() {
    require(&[
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ]);
    let dir = tempdir();
    let tree = fresh_tree(dir.path());
    let sshd_dir = dir.path().join("sshd");
    fs::create_dir_all(&sshd_dir).unwrap();
    let sshd = Sshd::start(&sshd_dir);
    // The files the documented command names, where it names them.
    let daemon = Path::new(env!("CARGO_BIN_EXE_agentenv"));
    fs::create_dir_all(tree.join("target/release")).unwrap();
    fs::copy(daemon, tree.join("target/release/agentenv")).unwrap();
    fs::write(
        tree.join("firecracker"),
        "#!/bin/sh\necho 'Firecracker v1.13.1'\n",
    )
    .unwrap();
    fs::set_permissions(tree.join("firecracker"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir_all(tree.join("artifacts")).unwrap();
    for (f, content) in [
        ("artifacts/vmlinux", "kernel"),
        ("artifacts/initrd.img", "initramfs"),
        ("artifacts/rootfs.ext4", "rootfs"),
    ] {
        fs::write(tree.join(f), content).unwrap();
    }
    let prefix = dir.path().join("remote/opt/agentenv");
    let opts = sshd.ssh_opts();
    let ran = in_tree(
        &tree,
        "setup-remote-host.sh",
        &[
            "--host",
            "root@127.0.0.1",
            "--firecracker",
            "./firecracker",
            "--hypervisor",
            "target/release/agentenv",
            "--kernel",
            "artifacts/vmlinux",
            "--rootfs",
            "artifacts/rootfs.ext4",
            "--config",
            "config/hypervisor.example.toml",
            "--no-service",
            "--ssh-opts",
            &opts,
            "--prefix",
            prefix.to_str().unwrap(),
        ],
    )
    .timeout(180)
    .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    assert!(
        ran.stdout
            .contains("using the initramfs artifacts/initrd.img"),
        "{}",
        ran.describe()
    );

    // The installed config, read as the daemon reads it (relative paths from the prefix,
    // the unit's working directory), names the installed files.
    let config_path = prefix.join("config/agentenv.toml");
    let cfg = agentenv_core::config::Config::load(&config_path)
        .unwrap_or_else(|e| panic!("the installed config does not load: {e}"));
    let abs = |p: &Path| prefix.join(p);
    let same = |installed: &Path, original: &str| {
        assert_eq!(
            fs::read(installed).unwrap_or_else(|e| panic!("{}: {e}", installed.display())),
            fs::read(tree.join(original)).unwrap(),
            "{} is not {original}",
            installed.display()
        );
    };
    assert_eq!(abs(&cfg.firecracker_binary), prefix.join("bin/firecracker"));
    same(&abs(&cfg.firecracker_binary), "firecracker");
    same(
        &abs(&cfg.kernel_root).join(&cfg.default_kernel),
        "artifacts/vmlinux",
    );
    let initrd = cfg
        .default_initrd
        .as_deref()
        .expect("default_initrd is set");
    same(
        &abs(&cfg.initramfs_root).join(initrd),
        "artifacts/initrd.img",
    );
    same(
        &abs(&cfg.rootfs_root).join("rootfs.ext4"),
        "artifacts/rootfs.ext4",
    );
    same(&prefix.join("bin/agentenv"), "target/release/agentenv");
    // The rest of the example config is kept (its [network] table, say).
    assert!(cfg.network.enable);
    // The installed daemon accepts it, and the runtime directories were made there.
    let check = Command::new(prefix.join("bin/agentenv"))
        .arg("check-config")
        .arg("--config")
        .arg(&config_path)
        .current_dir(&prefix)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(prefix.join(&cfg.session_root).is_dir());
    assert!(
        !Path::new("/root/.agentenv-install").exists(),
        "the staging directory was left in the remote home"
    );
}
