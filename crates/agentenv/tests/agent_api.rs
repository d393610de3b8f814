//! The guest agent through the daemon's HTTP API and the CLI, without a VM: the
//! real `agentenv-guest` runs on the host (`--listen-unix`) behind the Firecracker
//! double's hybrid vsock (`--vsock-agent`), so the whole path — HTTP, engine,
//! host client, vsock handshake, protocol, agent — is the production one.
//! Real guests run the same agent in `e2e_qemu.rs`.
//!
//! Commands run on the host here, so they only touch this test's directory.

mod common;

use std::io::Read;

use std::process::Command;
use std::time::{Duration, Instant};

use agentenv_client::{Body, ClientError, Request, UploadOptions};
use agentenv_core::config::Config;

use common::{finish, is_real, noise, Daemon, HostAgent, TestDir};
use serde_json::{json, Value};

/// A daemon whose Firecracker double bridges the agent's vsock port to a host agent.
fn start(tweak: impl FnOnce(&mut Config)) -> Option<(Daemon, TestDir, HostAgent)> {
    if is_real() {
        agentenv_testkit::skip::skip_optional(
            "a real Firecracker boots no guest here, so no agent answers",
        );
        return None;
    }
    Some(common::start_with_agent(tweak))
}

fn create_ready(d: &Daemon, vm: &str) -> Value {
    let mut req = common::overlay_req(vm);
    req["wait_ready"] = json!(true);
    req["wait_ready_timeout_s"] = json!(20);
    let (code, v) = d.call("POST", "/v1/vm", Some(req));
    assert_eq!(code, 201, "{v}");
    v
}

fn exec(d: &Daemon, vm: &str, body: Value) -> (u16, Value) {
    d.call("POST", &format!("/v1/vm/{vm}/exec"), Some(body))
}

fn done(d: Daemon, dir: TestDir, mut agent: HostAgent) {
    agent.stop();
    finish(d, dir);
}

#[test]
fn wait_ready_gives_a_usable_vm_with_the_agent_version() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let vm = create_ready(&d, "vm1");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["ready"], true, "{vm}");
    assert!(vm["agent"]["version"]
        .as_str()
        .unwrap()
        .starts_with("agentenv-guest "));
    assert_eq!(vm["agent"]["protocol"], 1);
    let (_, shown) = d.call("GET", "/v1/vm/vm1", None);
    assert_eq!(shown["ready"], true);

    // Without wait_ready the answer comes at once and `ready` follows.
    let (code, v) = d.create("vm2");
    assert_eq!(code, 201, "{v}");
    let start = Instant::now();
    loop {
        let (_, v) = d.call("GET", "/v1/vm/vm2", None);
        if v["ready"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Bad wait_ready input names the field and leaves nothing.
    let mut req = common::overlay_req("vm3");
    req["wait_ready_timeout_s"] = json!(5);
    let (code, e) = d.call("POST", "/v1/vm", Some(req.clone()));
    assert_eq!(
        (code, e["field"].as_str()),
        (400, Some("wait_ready_timeout_s")),
        "{e}"
    );
    req["wait_ready"] = json!(true);
    req["wait_ready_timeout_s"] = json!(0);
    let (code, e) = d.call("POST", "/v1/vm", Some(req));
    assert_eq!(
        (code, e["field"].as_str()),
        (400, Some("wait_ready_timeout_s")),
        "{e}"
    );
    assert_eq!(d.call("GET", "/v1/vm/vm3", None).0, 404);
    done(d, dir, agent);
}

#[test]
fn wait_ready_times_out_with_504_and_keeps_the_vm() {
    let Some((d, dir, mut agent)) = start(|_| {}) else {
        return;
    };
    agent.stop(); // nothing answers on the guest port now
    let mut req = common::overlay_req("vm1");
    req["wait_ready"] = json!(true);
    req["wait_ready_timeout_s"] = json!(1);
    let t = Instant::now();
    let (code, e) = d.call("POST", "/v1/vm", Some(req));
    assert_eq!(code, 504, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("did not answer"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let (_, v) = d.call("GET", "/v1/vm/vm1", None);
    assert_eq!(
        (v["state"].as_str(), v["ready"].as_bool()),
        (Some("running"), Some(false))
    );
    // Exec on a VM whose agent is not ready: 503.
    let (code, e) = exec(&d, "vm1", json!({"cmd": ["true"]}));
    assert_eq!(code, 503, "{e}");
    done(d, dir, agent);
}

#[test]
fn exec_reports_exit_codes_output_stdin_env_and_cwd() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    let (code, r) = exec(
        &d,
        "vm1",
        json!({"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["signal"], Value::Null);
    assert_eq!(r["stdout"], "out\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["truncated"], false);
    assert_eq!(r["timed_out"], false);

    let (_, r) = exec(&d, "vm1", json!({"cmd": ["cat"], "stdin": "hello\nworld"}));
    assert_eq!(r["stdout"], "hello\nworld", "{r}");
    let (_, r) = exec(
        &d,
        "vm1",
        json!({"cmd": ["od", "-An", "-tx1"], "stdin_base64": "AAH/"}),
    );
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "00 01 ff", "{r}");

    let cwd = dir.path().display().to_string();
    let (_, r) = exec(
        &d,
        "vm1",
        json!({"cmd": ["sh", "-c", "echo $FOO; pwd"], "env": {"FOO": "bar baz"}, "cwd": cwd}),
    );
    assert_eq!(r["stdout"], format!("bar baz\n{cwd}\n"), "{r}");

    let (_, r) = exec(&d, "vm1", json!({"cmd": ["sh", "-c", "kill -9 $$"]}));
    assert_eq!(
        (r["exit_code"].clone(), r["signal"].clone()),
        (Value::Null, json!(9)),
        "{r}"
    );

    // Bad input: each names its field.
    for (body, status, field) in [
        (json!({"cmd": []}), 400, "cmd"),
        (json!({"cmd": ["no-such-program-agentenv"]}), 404, "cmd"),
        (json!({"cmd": ["true"], "cwd": "/no/such/dir"}), 404, "cwd"),
        (json!({"cmd": ["true"], "cwd": "relative"}), 400, "cwd"),
        (json!({"cmd": ["true"], "timeout_s": -1}), 400, "timeout_s"),
        (
            json!({"cmd": ["true"], "env": {"A=B": "x"}}),
            400,
            "env.A=B",
        ),
        (
            json!({"cmd": ["true"], "stdin_base64": "%%"}),
            400,
            "stdin_base64",
        ),
        (json!({"cmd": ["true"], "bogus": 1}), 400, "bogus"),
        (json!({"cmd": "true"}), 400, "cmd"),
    ] {
        let (code, e) = exec(&d, "vm1", body.clone());
        assert_eq!(code, status, "{body}: {e}");
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    let (code, _) = exec(&d, "nope", json!({"cmd": ["true"]}));
    assert_eq!(code, 404);
    done(d, dir, agent);
}

#[test]
fn exec_output_is_capped_as_configured_and_timeouts_kill() {
    let Some((d, dir, agent)) = start(|c| c.agent.max_output_bytes = 1 << 20) else {
        return;
    };
    create_ready(&d, "vm1");
    let (code, r) = exec(
        &d,
        "vm1",
        json!({"cmd": ["sh", "-c", "yes 0123456789abcdef | head -c 10485760; echo tail >&2"]}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stdout_bytes"], 10 << 20);
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stderr"], "tail\n");

    let t = Instant::now();
    let (code, r) = exec(
        &d,
        "vm1",
        json!({"cmd": ["sh", "-c", "echo started; sleep 30"], "timeout_s": 0.5}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["signal"], 9);
    assert_eq!(r["stdout"], "started\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    done(d, dir, agent);
}

#[test]
fn streaming_exec_sends_output_as_it_comes() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    let body = json!({
        "cmd": ["sh", "-c", "echo one; sleep 0.3; echo two >&2; exit 7"],
        "stream": true
    })
    .to_string();
    let req = Request::new("POST", "/v1/vm/vm1/exec").body(Body::Bytes(body.as_bytes()));
    let mut resp = d.client().send_streaming(req).unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
    let mut text = String::new();
    resp.read_to_string(&mut text).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "started", "{text}");
    let decode = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| {
                String::from_utf8(
                    agentenv_api::base64::decode(e["data"].as_str().unwrap()).unwrap(),
                )
                .unwrap()
            })
            .collect()
    };
    assert_eq!(decode("stdout"), "one\n");
    assert_eq!(decode("stderr"), "two\n");
    let last = events.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(7))
    );
    done(d, dir, agent);
}

#[test]
fn files_round_trip_64_mib_and_bad_paths_are_refused() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    let data = noise(64 << 20, 7);
    let target = dir.path().join("guestfs/sub/big.bin");
    let c = d.client();
    let opts = UploadOptions {
        mode: Some(0o600),
        make_parents: true,
    };
    let target_s = target.to_str().unwrap();
    let w = c
        .upload("vm1", target_s, &opts, &data[..], Some(data.len() as u64))
        .unwrap();
    assert_eq!(w.bytes, 64u64 << 20, "{w:?}");
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 64 << 20);

    let target_q = format!(
        "/v1/vm/vm1/files?path={}",
        agentenv_client::percent_encode(target_s)
    );
    let mut resp = c.send_streaming(Request::new("GET", &target_q)).unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("x-agentenv-file-size"), Some("67108864"));
    assert_eq!(resp.header("x-agentenv-file-mode"), Some("0600"));
    let mut back = Vec::new();
    resp.read_to_end(&mut back).unwrap();
    assert!(back == data, "downloaded bytes differ");

    // An API error's status and body.
    let status = |r: Result<Value, ClientError>| -> (u16, Value) {
        match r {
            Ok(v) => (200, v),
            Err(ClientError::Api { status, body }) => (status, serde_json::to_value(body).unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let missing_parent = dir.path().join("nodir/x");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (method, path, status_want, field) in [
        ("PUT", "relative/x".to_string(), 400, "path"),
        ("PUT", missing_parent.display().to_string(), 404, "path"),
        ("PUT", dir.path().display().to_string() + "/", 400, "path"),
        (
            "GET",
            dir.path().join("absent").display().to_string(),
            404,
            "path",
        ),
        ("GET", dir.path().display().to_string(), 400, "path"),
        ("GET", fifo.display().to_string(), 400, "path"),
        ("GET", "".to_string(), 400, "path"),
    ] {
        let (code, e) = if method == "PUT" {
            let no_opts = UploadOptions::default();
            status(
                c.upload("vm1", &path, &no_opts, &b"x"[..], Some(1))
                    .map(|w| json!(w)),
            )
        } else {
            status(c.download("vm1", &path).map(|_| Value::Null))
        };
        assert_eq!(
            (code, e["field"].as_str()),
            (status_want, Some(field)),
            "{method} {path}: {e}"
        );
    }
    let (code, e) = common::send(&c, Request::new("PUT", "/v1/vm/vm1/files?path=/x&mode=9z"));
    assert_eq!((code, e["field"].as_str()), (400, Some("mode")), "{e}");
    let (code, e) = common::send(&c, Request::new("GET", "/v1/vm/vm1/files"));
    assert_eq!((code, e["field"].as_str()), (400, Some("path")), "{e}");
    // Nothing half-written stays behind a refused upload.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("agentenv-upload"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_file(&fifo).unwrap();
    std::fs::remove_dir_all(dir.path().join("guestfs")).unwrap();
    done(d, dir, agent);
}

#[test]
fn many_execs_sequential_and_concurrent_and_paused_vms_refuse() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    common::sequential_and_concurrent_execs(&d, "vm1", 20, 0.2);
    assert_eq!(d.call("POST", "/v1/vm/vm1/pause", None).0, 200);
    let (code, e) = exec(&d, "vm1", json!({"cmd": ["true"]}));
    assert_eq!((code, e["state"].as_str()), (409, Some("paused")), "{e}");
    assert_eq!(d.call("POST", "/v1/vm/vm1/resume", None).0, 200);
    let (code, _) = exec(&d, "vm1", json!({"cmd": ["true"]}));
    assert_eq!(code, 200);
    done(d, dir, agent);
}

#[test]
fn readiness_follows_the_agent_connection() {
    let Some((d, dir, mut agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    let sock = agent.socket.clone();
    agent.stop();
    let wait_ready = |want: bool| {
        let start = Instant::now();
        loop {
            let (_, v) = d.call("GET", "/v1/vm/vm1", None);
            if v["ready"] == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ready never {want}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_ready(false);
    let agent = HostAgent::start(&sock);
    wait_ready(true);
    let (code, r) = exec(&d, "vm1", json!({"cmd": ["echo", "back"]}));
    assert_eq!((code, r["stdout"].as_str()), (200, Some("back\n")), "{r}");
    done(d, dir, agent);
}

#[test]
fn cli_exec_streams_and_exits_with_the_command_status_and_cp_copies_both_ways() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    create_ready(&d, "vm1");
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agentenv"))
            .args(args)
            .env("AGENTENV_SERVER", &d.base)
            .env("AGENTENV_TOKEN", common::TEST_TOKEN)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "vm",
        "exec",
        "vm1",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"oops\n");
    let out = cli(&["vm", "exec", "vm1", "--timeout", "0.3", "--", "sleep", "10"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");

    let local = dir.path().join("local.bin");
    let data = noise(3 << 20, 11);
    std::fs::write(&local, &data).unwrap();
    let guest = dir.path().join("in-guest.bin");
    let spec = format!("vm1:{}", guest.display());
    let out = cli(&["vm", "cp", local.to_str().unwrap(), &spec]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&guest).unwrap(), data);
    let back = dir.path().join("back.bin");
    let out = cli(&["vm", "cp", &spec, back.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let out = cli(&["vm", "cp", "vm1:/no/such/file", back.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 404"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(&back).unwrap(),
        data,
        "a failed cp keeps the old file"
    );
    for f in [&local, &guest, &back] {
        std::fs::remove_file(f).unwrap();
    }
    done(d, dir, agent);
}
