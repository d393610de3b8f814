//! The daemon's request limits over real HTTP: the cap on mutating requests in
//! flight (429 + `Retry-After`), the header read timeout (slow or idle clients
//! are disconnected), the JSON body timeout and the upload idle timeout (408),
//! and a clean stop while slow clients are connected.
//!
//! Each test prints the number of fault cases it tried (`fault cases: N`).

mod common;

use std::io::{Read, Write};
use std::path::Path;

use std::time::{Duration, Instant};

use agentenv_client::{Body, Request, Stream};
use agentenv_core::config::Config;

use common::{finish, is_real, Daemon, TestDir};
use serde_json::{json, Value};

/// A response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Opens a connection and sends `head` (with the harness's token) and
/// nothing more.
fn connect(d: &Daemon, head: &str) -> Stream {
    let mut s = d.client().endpoint().open(Duration::from_secs(30)).unwrap();
    s.write_all(&common::with_auth(head.as_bytes().to_vec()))
        .unwrap();
    s
}

/// Reads one response; the server is expected to close the connection after it
/// (requests here say `Connection: close`, or the server does on a timeout).
fn read_response(s: &mut Stream) -> Raw {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let r = agentenv_client::transport::read_response(&mut &buf[..])
        .unwrap_or_else(|e| panic!("no response ({e}): {:?}", String::from_utf8_lossy(&buf)));
    Raw {
        status: r.status,
        body: serde_json::from_slice(&r.body).unwrap_or(Value::String(r.text())),
        headers: r.headers,
    }
}

/// True when the server closed the connection (EOF or reset) within `within`.
fn closed_within(s: &mut Stream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// One request, with its status, `Retry-After` and JSON body.
fn call(d: &Daemon, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Option<String>, Value) {
    let mut req = Request::new(method, path).body(body.map_or(Body::Empty, Body::Bytes));
    if method == "PUT" {
        // An upload's body is the file (issue 14: octet-stream only).
        req = req.header("Content-Type", "application/octet-stream");
    }
    let resp = d
        .client()
        .send(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let retry = resp.header("retry-after").map(str::to_string);
    (
        resp.status,
        retry,
        serde_json::from_slice(&resp.body).unwrap_or(Value::String(resp.text())),
    )
}

/// TCP sockets this process (and so the in-process daemon) has open.
fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false)
        })
        .count()
}

/// Waits until `cond` holds, or panics after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Operations the daemon counts in flight now (`ops_in_flight` of `GET /v1/health`).
fn ops_in_flight(d: &Daemon) -> u64 {
    let (code, _, v) = call(d, "GET", "/v1/health", None);
    assert_eq!(code, 200, "{v}");
    v["ops_in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ops_in_flight: {v}"))
}

fn daemon(tweak: impl FnOnce(&mut Config, &TestDir)) -> (Daemon, TestDir) {
    let mut dir = TestDir::new();
    let mut cfg = dir.config();
    tweak(&mut cfg, &dir);
    dir.baseline = Some(common::baseline(dir.path()));
    (Daemon::start_with(cfg, dir.path()), dir)
}

#[test]
fn operations_beyond_the_cap_get_429_at_once_and_reads_are_never_limited() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's --hang-on");
        return;
    }
    let mut cases = 0;
    // The two hung pauses hold both permits until they time out: every check
    // below has to fit in that window, on a loaded machine too.
    let (d, dir) = daemon(|cfg, dir| {
        cfg.max_inflight_ops = 2;
        cfg.request_timeout_ms = 10_000;
        cfg.firecracker_binary = dir.wrapper("fc-hang", &["--hang-on", "PATCH /vm"]);
    });
    for vm in ["a", "b", "c"] {
        d.create_ok(vm);
    }
    // Two pauses hang in the VMM and hold both permits.
    let base = d.base.clone();
    let hung: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|vm| {
            let (base, path) = (base.clone(), format!("/v1/vm/{vm}/pause"));
            std::thread::spawn(move || common::http_call(&base, "POST", &path, None).0)
        })
        .collect();
    for vm in ["a", "b"] {
        d.wait_state(vm, "pausing", Duration::from_secs(10));
    }
    assert_eq!(ops_in_flight(&d), 2);
    // "At once": a refused call is not queued behind the hung ones (which
    // would cost the whole 10 s request timeout).
    let at_once = Duration::from_secs(2);
    let create = serde_json::to_vec(&common::overlay_req("d")).unwrap();
    let files = format!(
        "/v1/vm/c/files?path={}",
        dir.path().join("x").to_str().unwrap()
    );
    let exec = br#"{"cmd":["true"]}"#;
    let refused: [(&str, &str, Option<&[u8]>); 9] = [
        ("POST", "/v1/vm/c/pause", None),
        ("POST", "/v1/vm/c/resume", None),
        ("POST", "/v1/vm/c/shutdown", None),
        ("POST", "/v1/vm/c/snapshot", None),
        ("DELETE", "/v1/vm/c", None),
        ("POST", "/v1/vm", Some(&create)),
        ("POST", "/v1/vm/c/exec", Some(exec)),
        ("PUT", &files, Some(b"data")),
        ("DELETE", "/v1/snapshots/none", None),
    ];
    for (method, path, body) in refused {
        let start = Instant::now();
        let (code, retry, v) = call(&d, method, path, body);
        let took = start.elapsed();
        assert_eq!(code, 429, "{method} {path}: {v}");
        assert_eq!(retry.as_deref(), Some("1"), "{method} {path}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains("2 (max_inflight_ops)"), "{msg}");
        assert!(took < at_once, "{method} {path} took {took:?}");
        cases += 1;
    }
    // Nothing was touched by the refused calls.
    assert_eq!(d.call("GET", "/v1/vm/c", None).1["state"], "running");
    assert_eq!(d.call("GET", "/v1/vm/d", None).0, 404);
    // Reads are never limited.
    for path in [
        "/v1/health",
        "/v1/vm",
        "/v1/vm/c",
        "/v1/snapshots",
        "/v1/openapi.json",
    ] {
        let start = Instant::now();
        let (code, _, v) = call(&d, "GET", path, None);
        assert_eq!(code, 200, "{path}: {v}");
        let took = start.elapsed();
        assert!(took < at_once, "{path} took {took:?}");
        cases += 1;
    }
    for h in hung {
        assert_eq!(h.join().unwrap(), 504);
        cases += 1;
    }
    // The permits come back (a response is read before the server has dropped
    // it): operations run again.
    wait_for("the permits back", Duration::from_secs(10), || {
        ops_in_flight(&d) == 0
    });
    let (code, _, v) = call(&d, "DELETE", "/v1/vm/c", None);
    assert_eq!(code, 204, "{v}");
    println!("fault cases: {cases}");
    finish(d, dir);
}

#[test]
fn an_operation_whose_client_went_away_still_counts() {
    if is_real() {
        agentenv_testkit::skip::skip_optional("uses the double's --hang-on");
        return;
    }
    // The hung pause holds the only permit until it times out: the checks
    // after the hang-up have to fit in that window, on a loaded machine too.
    const TIMEOUT_MS: u64 = 5000;
    let (d, dir) = daemon(|cfg, dir| {
        cfg.max_inflight_ops = 1;
        cfg.request_timeout_ms = TIMEOUT_MS;
        cfg.firecracker_binary = dir.wrapper("fc-hang", &["--hang-on", "PATCH /vm"]);
    });
    d.create_ok("a");
    // The pause hangs in the VMM; its client hangs up. The engine task goes
    // on (a disconnect must not cancel an operation half-way) and so does its
    // claim on the limit.
    let sent = Instant::now();
    let s = connect(
        &d,
        "POST /v1/vm/a/pause HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    d.wait_state("a", "pausing", Duration::from_secs(10));
    drop(s);
    // Time for the server to see the hang-up (and drop the request's future).
    std::thread::sleep(Duration::from_millis(200));
    let (code, retry, v) = call(&d, "DELETE", "/v1/vm/a", None);
    assert_eq!((code, retry.as_deref()), (429, Some("1")), "{v}");
    assert_eq!(ops_in_flight(&d), 1);
    // Once the pause has timed out, the permit is back.
    d.wait_state("a", "running", Duration::from_secs(30));
    wait_for("the permit back", Duration::from_secs(10), || {
        ops_in_flight(&d) == 0 && call(&d, "POST", "/v1/vm/nope/resume", None).0 == 404
    });
    // Held until the pause timed out (TIMEOUT_MS after it was sent at the
    // earliest), not given back when the client hung up.
    let held = sent.elapsed();
    assert!(held >= Duration::from_millis(TIMEOUT_MS), "{held:?}");
    println!("fault cases: 1");
    finish(d, dir);
}

#[test]
fn a_slow_json_body_holds_its_permit_until_408() {
    let mut cases = 0;
    const BODY_TIMEOUT_MS: u64 = 2000;
    let body_timeout = Duration::from_millis(BODY_TIMEOUT_MS);
    let (d, dir) = daemon(|cfg, _| {
        cfg.max_inflight_ops = 1;
        cfg.body_timeout_ms = BODY_TIMEOUT_MS;
    });
    let body = serde_json::to_string(&common::overlay_req("slow")).unwrap();
    let head = |len: usize| {
        format!(
            "POST /v1/vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // 1. Part of the body, then silence.
    let start = Instant::now();
    let mut s = connect(&d, &head(body.len()));
    s.write_all(&body.as_bytes()[..10]).unwrap();
    // It is in flight once the daemon has read its headers: the only permit is taken.
    wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || ops_in_flight(&d) == 1,
    );
    let (code, retry, v) = call(&d, "POST", "/v1/vm/x/pause", None);
    assert_eq!((code, retry.as_deref()), (429, Some("1")), "{v}");
    cases += 1;
    let r = read_response(&mut s);
    let took = start.elapsed();
    assert_eq!(r.status, 408, "{r:?}");
    let msg = r.body["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{BODY_TIMEOUT_MS} ms (body_timeout_ms)")),
        "{msg}"
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        took >= body_timeout && took < body_timeout + Duration::from_secs(8),
        "{took:?}"
    );
    cases += 1;
    // Each part starts once the last one's permit is back (its response can
    // be read before the server has dropped it).
    let permit_back = || {
        wait_for("the permit back", Duration::from_secs(10), || {
            ops_in_flight(&d) == 0
        })
    };

    // 2. A drip feed never idle for long (a byte every 100 ms; the whole body
    // would take several times body_timeout_ms) still ends at the total timeout.
    assert!(body.len() as u64 * 100 > 2 * BODY_TIMEOUT_MS);
    permit_back();
    let start = Instant::now();
    let mut s = connect(&d, &head(body.len()));
    for b in body.as_bytes() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > 2 * body_timeout {
            break;
        }
    }
    let r = read_response(&mut s);
    let took = start.elapsed();
    assert_eq!(r.status, 408, "{r:?}");
    let msg = r.body["error"].as_str().unwrap();
    assert!(msg.contains("did not arrive within"), "{msg}");
    assert!(
        took >= body_timeout && took < body_timeout + Duration::from_secs(8),
        "{took:?}"
    );
    cases += 1;

    // 3. Headers promising a body that never comes.
    permit_back();
    let mut s = connect(&d, &head(100));
    let r = read_response(&mut s);
    assert_eq!(r.status, 408, "{r:?}");
    cases += 1;

    // 4. Chunked, with a chunk that stops half-way.
    permit_back();
    let mut s = connect(
        &d,
        "POST /v1/vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{\"vm_id\":",
    );
    let r = read_response(&mut s);
    assert_eq!(r.status, 408, "{r:?}");
    cases += 1;

    // The permit came back and nothing was created.
    permit_back();
    assert_eq!(d.call("GET", "/v1/vm/slow", None).0, 404);
    d.create_ok("slow");
    println!("fault cases: {cases}");
    finish(d, dir);
}

#[test]
fn slow_headers_and_idle_connections_are_closed() {
    let mut cases = 0;
    let (d, dir) = daemon(|cfg, _| {
        cfg.header_timeout_ms = 300;
    });
    let before = open_sockets();
    let start = Instant::now();
    let heads = [
        "",
        "P",
        "POST /v1/vm HTTP/1.1\r\n",
        "POST /v1/vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: app",
        "GET /v1/vm HTTP/1.1\r\nHost: localhost\r\n",
    ];
    let mut conns: Vec<Stream> = (0..40)
        .map(|i| connect(&d, heads[i % heads.len()]))
        .collect();
    // While they hang, the daemon serves others.
    assert_eq!(d.call("GET", "/v1/health", None).0, 200);
    for s in &mut conns {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "a slow connection was not closed"
        );
        cases += 1;
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    // A kept-alive connection left idle after a request is closed as well.
    let mut s = connect(&d, "GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut first = [0u8; 12];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    cases += 1;
    drop(conns);
    drop(s);
    // Every connection (and its task) is gone on the daemon's side too.
    wait_for(
        "sockets back to the baseline",
        Duration::from_secs(10),
        || open_sockets() <= before,
    );
    println!(
        "fault cases: {cases} (40 slow connections closed after {} ms)",
        took.as_millis()
    );
    finish(d, dir);
}

#[test]
fn a_stop_with_slow_clients_connected_is_prompt() {
    // Requests in progress finish before the stop; a slow client's is bounded by
    // these timeouts.
    let (d, dir) = daemon(|cfg, _| {
        cfg.header_timeout_ms = 500;
        cfg.body_timeout_ms = 500;
    });
    d.create_ok("vm1");
    let mut partial = connect(&d, "POST /v1/vm HTTP/1.1\r\nHost: localhost\r\n");
    let mut idle = connect(&d, "");
    let mut body = connect(
        &d,
        "POST /v1/vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    );
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    finish(d, dir);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    for s in [&mut partial, &mut idle, &mut body] {
        assert!(closed_within(s, Duration::from_secs(5)));
    }
    println!("fault cases: 3 (stopped in {} ms)", took.as_millis());
}

/// The guest agent on the host behind the double's vsock (as in `agent_api.rs`).
#[test]
fn a_stalled_upload_is_408_but_a_slow_steady_one_completes() {
    if is_real() {
        agentenv_testkit::skip::skip_optional(
            "a real Firecracker boots no guest here, so no agent answers",
        );
        return;
    }
    let mut cases = 0;
    const BODY_TIMEOUT_MS: u64 = 1500;
    let (d, dir, agent) = common::start_with_agent(|cfg| cfg.body_timeout_ms = BODY_TIMEOUT_MS);
    let mut req = common::overlay_req("vm1");
    req["wait_ready"] = json!(true);
    req["wait_ready_timeout_s"] = json!(20);
    let (code, v) = d.call("POST", "/v1/vm", Some(req));
    assert_eq!(code, 201, "{v}");
    let put_head = |target: &Path, len: usize| {
        format!(
            "PUT /v1/vm/vm1/files?path={} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n",
            target.display()
        )
    };

    // Stalls after 256 KiB of 1 MiB: 408 after the idle timeout, nothing written.
    let stalled = dir.path().join("stalled.bin");
    let start = Instant::now();
    let mut s = connect(&d, &put_head(&stalled, 1 << 20));
    s.write_all(&vec![7u8; 256 << 10]).unwrap();
    let r = read_response(&mut s);
    let took = start.elapsed();
    assert_eq!(r.status, 408, "{r:?}");
    let msg = r.body["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("no bytes for {BODY_TIMEOUT_MS} ms")),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(BODY_TIMEOUT_MS) && took < Duration::from_secs(10),
        "{took:?}"
    );
    wait_for("no upload leftovers", Duration::from_secs(5), || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("agentenv-upload"))
    });
    assert!(!stalled.exists());
    cases += 1;

    // Slow but steady: a piece every 200 ms for 3 s (2× body_timeout_ms) is fine.
    let steady = dir.path().join("steady.bin");
    let pieces = 15;
    assert!(pieces as u64 * 200 >= 2 * BODY_TIMEOUT_MS);
    let mut s = connect(&d, &put_head(&steady, pieces * 1000));
    for _ in 0..pieces {
        s.write_all(&[1u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["bytes"], pieces * 1000);
    assert_eq!(
        std::fs::metadata(&steady).unwrap().len(),
        pieces as u64 * 1000
    );
    cases += 1;
    std::fs::remove_file(&steady).unwrap();

    println!("fault cases: {cases}");
    drop(agent);
    finish(d, dir);
}
