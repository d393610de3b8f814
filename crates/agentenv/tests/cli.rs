//! The `agentenv` binary: the daemon started for real, the CLI against it,
//! signals, and config errors.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, write_config, KillOnDrop, TestDir};

const BIN: &str = env!("CARGO_BIN_EXE_agentenv");

fn cli(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("vm")
        .args(args)
        .args(["--server", server])
        .env("AGENTENV_TOKEN", common::TEST_TOKEN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn daemon_and_cli_end_to_end_then_sigterm_stops_cleanly() {
    let dir = TestDir::new();
    let config = write_config(&dir, "");
    let base = common::baseline(dir.path());
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let mut daemon = KillOnDrop(
        Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("AGENTENV_CONFIG", &config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !common::healthy(&server) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, out, err) = cli(&server, &["create", "c1", "--rootfs", "base.ext4"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state          running"), "{out}");
    let (code, out, _) = cli(
        &server,
        &["create", "c2", "--rootfs", "base.ext4", "--json"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "running");

    let (code, out, _) = cli(&server, &["ls"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("VM_ID"), "{out}");
    assert!(
        lines[1].starts_with("c1 ") && lines[1].contains("running"),
        "{out}"
    );
    assert_eq!(lines.len(), 3, "{out}");
    let (_, out, _) = cli(&server, &["ls", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"].as_array().unwrap().len(), 2);

    // Full snapshots: snapshot --memory, restore, fork, reset.
    let (code, out, err) = cli(&server, &["snapshot", "c2", "--id", "f1", "--memory"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kind") && out.contains("full"), "{out}");
    let (code, out, err) = cli(&server, &["restore", "r1", "--snapshot", "f1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running"), "{out}");
    let (code, out, err) = cli(&server, &["fork", "c2", "-n", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("c2-fork-1") && out.contains("c2-fork-2"),
        "{out}"
    );
    let (code, out, err) = cli(&server, &["reset", "r1", "f1"]);
    assert_eq!((code, out.contains("running")), (0, true), "{out}{err}");
    let (code, _, err) = cli(&server, &["fork", "c2", "-n", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("count") && err.contains("HTTP 400"), "{err}");
    for id in ["r1", "c2-fork-1", "c2-fork-2"] {
        assert_eq!(cli(&server, &["rm", id]).0, 0);
    }
    let out = Command::new(BIN)
        .args(["snapshot", "rm", "f1", "--server", &server])
        .env("AGENTENV_TOKEN", common::TEST_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, out, _) = cli(&server, &["pause", "c1"]);
    assert_eq!(code, 0);
    assert!(out.contains("paused"), "{out}");
    let (code, _, err) = cli(&server, &["pause", "c1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is paused") && err.contains("HTTP 409"),
        "{err}"
    );
    let (code, out, _) = cli(&server, &["resume", "c1"]);
    assert_eq!((code, out.contains("running")), (0, true), "{out}");
    let (code, out, _) = cli(&server, &["shutdown", "c1"]);
    assert_eq!((code, out.contains("stopped")), (0, true), "{out}");
    let (code, out, _) = cli(&server, &["show", "c1"]);
    assert_eq!(code, 0);
    // A real Firecracker's guest boots too slowly here to act on Ctrl-Alt-Del,
    // so it is killed after the timeout instead.
    let expected = if common::is_real() {
        "did not power off"
    } else {
        "shut down by request"
    };
    assert!(out.contains("exit") && out.contains(expected), "{out}");
    let (code, out, _) = cli(&server, &["rm", "c1"]);
    assert_eq!((code, out.trim()), (0, "deleted c1"));
    let (code, _, err) = cli(&server, &["show", "c1"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");

    // SIGTERM: the daemon stops its VMs (on_shutdown = "stop") and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let records = agentenv_testkit::leaks::processes_mentioning(dir.path());
    assert!(records.is_empty(), "vmm survived: {records:?}");
    // c2's record remains (stopped); remove it and check nothing else leaked.
    std::fs::remove_dir_all(dir.path().join("sessions/c2")).unwrap();
    base.assert_clean();
}

#[test]
fn cli_says_when_the_daemon_is_unreachable() {
    let port = free_port();
    let (code, _, err) = cli(&format!("http://127.0.0.1:{port}"), &["ls"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the agentenv daemon"), "{err}");
}

#[test]
fn bad_config_stops_startup_naming_the_key() {
    let dir = TestDir::new();
    for (extra, key) in [
        ("console_log_max_bytes = 1", "console_log_max_bytes"),
        ("colour = \"blue\"", "colour"),
        ("[network]\nnetmask = \"1.2.3\"", "network.netmask"),
    ] {
        let config = write_config(&dir, extra);
        let out = Command::new(BIN)
            .args([
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{extra:?}: {err}");
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/agentenv.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agentenv.toml"));
}

#[test]
fn only_the_daemon_takes_config_and_listen() {
    for args in [
        &["vm", "ls", "--config", "x.toml"][..],
        &["snapshot", "ls", "--listen", "127.0.0.1:1"],
        &["--config", "x.toml", "vm", "ls"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--config") || err.contains("--listen"),
            "{err}"
        );
    }
    // `check-config` reads one, before or after the subcommand.
    let dir = TestDir::new();
    let config = write_config(&dir, "");
    let config = config.to_str().unwrap();
    for args in [
        &["check-config", "--config", config][..],
        &["--config", config, "check-config"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
