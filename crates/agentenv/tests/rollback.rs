//! A create that fails at any step leaves nothing behind: no process, socket,
//! session directory, table entry or memory reservation.

mod common;

use std::time::Duration;

use common::{is_real, Daemon, TestDir};

/// Runs one failing create and checks the aftermath.
fn check_rollback(d: &Daemon, dir: &TestDir, expect: u16, word: &str) {
    let base = common::baseline(dir.path());
    let (code, v) = d.create("rb");
    assert_eq!(code, expect, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains(word), "{err:?} should mention {word:?}");
    base.assert_clean();
    assert!(d.engine.is_empty(), "vm still listed");
    let (code, _) = d.call("GET", "/v1/vm/rb", None);
    assert_eq!(code, 404);
}

fn points(prefixes: &[&str]) -> Vec<&'static str> {
    agentenv_core::engine::FAILPOINTS
        .iter()
        .copied()
        .filter(|f| prefixes.iter().any(|p| f.starts_with(p)))
        .collect()
}

#[test]
fn snapshot_persist_and_delete_failpoints_roll_back_or_stay_retryable() {
    let (d, dir) = Daemon::start();
    let mut cases = 0;
    d.create_ok("vm1");
    // A snapshot that fails at any step: the VM runs on, no snapshot, no file.
    let base = common::baseline(dir.path());
    for fp in points(&["snapshot."]) {
        d.engine.failpoints.arm(fp);
        let (code, v) = d.call(
            "POST",
            "/v1/vm/vm1/snapshot",
            Some(serde_json::json!({"snapshot_id": "s1"})),
        );
        d.engine.failpoints.clear();
        assert_eq!(code, 500, "{fp}: {v}");
        assert!(v["error"].as_str().unwrap().contains(fp), "{fp}: {v}");
        assert_eq!(
            d.call("GET", "/v1/vm/vm1", None).1["state"],
            "running",
            "{fp}"
        );
        assert_eq!(d.call("GET", "/v1/snapshots/s1", None).0, 404, "{fp}");
        base.assert_clean();
        cases += 1;
    }
    let (code, v) = d.call(
        "POST",
        "/v1/vm/vm1/snapshot",
        Some(serde_json::json!({"snapshot_id": "s1"})),
    );
    assert_eq!(code, 201, "{v}");
    // A persist that fails at any step: the tmpfs copy stays, usable; no partial file.
    let base = common::baseline(dir.path());
    for fp in points(&["persist."]) {
        d.engine.failpoints.arm(fp);
        let (code, v) = d.call("POST", "/v1/snapshots/s1/persist", None);
        d.engine.failpoints.clear();
        assert_eq!(code, 500, "{fp}: {v}");
        let (_, s) = d.call("GET", "/v1/snapshots/s1", None);
        assert_eq!(
            (s["tier"].as_str(), s["durable_path"].as_str()),
            (Some("tmpfs"), None),
            "{fp}: {s}"
        );
        base.assert_clean();
        cases += 1;
    }
    assert_eq!(d.call("POST", "/v1/snapshots/s1/persist", None).0, 200);
    assert_eq!(d.call("DELETE", "/v1/snapshots/s1", None).0, 204);
    // A delete that fails at any step stays retryable, and a retry finishes it.
    for (i, fp) in points(&["delete."]).into_iter().enumerate() {
        let id = format!("del{i}");
        d.create_ok(&id);
        d.engine.failpoints.arm(fp);
        let (code, v) = d.call("DELETE", &format!("/v1/vm/{id}"), None);
        d.engine.failpoints.clear();
        assert_eq!(code, 500, "{fp}: {v}");
        assert!(v["error"].as_str().unwrap().contains(fp), "{fp}: {v}");
        let (code, v) = d.call("DELETE", &format!("/v1/vm/{id}"), None);
        assert_eq!(code, 204, "{fp}: retry: {v}");
        cases += 1;
    }
    // A delete interrupted by a crash is finished by the next startup.
    d.create_ok("crashy");
    d.engine.failpoints.arm("delete.socket_removed");
    assert_eq!(d.call("DELETE", "/v1/vm/crashy", None).0, 500);
    d.engine.failpoints.clear();
    let cfg = d.cfg.clone();
    d.stop();
    let d = Daemon::start_with(cfg, dir.path());
    assert_eq!(d.call("GET", "/v1/vm/crashy", None).0, 404);
    assert!(!dir.path().join("sessions/crashy").exists());
    eprintln!("failpoint cases (snapshot, persist, delete): {cases}");
    common::finish(d, dir);
}

#[test]
fn engine_failpoints_roll_back_every_step() {
    let (d, dir) = Daemon::start();
    for fp in points(&["create."]) {
        d.engine.failpoints.arm(fp);
        check_rollback(&d, &dir, 500, fp);
        d.engine.failpoints.clear();
    }
    // The id and the memory are free again.
    assert_eq!(d.create("rb").0, 201);
    common::finish(d, dir);
}

#[test]
fn vmm_failures_roll_back_every_step() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's failure injection");
        return;
    }
    let mut dir = TestDir::new();
    let cases: &[(&[&str], u16, &str)] = &[
        (&["--exit-at-start", "3"], 502, "exited during startup"),
        (&["--no-socket"], 502, "did not create its socket"),
        (
            &["--fail-request", "PUT /machine-config"],
            502,
            "PUT /machine-config",
        ),
        (
            &["--fail-request", "PUT /boot-source"],
            502,
            "PUT /boot-source",
        ),
        (
            &["--fail-request", "PUT /drives/rootfs"],
            502,
            "PUT /drives/rootfs",
        ),
        (
            &["--fail-request", "PUT /drives/overlay"],
            502,
            "PUT /drives/overlay",
        ),
        (&["--fail-request", "PUT /actions"], 502, "PUT /actions"),
        (&["--hang-on", "PUT /actions"], 504, "timed out"),
    ];
    for (i, (flags, code, word)) in cases.iter().enumerate() {
        let mut cfg = dir.config();
        cfg.startup_timeout_ms = 300;
        cfg.request_timeout_ms = 300;
        cfg.firecracker_binary = dir.wrapper(&format!("fc{i}"), flags);
        dir.baseline = None;
        let d = Daemon::start_with(cfg, dir.path());
        check_rollback(&d, &dir, *code, word);
        d.stop();
    }
    // A missing binary is a clean 502 too.
    let mut cfg = dir.config();
    cfg.firecracker_binary = dir.path().join("fc-missing");
    std::fs::write(
        &cfg.firecracker_binary,
        "#!/bin/sh\nexec /nonexistent/firecracker \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &cfg.firecracker_binary,
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let d = Daemon::start_with(cfg, dir.path());
    check_rollback(&d, &dir, 502, "exited during startup");
    d.stop();
    dir.tmp.close().unwrap();
}

#[test]
fn a_stale_socket_file_does_not_block_a_create_but_a_directory_does() {
    let (d, dir) = Daemon::start();
    let stale = dir.path().join("s/stale.sock");
    std::fs::write(&stale, b"").unwrap();
    let (code, v) = d.create("stale");
    assert_eq!(code, 201, "{v}");
    // A directory there is not ours to remove: 409 before anything is made.
    let taken = dir.path().join("s/taken.sock");
    std::fs::create_dir(&taken).unwrap();
    let (code, v) = d.create("taken");
    assert_eq!(code, 409, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("taken.sock") && err.contains("directory"),
        "{v}"
    );
    assert!(!dir.path().join("sessions/taken").exists());
    assert_eq!(d.call("GET", "/v1/vm/taken", None).0, 404);
    std::fs::remove_dir(&taken).unwrap();
    common::finish(d, dir);
}

/// The daemon crashes at each step of create, snapshot and delete (every
/// operation stops where it is; VMMs live on), and the next start finishes or
/// undoes what was cut short: a create is rolled back, a delete completed or
/// left retryable, a snapshot's VM runs again (or stays paused if it was)
/// with the copy kept only when it was complete. Nothing leaks.
#[test]
fn a_crash_at_each_step_is_finished_or_undone_at_the_next_start() {
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Leave;
    let mut cases: Vec<(&str, &str)> = points(&["create.", "delete."])
        .into_iter()
        .map(|fp| (fp, "running"))
        .collect();
    for fp in ["snapshot.frozen", "snapshot.paused", "snapshot.copied"] {
        cases.push((fp, "running"));
        cases.push((fp, "paused"));
    }
    for &(fp, was) in &cases {
        let d = Daemon::start_with(cfg.clone(), dir.path());
        let mut pid = None;
        if !fp.starts_with("create.") {
            pid = d.create_ok("vm")["pid"].as_u64();
            if was == "paused" {
                assert_eq!(d.call("POST", "/v1/vm/vm/pause", None).0, 200);
            }
        }
        d.engine.failpoints.arm_hang(fp);
        let op = fp.split('.').next().unwrap();
        let (method, path, body) = match op {
            "create" => ("POST", "/v1/vm", common::overlay_req("vm")),
            "snapshot" => (
                "POST",
                "/v1/vm/vm/snapshot",
                serde_json::json!({"snapshot_id": "s1"}),
            ),
            _ => ("DELETE", "/v1/vm/vm", serde_json::Value::Null),
        };
        common::fire(&d, method, path.into(), body, Duration::from_secs(30));
        common::wait_hung(&d, fp);
        if op == "snapshot" {
            // The record on disk says what a restart must finish.
            let rec: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.path().join("sessions/vm/vm.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(rec["vm"]["state"], "snapshotting", "{fp}: {rec}");
            assert_eq!(rec["snapshot"]["snapshot_id"], "s1", "{fp}: {rec}");
            assert_eq!(rec["snapshot"]["resume"], was == "running", "{fp}: {rec}");
        }
        d.crash();

        let d = Daemon::start_with(cfg.clone(), dir.path());
        let (code, v) = d.call("GET", "/v1/vm/vm", None);
        match op {
            "create" => {
                assert_eq!(code, 404, "{fp}: {v}");
                assert!(!dir.path().join("sessions/vm").exists(), "{fp}");
            }
            "snapshot" => {
                assert_eq!(code, 200, "{fp}: {v}");
                assert_eq!(v["state"], was, "{fp}: {v}");
                assert_eq!(v["pid"].as_u64(), pid, "{fp}: the same vmm, re-adopted");
                let kept = fp == "snapshot.copied";
                let (code, s) = d.call("GET", "/v1/snapshots/s1", None);
                assert_eq!(code, if kept { 200 } else { 404 }, "{fp}: {s}");
                if kept {
                    assert_eq!(d.call("DELETE", "/v1/snapshots/s1", None).0, 204);
                }
                // The re-adopted VM takes operations again.
                let (code, v) = d.call(
                    "POST",
                    "/v1/vm/vm/snapshot",
                    Some(serde_json::json!({"snapshot_id": "s2"})),
                );
                assert_eq!(code, 201, "{fp}: {v}");
                assert_eq!(d.call("GET", "/v1/vm/vm", None).1["state"], was, "{fp}");
                assert_eq!(d.call("DELETE", "/v1/snapshots/s2", None).0, 204);
            }
            _ => {
                // Cut before the record said `deleting`: the VM is stopped
                // and a DELETE finishes the job; after: it is gone.
                if fp == "delete.vmm_stopped" {
                    assert_eq!((code, v["state"].as_str()), (200, Some("stopped")), "{v}");
                } else {
                    assert_eq!(code, 404, "{fp}: {v}");
                }
            }
        }
        for vm in d.engine.list() {
            let (code, body) = d.call("DELETE", &format!("/v1/vm/{}", vm.vm_id), None);
            assert_eq!(code, 204, "{fp}: {body}");
        }
        d.stop();
        dir.baseline.as_ref().unwrap().assert_clean();
    }
    eprintln!("crash cases (create, snapshot, delete): {}", cases.len());
}

/// A clean stop waits for the operations whose clients went away: here a
/// snapshot, held at a step until the stop is under way. It finishes, and the
/// next start finds the copy complete and the VM running.
#[test]
fn a_clean_stop_lets_operations_in_flight_finish() {
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Leave;
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let pid = d.create_ok("vm")["pid"].as_u64();
    d.engine.failpoints.arm_hang("snapshot.paused");
    let client = common::fire(
        &d,
        "POST",
        "/v1/vm/vm/snapshot".into(),
        serde_json::json!({"snapshot_id": "s1"}),
        Duration::from_millis(300),
    );
    common::wait_hung(&d, "snapshot.paused");
    client.join().unwrap();
    let engine = d.engine.clone();
    let stopper = std::thread::spawn(move || d.stop());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !stopper.is_finished(),
        "the stop did not wait for the snapshot"
    );
    engine.failpoints.clear();
    stopper.join().unwrap();

    let d = Daemon::start_with(cfg, dir.path());
    let v = d.call("GET", "/v1/vm/vm", None).1;
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), pid, "{v}");
    let (code, s) = d.call("GET", "/v1/snapshots/s1", None);
    assert_eq!(code, 200, "{s}");
    assert_eq!(d.call("DELETE", "/v1/snapshots/s1", None).0, 204);
    common::finish(d, dir);
}
