//! The daemon process killed with SIGKILL and started again: every VM is
//! re-adopted or recorded as failed with the cause, the API shows the truth,
//! and nothing leaks. Also measures how fast VMM deaths are noticed, for VMMs
//! the daemon started and for re-adopted ones.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, write_config, KillOnDrop, TestDir};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_agentenv");

/// The `agentenv` daemon as a separate process.
struct DaemonProc {
    child: KillOnDrop,
    base: String,
}

impl DaemonProc {
    fn start(config: &std::path::Path, port: u16) -> DaemonProc {
        let child = KillOnDrop(
            Command::new(BIN)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("AGENTENV_CONFIG", config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        let mut child = child;
        while !common::healthy(&base) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not come up"
            );
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!("the daemon exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        DaemonProc { child, base }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        common::http_call(&self.base, method, path, body)
    }

    fn vm(&self, id: &str) -> Value {
        let (code, v) = self.call("GET", &format!("/v1/vm/{id}"), None);
        assert_eq!(code, 200, "{v}");
        v
    }

    fn sigkill(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

fn kill9(pid: u64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Kills a VM's VMM and returns how long until the API shows it failed.
fn death_latency(d: &DaemonProc, id: &str) -> Duration {
    let pid = d.vm(id)["pid"].as_u64().unwrap();
    let t = Instant::now();
    kill9(pid);
    loop {
        let v = d.vm(id);
        if v["state"] == "failed" {
            let cause = v["exit"]["cause"].as_str().unwrap_or("");
            assert!(cause.contains("vmm"), "{v}");
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "death not noticed: {v}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn sigkill_of_the_daemon_with_20_vms_loses_none() {
    if common::is_real() {
        agentenv_testkit::skip::skip_optional("20 real Firecracker guests do not boot here");
        return;
    }
    let dir = TestDir::new();
    let config = write_config(&dir, "on_shutdown = \"leave\"\nrequest_timeout_ms = 2000");
    let base = common::baseline(dir.path());
    let port = free_port();
    let d = DaemonProc::start(&config, port);
    let create = |d: &DaemonProc, id: &str| {
        let (code, v) = d.call("POST", "/v1/vm", Some(common::overlay_req(id)));
        assert_eq!(code, 201, "{v}");
        v
    };

    // 20 VMs in mixed states.
    let mut pids = std::collections::HashMap::new();
    for i in 0..20 {
        let id = format!("vm{i:02}");
        let v = create(&d, &id);
        pids.insert(id, v["pid"].as_u64().unwrap());
    }
    // vm00–07 running; vm08–11 paused; vm12–14 stopped; vm15–16 failed (their
    // VMM killed under the daemon); vm17–19 running, then killed while no
    // daemon runs; snapshots of two running VMs.
    for i in 8..12 {
        assert_eq!(
            d.call("POST", &format!("/v1/vm/vm{i:02}/pause"), None).0,
            200
        );
    }
    for i in 12..15 {
        assert_eq!(
            d.call("POST", &format!("/v1/vm/vm{i:02}/shutdown"), None).0,
            200
        );
    }
    for i in 15..17 {
        death_latency(&d, &format!("vm{i:02}"));
    }
    for id in ["vm00", "vm01"] {
        let (code, v) = d.call(
            "POST",
            &format!("/v1/vm/{id}/snapshot"),
            Some(json!({"snapshot_id": format!("{id}-snap")})),
        );
        assert_eq!(code, 201, "{v}");
    }
    let before: Value = d.call("GET", "/v1/vm", None).1;

    // The crash.
    d.sigkill();
    for i in 17..20 {
        kill9(pids[&format!("vm{i:02}")]);
    }
    // The killed ones vanish (SIGKILL is asynchronous); the other 12 stay.
    let start = Instant::now();
    let live = loop {
        let live = agentenv_testkit::leaks::processes_mentioning(&dir.path().join("s"));
        if live.len() <= 12 || start.elapsed() > Duration::from_secs(5) {
            break live;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        live.len(),
        12,
        "running and paused VMMs outlive the daemon: {live:?}"
    );

    let t = Instant::now();
    let d = DaemonProc::start(&config, port);
    eprintln!(
        "restart with 20 vms: health answered after {:?}",
        t.elapsed()
    );
    let mut readopted = 0;
    for i in 0..20 {
        let id = format!("vm{i:02}");
        let v = d.vm(&id);
        let want = match i {
            0..=7 => "running",
            8..=11 => "paused",
            12..=14 => "stopped",
            _ => "failed",
        };
        assert_eq!(v["state"], want, "{id}: {v}");
        if matches!(i, 0..=11) {
            assert_eq!(
                v["pid"].as_u64(),
                Some(pids[&id]),
                "{id} has a new vmm: {v}"
            );
            readopted += 1;
        } else {
            assert_eq!(v["pid"], Value::Null, "{v}");
        }
        if (17..20).contains(&i) {
            let cause = v["exit"]["cause"].as_str().unwrap();
            assert!(
                cause.contains("agentenv restarted") && cause.contains("gone"),
                "{cause}"
            );
        }
        // Everything else is as it was.
        let old = before["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["vm_id"] == id)
            .unwrap();
        for k in ["disk", "boot_args", "session_dir", "created_at"] {
            assert_eq!(v[k], old[k], "{id}.{k}");
        }
    }
    eprintln!("re-adopted vms after SIGKILL of the daemon: {readopted}");
    assert_eq!(readopted, 12);
    let (_, snaps) = d.call("GET", "/v1/snapshots", None);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 2, "{snaps}");
    // Re-adopted VMMs obey: pause, resume, shutdown.
    assert_eq!(
        d.call("POST", "/v1/vm/vm02/pause", None).1["state"],
        "paused"
    );
    assert_eq!(
        d.call("POST", "/v1/vm/vm08/resume", None).1["state"],
        "running"
    );
    let (code, v) = d.call("POST", "/v1/vm/vm03/shutdown", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("stopped")), "{v}");

    // VMM deaths are noticed fast: re-adopted VMMs (pidfd) and new ones (child).
    let mut adopted: Vec<Duration> = (4..8)
        .chain(9..12)
        .map(|i| death_latency(&d, &format!("vm{i:02}")))
        .collect();
    adopted.push(death_latency(&d, "vm00"));
    let mut children = Vec::new();
    for i in 0..10 {
        let id = format!("new{i}");
        create(&d, &id);
        children.push(death_latency(&d, &id));
    }
    let (a50, a99) = (
        percentile(&mut adopted, 0.5),
        percentile(&mut adopted, 0.99),
    );
    let (c50, c99) = (
        percentile(&mut children, 0.5),
        percentile(&mut children, 0.99),
    );
    eprintln!(
        "vmm death detection: re-adopted p50 {a50:?} p99 {a99:?} (n={}); children p50 {c50:?} p99 {c99:?} (n={})",
        adopted.len(),
        children.len()
    );
    // Exit is noticed through a pidfd or SIGCHLD, not a poll: typically a few
    // ms. The figures above are the measurement; the bounds leave room for
    // a loaded machine delaying a sample.
    let worst = adopted.iter().chain(&children).max().copied().unwrap();
    assert!(a50 < Duration::from_secs(1) && c50 < Duration::from_secs(1));
    assert!(worst < Duration::from_secs(5), "{worst:?}");

    // Everything goes away cleanly.
    let (_, list) = d.call("GET", "/v1/vm", None);
    for v in list["vms"].as_array().unwrap() {
        let id = v["vm_id"].as_str().unwrap();
        assert_eq!(
            d.call("DELETE", &format!("/v1/vm/{id}"), None).0,
            204,
            "{id}"
        );
    }
    for s in ["vm00-snap", "vm01-snap"] {
        assert_eq!(d.call("DELETE", &format!("/v1/snapshots/{s}"), None).0, 204);
    }
    d.sigkill();
    base.assert_clean();
}

fn get(d: &common::Daemon, id: &str) -> Value {
    let (code, v) = d.call("GET", &format!("/v1/vm/{id}"), None);
    assert_eq!(code, 200, "{v}");
    v
}

/// Deletes VM `id` and waits until its VMM `pid` is gone.
fn delete_kills(d: &common::Daemon, id: &str, pid: u64) {
    let (code, body) = d.call("DELETE", &format!("/v1/vm/{id}"), None);
    assert_eq!(code, 204, "{body}");
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "vmm {pid} still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: u64) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rfind(')').is_some_and(|i| s[i + 2..].starts_with('Z')))
}

/// A daemon restarted with another backend for new VMs re-adopts a running
/// VM with the driver of its own record and drives it through it; where that
/// driver cannot be built, the VMM is left running (never killed), shown as
/// `failed` with the cause, and a later daemon that has the driver re-adopts it.
#[test]
fn a_restart_with_another_backend_keeps_each_vm_on_its_own_driver() {
    use agentenv_core::config::VmmChoice;
    let mut dir = common::TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let fc_cfg = dir.config();
    let d = common::Daemon::start_with(fc_cfg.clone(), dir.path());
    let v = d.create_ok("keep");
    let pid = v["pid"].as_u64().unwrap();
    d.crash();

    // New VMs get QEMU now; the Firecracker VM keeps its VMM.
    let mut qemu_cfg = fc_cfg.clone();
    qemu_cfg.vmm = VmmChoice::Qemu;
    let d = common::Daemon::start_with(qemu_cfg.clone(), dir.path());
    assert_eq!(d.engine.backend().as_str(), "qemu");
    let v = d.wait_state("keep", "running", Duration::from_secs(5));
    assert_eq!(v["backend"], "firecracker", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "the same vmm: {v}");
    let (code, v) = d.call("POST", "/v1/vm/keep/pause", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("paused")), "{v}");
    assert_eq!(
        common::fc_state(v["api_socket"].as_str().unwrap()),
        "Paused"
    );
    let (code, v) = d.call("POST", "/v1/vm/keep/resume", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(
        common::fc_state(v["api_socket"].as_str().unwrap()),
        "Running"
    );
    d.crash();

    // No Firecracker binary at all now: the VMM is left running, untouched.
    let mut no_fc = qemu_cfg.clone();
    no_fc.firecracker_binary = dir.path().join("no-such-firecracker");
    let d = common::Daemon::start_with(no_fc, dir.path());
    let v = get(&d, "keep");
    assert_eq!(v["state"], "failed", "{v}");
    let cause = v["exit"]["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("not managed") && cause.contains("firecracker_binary"),
        "{v}"
    );
    assert!(alive(pid), "the vmm must be left running: {v}");
    assert!(std::path::Path::new(v["api_socket"].as_str().unwrap()).exists());
    d.crash();

    // With the driver back, it is re-adopted, and a delete ends it.
    let d = common::Daemon::start_with(qemu_cfg, dir.path());
    let v = d.wait_state("keep", "running", Duration::from_secs(5));
    assert_eq!(v["pid"].as_u64(), Some(pid), "{v}");
    delete_kills(&d, "keep", pid);
    common::finish(d, dir);
}

/// Deleting a VM whose VMM was left running unmanaged kills it by its
/// recorded identity, and nothing is left.
#[test]
fn deleting_an_unmanaged_vm_kills_its_vmm() {
    use agentenv_core::config::VmmChoice;
    let mut dir = common::TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let fc_cfg = dir.config();
    let d = common::Daemon::start_with(fc_cfg.clone(), dir.path());
    let pid = d.create_ok("lone")["pid"].as_u64().unwrap();
    d.crash();
    let mut cfg = fc_cfg;
    cfg.vmm = VmmChoice::Qemu;
    cfg.firecracker_binary = dir.path().join("no-such-firecracker");
    let d = common::Daemon::start_with(cfg, dir.path());
    assert_eq!(get(&d, "lone")["state"], "failed");
    assert!(alive(pid));
    delete_kills(&d, "lone", pid);
    common::finish(d, dir);
}

/// `vmm = "auto"` is pinned while VMs exist: a restart keeps the backend the
/// VMs were made with instead of probing KVM again.
#[test]
fn vmm_auto_is_pinned_while_vms_exist() {
    use agentenv_core::config::VmmChoice;
    let mut dir = common::TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.vmm = VmmChoice::Auto;
    let pin = cfg.session_root.join(agentenv::daemon::AUTO_PIN_FILE);
    // No VM yet: the choice is made (by the probe) and recorded.
    let d = common::Daemon::start_with(cfg.clone(), dir.path());
    let chosen = d.engine.backend();
    assert_eq!(
        std::fs::read_to_string(&pin).unwrap().trim(),
        chosen.as_str()
    );
    d.stop();
    // A VM exists, made with Firecracker (as if the probe had chosen it):
    // whatever the probe says now, new VMs keep getting Firecracker.
    let mut fc = cfg.clone();
    fc.vmm = VmmChoice::Firecracker;
    let d = common::Daemon::start_with(fc, dir.path());
    d.create_ok("pinned");
    d.crash();
    std::fs::write(&pin, "firecracker\n").unwrap();
    assert_eq!(
        agentenv::daemon::pinned_auto(&cfg).map(|k| k.as_str()),
        Some("firecracker")
    );
    let d = common::Daemon::start_with(cfg.clone(), dir.path());
    assert_eq!(d.engine.backend().as_str(), "firecracker");
    d.wait_state("pinned", "running", Duration::from_secs(5));
    let (code, body) = d.call("DELETE", "/v1/vm/pinned", None);
    assert_eq!(code, 204, "{body}");
    // Without VMs the pin no longer holds.
    assert_eq!(agentenv::daemon::pinned_auto(&cfg), None);
    d.stop();
    std::fs::remove_file(&pin).unwrap();
    if let Some(b) = &dir.baseline {
        b.assert_clean();
    }
}
