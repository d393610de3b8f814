//! A create that fails at any step leaves nothing behind: no process, socket,
//! session directory, table entry or memory reservation.

mod common;

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

#[test]
fn engine_failpoints_roll_back_every_step() {
    let (d, dir) = Daemon::start();
    for fp in agentenv_core::engine::FAILPOINTS {
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
        eprintln!("skipping: uses the double's failure injection");
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
fn a_stale_socket_file_does_not_block_a_create() {
    let (d, dir) = Daemon::start();
    let stale = dir.path().join("s/stale.sock");
    std::fs::write(&stale, b"").unwrap();
    let (code, v) = d.create("stale");
    assert_eq!(code, 201, "{v}");
    common::finish(d, dir);
}
