//! The daemon over real HTTP, through the real Firecracker driver, against the
//! Firecracker API double (or a real Firecracker with AGENTENV_TEST_FIRECRACKER).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{finish, is_real, overlay_req, Daemon, TestDir};
use serde_json::{json, Value};

#[test]
fn lifecycle_create_pause_resume_shutdown_delete() {
    let (d, dir) = Daemon::start();
    let (code, vm) = d.create("vm1");
    assert_eq!(code, 201, "{vm}");
    assert_eq!(vm["vm_id"], "vm1");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["backend"], "firecracker");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(vm["memory_mib"], 128);
    assert_eq!(vm["host_ip"], Value::Null);
    assert_eq!(vm["guest_ip"], Value::Null);
    assert_eq!(vm["tap_name"], Value::Null);
    assert!(vm["created_at"].as_str().unwrap().contains('T'));
    assert!(vm["pid"].as_u64().is_some());
    let sock = vm["api_socket"].as_str().unwrap();
    assert!(
        sock.starts_with(dir.path().join("s").to_str().unwrap()),
        "{sock}"
    );
    assert!(Path::new(sock).exists());
    assert_eq!(vm["disk"]["kind"], "overlay");
    assert!(vm["disk"]["rootfs_path"]
        .as_str()
        .unwrap()
        .ends_with("rootfs/base.ext4"));
    assert_eq!(vm["disk"]["size_bytes"], 1u64 << 30);
    assert!(vm["boot_args"]
        .as_str()
        .unwrap()
        .starts_with("console=ttyS0 reboot=k panic=1 pci=off agentenv.vm_id=vm1"));

    // The session directory holds config, disk, log and record.
    let session = Path::new(vm["session_dir"].as_str().unwrap());
    for f in ["firecracker.json", "overlay.ext4", "console.log", "vm.json"] {
        assert!(session.join(f).exists(), "{f} missing");
    }
    let fc: Value =
        serde_json::from_slice(&std::fs::read(session.join("firecracker.json")).unwrap()).unwrap();
    assert_eq!(fc["machine-config"]["mem_size_mib"], 128);
    assert_eq!(fc["drives"][0]["is_read_only"], true);
    assert_eq!(fc["drives"][1]["drive_id"], "overlay");
    let rec: Value =
        serde_json::from_slice(&std::fs::read(session.join("vm.json")).unwrap()).unwrap();
    assert_eq!(rec["schema_version"], 1);
    assert_eq!(rec["vm"]["state"], "running");

    let (code, list) = d.call("GET", "/v1/vm", None);
    assert_eq!(code, 200);
    assert_eq!(list["vms"].as_array().unwrap().len(), 1);

    let (code, v) = d.call("POST", "/v1/vm/vm1/pause", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("paused")), "{v}");
    let rec: Value =
        serde_json::from_slice(&std::fs::read(session.join("vm.json")).unwrap()).unwrap();
    assert_eq!(
        rec["vm"]["state"], "paused",
        "state persisted before answering"
    );
    let (code, v) = d.call("POST", "/v1/vm/vm1/resume", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");

    let (code, v) = d.call("POST", "/v1/vm/vm1/shutdown", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["pid"], Value::Null);
    assert!(!Path::new(sock).exists(), "socket removed");
    if !is_real() {
        // The double exits on Ctrl-Alt-Del; a real guest kernel is too slow here.
        assert!(
            v["exit"]["cause"]
                .as_str()
                .unwrap()
                .starts_with("shut down by request"),
            "{v}"
        );
        assert_eq!(v["exit"]["exit_code"], 0);
    }
    // The record stays after shutdown.
    let (code, v) = d.call("GET", "/v1/vm/vm1", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("stopped")));

    let (code, _) = d.call("DELETE", "/v1/vm/vm1", None);
    assert_eq!(code, 204);
    assert!(!session.exists());
    let (code, v) = d.call("GET", "/v1/vm/vm1", None);
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["field"], "vm_id");
    finish(d, dir);
}

#[test]
fn delete_stops_a_running_vm_and_leaves_nothing() {
    let (d, dir) = Daemon::start();
    for id in ["a", "b"] {
        d.create_ok(id);
    }
    let (code, _) = d.call("POST", "/v1/vm/b/pause", None);
    assert_eq!(code, 200);
    for id in ["a", "b"] {
        let (code, v) = d.call("DELETE", &format!("/v1/vm/{id}"), None);
        assert_eq!(code, 204, "{v}");
    }
    let (_, list) = d.call("GET", "/v1/vm", None);
    assert_eq!(list["vms"], json!([]));
    finish(d, dir);
}

#[test]
fn wrong_state_is_409_with_the_current_state() {
    let (d, dir) = Daemon::start();
    d.create_ok("vm1");
    let (code, v) = d.call("POST", "/v1/vm/vm1/resume", None);
    assert_eq!((code, v["state"].as_str()), (409, Some("running")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("running"), "{v}");
    d.call("POST", "/v1/vm/vm1/pause", None);
    let (code, v) = d.call("POST", "/v1/vm/vm1/pause", None);
    assert_eq!((code, v["state"].as_str()), (409, Some("paused")), "{v}");
    let (code, v) = d.call("POST", "/v1/vm/vm1/shutdown", None);
    assert_eq!(code, 200, "a paused vm can be shut down: {v}");
    for verb in ["pause", "resume", "shutdown"] {
        let (code, v) = d.call("POST", &format!("/v1/vm/vm1/{verb}"), None);
        assert_eq!(
            (code, v["state"].as_str()),
            (409, Some("stopped")),
            "{verb}: {v}"
        );
    }
    finish(d, dir);
}

#[test]
fn unknown_vms_are_404_and_bad_ids_400() {
    let (d, dir) = Daemon::start();
    for (m, p) in [
        ("GET", "/v1/vm/nope"),
        ("DELETE", "/v1/vm/nope"),
        ("POST", "/v1/vm/nope/pause"),
        ("POST", "/v1/vm/nope/resume"),
        ("POST", "/v1/vm/nope/shutdown"),
    ] {
        let (code, v) = d.call(m, p, None);
        assert_eq!(code, 404, "{m} {p}: {v}");
        assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    }
    for bad in [".hidden", "-x", "a%20b", "%C3%A9", &"x".repeat(64)] {
        let (code, v) = d.call("GET", &format!("/v1/vm/{bad}"), None);
        assert_eq!(code, 400, "{bad}: {v}");
        assert_eq!(v["field"], "vm_id");
    }
    let (code, v) = d.call("GET", "/v1/nothing", None);
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].is_string());
    let (code, v) = d.call("PUT", "/v1/vm", None);
    assert_eq!(code, 405, "{v}");
    assert!(v["error"].is_string());
    finish(d, dir);
}

#[test]
fn bad_create_bodies_name_the_field_and_leave_nothing() {
    let (d, dir) = Daemon::start();
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"vm_id": "../x", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": "", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": "a b", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": "x".repeat(64), "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": "١٢٣", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": 5, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "vm_id",
        ),
        (
            json!({"vm_id": "a", "slots": 0, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "slots",
        ),
        (
            json!({"vm_id": "a", "slots": 33, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "slots",
        ),
        (
            json!({"vm_id": "a", "slots": -1, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "slots",
        ),
        (
            json!({"vm_id": "a", "slots": "2", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "slots",
        ),
        (
            json!({"vm_id": "a", "memory": 1, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "memory",
        ),
        (json!({"vm_id": "a"}), 400, ""),
        (
            json!({"vm_id": "a", "disk": {"kind":"floppy"}}),
            400,
            "disk.kind",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"overlay","rootfs_id":"nope.ext4"}}),
            404,
            "disk.rootfs_id",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"overlay","rootfs_id":"../etc/passwd"}}),
            400,
            "disk.rootfs_id",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"overlay","rootfs_id":"base.ext4","disk_size_gib":0}}),
            400,
            "disk.disk_size_gib",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"overlay","rootfs_id":"base.ext4","extra":1}}),
            400,
            "disk.extra",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"snapshot","snapshot_id":"nope"}}),
            404,
            "disk.snapshot_id",
        ),
        (
            json!({"vm_id": "a", "disk": {"kind":"snapshot","snapshot_id":"../x"}}),
            400,
            "disk.snapshot_id",
        ),
        (
            json!({"vm_id": "a", "kernel": "missing", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            404,
            "kernel",
        ),
        (
            json!({"vm_id": "a", "kernel": "/etc/passwd", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "kernel",
        ),
        (
            json!({"vm_id": "a", "initrd": "missing.img", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            404,
            "initrd",
        ),
        (
            json!({"vm_id": "a", "boot_args": "x agentenv.root=/dev/sda", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "boot_args",
        ),
        (
            json!({"vm_id": "a", "boot_args": "a\u{0}b", "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "boot_args",
        ),
        (
            json!({"vm_id": "a", "network": {"tap_name":"tap0","guest_mac":"zz"}, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "network.guest_mac",
        ),
        (
            json!({"vm_id": "a", "network": {"tap_name":"a/b","guest_mac":"06:00:00:00:00:01"}, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "network.tap_name",
        ),
        (
            json!({"vm_id": "a", "network": {"tap_name":"tap0"}, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}}),
            400,
            "network",
        ),
    ];
    for (body, code, field) in cases {
        let (got, v) = d.call("POST", "/v1/vm", Some(body.clone()));
        assert_eq!(got, code, "{body} → {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        if !field.is_empty() {
            assert_eq!(v["field"], field, "{body} → {v}");
        }
    }
    // Malformed JSON, empty and oversized bodies.
    let (code, v) = d.post_raw("/v1/vm", b"{\"vm_id\": ");
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("malformed JSON"),
        "{v}"
    );
    let (code, v) = d.post_raw("/v1/vm", b"");
    assert_eq!(code, 400, "{v}");
    let big = format!(
        "{{\"vm_id\":\"a\",\"boot_args\":\"{}\",\"disk\":{{\"kind\":\"overlay\",\"rootfs_id\":\"base.ext4\"}}}}",
        "x".repeat(70 * 1024)
    );
    let (code, v) = d.post_raw("/v1/vm", big.as_bytes());
    assert_eq!(code, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("65536"), "{v}");
    assert!(d.engine.is_empty());
    finish(d, dir);
}

#[test]
fn concurrent_creates_of_one_id_give_exactly_one_201() {
    let (d, dir) = Daemon::start();
    let d = std::sync::Arc::new(d);
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || d.create("same").0)
        })
        .collect();
    let mut codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    codes.sort();
    assert_eq!(codes, [201, 409, 409, 409, 409, 409, 409, 409, 409, 409]);
    let d = std::sync::Arc::into_inner(d).unwrap();
    finish(d, dir);
}

#[test]
fn memory_admission_counts_running_vms() {
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.max_memory_mib = Some(300);
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("a");
    d.create_ok("b");
    let (code, v) = d.create("c");
    assert_eq!(code, 507, "{v}");
    assert!(v["error"].as_str().unwrap().contains("256 MiB"), "{v}");
    // A stopped VM no longer counts.
    assert_eq!(d.call("POST", "/v1/vm/a/shutdown", None).0, 200);
    d.create_ok("c");
    // 32 slots of 128 MiB: 4 GiB, more than the limit.
    let (code, _) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id":"big","slots":32,"disk":{"kind":"overlay","rootfs_id":"base.ext4"}})),
    );
    assert_eq!(code, 507);
    finish(d, dir);
}

#[test]
fn direct_disks_follow_the_path_rules() {
    let mut dir = TestDir::new();
    let disks = dir.path().join("disks");
    let ok = disks.join("ok.img");
    std::fs::File::create(&ok)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::os::unix::fs::symlink(&ok, disks.join("link.img")).unwrap();
    std::fs::write(disks.join("linked.img"), b"x").unwrap();
    std::fs::hard_link(disks.join("linked.img"), disks.join("linked2.img")).unwrap();
    nix::unistd::mkfifo(&disks.join("fifo.img"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::create_dir(disks.join("dir.img")).unwrap();
    let outside = dir.path().join("rootfs/base.ext4");
    let req =
        |id: &str, path: &Path| json!({"vm_id": id, "disk": {"kind": "direct", "path": path}});

    // Without direct_disk_roots every direct disk is refused.
    let cfg = dir.config();
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let (code, v) = d.call("POST", "/v1/vm", Some(req("a", &ok)));
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["field"], "disk.path");
    d.stop();

    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = cfg;
    cfg.direct_disk_roots = vec![disks.clone()];
    let d = Daemon::start_with(cfg, dir.path());
    let cases = [
        (disks.join("link.img"), 400, "symlink"),
        (disks.join("linked.img"), 400, "hard link"),
        (disks.join("fifo.img"), 400, "FIFO"),
        (disks.join("dir.img"), 400, "directory"),
        (disks.join("missing.img"), 404, "does not exist"),
        (disks.join("../rootfs/base.ext4"), 400, ".."),
        (outside.clone(), 403, "direct_disk_roots"),
        ("relative.img".into(), 400, "absolute"),
    ];
    for (path, code, word) in cases {
        let (got, v) = d.call("POST", "/v1/vm", Some(req("a", &path)));
        assert_eq!(got, code, "{} → {v}", path.display());
        assert_eq!(v["field"], "disk.path");
        assert!(v["error"].as_str().unwrap().contains(word), "{v}");
    }
    let (code, v) = d.call("POST", "/v1/vm", Some(req("a", &ok)));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["disk"]["kind"], "direct");
    assert_eq!(v["disk"]["writable_path"], ok.to_str().unwrap());
    assert!(!v["boot_args"]
        .as_str()
        .unwrap()
        .contains("agentenv.overlay"));
    let (code, v) = d.call("POST", "/v1/vm", Some(req("b", &ok)));
    assert_eq!(code, 409, "two vms on one direct disk: {v}");
    // Deleting the VM keeps the user's disk.
    let (code, _) = d.call("DELETE", "/v1/vm/a", None);
    assert_eq!(code, 204);
    assert!(ok.exists());
    finish(d, dir);
}

#[test]
fn network_is_used_as_given_when_networking_is_disabled() {
    if is_real() {
        // A real Firecracker opens the TAP, creating it in the host's namespace.
        agentenv_testkit::skip::skip_optional(
            "would make a real Firecracker create a TAP on this host",
        );
        return;
    }
    let (d, dir) = Daemon::start();
    let mut body = overlay_req("n1");
    body["network"] = json!({"tap_name": "tap7", "guest_mac": "06:00:AC:10:00:02"});
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["tap_name"], "tap7");
    assert_eq!(v["guest_mac"], "06:00:ac:10:00:02");
    let fc: Value = serde_json::from_slice(
        &std::fs::read(Path::new(v["session_dir"].as_str().unwrap()).join("firecracker.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(fc["network-interfaces"][0]["host_dev_name"], "tap7");
    finish(d, dir);
}

#[test]
fn records_survive_a_daemon_restart() {
    let (d, dir) = Daemon::start();
    d.create_ok("keep");
    assert_eq!(d.call("POST", "/v1/vm/keep/shutdown", None).0, 200);
    d.create_ok("live");
    let cfg = d.cfg.clone();
    // A clean stop with on_shutdown = "stop" shuts the running VM down.
    d.stop();
    let d = Daemon::start_with(cfg, dir.path());
    let v = d.engine.get("keep").unwrap();
    assert_eq!(v.state, agentenv_api::VmState::Stopped);
    assert!(v.exit.is_some());
    let v = d.engine.get("live").unwrap();
    assert_eq!(v.state, agentenv_api::VmState::Stopped, "{v:?}");
    finish(d, dir);
}

#[test]
fn openapi_document_is_served() {
    let (d, dir) = Daemon::start();
    let (code, v) = d.call("GET", "/v1/openapi.json", None);
    assert_eq!(code, 200);
    assert!(
        v["paths"]["/v1/vm/{vm_id}/pause"]["post"].is_object(),
        "{v}"
    );
    let (code, v) = d.call("GET", "/v1/health", None);
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")));
    finish(d, dir);
}

#[test]
fn vmm_exit_is_noticed_and_recorded() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's --exit-on-start/--panic-on-start");
        return;
    }
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.firecracker_binary = dir.wrapper("fc-exit", &["--exit-on-start"]);
    let panicking = dir.wrapper("fc-panic", &["--panic-on-start"]);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let (code, v) = d.create("gone");
    assert_eq!(code, 201, "{v}");
    let v = d.wait_state("gone", "stopped", Duration::from_secs(10));
    assert!(
        v["exit"]["cause"].as_str().unwrap().contains("powered off"),
        "{v}"
    );
    assert!(!Path::new(v["api_socket"].as_str().unwrap()).exists());
    d.stop();

    cfg.firecracker_binary = panicking;
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("panics");
    let v = d.wait_state("panics", "failed", Duration::from_secs(10));
    assert!(
        v["exit"]["cause"]
            .as_str()
            .unwrap()
            .contains("guest kernel panic: injected panic"),
        "{v}"
    );
    finish(d, dir);
}

#[test]
fn shutdown_kills_a_guest_that_ignores_it() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's --ignore-ctrl-alt-del");
        return;
    }
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.shutdown_timeout_s = 1;
    cfg.firecracker_binary = dir.wrapper("fc-stubborn", &["--ignore-ctrl-alt-del"]);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("stubborn");
    let (code, v) = d.call("POST", "/v1/vm/stubborn/shutdown", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "stopped");
    assert!(
        v["exit"]["cause"]
            .as_str()
            .unwrap()
            .contains("did not power off within 1 s"),
        "{v}"
    );
    assert_eq!(v["exit"]["signal"], 9);
    finish(d, dir);
}

#[test]
fn a_hung_vmm_gives_504_and_the_vm_stays_usable() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's --hang-on");
        return;
    }
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.request_timeout_ms = 2000;
    cfg.firecracker_binary = dir.wrapper("fc-hang", &["--hang-on", "PATCH /vm"]);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("hung");
    let (code, v) = d.call("POST", "/v1/vm/hung/pause", None);
    assert_eq!(code, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("timed out"), "{v}");
    let (_, v) = d.call("GET", "/v1/vm/hung", None);
    assert_eq!(v["state"], "running");
    finish(d, dir);
}

/// Rewrites a VM's record as a crash in the middle of an operation would leave it.
fn set_record_state(dir: &TestDir, vm_id: &str, state: &str, pid: Value) {
    let p = dir.path().join(format!("sessions/{vm_id}/vm.json"));
    let mut rec: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    rec["vm"]["state"] = json!(state);
    rec["vm"]["pid"] = pid;
    std::fs::write(&p, serde_json::to_vec(&rec).unwrap()).unwrap();
}

#[test]
fn a_restart_re_adopts_live_vmms_and_finishes_what_a_crash_interrupted() {
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    // A daemon that leaves its VMMs behind when it goes away, as a crash would.
    let mut cfg = dir.config();
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Leave;
    let d = Daemon::start_with(cfg.clone(), dir.path());
    for id in [
        "creating", "deleting", "running", "paused", "died", "stopped",
    ] {
        d.create_ok(id);
    }
    assert_eq!(d.call("POST", "/v1/vm/paused/pause", None).0, 200);
    assert_eq!(d.call("POST", "/v1/vm/stopped/shutdown", None).0, 200);
    let pids: std::collections::HashMap<String, u64> = d
        .engine
        .list()
        .into_iter()
        .filter_map(|v| Some((v.vm_id, u64::from(v.pid?))))
        .collect();
    d.stop();
    assert_eq!(
        agentenv_testkit::leaks::processes_mentioning(&dir.path().join("s")).len(),
        5,
        "the five VMMs outlive the daemon"
    );
    // Records as a crash mid-create (no pid yet) and mid-delete leave them.
    set_record_state(&dir, "creating", "creating", Value::Null);
    set_record_state(&dir, "deleting", "deleting", Value::Null);
    // One VMM dies while no daemon runs.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids["died"] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Leftovers no record owns: a VMM started by hand on the socket root, a
    // socket file, a session directory without a record, one with a torn record.
    let orphan_sock = dir.path().join("s/orphan.sock");
    let orphan = std::process::Command::new(common::firecracker())
        .arg("--api-sock")
        .arg(&orphan_sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stray_sock = dir.path().join("s/stray.sock");
    drop(std::os::unix::net::UnixListener::bind(&stray_sock).unwrap());
    std::fs::create_dir_all(dir.path().join("sessions/norecord")).unwrap();
    std::fs::create_dir_all(dir.path().join("sessions/torn")).unwrap();
    std::fs::write(dir.path().join("sessions/torn/vm.json"), b"{\"schema_vers").unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let d = Daemon::start_with(cfg, dir.path());
    // The interrupted create is rolled back and the delete finished: gone, with
    // their VMMs.
    assert!(d.engine.get("creating").is_err());
    assert!(d.engine.get("deleting").is_err());
    assert!(!dir.path().join("sessions/creating").exists());
    assert!(!dir.path().join("sessions/deleting").exists());
    // Live VMMs are re-adopted in the state they report, same processes.
    for (id, state) in [("running", "running"), ("paused", "paused")] {
        let (_, v) = d.call("GET", &format!("/v1/vm/{id}"), None);
        assert_eq!(v["state"], state, "{v}");
        assert_eq!(v["pid"].as_u64(), Some(pids[id]), "{v}");
    }
    // ... and work: pause, resume, shutdown.
    let (code, v) = d.call("POST", "/v1/vm/running/pause", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (code, v) = d.call("POST", "/v1/vm/paused/resume", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");
    let (code, v) = d.call("POST", "/v1/vm/paused/shutdown", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("stopped")), "{v}");
    // The VMM that died meanwhile: failed, with the cause.
    let v = d.engine.get("died").unwrap();
    assert_eq!(v.state, agentenv_api::VmState::Failed);
    let cause = v.exit.unwrap().cause;
    assert!(
        cause.contains("could not be re-adopted") && cause.contains("gone"),
        "{cause}"
    );
    assert_eq!(
        d.engine.get("stopped").unwrap().state,
        agentenv_api::VmState::Stopped
    );
    // Leftovers are cleaned: the orphan VMM killed, the sockets removed, the
    // record-less session removed, the torn one moved aside.
    let mut orphan = orphan;
    let start = std::time::Instant::now();
    while orphan.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "orphan vmm survived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!orphan_sock.exists() && !stray_sock.exists());
    assert!(!dir.path().join("sessions/norecord").exists());
    assert!(!dir.path().join("sessions/torn").exists());
    let quarantined = std::fs::read_dir(dir.path().join("sessions/.quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    // A VM of the same id as the torn one can be made again.
    d.create_ok("torn");
    std::fs::remove_dir_all(dir.path().join("sessions/.quarantine")).unwrap();
    finish(d, dir);
}

#[test]
fn shares_become_disk_images_and_follow_the_path_rules() {
    let mut dir = TestDir::new();
    let disks = dir.path().join("disks");
    let share = disks.join("data");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("sub/hello.txt"), b"hello from the host").unwrap();
    std::fs::write(disks.join("file.img"), b"x").unwrap();
    std::os::unix::fs::symlink(&share, disks.join("link")).unwrap();
    let mut cfg = dir.config();
    cfg.direct_disk_roots = vec![disks.clone()];
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());

    let mut body = overlay_req("sh");
    body["shares"] = json!([
        {"host_path": share, "guest_path": "/mnt/data"},
        {"host_path": share, "guest_path": "/mnt/rw", "read_only": false},
    ]);
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["shares"][0]["device"], "/dev/vdc");
    assert_eq!(v["shares"][0]["read_only"], true);
    assert_eq!(v["shares"][1]["device"], "/dev/vdd");
    let args = v["boot_args"].as_str().unwrap();
    assert!(
        args.ends_with("agentenv.share=/dev/vdc:/mnt/data:ro agentenv.share=/dev/vdd:/mnt/rw:rw"),
        "{args}"
    );
    // The image holds a copy of the directory.
    let image = v["shares"][0]["image_path"].as_str().unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /sub/hello.txt", image])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the host");
    let fc: Value = serde_json::from_slice(
        &std::fs::read(Path::new(v["session_dir"].as_str().unwrap()).join("firecracker.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(fc["drives"][2]["drive_id"], "share0");
    assert_eq!(fc["drives"][2]["is_read_only"], true);
    assert_eq!(fc["drives"][3]["is_read_only"], false);

    let bad = |shares: Value| {
        let mut b = overlay_req("bad");
        b["shares"] = shares;
        d.call("POST", "/v1/vm", Some(b))
    };
    let cases = [
        (
            json!([{"host_path": dir.path().join("rootfs"), "guest_path": "/mnt/x"}]),
            403,
            "shares[0].host_path",
        ),
        (
            json!([{"host_path": disks.join("file.img"), "guest_path": "/mnt/x"}]),
            400,
            "shares[0].host_path",
        ),
        (
            json!([{"host_path": disks.join("link"), "guest_path": "/mnt/x"}]),
            400,
            "shares[0].host_path",
        ),
        (
            json!([{"host_path": "relative", "guest_path": "/mnt/x"}]),
            400,
            "shares[0].host_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "mnt"}]),
            400,
            "shares[0].guest_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "/"}]),
            400,
            "shares[0].guest_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "/a/../etc"}]),
            400,
            "shares[0].guest_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "/a b"}]),
            400,
            "shares[0].guest_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "/m"}, {"host_path": share, "guest_path": "/m"}]),
            400,
            "shares[1].guest_path",
        ),
        (
            json!([{"host_path": share, "guest_path": "/m", "mode": "ro"}]),
            400,
            "shares[0]",
        ),
    ];
    for (shares, code, field) in cases {
        let (got, v) = bad(shares.clone());
        assert_eq!(got, code, "{shares} → {v}");
        assert!(
            v["field"].as_str().is_some_and(|f| f.starts_with(field)),
            "{shares} → {v}"
        );
    }
    finish(d, dir);
}

/// The kernel command line is budgeted as Firecracker sees it (boot_args,
/// agentenv's parameters, `root=/dev/vda ro` and one `virtio_mmio.device=`
/// per device, within 2048 bytes with the final NUL): the longest boot_args
/// that fits is accepted by the VMM (the double counts as the real binary
/// does), one byte more is a 400 naming `boot_args` before any VMM starts.
#[test]
fn boot_args_are_budgeted_as_firecracker_sees_the_command_line() {
    let (d, dir) = Daemon::start();
    let req = |id: &str, args: &str| json!({"vm_id": id, "boot_args": args, "disk": {"kind":"overlay","rootfs_id":"base.ext4"}});
    let (code, v) = d.call("POST", "/v1/vm", Some(req("fc1", &"a".repeat(2000))));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["field"], "boot_args", "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("as Firecracker sees it"), "{v}");
    let over: usize = msg
        .rsplit("shorten boot_args by ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {msg}"));
    assert!(d.engine.is_empty());
    let longest = "a".repeat(2000 - over);
    let (code, v) = d.call("POST", "/v1/vm", Some(req("fc1", &format!("{longest}b"))));
    assert_eq!((code, v["field"].as_str()), (400, Some("boot_args")), "{v}");
    // Exactly at the limit: Firecracker (or its double) starts the guest.
    let (code, v) = d.call("POST", "/v1/vm", Some(req("fc1", &longest)));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    finish(d, dir);
}

/// `acpi=off` (the seed's sample boot args): a kernel whose config says it
/// cannot find virtio-mmio devices on its command line is refused with a 400
/// naming `boot_args` (the guest would never find its disks); one built with
/// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y boots; without a config beside the
/// kernel the create goes on, with a warning saying what to check.
#[test]
fn acpi_off_needs_a_kernel_that_reads_virtio_mmio_devices_from_its_command_line() {
    let seed_args = "console=ttyS0 reboot=k panic=1 pci=off acpi=off";
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.default_boot_args = seed_args.into();
    let d = Daemon::start_with(cfg, dir.path());
    let sidecar = dir.path().join("kernels/vmlinux.config");
    let req = |id: &str, args: Option<&str>| {
        let mut r = common::overlay_req(id);
        if let Some(a) = args {
            r["boot_args"] = json!(a);
        }
        r
    };

    std::fs::write(
        &sidecar,
        "CONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n",
    )
    .unwrap();
    let (code, v) = d.call("POST", "/v1/vm", Some(req("noacpi", Some(seed_args))));
    assert_eq!((code, v["field"].as_str()), (400, Some("boot_args")), "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is off") && msg.contains("drop acpi=off"),
        "{v}"
    );
    // The config's default_boot_args: the same answer, saying where it came from.
    let (code, v) = d.call("POST", "/v1/vm", Some(req("noacpi", None)));
    assert_eq!((code, v["field"].as_str()), (400, Some("boot_args")), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("default_boot_args"),
        "{v}"
    );
    assert!(d.engine.is_empty());

    std::fs::write(
        &sidecar,
        "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n",
    )
    .unwrap();
    let (code, v) = d.call("POST", "/v1/vm", Some(req("cmdline", None)));
    assert_eq!(code, 201, "{v}");
    assert!(v["warnings"].as_array().is_none_or(|w| w.is_empty()), "{v}");

    std::fs::remove_file(&sidecar).unwrap();
    let (code, v) = d.call("POST", "/v1/vm", Some(req("unknown", None)));
    assert_eq!(code, 201, "{v}");
    assert!(
        v["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")),
        "{v}"
    );
    // Without acpi=off nothing is asked of the kernel.
    let (code, v) = d.call("POST", "/v1/vm", Some(req("acpi", Some("console=ttyS0"))));
    assert_eq!(code, 201, "{v}");
    assert!(v["warnings"].as_array().is_none_or(|w| w.is_empty()), "{v}");
    finish(d, dir);
}
