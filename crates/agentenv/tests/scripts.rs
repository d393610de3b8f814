//! The shell scripts in `scripts/`, run for real: their `--help`, argument errors that name
//! the argument, `setup-runtime.sh` on a temporary config, `setup-remote-host.sh
//! --print-unit`/`--dry-run`, `get-firecracker.sh` without network (and from a cached
//! release), the static guest agent build, and builds of the minimal rootfs (with the agent)
//! and of the kernel artifacts.
//!
//! Nothing here needs root. The guest agent is built in `target/guest` (shared with
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
        cmd.args(args)
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        Run {
            cmd,
            what: format!("{name} {}", args.join(" ")),
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
                "--dockerfile",
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

    let cleaned = Run::new(
        "setup-runtime.sh",
        &["--config", config, "--clean", "--force"],
    )
    .cwd(dir.path())
    .run();
    assert_eq!(cleaned.code, Some(0), "{}", cleaned.describe());
    for d in &dirs {
        assert!(
            !d.exists(),
            "{} survived --clean: {}",
            d.display(),
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

#[test]
fn get_firecracker_extracts_a_cached_release() {
    if !on_path("tar") || !on_path("curl") {
        agentenv_testkit::skip::skip("tar or curl is not installed");
        return;
    }
    let dir = tempdir();
    let arch = std::env::consts::ARCH;
    let release = format!("release-v9.8.7-{arch}");
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join(&release)).unwrap();
    let fake = tree
        .join(&release)
        .join(format!("firecracker-v9.8.7-{arch}"));
    fs::write(&fake, "#!/bin/sh\necho 'Firecracker v9.8.7'\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir_all(cache.join("firecracker")).unwrap();
    let tgz = cache.join(format!("firecracker/firecracker-v9.8.7-{arch}.tgz"));
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&tree)
        .arg(&release)
        .status()
        .unwrap();
    assert!(tar.success());

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
    let needle = if is_root() {
        "docker engine"
    } else {
        "needs root"
    };
    assert!(ran.stderr.contains(needle), "{}", ran.describe());
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
    let args = [
        "--output",
        img.to_str().unwrap(),
        "--size-mib",
        "32",
        "--flavor",
        "minimal",
        "--agent",
        agent.to_str().unwrap(),
    ];
    let ran = Run::new("create-rootfs.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .timeout(180)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
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
    let again = Run::new("create-rootfs.sh", &args)
        .env("AGENTENV_CACHE", &cache)
        .run();
    assert_eq!(again.code, Some(0), "{}", again.describe());
    assert!(again.stdout.contains("up to date"), "{}", again.describe());

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
