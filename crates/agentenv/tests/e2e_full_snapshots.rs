//! Full (memory) snapshots end to end with real guests: the daemon's HTTP API,
//! QEMU microvm under TCG, the artifacts' kernel and rootfs. A restored VM
//! runs on from the instant of its snapshot without booting; fork and reset
//! work through the same path. Skips with a reason when QEMU or the
//! artifacts are missing; CI builds them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::config::Config;
use common::{boot_ready, call_ok, finish, Daemon, TestDir};
use serde_json::{json, Value};

/// A tmpfs directory for the fast snapshot tier and guest RAM, removed (and
/// checked empty of leftovers) at the end.
struct Shm(tempfile::TempDir);

impl Shm {
    fn new() -> Shm {
        Shm(tempfile::tempdir_in("/dev/shm").unwrap())
    }

    /// Files left under it (the tier's own directory entries aside).
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.0.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.display().to_string());
                }
            }
        }
        out
    }
}

/// A QEMU config over the artifacts, the fast tier and guest RAM in `shm`.
fn qemu_config(dir: &TestDir, art: &Path, shm: &Shm) -> Config {
    Config {
        request_timeout_ms: 20_000,
        tmpfs_snapshot_root: shm.0.path().join("tier"),
        guest_memory_root: Some(shm.0.path().join("ram")),
        ..common::qemu_config(dir, art)
    }
}

/// Deletes the test's VMs and snapshots, then checks that nothing is left:
/// no process, file or socket of the daemon's, nothing in the tmpfs.
fn clean_up(d: Daemon, dir: TestDir, shm: &Shm, vms: &[&str], snapshots: &[&str]) {
    for vm in vms {
        call_ok(&d, "DELETE", &format!("/v1/vm/{vm}"), None, 204);
    }
    for s in snapshots {
        call_ok(&d, "DELETE", &format!("/v1/snapshots/{s}"), None, 204);
    }
    finish(d, dir);
    assert_eq!(shm.leftovers(), Vec::<String>::new());
}

fn start(dir: &mut TestDir, cfg: Config) -> Daemon {
    for p in [&cfg.tmpfs_snapshot_root, &cfg.guest_memory_dir()] {
        std::fs::create_dir_all(p).unwrap();
    }
    dir.baseline = Some(common::baseline(dir.path()));
    Daemon::start_with(cfg, dir.path())
}

fn restore_ready(d: &Daemon, vm_id: &str, snapshot_id: &str) -> (Value, Duration) {
    let t = Instant::now();
    let v = call_ok(
        d,
        "POST",
        "/v1/vm",
        Some(
            json!({"vm_id": vm_id, "restore": {"snapshot_id": snapshot_id},
                    "wait_ready": true, "wait_ready_timeout_s": 30}),
        ),
        201,
    );
    let took = t.elapsed();
    assert_eq!(
        (v["state"].as_str(), v["ready"].as_bool()),
        (Some("running"), Some(true)),
        "{v}"
    );
    (v, took)
}

/// Runs `sh -c script` in a VM: (exit code, stdout).
fn sh(d: &Daemon, vm: &str, script: &str) -> (i64, String) {
    let v = call_ok(
        d,
        "POST",
        &format!("/v1/vm/{vm}/exec"),
        Some(json!({"cmd": ["sh", "-c", script], "timeout_s": 30})),
        200,
    );
    (
        v["exit_code"].as_i64().unwrap_or(-1),
        v["stdout"].as_str().unwrap_or_default().to_string(),
    )
}

/// Waits until a VM's agent answers.
fn wait_ready(d: &Daemon, vm: &str, timeout: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = call_ok(d, "GET", &format!("/v1/vm/{vm}"), None, 200);
        if v["ready"] == true {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "{vm} not ready after {timeout:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn full_snapshot(d: &Daemon, vm: &str, id: &str) -> Value {
    let s = call_ok(
        d,
        "POST",
        &format!("/v1/vm/{vm}/snapshot"),
        Some(json!({"snapshot_id": id, "memory": true})),
        201,
    );
    assert_eq!(s["kind"], "full", "{s}");
    s
}

#[test]
fn a_restored_vm_runs_on_from_its_snapshot_with_its_processes_and_page_cache() {
    let art = need_artifacts!();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art, &shm);
    let d = start(&mut dir, cfg);
    boot_ready(&d, "src");
    // A counter outside the exec's session, and a file written, never synced.
    let (code, pid) = sh(
        &d,
        "src",
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' \
         </dev/null >/dev/null 2>&1 & echo $!",
    );
    assert_eq!(code, 0);
    let pid = pid.trim().to_string();
    assert_eq!(sh(&d, "src", "echo unsynced > /root/unsynced").0, 0);
    std::thread::sleep(Duration::from_millis(300));
    let snap = full_snapshot(&d, "src", "full1");
    let full = &snap["full"];
    assert!(
        full["vmm_version"].as_str().unwrap().starts_with("qemu "),
        "{snap}"
    );
    assert_eq!(full["memory_mib"], 256);
    assert!(snap["rootfs_fingerprint"].is_string(), "{snap}");
    // The source runs on.
    assert_eq!(
        call_ok(&d, "GET", "/v1/vm/src", None, 200)["state"],
        "running"
    );

    let (r, took) = restore_ready(&d, "r1", "full1");
    eprintln!("restore to ready: {took:?}");
    assert_eq!(r["restored_from"], "full1");
    assert_ne!(r["pid"], Value::Null);
    let (code, out) = sh(
        &d,
        "r1",
        &format!("kill -0 {pid} && cat /root/unsynced && cat /tmp/counter"),
    );
    assert_eq!(
        code, 0,
        "the counter (pid {pid}) is alive in the restored vm: {out}"
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("unsynced"));
    let first: u64 = lines.next().unwrap().trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let (_, later) = sh(&d, "r1", "cat /tmp/counter");
    let later: u64 = later.trim().parse().unwrap();
    assert!(later > first, "the counter goes on: {first} then {later}");
    // Its own identity, not its source's.
    assert_eq!(sh(&d, "r1", "hostname").1.trim(), "r1");
    let host_now = chrono::Utc::now().timestamp();
    let guest_now: i64 = sh(&d, "r1", "date +%s").1.trim().parse().unwrap();
    assert!(
        (guest_now - host_now).abs() < 30,
        "guest clock {guest_now}, host {host_now}"
    );
    let a = sh(&d, "src", "head -c 16 /dev/urandom | od -An -tx1").1;
    let b = sh(&d, "r1", "head -c 16 /dev/urandom | od -An -tx1").1;
    assert_ne!(a, b, "the restored vm draws its own random bytes");

    // The snapshot cannot go while r1's memory maps it.
    let (code, e) = d.call("DELETE", "/v1/snapshots/full1", None);
    assert_eq!(code, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("r1"), "{e}");
    assert_eq!(
        call_ok(&d, "GET", "/v1/snapshots/full1", None, 200)["mapped_by"],
        json!(["r1"])
    );
    clean_up(d, dir, &shm, &["r1"], &["full1"]);
}

#[test]
fn reset_twenty_times_each_time_forgets_what_was_written() {
    let art = need_artifacts!();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art, &shm);
    let d = start(&mut dir, cfg);
    let src = boot_ready(&d, "rl");
    full_snapshot(&d, "rl", "base");
    let mut times = Vec::new();
    for i in 0..20 {
        let (code, _) = sh(&d, "rl", &format!("echo {i} > /root/after-snapshot"));
        assert_eq!(code, 0);
        let t = Instant::now();
        let v = call_ok(
            &d,
            "POST",
            "/v1/vm/rl/reset",
            Some(json!({"snapshot_id": "base"})),
            200,
        );
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["guest_ip"], src["guest_ip"]);
        assert_eq!(v["api_socket"], src["api_socket"]);
        let (code, out) = sh(
            &d,
            "rl",
            "cat /root/after-snapshot 2>/dev/null; test ! -e /root/after-snapshot",
        );
        times.push(t.elapsed());
        assert_eq!(
            code, 0,
            "reset {i}: the file written after the snapshot is still there: {out}"
        );
    }
    times.sort();
    eprintln!(
        "reset + first exec: p50 {:?}, max {:?}",
        times[10], times[19]
    );
    // A disk snapshot cannot be reset to.
    call_ok(
        &d,
        "POST",
        "/v1/vm/rl/snapshot",
        Some(json!({"snapshot_id": "disk"})),
        201,
    );
    let (code, e) = d.call(
        "POST",
        "/v1/vm/rl/reset",
        Some(json!({"snapshot_id": "disk"})),
    );
    assert_eq!(code, 409, "{e}");
    clean_up(d, dir, &shm, &["rl"], &["base", "disk"]);
}

#[test]
fn bad_snapshots_are_refused_and_leave_nothing() {
    let art = need_artifacts!();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    // A base image of the test's own, so that it can change.
    let rootfs = dir.path().join("rootfs-own");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy(art.join("rootfs/minimal.ext4"), rootfs.join("minimal.ext4")).unwrap();
    let mut cfg = qemu_config(&dir, &art, &shm);
    cfg.rootfs_root = rootfs.clone();
    let d = start(&mut dir, cfg);
    boot_ready(&d, "b1");
    full_snapshot(&d, "b1", "good");
    let bad = full_snapshot(&d, "b1", "bad");
    // A memory file changed behind the daemon's back: 422, nothing made.
    let mem = PathBuf::from(bad["tmpfs_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .join("memory");
    assert!(mem.exists(), "{}", mem.display());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.write_all_at(b"corrupt!", 4096).unwrap();
    }
    let (code, e) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "c1", "restore": {"snapshot_id": "bad"}})),
    );
    assert_eq!(code, 422, "{e}");
    assert_eq!(d.call("GET", "/v1/vm/c1", None).0, 404);
    // Fields a snapshot decides: 400 naming them.
    let (code, e) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "c2", "restore": {"snapshot_id": "good"}, "slots": 2})),
    );
    assert_eq!((code, e["field"].as_str()), (400, Some("slots")), "{e}");
    // A changed base image: 409 naming it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(rootfs.join("minimal.ext4"))
            .unwrap();
        f.write_all_at(b"x", 0).unwrap();
    }
    let (code, e) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "c3", "restore": {"snapshot_id": "good"}})),
    );
    assert_eq!(code, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("minimal.ext4"), "{e}");
    clean_up(d, dir, &shm, &["b1"], &["good", "bad"]);
}

#[test]
fn a_crash_mid_fork_leaves_no_clone_and_no_snapshot_after_the_restart() {
    let art = need_artifacts!();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    let mut cfg = qemu_config(&dir, &art, &shm);
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Stop;
    let d = start(&mut dir, cfg.clone());
    let src = boot_ready(&d, "fk");
    d.engine.failpoints.arm_hang("fork.snapshot");
    common::fire(
        &d,
        "POST",
        "/v1/vm/fk/fork".into(),
        json!({"count": 2}),
        Duration::from_secs(60),
    );
    common::wait_hung(&d, "fork.snapshot");
    d.crash();
    let d = Daemon::start_with(cfg, dir.path());
    let vms = call_ok(&d, "GET", "/v1/vm", None, 200);
    let ids: Vec<&str> = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fk"]);
    let v = call_ok(&d, "GET", "/v1/vm/fk", None, 200);
    assert_eq!(
        (v["state"].as_str(), &v["pid"]),
        (Some("running"), &src["pid"])
    );
    let snaps = call_ok(&d, "GET", "/v1/snapshots", None, 200);
    assert_eq!(
        snaps["snapshots"],
        json!([]),
        "the fork's snapshot went with the crash"
    );
    // A fork now works, and its clones are running VMs of their own.
    let forked = call_ok(&d, "POST", "/v1/vm/fk/fork", Some(json!({"count": 2})), 201);
    let clones = forked["vms"].as_array().unwrap();
    assert_eq!(clones.len(), 2);
    for c in clones {
        let id = c["vm_id"].as_str().unwrap();
        let v = wait_ready(&d, id, Duration::from_secs(30));
        assert_eq!(v["ready"], true, "{v}");
        assert_eq!(sh(&d, id, "hostname").1.trim(), id);
        call_ok(&d, "DELETE", &format!("/v1/vm/{id}"), None, 204);
    }
    assert_eq!(
        call_ok(&d, "GET", "/v1/snapshots", None, 200)["snapshots"],
        json!([])
    );
    finish(d, dir);
    assert_eq!(shm.leftovers(), Vec::<String>::new());
}

#[test]
fn five_clones_have_their_own_address_and_randomness_and_cannot_reach_each_other() {
    let art = need_artifacts!();
    if let Some(why) = agentenv_testkit::netns::unavailable() {
        agentenv_testkit::skip::skip(&why);
        return;
    }
    let ns = agentenv_testkit::netns::NetnsPair::new("fork").unwrap();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    let cfg = qemu_config(&dir, &art, &shm);
    for p in [&cfg.tmpfs_snapshot_root, &cfg.guest_memory_dir()] {
        std::fs::create_dir_all(p).unwrap();
    }
    let d = common::start_networked(cfg, &mut dir, &ns);
    let before = ns.state();
    let parent = boot_ready(&d, "p");
    let t = Instant::now();
    let forked = call_ok(&d, "POST", "/v1/vm/p/fork", Some(json!({"count": 5})), 201);
    let clones: Vec<Value> = forked["vms"].as_array().unwrap().clone();
    for c in &clones {
        wait_ready(&d, c["vm_id"].as_str().unwrap(), Duration::from_secs(60));
    }
    eprintln!("fork 5 → all ready: {:?}", t.elapsed());
    let mut ips: Vec<String> = clones
        .iter()
        .map(|c| c["guest_ip"].as_str().unwrap().to_string())
        .collect();
    ips.push(parent["guest_ip"].as_str().unwrap().to_string());
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "{ips:?}");
    let mut randoms = Vec::new();
    for c in &clones {
        let id = c["vm_id"].as_str().unwrap();
        let ip = c["guest_ip"].as_str().unwrap();
        let gw = c["host_ip"].as_str().unwrap();
        let (_, addr) = sh(&d, id, "ip -4 -o addr show dev eth0");
        assert!(addr.contains(&format!("{ip}/")), "{id}: {addr}");
        let parent_ip = parent["guest_ip"].as_str().unwrap();
        assert!(
            !addr.contains(&format!("{parent_ip}/")),
            "{id} answers with its parent's address: {addr}"
        );
        assert_eq!(
            sh(&d, id, &format!("ping -c 1 -W 2 {gw}")).0,
            0,
            "{id}: its gateway"
        );
        let other = ips.iter().find(|o| o.as_str() != ip).unwrap();
        assert_ne!(
            sh(&d, id, &format!("ping -c 1 -W 1 {other}")).0,
            0,
            "{id} reached {other}"
        );
        assert_ne!(
            sh(&d, id, &format!("ping -c 1 -W 1 {parent_ip}")).0,
            0,
            "{id} reached its parent"
        );
        randoms.push(sh(&d, id, "head -c 16 /dev/urandom | od -An -tx1").1);
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 5, "clones draw different random bytes");
    finish(d, dir);
    assert_eq!(ns.state(), before, "namespace not back to its baseline");
    assert_eq!(shm.leftovers(), Vec::<String>::new());
}

#[test]
fn a_crash_mid_full_snapshot_leaves_the_guest_running_after_the_restart() {
    let art = need_artifacts!();
    let shm = Shm::new();
    let mut dir = TestDir::new();
    let mut cfg = qemu_config(&dir, &art, &shm);
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Stop;
    let d = start(&mut dir, cfg.clone());
    let pid = boot_ready(&d, "cs")["pid"].clone();
    // The daemon dies with the guest stopped and its state saved.
    d.engine.failpoints.arm_hang("snapshot.saved");
    common::fire(
        &d,
        "POST",
        "/v1/vm/cs/snapshot".into(),
        json!({"snapshot_id": "cut", "memory": true}),
        Duration::from_secs(60),
    );
    common::wait_hung(&d, "snapshot.saved");
    d.crash();
    let d = Daemon::start_with(cfg, dir.path());
    let v = call_ok(&d, "GET", "/v1/vm/cs", None, 200);
    assert_eq!(
        (v["state"].as_str(), &v["pid"]),
        (Some("running"), &pid),
        "{v}"
    );
    assert_eq!(d.call("GET", "/v1/snapshots/cut", None).0, 404);
    wait_ready(&d, "cs", Duration::from_secs(30));
    assert_eq!(
        sh(&d, "cs", "echo after > /root/after && cat /root/after").1,
        "after\n"
    );
    // And a full snapshot works again on the re-adopted VMM.
    full_snapshot(&d, "cs", "again");
    clean_up(d, dir, &shm, &["cs"], &["again"]);
}
