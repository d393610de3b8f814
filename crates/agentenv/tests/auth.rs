//! Access control over real HTTP: bearer tokens (401 with
//! `WWW-Authenticate`), the open health check, owner isolation between two
//! `user` tokens across every route (404 exactly as if absent), admins seeing
//! everything, owners surviving a restart, the audit log, an unauthenticated
//! flood taking no in-flight slot, and — with the daemon as a process —
//! tokens reloaded by SIGHUP, bad tokens files refused at startup and the
//! first start creating an admin token.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_client::{Body, Request};
use common::{anonymous_client, finish, is_real, Daemon, KillOnDrop, TestDir, TEST_TOKEN};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_agentenv");
const ALICE: &str = "e2b_a11ce0000000000000000000000000000000a11c";
const BOB: &str = "e2b_b0b0000000000000000000000000000000000b0b";

/// One request as `token` (none: no `Authorization` header) plus `headers`;
/// the status, the headers and the JSON body.
fn call_as(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let mut c = anonymous_client(base, Duration::from_secs(60));
    if let Some(t) = token {
        c = c.with_token(t);
    }
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    let mut req =
        Request::new(method, path).body(bytes.as_deref().map_or(Body::Empty, Body::Bytes));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = if resp.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&resp.body).unwrap_or(Value::String(resp.text()))
    };
    (resp.status, resp.headers, v)
}

/// One request as `token`: the status and the JSON body.
fn json_as(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (code, _, v) = call_as(base, Some(token), method, path, &[], body);
    (code, v)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A daemon whose tokens file has the harness's admin, `alice` and `bob`
/// (both `user`).
fn two_users() -> (Daemon, TestDir) {
    let mut dir = TestDir::new();
    common::write_tokens(
        &dir.path().join("tokens"),
        &[
            (common::TEST_TOKEN_NAME, "admin", TEST_TOKEN),
            ("alice", "user", ALICE),
            ("bob", "user", BOB),
        ],
    );
    dir.baseline = Some(common::baseline(dir.path()));
    let cfg = dir.config();
    (Daemon::start_with(cfg, dir.path()), dir)
}

#[test]
fn requests_without_a_valid_token_get_401_with_www_authenticate_and_touch_nothing() {
    let (d, dir) = Daemon::start();
    let create = common::overlay_req("x1");
    type Case<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)]);
    let cases: [Case; 8] = [
        ("missing", None, &[]),
        (
            "unknown token",
            Some("e2b_ffffffffffffffffffffffffffffffffffffffff"),
            &[],
        ),
        ("empty bearer", None, &[("Authorization", "Bearer")]),
        ("bearer and spaces", None, &[("Authorization", "Bearer   ")]),
        ("no space", None, &[("Authorization", "BearerX")]),
        ("two words", None, &[("Authorization", "Bearer a b")]),
        (
            "basic scheme",
            None,
            &[("Authorization", "Basic YWRtaW46YWRtaW4=")],
        ),
        // The token in the wrong scheme is no credential either.
        (
            "token scheme",
            None,
            &[("Authorization", &*format!("Token {TEST_TOKEN}"))],
        ),
    ];
    let mut n = 0;
    for (what, token, headers) in cases {
        for (method, path, body) in [
            ("GET", "/v1/vm", None),
            ("POST", "/v1/vm", Some(create.clone())),
            ("GET", "/v1/snapshots", None),
            ("GET", "/v1/openapi.json", None),
            ("DELETE", "/v1/vm/x1", None),
        ] {
            let (code, h, v) = call_as(&d.base, token, method, path, headers, body);
            assert_eq!(code, 401, "{what}: {method} {path}: {v}");
            let www = header(&h, "www-authenticate").unwrap_or_default();
            assert!(www.starts_with("Bearer"), "{what}: {www:?}");
            assert_eq!(header(&h, "content-type"), Some("application/json"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            assert!(v.get("state").is_none() && v.get("vms").is_none(), "{v}");
            n += 1;
        }
    }
    // The cross-site "simple" POST of the issue (text/plain, no credential).
    let a = common::raw_http(
        &d.base,
        format!(
            "POST /v1/vm HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: x\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
            create.to_string().len(),
            create
        )
        .into_bytes(),
        Duration::from_secs(10),
    );
    // Refused before authentication even looks at it: the cross-site guard
    // (outermost layer) turns away every body that is not JSON.
    assert_eq!(a.status, 415, "{:?}", a.body);
    assert!(d.engine.is_empty(), "an unauthenticated request made a vm");
    println!("401 cases: {}", n + 1);
    finish(d, dir);
}

#[test]
fn health_is_open_and_tells_nothing_secret() {
    let (d, dir) = Daemon::start();
    let (code, _, v) = call_as(&d.base, None, "GET", "/v1/health", &[], None);
    assert_eq!(code, 200, "{v}");
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["backend", "ops_in_flight", "status", "version"],
        "{v}"
    );
    let text = v.to_string();
    assert!(!text.contains(dir.path().to_str().unwrap()), "{text}");
    assert!(!text.contains("e2b_"), "{text}");
    // Only GET is open there.
    let (code, _, _) = call_as(&d.base, None, "POST", "/v1/health", &[], None);
    assert_eq!(code, 401);
    finish(d, dir);
}

/// Every route on a VM or snapshot, as (method, path, body).
fn every_verb(vm: &str, snap: &str, file: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", format!("/v1/vm/{vm}"), None),
        ("POST", format!("/v1/vm/{vm}/pause"), None),
        ("POST", format!("/v1/vm/{vm}/resume"), None),
        ("POST", format!("/v1/vm/{vm}/shutdown"), None),
        (
            "POST",
            format!("/v1/vm/{vm}/snapshot"),
            Some(json!({"snapshot_id": "stolen"})),
        ),
        (
            "POST",
            format!("/v1/vm/{vm}/fork"),
            Some(json!({"count": 1})),
        ),
        (
            "POST",
            format!("/v1/vm/{vm}/reset"),
            Some(json!({"snapshot_id": snap})),
        ),
        (
            "POST",
            format!("/v1/vm/{vm}/exec"),
            Some(json!({"cmd": ["true"]})),
        ),
        ("GET", format!("/v1/vm/{vm}/files?path={file}"), None),
        ("PUT", format!("/v1/vm/{vm}/files?path={file}"), None),
        ("DELETE", format!("/v1/vm/{vm}"), None),
        ("GET", format!("/v1/snapshots/{snap}"), None),
        ("POST", format!("/v1/snapshots/{snap}/persist"), None),
        ("DELETE", format!("/v1/snapshots/{snap}"), None),
    ]
}

#[test]
fn a_user_sees_only_its_own_vms_and_snapshots_and_the_rest_answers_404_as_if_absent() {
    let (d, dir) = two_users();
    let as_ = |token: &str, method: &str, path: &str, body: Option<Value>| {
        json_as(&d.base, token, method, path, body)
    };
    // Made by (token, path, body), owned by the token's name.
    for (token, owner, path, body) in [
        (ALICE, "alice", "/v1/vm", common::overlay_req("a1")),
        (BOB, "bob", "/v1/vm", common::overlay_req("b1")),
        (
            ALICE,
            "alice",
            "/v1/vm/a1/snapshot",
            json!({"snapshot_id": "sa"}),
        ),
        (
            BOB,
            "bob",
            "/v1/vm/b1/snapshot",
            json!({"snapshot_id": "sb"}),
        ),
    ] {
        let (code, v) = as_(token, "POST", path, Some(body));
        assert_eq!(
            (code, v["owner"].as_str()),
            (201, Some(owner)),
            "{path}: {v}"
        );
    }

    // Lists: each user its own.
    let ids = |v: &Value, key: &str, id: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x[id].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&as_(ALICE, "GET", "/v1/vm", None).1, "vms", "vm_id"),
        ["a1"]
    );
    assert_eq!(
        ids(&as_(BOB, "GET", "/v1/vm", None).1, "vms", "vm_id"),
        ["b1"]
    );
    assert_eq!(
        ids(
            &as_(ALICE, "GET", "/v1/snapshots", None).1,
            "snapshots",
            "snapshot_id"
        ),
        ["sa"]
    );
    assert_eq!(
        ids(
            &as_(BOB, "GET", "/v1/snapshots", None).1,
            "snapshots",
            "snapshot_id"
        ),
        ["sb"]
    );
    // The admin sees everything, with its owners.
    let (_, all) = as_(TEST_TOKEN, "GET", "/v1/vm", None);
    assert_eq!(ids(&all, "vms", "vm_id"), ["a1", "b1"]);
    assert_eq!(all["vms"][0]["owner"], "alice");
    assert_eq!(all["vms"][1]["owner"], "bob");
    let (_, all) = as_(TEST_TOKEN, "GET", "/v1/snapshots", None);
    assert_eq!(ids(&all, "snapshots", "snapshot_id"), ["sa", "sb"]);

    // Every verb on alice's VM and snapshot, as bob: the answer an absent VM
    // or snapshot gets, with the names swapped.
    let file = dir.path().join("f").display().to_string();
    let mut cases = 0;
    for ((method, theirs, body), (_, absent, _)) in every_verb("a1", "sa", &file)
        .into_iter()
        .zip(every_verb("zz", "zs", &file))
    {
        let (code, v) = as_(BOB, method, &theirs, body.clone());
        let (acode, av) = as_(BOB, method, &absent, body);
        assert_eq!(code, 404, "bob {method} {theirs}: {v}");
        assert_eq!(acode, 404, "bob {method} {absent}: {av}");
        let norm =
            |v: &Value, vm: &str, snap: &str| v.to_string().replace(vm, "VM").replace(snap, "SNAP");
        assert_eq!(
            norm(&v, "a1", "sa"),
            norm(&av, "zz", "zs"),
            "{method} {theirs}"
        );
        cases += 1;
    }
    // Bob's own VM from or to alice's snapshot: as absent too.
    for (method, path, body, absent_body) in [
        (
            "POST",
            "/v1/vm",
            json!({"vm_id": "b2", "disk": {"kind": "snapshot", "snapshot_id": "sa"}}),
            json!({"vm_id": "b2", "disk": {"kind": "snapshot", "snapshot_id": "zs"}}),
        ),
        (
            "POST",
            "/v1/vm",
            json!({"vm_id": "b2", "restore": {"snapshot_id": "sa"}}),
            json!({"vm_id": "b2", "restore": {"snapshot_id": "zs"}}),
        ),
        (
            "POST",
            "/v1/vm/b1/reset",
            json!({"snapshot_id": "sa"}),
            json!({"snapshot_id": "zs"}),
        ),
    ] {
        let (code, v) = as_(BOB, method, path, Some(body));
        let (acode, av) = as_(BOB, method, path, Some(absent_body));
        assert_eq!((code, acode), (404, 404), "{path}: {v} / {av}");
        assert_eq!(v.to_string().replace("sa", "zs"), av.to_string(), "{path}");
        cases += 1;
    }
    // Nothing of alice's was touched.
    let (code, v) = as_(ALICE, "GET", "/v1/vm/a1", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(as_(ALICE, "GET", "/v1/snapshots/sa", None).0, 200);
    assert_eq!(as_(TEST_TOKEN, "GET", "/v1/snapshots/stolen", None).0, 404);
    assert!(d.engine.get("b2").is_err());
    // Alice's own verbs work, and what she makes from her things is hers.
    let (code, v) = as_(
        ALICE,
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "a2", "disk": {"kind": "snapshot", "snapshot_id": "sa"}})),
    );
    assert_eq!((code, v["owner"].as_str()), (201, Some("alice")), "{v}");
    assert_eq!(as_(ALICE, "POST", "/v1/vm/a1/pause", None).0, 200);
    assert_eq!(as_(ALICE, "POST", "/v1/vm/a1/resume", None).0, 200);
    // The admin may act on anyone's VM.
    assert_eq!(as_(TEST_TOKEN, "POST", "/v1/vm/b1/pause", None).0, 200);
    assert_eq!(as_(TEST_TOKEN, "POST", "/v1/vm/b1/resume", None).0, 200);
    println!("isolation cases: {cases}");

    // Owners are in the records: a restarted daemon still keeps them apart.
    let cfg = d.cfg.clone();
    d.stop();
    let d = Daemon::start_with(cfg, dir.path());
    let (code, _, v) = call_as(&d.base, Some(ALICE), "GET", "/v1/vm/a1", &[], None);
    assert_eq!((code, v["owner"].as_str()), (200, Some("alice")), "{v}");
    assert_eq!(
        call_as(&d.base, Some(BOB), "GET", "/v1/vm/a1", &[], None).0,
        404
    );
    let (code, _, v) = call_as(&d.base, Some(ALICE), "GET", "/v1/snapshots/sa", &[], None);
    assert_eq!((code, v["owner"].as_str()), (200, Some("alice")), "{v}");
    assert_eq!(
        call_as(&d.base, Some(BOB), "GET", "/v1/snapshots/sa", &[], None).0,
        404
    );
    for s in ["sa", "sb"] {
        assert_eq!(d.call("DELETE", &format!("/v1/snapshots/{s}"), None).0, 204);
    }
    finish(d, dir);
}

#[test]
fn forks_and_restores_belong_to_their_caller() {
    if is_real() {
        eprintln!("skipping: a real Firecracker's full snapshots are too slow here");
        return;
    }
    let (d, dir) = two_users();
    let as_ = |token: &str, method: &str, path: &str, body: Option<Value>| {
        json_as(&d.base, token, method, path, body)
    };
    // Alice's VM, snapshotted (memory) by the admin: the snapshot is the admin's.
    assert_eq!(
        as_(ALICE, "POST", "/v1/vm", Some(common::overlay_req("a1"))).0,
        201
    );
    let (code, v) = as_(
        TEST_TOKEN,
        "POST",
        "/v1/vm/a1/snapshot",
        Some(json!({"snapshot_id": "full", "memory": true})),
    );
    assert_eq!(
        (code, v["owner"].as_str()),
        (201, Some(common::TEST_TOKEN_NAME)),
        "{v}"
    );
    assert_eq!(as_(ALICE, "GET", "/v1/snapshots/full", None).0, 404);
    // Alice forks her VM: the clones are hers.
    let (code, v) = as_(
        ALICE,
        "POST",
        "/v1/vm/a1/fork",
        Some(json!({"count": 1, "vm_ids": ["a1c"]})),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["vms"][0]["owner"], "alice", "{v}");
    assert_eq!(as_(BOB, "GET", "/v1/vm/a1c", None).0, 404);
    // Bob cannot restore the admin's snapshot; the admin's restore is the admin's.
    assert_eq!(
        as_(
            BOB,
            "POST",
            "/v1/vm",
            Some(json!({"vm_id": "r", "restore": {"snapshot_id": "full"}}))
        )
        .0,
        404
    );
    let (code, v) = as_(
        TEST_TOKEN,
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "r", "restore": {"snapshot_id": "full"}})),
    );
    assert_eq!(
        (code, v["owner"].as_str()),
        (201, Some(common::TEST_TOKEN_NAME)),
        "{v}"
    );
    assert_eq!(as_(ALICE, "GET", "/v1/vm/r", None).0, 404);
    for vm in ["r", "a1c", "a1"] {
        assert_eq!(d.call("DELETE", &format!("/v1/vm/{vm}"), None).0, 204);
    }
    assert_eq!(d.call("DELETE", "/v1/snapshots/full", None).0, 204);
    finish(d, dir);
}

#[test]
fn every_mutating_request_leaves_one_audit_line() {
    let lines = common::audit_lines();
    let (d, dir) = two_users();
    let (code, _, _) = call_as(
        &d.base,
        Some(ALICE),
        "POST",
        "/v1/vm",
        &[],
        Some(common::overlay_req("audit1")),
    );
    assert_eq!(code, 201);
    let (code, _, _) = call_as(&d.base, Some(BOB), "POST", "/v1/vm/audit1/pause", &[], None);
    assert_eq!(code, 404);
    let (code, _, _) = call_as(&d.base, None, "DELETE", "/v1/vm/audit1", &[], None);
    assert_eq!(code, 401);
    let (code, _, _) = call_as(
        &d.base,
        Some(ALICE),
        "POST",
        "/v1/vm/audit1/snapshot",
        &[],
        Some(json!({"snapshot_id": "audits"})),
    );
    assert_eq!(code, 201);
    let (code, _, _) = call_as(
        &d.base,
        Some(ALICE),
        "DELETE",
        "/v1/snapshots/audits",
        &[],
        None,
    );
    assert_eq!(code, 204);
    let (code, _, _) = call_as(&d.base, Some(ALICE), "GET", "/v1/vm/audit1", &[], None);
    assert_eq!(code, 200);
    let (code, _, _) = call_as(&d.base, Some(ALICE), "DELETE", "/v1/vm/audit1", &[], None);
    assert_eq!(code, 204);
    let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("audit1") || l.contains("audits"))
        .collect();
    let want = [
        (
            "principal=alice",
            "request=POST /v1/vm ",
            "target=vm=audit1",
            "status=201",
        ),
        (
            "principal=bob",
            "request=POST /v1/vm/audit1/pause",
            "target=vm=audit1",
            "status=404",
        ),
        (
            "principal=-",
            "request=DELETE /v1/vm/audit1",
            "target=vm=audit1",
            "status=401",
        ),
        (
            "principal=alice",
            "request=POST /v1/vm/audit1/snapshot",
            "target=snapshot=audits",
            "status=201",
        ),
        (
            "principal=alice",
            "request=DELETE /v1/snapshots/audits",
            "target=snapshot=audits",
            "status=204",
        ),
        (
            "principal=alice",
            "request=DELETE /v1/vm/audit1",
            "target=vm=audit1",
            "status=204",
        ),
    ];
    assert_eq!(
        mine.len(),
        want.len(),
        "GETs are not audited; one line each:\n{}",
        mine.join("\n")
    );
    for (line, (who, req, target, status)) in mine.iter().zip(want) {
        for part in [
            who,
            req,
            target,
            status,
            "agentenv::audit",
            "client=127.0.0.1:",
            "duration_ms=",
        ] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
    }
    finish(d, dir);
}

#[test]
fn an_unauthenticated_flood_takes_no_in_flight_slot() {
    if is_real() {
        eprintln!("skipping: uses the double's --hang-on");
        return;
    }
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.max_inflight_ops = 1;
    cfg.request_timeout_ms = 10_000;
    cfg.firecracker_binary = dir.wrapper("fc-hang", &["--hang-on", "PATCH /vm"]);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    d.create_ok("f1");
    // One pause hangs in the VMM and holds the only permit.
    let base = d.base.clone();
    let hung =
        std::thread::spawn(move || common::http_call(&base, "POST", "/v1/vm/f1/pause", None).0);
    d.wait_state("f1", "pausing", Duration::from_secs(10));
    // A flood without credentials: every one 401, none 429, at once.
    let start = Instant::now();
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let base = d.base.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|_| {
                        call_as(
                            &base,
                            Some("e2b_nope"),
                            "POST",
                            "/v1/vm/f1/resume",
                            &[],
                            None,
                        )
                        .0
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for t in flood {
        assert!(t.join().unwrap().iter().all(|c| *c == 401));
    }
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let (_, _, h) = call_as(&d.base, None, "GET", "/v1/health", &[], None);
    assert_eq!(h["ops_in_flight"], 1, "{h}");
    // An authenticated operation does find the slot taken.
    assert_eq!(d.call("POST", "/v1/vm/f1/resume", None).0, 429);
    let _ = hung.join();
    finish(d, dir);
}

/// The daemon as a process on `config`; its stderr goes to `log`.
fn spawn_daemon(config: &Path, port: u16, log: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("AGENTENV_CONFIG", config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn wait_healthy(base: &str, child: &mut KillOnDrop, log: &Path) {
    let start = Instant::now();
    while !common::healthy(base) {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}): {}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn token_cli(tokens: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("token")
        .args(args)
        .arg("--tokens-file")
        .arg(tokens)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_with(base: &str, token: &str) -> u16 {
    call_as(base, Some(token), "GET", "/v1/vm", &[], None).0
}

/// Waits until `token` gets `want` on `GET /v1/vm`.
fn wait_status(base: &str, token: &str, want: u16) {
    let start = Instant::now();
    while status_with(base, token) != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{token}: never {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hup(child: &KillOnDrop) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[test]
fn sighup_reloads_the_tokens_file_and_a_bad_one_keeps_the_old_tokens() {
    let dir = TestDir::new();
    let tokens = dir.path().join("tokens");
    let config = common::write_config(&dir, "");
    let log = dir.path().join("daemon.log");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_daemon(&config, port, &log);
    wait_healthy(&base, &mut child, &log);
    assert_eq!(status_with(&base, TEST_TOKEN), 200);

    // A token made with the CLI: printed once, only its hash in the file.
    let (ok, new, err) = token_cli(&tokens, &["create", "carol", "--scope", "user"]);
    assert!(ok, "{err}");
    let new = new.trim().to_string();
    assert!(new.starts_with("e2b_") && new.len() == 44, "{new}");
    assert!(!std::fs::read_to_string(&tokens).unwrap().contains(&new));
    let (ok, list, _) = token_cli(&tokens, &["ls"]);
    assert!(ok);
    assert!(
        list.contains("carol") && list.contains("user") && list.contains("harness"),
        "{list}"
    );
    assert!(!list.contains(&agentenv::tokens::hash_hex(&new)), "{list}");
    // Not in force before SIGHUP, in force after.
    assert_eq!(status_with(&base, &new), 401);
    hup(&child);
    wait_status(&base, &new, 200);

    // Revoked: refused after the next SIGHUP.
    let (ok, _, err) = token_cli(&tokens, &["revoke", "carol"]);
    assert!(ok, "{err}");
    hup(&child);
    wait_status(&base, &new, 401);
    assert_eq!(status_with(&base, TEST_TOKEN), 200);

    // A bad file on SIGHUP: logged, the tokens loaded before stay.
    std::fs::write(&tokens, "harness admin not-a-hash\n").unwrap();
    hup(&child);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("SIGHUP") && text.contains("line 1") {
            assert!(text.contains(tokens.to_str().unwrap()), "{text}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no error logged: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_with(&base, TEST_TOKEN), 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn bad_tokens_files_stop_startup_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let tokens = dir.path().join("tokens");
    let config = common::write_config(&dir, "");
    let good = std::fs::read_to_string(&tokens).unwrap();
    let set = |text: &str, mode: u32| {
        std::fs::write(&tokens, text).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let cases: [(&str, u32, &str); 5] = [
        (&good, 0o644, "accessible to every user"),
        (&good, 0o602, "accessible to every user"),
        (&good, 0o660, "writable by its group"),
        ("# ok\nroot admin 1234\n", 0o600, "line 2"),
        (
            "root superuser 0000000000000000000000000000000000000000000000000000000000000000\n",
            0o600,
            "unknown scope \"superuser\"",
        ),
    ];
    let start = || {
        Command::new(BIN)
            .args([
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap()
    };
    for (text, mode, want) in cases {
        set(text, mode);
        let out = start();
        assert!(!out.status.success(), "{want}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(tokens.to_str().unwrap()) && err.contains(want),
            "{want}: {err}"
        );
    }
    // Something that cannot be read at all.
    std::fs::remove_file(&tokens).unwrap();
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tokens)
            .unwrap();
    }
    let out = start();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(tokens.to_str().unwrap()) && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn the_first_start_creates_an_admin_token_that_the_cli_uses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let tokens = dir.path().join("tokens");
    std::fs::remove_file(&tokens).unwrap();
    let config = common::write_config(&dir, "");
    let log = dir.path().join("daemon.log");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_daemon(&config, port, &log);
    wait_healthy(&base, &mut child, &log);
    let saved = dir.path().join("admin.token");
    for f in [&tokens, &saved] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let token = std::fs::read_to_string(&saved).unwrap().trim().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(saved.to_str().unwrap()) && !text.contains(&token),
        "{text}"
    );
    // The CLI with AGENTENV_TOKEN (and without: refused, saying so).
    let cli = |token: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["vm", "ls", "--server", &base]);
        if let Some(t) = token {
            c.env("AGENTENV_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = cli(Some(&token));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    // A second start keeps the file and the token.
    drop(child);
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_daemon(&config, port, &log);
    wait_healthy(&base, &mut child, &log);
    assert_eq!(std::fs::read_to_string(&saved).unwrap().trim(), token);
    assert_eq!(status_with(&base, &token), 200);
}
