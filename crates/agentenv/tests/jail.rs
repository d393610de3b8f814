//! The VMM jail end to end with real QEMU guests (the daemon runs as root, so
//! VMMs are jailed by default): the VMM runs as an unprivileged uid in its own
//! mount, PID, IPC and UTS namespaces, under a root holding only its VM's
//! files, with QEMU's seccomp sandbox on; full snapshots, restore, reset and a
//! daemon restart work jailed; delete leaves no jail directory, mount or
//! process. Skips with a reason when not root or without QEMU and artifacts.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_core::config::Config;
use common::{boot_ready, call_ok, finish, seen_by, status_field, Daemon, TestDir};
use serde_json::{json, Value};

macro_rules! need_root_and_artifacts {
    () => {{
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPING: the jail needs a daemon running as root");
            return;
        }
        need_artifacts!()
    }};
}

fn sh(d: &Daemon, vm: &str, script: &str) -> String {
    let v = call_ok(
        d,
        "POST",
        &format!("/v1/vm/{vm}/exec"),
        Some(json!({"cmd": ["sh", "-c", script], "timeout_s": 30})),
        200,
    );
    assert_eq!(v["exit_code"], 0, "{v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Checks that the QEMU of `vm` is jailed; returns its uid.
fn assert_jailed(d: &Daemon, cfg: &Config, vm: &Value, others: &[&Value]) -> u32 {
    let pid = vm["pid"].as_u64().unwrap();
    // An unprivileged uid and gid, no supplementary groups, no_new_privs,
    // QEMU's seccomp filter.
    let uid = common::assert_unprivileged_pid1(pid);
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Its root is the jail: the system's read-only directories, a minimal
    // /dev, its own /proc, and the paths leading to its own files only.
    let root = seen_by(pid, Path::new("/"));
    let top = names(&root);
    for want in ["dev", "proc", "usr"] {
        assert!(top.contains(&want.to_string()), "{top:?}");
    }
    assert!(
        !top.contains(&"home".to_string()) && !top.contains(&"root".to_string()),
        "{top:?}"
    );
    let dev = names(&seen_by(pid, Path::new("/dev")));
    let minimal = ["null", "zero", "full", "random", "urandom", "kvm", "net"];
    for n in &dev {
        // `shm` only as the way to guest RAM in a tmpfs there: nothing else of it.
        if n == "shm" {
            let shm = names(&seen_by(pid, Path::new("/dev/shm")));
            assert_eq!(shm.len(), 1, "{shm:?}");
        } else {
            assert!(minimal.contains(&n.as_str()), "{dev:?}");
        }
    }
    assert!(!seen_by(pid, Path::new("/etc/passwd")).exists());
    assert!(!seen_by(pid, Path::new("/etc/shadow")).exists());
    // Only the jail's processes in its /proc.
    let procs: Vec<String> = names(&seen_by(pid, Path::new("/proc")))
        .into_iter()
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    assert_eq!(procs, vec!["1".to_string()]);
    // Its session directory is there; the sockets directory holds nothing
    // (its socket was moved out); no other VM's files are.
    let session = PathBuf::from(vm["session_dir"].as_str().unwrap());
    assert!(seen_by(pid, &session.join("console.log")).exists());
    assert_eq!(names(&seen_by(pid, &cfg.socket_root)), Vec::<String>::new());
    assert_eq!(
        names(&seen_by(pid, &cfg.session_root)),
        vec![vm["vm_id"].as_str().unwrap().to_string()]
    );
    for other in others {
        let theirs = PathBuf::from(other["session_dir"].as_str().unwrap());
        assert!(!seen_by(pid, &theirs).exists());
    }
    // The rootfs base image (read-only) is there, alone.
    assert_eq!(
        names(&seen_by(pid, &cfg.rootfs_root)),
        vec!["minimal.ext4".to_string()]
    );
    let base = seen_by(pid, &cfg.rootfs_root.join("minimal.ext4"));
    let opened = std::fs::OpenOptions::new().write(true).open(&base);
    assert!(opened.is_err(), "the base image is writable in the jail");
    // The daemon still reaches it.
    let _ = d;
    uid
}

fn jail_config(dir: &TestDir, art: &Path) -> Config {
    common::qemu_config(dir, art)
}

#[test]
fn a_jailed_qemu_sees_only_its_files_runs_unprivileged_and_leaves_nothing() {
    let art = need_root_and_artifacts!();
    let mut dir = TestDir::new();
    let cfg = jail_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let a = boot_ready(&d, "ja");
    let b = boot_ready(&d, "jb");
    let ua = assert_jailed(&d, &cfg, &a, &[&b]);
    let ub = assert_jailed(&d, &cfg, &b, &[&a]);
    // Per-VM uids from the default range, recorded as the jail directory's owner.
    assert_ne!(ua, ub);
    for (vm, uid) in [("ja", ua), ("jb", ub)] {
        assert!((900_000..900_000 + 65_536).contains(&uid), "{uid}");
        let jail_dir = cfg.jail_dir().join(vm);
        assert_eq!(std::fs::metadata(&jail_dir).unwrap().uid(), uid);
        // The host sees an empty directory: the tree lives in the VMM's namespace.
        assert_eq!(names(&jail_dir), Vec::<String>::new());
    }
    // Exec and files through the agent, pause and resume, all jailed.
    assert_eq!(sh(&d, "ja", "echo hi > /root/f; cat /root/f"), "hi\n");
    assert_eq!(
        call_ok(&d, "POST", "/v1/vm/ja/pause", None, 200)["state"],
        "paused"
    );
    assert_eq!(
        call_ok(&d, "POST", "/v1/vm/ja/resume", None, 200)["state"],
        "running"
    );
    // Delete: the jail directory, its process and any mount below it are gone.
    call_ok(&d, "DELETE", "/v1/vm/ja", None, 204);
    let pid = a["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}/status")).exists()
            || status_field(pid, "State").starts_with('Z')
    );
    assert!(!cfg.jail_dir().join("ja").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&cfg.jail_dir().display().to_string()),
        "{mounts}"
    );
    // A guest powering itself off also takes its jail with it.
    let _ = d.call(
        "POST",
        "/v1/vm/jb/exec",
        Some(json!({"cmd": ["poweroff", "-f"], "timeout_s": 5})),
    );
    let stopped = d.wait_state("jb", "stopped", Duration::from_secs(60));
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let t = std::time::Instant::now();
    while cfg.jail_dir().join("jb").exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cfg.jail_dir().join("jb").exists());
    finish(d, dir);
}

/// A tmpfs directory for the fast snapshot tier and guest RAM.
struct Shm(tempfile::TempDir);

#[test]
fn full_snapshot_restore_fork_and_reset_work_jailed() {
    let art = need_root_and_artifacts!();
    let mut dir = TestDir::new();
    let shm = Shm(tempfile::tempdir_in("/dev/shm").unwrap());
    let cfg = Config {
        request_timeout_ms: 20_000,
        tmpfs_snapshot_root: shm.0.path().join("tier"),
        guest_memory_root: Some(shm.0.path().join("ram")),
        ..jail_config(&dir, &art)
    };
    for p in [&cfg.tmpfs_snapshot_root, &cfg.guest_memory_dir()] {
        std::fs::create_dir_all(p).unwrap();
    }
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let src = boot_ready(&d, "fsrc");
    assert_jailed(&d, &cfg, &src, &[]);
    sh(&d, "fsrc", "echo kept > /root/mark");
    let s = call_ok(
        &d,
        "POST",
        "/v1/vm/fsrc/snapshot",
        Some(json!({"snapshot_id": "jfull", "memory": true})),
        201,
    );
    assert_eq!(s["kind"], "full", "{s}");
    let r = call_ok(
        &d,
        "POST",
        "/v1/vm",
        Some(
            json!({"vm_id": "frest", "restore": {"snapshot_id": "jfull"},
                    "wait_ready": true, "wait_ready_timeout_s": 60}),
        ),
        201,
    );
    assert_eq!(
        (r["state"].as_str(), r["ready"].as_bool()),
        (Some("running"), Some(true)),
        "{r}"
    );
    let pid = r["pid"].as_u64().unwrap();
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_ne!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(sh(&d, "frest", "cat /root/mark"), "kept\n");
    // Reset: the source back to the snapshot's instant, still jailed.
    sh(&d, "fsrc", "echo gone > /root/mark");
    let v = call_ok(
        &d,
        "POST",
        "/v1/vm/fsrc/reset",
        Some(json!({"snapshot_id": "jfull"})),
        200,
    );
    assert_eq!(v["state"], "running", "{v}");
    let t = std::time::Instant::now();
    while d.call("GET", "/v1/vm/fsrc", None).1["ready"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not ready after reset"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sh(&d, "fsrc", "cat /root/mark"), "kept\n");
    let v = call_ok(&d, "GET", "/v1/vm/fsrc", None, 200);
    assert_eq!(status_field(v["pid"].as_u64().unwrap(), "Seccomp"), "2");
    // Fork: clones of a running VM, each jailed under its own uid.
    let forked = call_ok(
        &d,
        "POST",
        "/v1/vm/fsrc/fork",
        Some(json!({"count": 2})),
        201,
    );
    let clones: Vec<String> = forked["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("{forked}"))
        .iter()
        .map(|v| v["vm_id"].as_str().unwrap().to_string())
        .collect();
    let mut uids = Vec::new();
    for c in &clones {
        let v = call_ok(&d, "GET", &format!("/v1/vm/{c}"), None, 200);
        let pid = v["pid"].as_u64().unwrap();
        uids.push(status_field(pid, "Uid"));
        assert_eq!(status_field(pid, "Seccomp"), "2");
    }
    assert_ne!(uids[0], uids[1]);
    for vm in ["frest", "fsrc"]
        .iter()
        .copied()
        .chain(clones.iter().map(String::as_str))
    {
        call_ok(&d, "DELETE", &format!("/v1/vm/{vm}"), None, 204);
    }
    let snaps = call_ok(&d, "GET", "/v1/snapshots", None, 200);
    for s in snaps["snapshots"].as_array().unwrap() {
        let id = s["snapshot_id"].as_str().unwrap();
        call_ok(&d, "DELETE", &format!("/v1/snapshots/{id}"), None, 204);
    }
    assert_eq!(names(&cfg.jail_dir()), Vec::<String>::new());
    finish(d, dir);
}

#[test]
fn a_restarted_daemon_re_adopts_a_jailed_qemu() {
    let art = need_root_and_artifacts!();
    let mut dir = TestDir::new();
    let mut cfg = jail_config(&dir, &art);
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Leave;
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let vm = boot_ready(&d, "jr");
    let uid = assert_jailed(&d, &cfg, &vm, &[]);
    sh(&d, "jr", "echo before > /root/state");
    d.stop();
    std::thread::sleep(Duration::from_millis(300));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let v = call_ok(&d, "GET", "/v1/vm/jr", None, 200);
    assert_eq!(
        (v["state"].as_str(), v["pid"].clone()),
        (Some("running"), vm["pid"].clone()),
        "{v}"
    );
    // Still the same jail, still the same uid; the restart's sweep kept it.
    assert_eq!(assert_jailed(&d, &cfg, &v, &[]), uid);
    let t = std::time::Instant::now();
    while d.call("GET", "/v1/vm/jr", None).1["ready"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent not ready again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sh(&d, "jr", "cat /root/state"), "before\n");
    // A new VM beside it gets another uid (the recorded one is taken).
    let other = boot_ready(&d, "jr2");
    assert_ne!(assert_jailed(&d, &cfg, &other, &[&v]), uid);
    finish(d, dir);
}

#[test]
fn a_jail_that_cannot_be_set_up_is_refused_naming_the_key() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPING: the jail needs a daemon running as root");
        return;
    }
    let dir = TestDir::new();
    // A chroot_base that is a file: the daemon does not start.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let mut cfg = dir.config();
    cfg.vmm = agentenv_core::config::VmmChoice::Qemu;
    cfg.jail.chroot_base = Some(file.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(agentenv::daemon::build_engine(cfg.clone()))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("jail.chroot_base") && e.contains("is not a directory"),
        "{e}"
    );
    // Ids: root is refused in the config itself.
    for (toml, key) in [
        ("[jail]\nuid = 0\n", "jail.uid"),
        ("[jail]\ngid = 0\n", "jail.gid"),
        ("[jail]\nuid_range = [0, 10]\n", "jail.uid_range"),
        ("[jail]\nuid_range = [4294967000, 1000]\n", "jail.uid_range"),
    ] {
        let e = Config::parse(toml).unwrap_err().to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    // A range with no uid left: that VM gets a 503 naming the cause, and
    // nothing of it is left.
    let art = match common::guest_artifacts() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("skipping the range-full half: {why}");
            return;
        }
    };
    let mut dir = TestDir::new();
    let mut cfg = jail_config(&dir, &art);
    cfg.jail.uid_range = [910_000, 1];
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    boot_ready(&d, "one");
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "two", "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}})),
    );
    assert_eq!(code, 503, "{v}");
    assert!(v.to_string().contains("jail.uid_range"), "{v}");
    assert_eq!(d.call("GET", "/v1/vm/two", None).0, 404);
    assert!(!cfg.jail_dir().join("two").exists());
    finish(d, dir);
}
