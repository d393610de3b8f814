//! End to end with real guests: the daemon's HTTP API, the QEMU microvm backend
//! (TCG here), Debian's kernel and the minimal rootfs from `artifacts/`.
//! Skips with a reason when QEMU or the artifacts are missing; CI builds them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::config::{Config, VmmChoice};
use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 agentenv.heartbeat=1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The artifacts, or why the test cannot run.
fn artifacts() -> Result<PathBuf, String> {
    let dir = agentenv_testkit::paths::artifacts();
    for f in [
        "kernels/vmlinuz",
        "initramfs/initrd.img",
        "rootfs/minimal.ext4",
    ] {
        if !dir.join(f).exists() {
            return Err(format!(
                "{} missing (run scripts/build-artifacts.sh)",
                dir.join(f).display()
            ));
        }
    }
    if agentenv::daemon::find_binary(Path::new("qemu-system-x86_64")).is_none() {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    Ok(dir)
}

macro_rules! need_artifacts {
    () => {
        match artifacts() {
            Ok(a) => a,
            Err(why) => {
                eprintln!("skipping: {why}");
                return;
            }
        }
    };
}

/// A QEMU config over the artifacts (base images are only read).
fn qemu_config(dir: &TestDir, art: &Path) -> Config {
    Config {
        vmm: VmmChoice::Qemu,
        kernel_root: art.join("kernels"),
        initramfs_root: art.join("initramfs"),
        rootfs_root: art.join("rootfs"),
        default_kernel: "vmlinuz".into(),
        default_initrd: Some("initrd.img".into()),
        memory_mib_per_slot: 256,
        default_slots: 1,
        default_disk_size_gib: 2,
        startup_timeout_ms: 10_000,
        request_timeout_ms: 10_000,
        shutdown_timeout_s: 60,
        ..dir.config()
    }
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn console(vm: &Value) -> String {
    String::from_utf8_lossy(&std::fs::read(vm["console_log"].as_str().unwrap()).unwrap_or_default())
        .into_owned()
}

/// Waits until the console has a line containing `needle`; returns that line.
fn wait_line(vm: &Value, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = console(vm);
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.trim().to_string();
        }
        assert!(
            start.elapsed() < timeout,
            "no {needle:?} on the console after {timeout:?}; tail:\n{}",
            text.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn heartbeats(vm: &Value) -> usize {
    console(vm)
        .lines()
        .filter(|l| l.contains("agentenv-heartbeat"))
        .count()
}

fn create(d: &Daemon, body: Value) -> Value {
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    v
}

fn overlay(vm_id: &str) -> Value {
    json!({"vm_id": vm_id, "boot_args": BOOT_ARGS,
           "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}})
}

/// Reads a file out of an ext4 image with debugfs (no mount needed).
fn debugfs_cat(image: &str, path: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), image])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn boot_pause_resume_shutdown_and_boot_again() {
    let art = need_artifacts!();
    let base = art.join("rootfs/minimal.ext4");
    let base_sum = sha256(&base);
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());

    let t = Instant::now();
    let vm = create(&d, overlay("e1"));
    assert_eq!(vm["backend"], "qemu");
    assert_eq!(vm["state"], "running");
    let ready = wait_line(&vm, "AGENTENV_READY", BOOT_TIMEOUT);
    eprintln!("e1 ready after {:?}: {ready}", t.elapsed());
    assert!(ready.contains("vm_id=e1"), "{ready}");
    wait_line(&vm, "agentenv-heartbeat 3", Duration::from_secs(20));

    // Paused: the guest makes no progress.
    let (code, v) = d.call("POST", "/v1/vm/e1/pause", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("paused")), "{v}");
    std::thread::sleep(Duration::from_millis(300));
    let n1 = heartbeats(&vm);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(heartbeats(&vm), n1, "heartbeats while paused");
    // Resumed: it goes on.
    let (code, v) = d.call("POST", "/v1/vm/e1/resume", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");
    let start = Instant::now();
    while heartbeats(&vm) <= n1 + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no heartbeats after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Shutdown: the guest powers off and QEMU exits by itself.
    let (code, v) = d.call("POST", "/v1/vm/e1/shutdown", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["exit"]["exit_code"], 0, "{v}");
    assert_eq!(v["exit"]["signal"], Value::Null, "{v}");
    assert!(
        v["exit"]["cause"]
            .as_str()
            .unwrap()
            .starts_with("shut down by request"),
        "{v}"
    );
    // What the guest wrote landed in its overlay; the base is untouched.
    let boots = debugfs_cat(
        vm["disk"]["writable_path"].as_str().unwrap(),
        "/upper/var/lib/agentenv/boots",
    );
    assert!(
        boots.contains("e1"),
        "boot record missing from the overlay: {boots:?}"
    );
    assert_eq!(sha256(&base), base_sum, "base image changed");

    // The same base boots again.
    let vm2 = create(&d, overlay("e2"));
    let ready = wait_line(&vm2, "AGENTENV_READY", BOOT_TIMEOUT);
    assert!(
        ready.contains("vm_id=e2") && ready.contains("boots=1"),
        "{ready}"
    );
    finish(d, dir);
    assert_eq!(sha256(&base), base_sum, "base image changed");
}

#[test]
fn a_kernel_panic_ends_in_failed_with_the_cause() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create(
        &d,
        json!({"vm_id": "panics", "boot_args": "console=ttyS0 reboot=k panic=1 rdinit=/nonexistent",
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    let v = d.wait_state("panics", "failed", BOOT_TIMEOUT);
    let cause = v["exit"]["cause"].as_str().unwrap();
    assert!(
        cause.starts_with("guest kernel panic:"),
        "{cause}\n{}",
        console(&vm)
    );
    finish(d, dir);
}

#[test]
fn snapshot_carries_guest_data_into_a_new_vm_while_the_source_runs() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let src = create(&d, overlay("src"));
    wait_line(&src, "AGENTENV_READY", BOOT_TIMEOUT);
    let before = heartbeats(&src);

    let (code, s) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "snap1"})),
    );
    assert_eq!(code, 201, "{s}");
    // The source keeps running.
    let (_, v) = d.call("GET", "/v1/vm/src", None);
    assert_eq!(v["state"], "running");
    let start = Instant::now();
    while heartbeats(&src) <= before + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "source stopped making progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The copy boots with the source's data: its boot log already holds the
    // source's boot, and the guest reports two boots.
    let copy = create(
        &d,
        json!({"vm_id": "copy", "boot_args": BOOT_ARGS,
               "disk": {"kind": "snapshot", "snapshot_id": "snap1"}}),
    );
    let ready = wait_line(&copy, "AGENTENV_READY", BOOT_TIMEOUT);
    assert!(
        ready.contains("vm_id=copy") && ready.contains("boots=2"),
        "{ready}"
    );
    wait_line(&copy, "agentenv: previous boot src", Duration::from_secs(5));
    assert_eq!(d.call("DELETE", "/v1/snapshots/snap1", None).0, 204);
    finish(d, dir);
}

/// A `qemu_binary` that runs QEMU inside the network namespace holding the TAPs.
fn qemu_in_netns(dir: &TestDir, ns: &str) -> PathBuf {
    let p = dir.path().join("qemu-in-netns");
    std::fs::write(
        &p,
        format!("#!/bin/sh\nexec ip netns exec '{ns}' qemu-system-x86_64 \"$@\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn guests_reach_their_gateway_and_the_outside_but_not_each_other() {
    let art = need_artifacts!();
    if let Some(why) = agentenv_testkit::netns::unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    let ns = agentenv_testkit::netns::NetnsPair::new("e2e").unwrap();
    let mut dir = TestDir::new();
    let mut cfg = qemu_config(&dir, &art);
    cfg.network.enable = true;
    cfg.qemu_binary = qemu_in_netns(&dir, &ns.host);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_in(cfg, dir.path(), Some(ns.host_path()));
    let before = ns.state();

    // a: eth0 from the command line; its gateway and the outside answer.
    let a = create(
        &d,
        json!({"vm_id": "a", "boot_args": format!("{BOOT_ARGS} agentenv.check=ping:172.20.1.1,ping:198.18.0.1"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    assert_eq!(a["guest_ip"], "172.20.1.2");
    wait_line(&a, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&a);
    assert!(
        text.contains("agentenv-check ping 172.20.1.1 ok"),
        "gateway:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 198.18.0.1 ok"),
        "outside via NAT:\n{text}"
    );

    // b, while a runs: a is unreachable, b's own gateway answers.
    let b = create(
        &d,
        json!({"vm_id": "b", "boot_args": format!("{BOOT_ARGS} agentenv.check=ping:172.20.1.2,ping:172.20.1.1,ping:172.20.2.1"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    assert_eq!(b["guest_ip"], "172.20.2.2");
    wait_line(&b, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&b);
    assert!(
        text.contains("agentenv-check ping 172.20.2.1 ok"),
        "own gateway:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 172.20.1.2 fail"),
        "other guest:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 172.20.1.1 fail"),
        "other gateway:\n{text}"
    );

    finish(d, dir);
    assert_eq!(ns.state(), before, "namespace not back to its baseline");
}

#[test]
fn a_guest_sees_its_host_shares() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let share = dir.path().join("disks/data");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), b"hello from the host").unwrap();
    let mut cfg = qemu_config(&dir, &art);
    cfg.direct_disk_roots = vec![dir.path().join("disks")];
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create(
        &d,
        json!({"vm_id": "sh", "boot_args": format!("{BOOT_ARGS} agentenv.check=file:/mnt/data/hello.txt,file:/mnt/data/missing"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"},
               "shares": [{"host_path": share, "guest_path": "/mnt/data"}]}),
    );
    wait_line(&vm, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&vm);
    assert!(
        text.contains("agentenv-check file /mnt/data/hello.txt ok hello from the host"),
        "{text}"
    );
    assert!(
        text.contains("agentenv-check file /mnt/data/missing fail"),
        "{text}"
    );
    finish(d, dir);
}
