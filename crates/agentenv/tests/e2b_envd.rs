//! The E2B envd surface (`server/e2b/envd`) through raw HTTP shaped exactly
//! as the `e2b` SDK sends it (headers from docs/E2B-PROTOCOL §1.6, §3): the
//! Connect codec, `process.Process`, `filesystem.Filesystem`, `/files`,
//! `/health`, auth, and the bad-input cases. The daemon's VMs run the real
//! `agentenv-guest` on the host (`common::start_with_agent`), so guest users
//! are the host's: the tests act as `root` and `nobody` and write only under
//! their own test directory.
//!
//! The sandbox record is what the control plane writes on create; until a
//! test can create through it, the VM is created natively, its record
//! written to the session directory and the daemon restarted to load it
//! (what a daemon restart does for real sandboxes).

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentenv_client::ResponseHead;
use common::{is_real, Daemon, HostAgent, TestDir};
use serde_json::{json, Value};

const TOKEN: &str = "envd-test-token-0123456789abcdef";
const SBX: &str = "sbx1";

struct Env {
    d: Daemon,
    dir: TestDir,
    agent: HostAgent,
    /// The E2B listener's `IP:PORT`.
    addr: String,
    /// A scratch directory on the host (the guest's file system here).
    scratch: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Env {
    fn start() -> Option<Env> {
        if is_real() {
            agentenv_testkit::skip::skip_optional(
                "a real Firecracker boots no guest here, so no agent answers",
            );
            return None;
        }
        let (d, dir, agent) = common::start_with_agent(|c| {
            c.e2b.listen = vec!["127.0.0.1:0".into()];
            c.e2b.default_user = "root".into();
            c.e2b.domain = Some("e2b.test".into());
            // The restart below keeps the VM.
            c.on_shutdown = agentenv_core::config::OnShutdown::Leave;
        });
        let mut req = common::overlay_req(SBX);
        req["wait_ready"] = json!(true);
        req["wait_ready_timeout_s"] = json!(20);
        let (code, v) = d.call("POST", "/v1/vm", Some(req));
        assert_eq!(code, 201, "{v}");
        let record = json!({
            "sandboxId": SBX, "templateId": "base", "alias": "base", "owner": "admin",
            "envdAccessToken": TOKEN, "metadata": {},
            "envVars": {"SBX_VAR": "from-sandbox", "OVERRIDDEN": "sandbox"},
            "startedAt": "2026-12-07T00:00:00Z", "endAtMs": u64::MAX / 2,
            "autoPause": false, "allowInternetAccess": true
        });
        let file = d.cfg.session_root.join(SBX).join("e2b.json");
        std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
        let mut cfg = d.cfg.clone();
        d.stop();
        cfg.on_shutdown = agentenv_core::config::OnShutdown::Stop;
        let d = Daemon::start_with(cfg, dir.path());
        let start = Instant::now();
        loop {
            let (_, v) = d.call("GET", &format!("/v1/vm/{SBX}"), None);
            if v["ready"] == true {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = d
            .e2b_base
            .clone()
            .expect("the E2B listener")
            .trim_start_matches("http://")
            .to_string();
        // Outside the daemon's directory, whose leftovers `finish` checks.
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = scratch_dir.path().to_path_buf();
        Some(Env {
            d,
            dir,
            agent,
            addr,
            scratch,
            _scratch: scratch_dir,
        })
    }

    fn done(self) {
        let mut agent = self.agent;
        agent.stop();
        common::finish(self.d, self.dir);
    }

    fn open(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Sends a request (a `Content-Length` body, or chunked when `chunks`
    /// is Some) and returns the answer's head and a reader of its body.
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> (ResponseHead, Reader) {
        let s = self.open();
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut bytes = Vec::new();
        match body {
            Body::Fixed(b) => {
                req.push_str(&format!("Content-Length: {}\r\n\r\n", b.len()));
                bytes.extend_from_slice(req.as_bytes());
                bytes.extend_from_slice(&b);
            }
            Body::Chunked(chunks) => {
                req.push_str("Transfer-Encoding: chunked\r\n\r\n");
                bytes.extend_from_slice(req.as_bytes());
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    bytes.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    bytes.extend_from_slice(c);
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
            }
        }
        // Written from a thread of its own while the answer is read: the
        // daemon may answer early (an oversized message) and close, and a
        // write that then fails must not hide that answer.
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        });
        let mut r = BufReader::new(s);
        let head = ResponseHead::read(&mut r).expect("an answer");
        let body = head.body(r);
        (head, Reader(Box::new(body)))
    }

    fn envd_headers(&self, content_type: &str) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", content_type.to_string()),
            ("connect-protocol-version", "1".into()),
            ("user-agent", "connectrpc/0.12.1".into()),
            ("e2b-sandbox-id", SBX.into()),
            ("e2b-sandbox-port", "49983".into()),
            ("x-access-token", TOKEN.into()),
        ]
    }

    /// A unary RPC: status and JSON answer.
    fn unary(&self, method: &str, msg: Value) -> (u16, Value) {
        self.unary_with(method, msg, &[])
    }

    fn unary_with(&self, method: &str, msg: Value, extra: &[(&str, String)]) -> (u16, Value) {
        let mut h = self.envd_headers("application/json");
        h.push(("accept-encoding", "identity".into()));
        h.extend(extra.iter().cloned());
        let (head, mut r) = self.send(
            "POST",
            &format!("/{method}"),
            &h,
            Body::Fixed(serde_json::to_vec(&msg).unwrap()),
        );
        let mut raw = Vec::new();
        r.0.read_to_end(&mut raw).unwrap();
        (
            head.status,
            serde_json::from_slice(&raw).unwrap_or(Value::Null),
        )
    }

    /// A server-streaming RPC as the SDK sends it (chunked, one envelope).
    fn stream(&self, method: &str, msg: Value, extra: &[(&str, String)]) -> Stream {
        let mut h = self.envd_headers("application/connect+json");
        h.push(("connect-accept-encoding", "identity".into()));
        h.push(("connect-content-encoding", "identity".into()));
        h.push(("keepalive-ping-interval", "50".into()));
        // A header in `extra` replaces the SDK's.
        h.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        h.extend(extra.iter().cloned());
        let (head, r) = self.send(
            "POST",
            &format!("/{method}"),
            &h,
            Body::Chunked(vec![envelope(0, &msg)]),
        );
        assert_eq!(head.status, 200, "{method}: {:?}", head.headers);
        assert_eq!(
            head.header("content-type"),
            Some("application/connect+json")
        );
        Stream { r }
    }

    fn list(&self) -> Vec<Value> {
        let (code, v) = self.unary("process.Process/List", json!({}));
        assert_eq!(code, 200, "{v}");
        v["processes"].as_array().cloned().unwrap_or_default()
    }

    fn wait_no_processes(&self) {
        let start = Instant::now();
        while !self.list().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{:?}",
                self.list()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

enum Body {
    Fixed(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

struct Reader(Box<dyn Read + Send>);

fn envelope(flags: u8, msg: &Value) -> Vec<u8> {
    let b = serde_json::to_vec(msg).unwrap();
    let mut out = vec![flags];
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(&b);
    out
}

struct Stream {
    r: Reader,
}

/// One message of a stream: `Ok(msg)` or the end-stream envelope's content.
#[derive(Debug)]
enum Msg {
    Data(Value),
    End(Value),
}

impl Stream {
    fn next(&mut self) -> Msg {
        let mut head = [0u8; 5];
        self.r.0.read_exact(&mut head).expect("an envelope");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len];
        self.r.0.read_exact(&mut body).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        if head[0] & 2 != 0 {
            Msg::End(v)
        } else {
            assert_eq!(head[0], 0);
            Msg::Data(v)
        }
    }

    /// The code of the end-stream error that must come next.
    fn end_code(&mut self) -> String {
        match self.next() {
            Msg::End(e) => e["error"]["code"].as_str().unwrap_or_default().to_string(),
            Msg::Data(v) => panic!("a message where the end was due: {v}"),
        }
    }

    fn data(&mut self) -> Value {
        match self.next() {
            Msg::Data(v) => v,
            Msg::End(e) => panic!("the stream ended: {e}"),
        }
    }

    /// Reads to the end: stdout, stderr, the `end` event (if any), and the
    /// end-stream envelope.
    fn collect(&mut self) -> (String, String, Option<Value>, Value) {
        let (mut out, mut err, mut end) = (Vec::new(), Vec::new(), None);
        loop {
            match self.next() {
                Msg::Data(v) => {
                    let ev = &v["event"];
                    if let Some(d) = ev["data"]["stdout"].as_str() {
                        out.extend(agentenv_api::base64::decode(d).unwrap());
                    } else if let Some(d) = ev["data"]["stderr"].as_str() {
                        err.extend(agentenv_api::base64::decode(d).unwrap());
                    } else if ev.get("end").is_some() {
                        end = Some(ev["end"].clone());
                    } else {
                        assert!(ev.get("keepalive").is_some(), "{v}");
                    }
                }
                Msg::End(e) => {
                    return (
                        String::from_utf8(out).unwrap(),
                        String::from_utf8(err).unwrap(),
                        end,
                        e,
                    )
                }
            }
        }
    }
}

fn start_msg(script: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false})
}

#[test]
fn health_and_auth_follow_the_token_and_the_sandbox() {
    let Some(env) = Env::start() else { return };
    let health = |id: &str, token: Option<&str>, port: &str| {
        let mut h = vec![
            ("e2b-sandbox-id", id.to_string()),
            ("e2b-sandbox-port", port.to_string()),
        ];
        if let Some(t) = token {
            h.push(("x-access-token", t.to_string()));
        }
        let (head, mut r) = env.send("GET", "/health", &h, Body::Fixed(vec![]));
        let mut raw = Vec::new();
        r.0.read_to_end(&mut raw).unwrap();
        (head.status, serde_json::from_slice::<Value>(&raw).ok())
    };
    assert_eq!(health(SBX, Some(TOKEN), "49983"), (204, None));
    let (code, body) = health(SBX, Some("wrong"), "49983");
    assert_eq!(code, 401, "{body:?}");
    assert_eq!(body.unwrap()["code"], 401);
    assert_eq!(health(SBX, None, "49983").0, 401);
    let (code, body) = health("nope", Some(TOKEN), "49983");
    assert_eq!(code, 502);
    assert_eq!(
        body.unwrap()["message"],
        "The sandbox nope was not found",
        "the SDK looks for \"was not found\""
    );
    // Host routing (`[e2b] domain`): `Host: 49983-<id>.<domain>`; another
    // domain is a control-plane request, which /health is not.
    for (host, envd) in [
        ("49983-sbx1.e2b.test:443", true),
        ("49983-sbx1.other.test", false),
    ] {
        let (head, _) = env.send(
            "GET",
            "/health",
            &[("host", host.into()), ("x-access-token", TOKEN.into())],
            Body::Fixed(vec![]),
        );
        assert_eq!(head.status == 204, envd, "{host}: {}", head.status);
    }
    let (code, body) = health(SBX, Some(TOKEN), "8080");
    assert_eq!(code, 502);
    assert!(body.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("port is not open"));

    // RPCs: a wrong token is `unauthenticated`, before anything runs.
    let mut h = env.envd_headers("application/json");
    h.retain(|(k, _)| *k != "x-access-token");
    let (head, _) = env.send(
        "POST",
        "/process.Process/List",
        &h,
        Body::Fixed(b"{}".to_vec()),
    );
    assert_eq!(head.status, 401);
    h.push(("x-access-token", "e".repeat(TOKEN.len())));
    let (head, mut r) = env.send(
        "POST",
        "/process.Process/List",
        &h,
        Body::Fixed(b"{}".to_vec()),
    );
    let mut raw = String::new();
    r.0.read_to_string(&mut raw).unwrap();
    assert_eq!(head.status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&raw).unwrap()["code"],
        "unauthenticated"
    );
    env.done();
}

#[test]
fn start_streams_output_env_cwd_and_exit_codes() {
    let Some(env) = Env::start() else { return };
    let mut s = env.stream(
        "process.Process/Start",
        start_msg("echo out; echo err >&2; exit 3"),
        &[("connect-timeout-ms", "60000".into())],
    );
    let first = s.data();
    let pid = first["event"]["start"]["pid"]
        .as_u64()
        .expect("start first");
    assert!(pid > 0);
    let (out, err, end, last) = s.collect();
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(
        end.unwrap(),
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    assert_eq!(last, json!({}));

    // Env: PATH, then the sandbox's envVars, then the request's envs; cwd.
    let mut msg = start_msg("echo $SBX_VAR $OVERRIDDEN; pwd; test -n \"$PATH\" && echo path");
    msg["process"]["envs"] = json!({"OVERRIDDEN": "request"});
    msg["process"]["cwd"] = json!(env.scratch.to_str().unwrap());
    let mut s = env.stream("process.Process/Start", msg, &[]);
    s.data();
    let (out, _, end, _) = s.collect();
    assert_eq!(
        out,
        format!("from-sandbox request\n{}\npath\n", env.scratch.display())
    );
    assert_eq!(
        end.unwrap(),
        json!({"exitCode": 0, "exited": true, "status": "exit status 0"})
    );

    // snake_case and a missing cwd.
    let mut s = env.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/true"}, "stdin": false,
               "tag": "t1"}),
        &[],
    );
    s.data();
    assert_eq!(s.collect().2.unwrap()["exitCode"], 0);
    let mut s = env.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/true", "cwd": "/does/not/exist"}, "stdin": false}),
        &[],
    );
    // envd: a missing cwd is invalid_argument.
    assert_eq!(s.end_code(), "invalid_argument");
    env.wait_no_processes();
    env.done();
}

#[test]
fn a_process_outlives_its_client_and_is_reattached_listed_and_killed() {
    let Some(env) = Env::start() else { return };
    let mut msg = start_msg("i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done");
    msg["tag"] = json!("ticker");
    let pid;
    {
        let mut s = env.stream("process.Process/Start", msg, &[]);
        pid = s.data()["event"]["start"]["pid"].as_u64().unwrap();
        let d = s.data();
        assert!(d["event"]["data"]["stdout"].is_string(), "{d}");
        // The client goes away here.
    }
    std::thread::sleep(Duration::from_millis(300));
    let procs = env.list();
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert_eq!(procs[0]["pid"], pid);
    assert_eq!(procs[0]["tag"], "ticker");
    assert_eq!(procs[0]["config"]["cmd"], "/bin/bash");

    // Reattach by tag: start{pid} first, then live output.
    let mut c = env.stream(
        "process.Process/Connect",
        json!({"process": {"tag": "ticker"}}),
        &[],
    );
    assert_eq!(c.data()["event"]["start"]["pid"], pid);
    assert!(c.data()["event"]["data"]["stdout"].is_string());
    // A second subscriber by pid sees the same process.
    let mut c2 = env.stream(
        "process.Process/Connect",
        json!({"process": {"pid": pid.to_string()}}),
        &[],
    );
    assert_eq!(c2.data()["event"]["start"]["pid"], pid);

    let (code, v) = env.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!((code, &v), (200, &json!({})));
    for s in [&mut c, &mut c2] {
        let (_, _, end, last) = s.collect();
        assert_eq!(
            end.unwrap(),
            json!({"exitCode": -1, "exited": false, "status": "signal: killed",
                   "error": "signal: killed"})
        );
        assert_eq!(last, json!({}));
    }
    env.wait_no_processes();
    // Gone: not_found for every selector.
    let (code, v) = env.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": 9}),
    );
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));
    let mut c = env.stream(
        "process.Process/Connect",
        json!({"process": {"tag": "ticker"}}),
        &[],
    );
    assert_eq!(c.end_code(), "not_found");
    env.done();
}

#[test]
fn connect_timeout_ms_is_the_process_lifetime() {
    let Some(env) = Env::start() else { return };
    let marker = env.scratch.join("survived");
    let script = format!("sleep 3; touch {}", marker.display());
    let t = Instant::now();
    let mut s = env.stream(
        "process.Process/Start",
        start_msg(&script),
        &[("connect-timeout-ms", "700".into())],
    );
    s.data();
    let (_, _, end, last) = s.collect();
    assert!(
        end.is_none(),
        "a deadline ends the stream without an end event"
    );
    assert_eq!(last["error"]["code"], "deadline_exceeded", "{last}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    env.wait_no_processes();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!marker.exists(), "the process was killed");
    env.done();
}

#[test]
fn bad_connect_input_is_a_connect_error_and_starts_nothing() {
    let Some(env) = Env::start() else { return };
    let marker = env.scratch.join("started");
    let touch = start_msg(&format!("touch {}", marker.display()));

    // A body cut inside its envelope: invalid_argument, nothing runs.
    let env_bytes = envelope(0, &touch);
    let mut h = env.envd_headers("application/connect+json");
    h.push(("connect-content-encoding", "identity".into()));
    let (head, r) = env.send(
        "POST",
        "/process.Process/Start",
        &h,
        Body::Chunked(vec![env_bytes[..env_bytes.len() - 3].to_vec()]),
    );
    assert_eq!(head.status, 200);
    assert_eq!((Stream { r }).end_code(), "invalid_argument");
    // A client that hangs up inside the envelope.
    {
        let mut s = env.open();
        let mut req = "POST /process.Process/Start HTTP/1.1\r\nHost: x\r\n".to_string();
        for (k, v) in &h {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Transfer-Encoding: chunked\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let part = &env_bytes[..10];
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .unwrap();
        s.write_all(part).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    // Compressed flag, bad JSON, a huge length, two messages.
    for bad in [
        envelope(1, &touch),
        {
            let mut b = vec![0u8, 0, 0, 0, 5];
            b.extend_from_slice(b"{nope");
            b
        },
        vec![0u8, 0xff, 0xff, 0xff, 0xff],
        [envelope(0, &touch), envelope(0, &touch)].concat(),
    ] {
        let (head, r) = env.send(
            "POST",
            "/process.Process/Start",
            &h,
            Body::Chunked(vec![bad]),
        );
        assert_eq!(head.status, 200);
        match (Stream { r }).next() {
            Msg::End(e) => {
                let code = e["error"]["code"].as_str().unwrap().to_string();
                assert!(
                    code == "invalid_argument" || code == "resource_exhausted",
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // An oversized unary message.
    let big = json!({"pad": "x".repeat(5 << 20)});
    let (code, v) = env.unary("process.Process/List", big);
    assert_eq!(
        (code, v["code"].as_str()),
        (429, Some("resource_exhausted"))
    );
    // Bad JSON and wrong types in a unary call.
    let (head, mut r) = env.send(
        "POST",
        "/process.Process/SendSignal",
        &env.envd_headers("application/json"),
        Body::Fixed(b"{\"process\":".to_vec()),
    );
    let mut raw = String::new();
    r.0.read_to_string(&mut raw).unwrap();
    assert_eq!(head.status, 400, "{raw}");
    assert!(raw.contains("invalid_argument"));
    let (code, v) = env.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": "x"}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("invalid_argument")));
    let (code, v) = env.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": 1}, "signal": "SIGNAL_NOPE"}),
    );
    assert_eq!(
        (code, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    // A connect-timeout-ms that is not a number.
    let (code, v) = env.unary_with(
        "process.Process/List",
        json!({}),
        &[("connect-timeout-ms", "soon".into())],
    );
    assert_eq!(
        (code, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let mut s = env.stream(
        "process.Process/Start",
        touch.clone(),
        &[("connect-timeout-ms", "-1".into())],
    );
    assert_eq!(s.end_code(), "invalid_argument");
    // Unknown methods and services, wrong content types.
    let (code, v) = env.unary("process.Process/Nope", json!({}));
    assert_eq!((code, v["code"].as_str()), (501, Some("unimplemented")));
    let (code, v) = env.unary("nope.Nope/List", json!({}));
    assert_eq!((code, v["code"].as_str()), (501, Some("unimplemented")));
    let (head, _) = env.send(
        "POST",
        "/process.Process/List",
        &env.envd_headers("application/proto"),
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 415);
    let (head, _) = env.send(
        "POST",
        "/process.Process/Start",
        &env.envd_headers("application/json"),
        Body::Fixed(serde_json::to_vec(&touch).unwrap()),
    );
    assert_eq!(head.status, 415);
    // An empty Start and an empty command.
    for msg in [json!({}), json!({"process": {"cmd": ""}})] {
        let mut s = env.stream("process.Process/Start", msg, &[]);
        assert_eq!(s.end_code(), "invalid_argument");
    }

    std::thread::sleep(Duration::from_millis(500));
    assert!(env.list().is_empty());
    assert!(!marker.exists(), "no bad request started a process");
    env.done();
}

#[test]
fn a_deleted_vm_ends_open_streams_unavailable_and_health_says_not_found() {
    let Some(env) = Env::start() else { return };
    let mut s = env.stream("process.Process/Start", start_msg("sleep 60"), &[]);
    s.data();
    let (code, v) = env.d.call("DELETE", &format!("/v1/vm/{SBX}"), None);
    assert_eq!(code, 204, "{v}");
    let (_, _, end, last) = s.collect();
    assert!(end.is_none());
    assert_eq!(last["error"]["code"], "unavailable", "{last}");
    assert!(!last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("was not found"));
    let (head, mut r) = env.send(
        "GET",
        "/health",
        &[
            ("e2b-sandbox-id", SBX.into()),
            ("e2b-sandbox-port", "49983".into()),
            ("x-access-token", TOKEN.into()),
        ],
        Body::Fixed(vec![]),
    );
    let mut raw = String::new();
    r.0.read_to_string(&mut raw).unwrap();
    assert_eq!(head.status, 502);
    assert!(raw.contains("was not found"), "{raw}");
    env.done();
}

fn files_headers(env: &Env) -> Vec<(&'static str, String)> {
    let _ = env;
    vec![
        ("e2b-sandbox-id", SBX.into()),
        ("e2b-sandbox-port", "49983".into()),
        ("x-access-token", TOKEN.into()),
        ("user-agent", "e2b-python-sdk/2.63.0".into()),
    ]
}

fn read_all(mut r: Reader) -> Vec<u8> {
    let mut raw = Vec::new();
    r.0.read_to_end(&mut raw).unwrap();
    raw
}

fn gzip(data: &[u8], decompress: bool) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .arg(if decompress { "-dc" } else { "-c" })
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip on PATH");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn files_upload_and_download_stream_with_gzip_multipart_and_signatures() {
    let Some(env) = Env::start() else { return };
    let root = env.scratch.display().to_string();
    // A big octet-stream upload, sent in chunks; parents are created.
    let big = common::noise(9 << 20, 7);
    let path = format!("{root}/deep/er/big.bin");
    let mut h = files_headers(&env);
    h.push(("content-type", "application/octet-stream".into()));
    let (head, r) = env.send(
        "POST",
        &format!("/files?path={}", q(&path)),
        &h,
        Body::Chunked(big.chunks(300_000).map(<[u8]>::to_vec).collect()),
    );
    let v: Value = serde_json::from_slice(&read_all(r)).unwrap();
    assert_eq!(head.status, 200, "{v}");
    assert_eq!(
        v,
        json!([{"name": "big.bin", "type": "file", "path": path}])
    );
    assert_eq!(std::fs::read(&path).unwrap(), big);

    // Download: raw, then gzip when accepted.
    let (head, r) = env.send(
        "GET",
        &format!("/files?path={}", q(&path)),
        &files_headers(&env),
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-type"),
        Some("application/octet-stream")
    );
    assert!(head.header("content-encoding").is_none());
    assert!(read_all(r) == big);
    let mut h = files_headers(&env);
    h.push(("accept-encoding", "gzip".into()));
    let (head, r) = env.send(
        "GET",
        &format!("/files?path={}", q(&path)),
        &h,
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-encoding"), Some("gzip"));
    assert!(gzip(&read_all(r), true) == big);

    // A gzip-encoded octet-stream upload.
    let small = b"hello gzip\n".repeat(1000);
    let gz_path = format!("{root}/gz.txt");
    let mut h = files_headers(&env);
    h.push(("content-type", "application/octet-stream".into()));
    h.push(("content-encoding", "gzip".into()));
    let (head, r) = env.send(
        "POST",
        &format!("/files?path={}", q(&gz_path)),
        &h,
        Body::Fixed(gzip(&small, false)),
    );
    let body = read_all(r);
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(std::fs::read(&gz_path).unwrap(), small);

    // Multipart: several parts named `file`, each filename its path.
    let boundary = "b0undary42";
    let mut mp = Vec::new();
    let files = [
        (format!("{root}/m/one.txt"), b"one".to_vec()),
        (format!("{root}/m/two/two.txt"), b"two\0bin".to_vec()),
    ];
    for (p, data) in &files {
        mp.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{p}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        mp.extend_from_slice(data);
        mp.extend_from_slice(b"\r\n");
    }
    mp.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let mut h = files_headers(&env);
    h.push((
        "content-type",
        format!("multipart/form-data; boundary={boundary}"),
    ));
    let (head, r) = env.send("POST", "/files", &h, Body::Fixed(mp));
    let v: Value = serde_json::from_slice(&read_all(r)).unwrap();
    assert_eq!(head.status, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    for (i, (p, data)) in files.iter().enumerate() {
        assert_eq!(v[i]["path"], p.as_str());
        assert_eq!(&std::fs::read(p).unwrap(), data);
    }

    // Errors: missing file 404, directory 400, no path 400, JSON shaped.
    for (path, want) in [(format!("{root}/missing"), 404u16), (root.clone(), 400)] {
        let (head, r) = env.send(
            "GET",
            &format!("/files?path={}", q(&path)),
            &files_headers(&env),
            Body::Fixed(vec![]),
        );
        let v: Value = serde_json::from_slice(&read_all(r)).unwrap();
        assert_eq!(
            (head.status, v["code"].as_u64()),
            (want, Some(want as u64)),
            "{v}"
        );
        assert!(v["message"].is_string());
    }
    let (head, r) = env.send("GET", "/files", &files_headers(&env), Body::Fixed(vec![]));
    let v: Value = serde_json::from_slice(&read_all(r)).unwrap();
    assert_eq!(head.status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("path"));
    // No token: 401.
    let (head, _) = env.send(
        "GET",
        &format!("/files?path={}", q(&path)),
        &[
            ("e2b-sandbox-id", SBX.into()),
            ("e2b-sandbox-port", "49983".into()),
        ],
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 401);

    // A signed URL works without the token and without E2b-Sandbox-Id
    // (download_url with E2B_SANDBOX_URL), and only for its operation.
    let sign = |p: &str, op: &str, exp: Option<u64>| {
        use sha2::Digest;
        let raw = match exp {
            None => format!("{p}:{op}::{TOKEN}"),
            Some(e) => format!("{p}:{op}::{TOKEN}:{e}"),
        };
        let d = sha2::Sha256::digest(raw.as_bytes());
        format!(
            "v1_{}",
            agentenv_api::base64::encode(&d).trim_end_matches('=')
        )
    };
    let gz_sig = sign(&gz_path, "read", None);
    let (head, r) = env.send(
        "GET",
        &format!("/files?path={}&signature={}", q(&gz_path), q(&gz_sig)),
        &[],
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 200);
    assert_eq!(read_all(r), small);
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let (head, _) = env.send(
        "GET",
        &format!(
            "/files?path={}&signature={}&signature_expiration={far}",
            q(&gz_path),
            q(&sign(&gz_path, "read", Some(far)))
        ),
        &[("e2b-sandbox-id", SBX.into())],
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 200);
    // Expired, or signed for writing: refused.
    for (sig, exp) in [
        (sign(&gz_path, "read", Some(1)), "&signature_expiration=1"),
        (sign(&gz_path, "write", None), ""),
    ] {
        let (head, _) = env.send(
            "GET",
            &format!("/files?path={}&signature={}{exp}", q(&gz_path), q(&sig)),
            &[("e2b-sandbox-id", SBX.into())],
            Body::Fixed(vec![]),
        );
        assert_eq!(head.status, 401);
    }
    env.done();
}

fn b64(s: &[u8]) -> String {
    agentenv_api::base64::encode(s)
}

fn basic(user: &str) -> (&'static str, String) {
    (
        "authorization",
        format!("Basic {}", b64(format!("{user}:").as_bytes())),
    )
}

/// Reads data messages until their `kind` output contains `want`.
fn read_until(s: &mut Stream, kind: &str, want: &str) -> String {
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(want) {
        let v = s.data();
        if let Some(d) = v["event"]["data"][kind].as_str() {
            got.extend(agentenv_api::base64::decode(d).unwrap());
        } else {
            assert!(v["event"]["keepalive"].is_object(), "{v}");
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn stdin_signals_and_terminals_reach_the_process() {
    let Some(env) = Env::start() else { return };
    // A missing `stdin` means stdin is open; SendInput, then CloseStdin.
    let mut s = env.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/cat"}}),
        &[],
    );
    let pid = s.data()["event"]["start"]["pid"].as_u64().unwrap();
    let (code, v) = env.unary(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
    );
    assert_eq!((code, &v), (200, &json!({})));
    assert_eq!(read_until(&mut s, "stdout", "hello\n"), "hello\n");
    // Bad base64 is invalid_argument; the process is untouched.
    let (code, v) = env.unary(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": "!!!"}}),
    );
    assert_eq!((code, v["code"].as_str()), (400, Some("invalid_argument")));
    let (code, v) = env.unary(
        "process.Process/Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 10, "rows": 10}}}),
    );
    assert_eq!(
        (code, v["code"].as_str()),
        (400, Some("failed_precondition"))
    );
    // StreamInput: start, data, keepalive, data; answered `{}` once ended.
    let mut h = env.envd_headers("application/connect+json");
    h.push(("connect-content-encoding", "identity".into()));
    let (head, r) = env.send(
        "POST",
        "/process.Process/StreamInput",
        &h,
        Body::Chunked(vec![
            envelope(0, &json!({"start": {"process": {"pid": pid}}})),
            envelope(0, &json!({"data": {"input": {"stdin": b64(b"one ")}}})),
            envelope(0, &json!({"keepalive": {}})),
            envelope(0, &json!({"data": {"input": {"stdin": b64(b"two\n")}}})),
        ]),
    );
    assert_eq!(head.status, 200);
    let mut answer = Stream { r };
    assert_eq!(answer.data(), json!({}));
    match answer.next() {
        Msg::End(e) => assert_eq!(e, json!({})),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_until(&mut s, "stdout", "one two\n"), "one two\n");
    let (code, _) = env.unary(
        "process.Process/CloseStdin",
        json!({"process": {"pid": pid}}),
    );
    assert_eq!(code, 200);
    let (_, _, end, _) = s.collect();
    assert_eq!(end.unwrap()["exitCode"], 0);

    // SIGTERM.
    let mut s = env.stream("process.Process/Start", start_msg("exec sleep 30"), &[]);
    let pid = s.data()["event"]["start"]["pid"].as_u64().unwrap();
    let (code, v) = env.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
    );
    assert_eq!(code, 200, "{v}");
    let (_, _, end, _) = s.collect();
    assert_eq!(
        end.unwrap(),
        json!({"exitCode": -1, "exited": false, "status": "signal: terminated",
               "error": "signal: terminated"})
    );

    // A terminal: output comes as `pty`, input goes to it, resize works.
    let mut s = env.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/bash",
                           "args": ["-c", "stty size; read x; stty size; echo got $x"],
                           "envs": {"TERM": "xterm-256color"}},
               "pty": {"size": {"cols": 80, "rows": 24}}}),
        &[],
    );
    let pid = s.data()["event"]["start"]["pid"].as_u64().unwrap();
    read_until(&mut s, "pty", "24 80");
    let (code, v) = env.unary(
        "process.Process/Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = env.unary(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"pty": b64(b"yo\n")}}),
    );
    assert_eq!(code, 200, "{v}");
    let out = read_until(&mut s, "pty", "got yo");
    assert!(out.contains("30 100"), "{out:?}");
    let (_, _, end, _) = s.collect();
    assert_eq!(end.unwrap()["exitCode"], 0);
    env.wait_no_processes();
    env.done();
}

#[test]
fn users_and_file_system_calls_act_as_the_callers_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(env) = Env::start() else { return };
    let root = env.scratch.display().to_string();
    std::fs::set_permissions(&env.scratch, std::fs::Permissions::from_mode(0o777)).unwrap();

    // Processes run as the Basic user (default: [e2b] default_user).
    let mut s = env.stream(
        "process.Process/Start",
        start_msg("id -un; echo $HOME"),
        &[],
    );
    s.data();
    assert_eq!(s.collect().0, "root\n/root\n");
    let mut s = env.stream(
        "process.Process/Start",
        start_msg("id -un"),
        &[basic("nobody")],
    );
    s.data();
    assert_eq!(s.collect().0, "nobody\n");
    let mut s = env.stream(
        "process.Process/Start",
        start_msg("id -un"),
        &[basic("no-such-user-e2b")],
    );
    assert_eq!(s.end_code(), "unauthenticated");

    let fs = |method: &str, msg: Value, user: &str| {
        env.unary_with(
            &format!("filesystem.Filesystem/{method}"),
            msg,
            &[basic(user)],
        )
    };
    // MakeDir creates parents, then says already_exists.
    let dir = format!("{root}/made/deep");
    let (code, v) = fs("MakeDir", json!({"path": dir}), "nobody");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(v["entry"]["path"], dir.as_str());
    assert_eq!(v["entry"]["owner"], "nobody");
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 65534);
    let (code, v) = fs("MakeDir", json!({"path": dir}), "nobody");
    assert_eq!((code, v["code"].as_str()), (409, Some("already_exists")));

    // A file uploaded as nobody belongs to nobody.
    let mut h = files_headers(&env);
    h.push(("content-type", "application/octet-stream".into()));
    let file = format!("{dir}/f.txt");
    let (head, r) = env.send(
        "POST",
        &format!("/files?path={}&username=nobody", q(&file)),
        &h,
        Body::Fixed(b"abc".to_vec()),
    );
    assert_eq!(
        head.status,
        200,
        "{}",
        String::from_utf8_lossy(&read_all(r))
    );
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), 65534);
    let (code, v) = fs("Stat", json!({"path": file}), "root");
    assert_eq!(code, 200, "{v}");
    let e = &v["entry"];
    assert_eq!(
        (e["name"].as_str(), e["type"].as_str(), e["size"].as_str()),
        (Some("f.txt"), Some("FILE_TYPE_FILE"), Some("3"))
    );
    assert_eq!(e["permissions"].as_str().unwrap().len(), 10);
    assert!(e["modifiedTime"].as_str().unwrap().ends_with('Z'));
    // An unknown user on /files is 401.
    let (head, _) = env.send(
        "GET",
        &format!("/files?path={}&username=no-such-user-e2b", q(&file)),
        &files_headers(&env),
        Body::Fixed(vec![]),
    );
    assert_eq!(head.status, 401);

    // ListDir by depth.
    let (code, v) = fs("ListDir", json!({"path": format!("{root}/made")}), "root");
    assert_eq!(code, 200, "{v}");
    let names = |v: &Value| {
        let mut n: Vec<String> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&v), vec![dir.clone()]);
    let (_, v) = fs(
        "ListDir",
        json!({"path": format!("{root}/made"), "depth": 2}),
        "root",
    );
    assert_eq!(names(&v), vec![dir.clone(), file.clone()]);
    let (code, v) = fs("ListDir", json!({"path": format!("{root}/nope")}), "root");
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));

    // A symlink is described as one.
    std::os::unix::fs::symlink(&file, format!("{root}/link")).unwrap();
    let (_, v) = fs("Stat", json!({"path": format!("{root}/link")}), "root");
    assert_eq!(v["entry"]["type"], "FILE_TYPE_SYMLINK", "{v}");
    assert_eq!(v["entry"]["symlinkTarget"], file.as_str());

    // Move answers the destination; Remove is recursive and a missing path
    // is fine; Stat of what is gone is not_found.
    let moved = format!("{root}/moved.txt");
    let (code, v) = fs(
        "Move",
        json!({"source": file, "destination": moved}),
        "root",
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["entry"]["path"], moved.as_str());
    assert_eq!(std::fs::read(&moved).unwrap(), b"abc");
    let (code, v) = fs(
        "Move",
        json!({"source": file, "destination": moved}),
        "root",
    );
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));
    for _ in 0..2 {
        let (code, v) = fs("Remove", json!({"path": format!("{root}/made")}), "root");
        assert_eq!((code, &v), (200, &json!({})));
    }
    assert!(!std::path::Path::new(&dir).exists());
    let (code, v) = fs("Stat", json!({"path": dir}), "root");
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));
    let (code, v) = fs("Stat", json!({}), "root");
    assert_eq!((code, v["code"].as_str()), (400, Some("invalid_argument")));
    env.done();
}

#[test]
fn directory_watches_stream_and_poll_events() {
    let Some(env) = Env::start() else { return };
    let root = env.scratch.display().to_string();
    // WatchDir: start first, then events.
    let mut w = env.stream(
        "filesystem.Filesystem/WatchDir",
        json!({"path": root, "recursive": false}),
        &[],
    );
    assert_eq!(w.data(), json!({"start": {}}));
    std::fs::write(env.scratch.join("streamed.txt"), b"x").unwrap();
    let ev = w.data();
    assert_eq!(ev["filesystem"]["name"], "streamed.txt", "{ev}");
    assert_eq!(ev["filesystem"]["type"], "EVENT_TYPE_CREATE");
    drop(w);

    // CreateWatcher / GetWatcherEvents / RemoveWatcher.
    let (code, v) = env.unary(
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": root, "recursive": true}),
    );
    assert_eq!(code, 200, "{v}");
    let id = v["watcherId"].as_str().unwrap().to_string();
    std::fs::create_dir(env.scratch.join("sub")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(env.scratch.join("sub/polled.txt"), b"y").unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["name"] == "sub/polled.txt") {
        assert!(start.elapsed() < Duration::from_secs(10), "{seen:?}");
        let (code, v) = env.unary(
            "filesystem.Filesystem/GetWatcherEvents",
            json!({"watcher_id": id}),
        );
        assert_eq!(code, 200, "{v}");
        seen.extend(v["events"].as_array().unwrap().iter().cloned());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen
        .iter()
        .any(|e| e["name"] == "sub" && e["type"] == "EVENT_TYPE_CREATE"));
    let (code, _) = env.unary(
        "filesystem.Filesystem/RemoveWatcher",
        json!({"watcherId": id}),
    );
    assert_eq!(code, 200);
    let (code, v) = env.unary(
        "filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": id}),
    );
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));
    let (code, v) = env.unary(
        "filesystem.Filesystem/CreateWatcher",
        json!({"path": format!("{root}/nope")}),
    );
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")), "{v}");

    // A WatchDir's Connect-Timeout-Ms ends it with deadline_exceeded.
    let mut w = env.stream(
        "filesystem.Filesystem/WatchDir",
        json!({"path": root}),
        &[("connect-timeout-ms", "300".into())],
    );
    assert_eq!(w.data(), json!({"start": {}}));
    assert_eq!(w.end_code(), "deadline_exceeded");
    env.done();
}

#[test]
fn idle_streams_get_keepalives_and_a_reader_that_stops_is_dropped_not_the_process() {
    let Some(env) = Env::start() else { return };
    // Keepalive-Ping-Interval: 1 s of silence gets a keepalive event.
    let mut s = env.stream(
        "process.Process/Start",
        start_msg("sleep 2.5; echo done"),
        &[("keepalive-ping-interval", "1".into())],
    );
    s.data();
    let ka = s.data();
    assert_eq!(ka, json!({"event": {"keepalive": {}}}));
    let (out, _, end, _) = s.collect();
    assert_eq!(out, "done\n");
    assert_eq!(end.unwrap()["exitCode"], 0);

    // A client that reads nothing while the process writes 64 MiB: the
    // process still runs to its end (its output is not held for the client),
    // and the stream, once read, ends resource_exhausted.
    let marker = env.scratch.join("finished");
    let s = env.stream(
        "process.Process/Start",
        start_msg(&format!(
            "head -c 67108864 /dev/zero; touch {}",
            marker.display()
        )),
        &[],
    );
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the process is held back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_no_processes();
    let mut s = s;
    assert!(s.data()["event"]["start"]["pid"].is_u64());
    let (_, _, end, last) = s.collect();
    assert!(end.is_none());
    assert_eq!(last["error"]["code"], "resource_exhausted", "{last}");
    env.done();
}
