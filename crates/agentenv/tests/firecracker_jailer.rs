//! Firecracker started through Firecracker's own jailer (`[jail]
//! firecracker_jailer`), end to end through the HTTP API: the jailer
//! confines it (uid, chroot, namespaces) inside the VM's cgroup, a full
//! snapshot restores through it, a restarted daemon re-adopts it, and delete
//! leaves nothing. Needs `AGENTENV_TEST_JAILER=/path/to/jailer` (no registry
//! we reach has it: an optional test, like the real Firecracker's) and root.
//! The VMM is the Firecracker double, or the real one with
//! `AGENTENV_TEST_FIRECRACKER` (and a real kernel).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{finish, seen_by, Daemon, TestDir};
use serde_json::{json, Value};

fn jailer() -> Option<PathBuf> {
    agentenv_testkit::paths::real_jailer()
}

macro_rules! need_root_and_jailer {
    () => {{
        let Some(jailer) = jailer() else {
            agentenv_testkit::skip_optional!(
                "AGENTENV_TEST_JAILER is not set (a firecracker jailer binary)"
            );
        };
        if !nix::unistd::geteuid().is_root() {
            agentenv_testkit::skip!("firecracker's jailer needs a daemon running as root");
        }
        jailer
    }};
}

fn ok(d: &Daemon, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let (code, v) = d.call(method, path, body);
    assert_eq!(code, want, "{method} {path}: {v}");
    v
}

fn argv(pid: u64) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Checks that `vm`'s Firecracker runs as the jailer left it.
fn assert_through_jailer(d: &Daemon, vm: &Value) {
    let pid = vm["pid"].as_u64().expect("a pid");
    let id = vm["vm_id"].as_str().unwrap();
    // The jailer's copy of Firecracker, given `--id` once (the jailer's)
    // and the daemon's control socket.
    let args = argv(pid);
    let copied = format!(
        "/{}",
        d.cfg
            .firecracker_binary
            .file_name()
            .unwrap()
            .to_string_lossy()
    );
    assert_eq!(args[0], copied, "{args:?}");
    assert_eq!(args.iter().filter(|a| *a == "--id").count(), 1, "{args:?}");
    let sock = d.cfg.socket_root.join(format!("{id}.sock"));
    let at = args.iter().position(|a| a == "--api-sock").unwrap();
    assert_eq!(Path::new(&args[at + 1]), sock, "{args:?}");
    // The jail uid and gid (never root), no capabilities, no_new_privs, PID
    // 1 of its own PID namespace, its own mount, IPC and UTS namespaces.
    common::assert_unprivileged_pid1(pid);
    // Its root is the jailer's chroot: its copy of Firecracker, the /dev the
    // jailer made, the session directory at /vm; none of the host's files.
    assert!(seen_by(pid, Path::new(&copied)).is_file());
    assert!(seen_by(pid, Path::new("/dev/kvm")).exists() || !Path::new("/dev/kvm").exists());
    assert!(seen_by(pid, Path::new("/dev/net/tun")).exists());
    let session = vm["session_dir"].as_str().unwrap();
    assert!(seen_by(pid, Path::new("/vm/console.log")).exists());
    assert!(seen_by(pid, Path::new(&format!("{session}/console.log"))).exists());
    assert!(!seen_by(pid, Path::new("/etc/passwd")).exists());
    assert!(!seen_by(pid, Path::new("/proc/1")).exists());
    assert!(!seen_by(pid, &d.cfg.auth.tokens_file).exists());
    // In the VM's cgroup (the daemon's limits hold).
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/{id}\n")), "{cgroup}");
}

/// The process is gone (or a zombie waiting for its reaper, holding nothing).
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rfind(')').is_some_and(|i| s[i + 2..].starts_with('Z')),
    }
}

fn jailer_config(dir: &TestDir, jailer: PathBuf) -> agentenv_core::config::Config {
    let mut cfg = dir.config();
    cfg.jail.firecracker_jailer = Some(jailer);
    cfg
}

#[test]
fn firecracker_through_its_jailer_boots_snapshots_restores_and_leaves_nothing() {
    let jailer = need_root_and_jailer!();
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let cfg = jailer_config(&dir, jailer);
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("src");
    let vm = d.wait_state("src", "running", Duration::from_secs(30));
    assert_through_jailer(&d, &vm);
    ok(&d, "POST", "/v1/vm/src/pause", None, 200);
    ok(&d, "POST", "/v1/vm/src/resume", None, 200);

    // A full snapshot: written through /vm, restored by a second jailed
    // Firecracker, recorded as taken through the jailer.
    let snap = ok(
        &d,
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "full", "memory": true})),
        201,
    );
    let version = snap["full"]["vmm_version"].as_str().unwrap_or_default();
    assert!(version.ends_with(" (jailer)"), "{snap}");
    let (code, restored) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "copy", "restore": {"snapshot_id": "full"}})),
    );
    assert_eq!(code, 201, "{restored}");
    let copy = ok(&d, "GET", "/v1/vm/copy", None, 200);
    assert_eq!(copy["state"], "running", "{copy}");
    assert_through_jailer(&d, &copy);
    let load: Value = serde_json::from_slice(
        &std::fs::read(Path::new(copy["session_dir"].as_str().unwrap()).join("snapshot-load.json"))
            .unwrap(),
    )
    .unwrap();
    assert!(
        load["snapshot_path"].as_str().unwrap().ends_with("state"),
        "{load}"
    );

    // A restarted daemon re-adopts both jailed Firecrackers, even when it
    // no longer starts Firecracker through the jailer; a full snapshot of
    // one started the other way is refused (its paths and version label
    // would disagree), naming why.
    let pids: Vec<u64> = [&vm, &copy]
        .iter()
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    let mut cfg = d.cfg.clone();
    d.crash();
    cfg.jail.firecracker_jailer = None;
    let d = Daemon::start_with(cfg, dir.path());
    for (id, pid) in ["src", "copy"].iter().zip(&pids) {
        let v = ok(&d, "GET", &format!("/v1/vm/{id}"), None, 200);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["pid"].as_u64(), Some(*pid), "{v}");
    }
    let (code, e) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "other", "memory": true})),
    );
    assert!(code >= 400, "{code} {e}");
    assert!(
        e["error"].as_str().unwrap().contains("firecracker_jailer"),
        "{e}"
    );
    let src = ok(&d, "GET", "/v1/vm/src", None, 200);
    assert_eq!(src["state"], "running", "{src}");
    // Delete: no process, jail directory, mount or cgroup stays (checked
    // against the baseline by `finish`).
    ok(&d, "DELETE", "/v1/vm/copy", None, 204);
    assert!(gone(pids[1]), "the vmm of copy outlived its delete");
    assert!(!d.cfg.jail_dir().join("copy").exists());
    ok(&d, "DELETE", "/v1/vm/src", None, 204);
    ok(&d, "DELETE", "/v1/snapshots/full", None, 204);
    finish(d, dir);
}

#[test]
fn a_jailer_that_cannot_be_used_is_refused_at_startup_naming_the_key() {
    let _jailer = need_root_and_jailer!();
    let dir = TestDir::new();
    for (path, why) in [
        (PathBuf::from("relative/jailer"), "must be an absolute path"),
        (dir.path().join("missing"), "No such file"),
        (dir.path().join("sessions"), "is not a regular file"),
        (dir.path().join("tokens"), "is not executable"),
    ] {
        let cfg = jailer_config(&dir, path);
        let e = match agentenv::daemon::make_jail(&cfg) {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("accepted a jailer at {why}"),
        };
        assert!(
            e.contains("jail.firecracker_jailer") && e.contains(why),
            "{e}"
        );
    }
    // The jailer needs the jail.
    let mut cfg = jailer_config(&dir, jailer().unwrap());
    cfg.jail.enable = Some(false);
    let e = format!("{:#}", agentenv::daemon::make_jail(&cfg).err().unwrap());
    assert!(e.contains("needs the jail on"), "{e}");
}
