//! The E2B control plane (`server/e2b/control`) over real HTTP, with the
//! headers and bodies the official SDK sends (docs/e2b.md,
//! /work/shared/E2B-PROTOCOL.md §2): sandboxes are VMs of the Firecracker
//! double whose agent is the real `agentenv-guest` running on the host
//! (`common::start_with_agent`), so a template's `wait_ready` create works.
//!
//! Who may call: a token of the tokens file as `X-API-KEY`; a `user`
//! token sees only its own sandboxes and snapshots (404, the very bytes of
//! an absent id, for the rest). Every error is `{"code","message"}`.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use agentenv_core::config::{Config, E2bTemplate};
use common::{finish, is_real, Daemon, HostAgent, TestDir, TEST_TOKEN};
use serde_json::{json, Value};

const ALICE: &str = "e2b_a11ce00000000000000000000000000000000a";
const BOB: &str = "e2b_b0b0000000000000000000000000000000000b";

/// The headers the SDK (2.63.0) sends on every control-plane request.
const SDK_HEADERS: &[(&str, &str)] = &[
    ("user-agent", "e2b-python-sdk/2.63.0"),
    ("lang", "python"),
    ("lang_version", "3.11.2"),
    ("package_version", "2.63.0"),
    ("publisher", "e2b"),
    ("sdk_runtime", "python"),
    ("system", "Linux"),
];

/// An answer off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Checks the E2B error shape: `{"code": status, "message": "…"}`, JSON.
    fn error(&self, status: u16) -> &str {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(self.body["code"], status, "{self:?}");
        self.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {self:?}"))
    }
}

/// A client of the E2B listener, as the SDK calls it.
struct E2b {
    addr: String,
    key: Option<String>,
}

impl E2b {
    fn new(d: &Daemon, key: &str) -> E2b {
        let base = d.e2b_base.as_ref().expect("the E2B listener is on");
        E2b {
            addr: base.trim_start_matches("http://").to_string(),
            key: Some(key.to_string()),
        }
    }

    fn as_key(&self, key: Option<&str>) -> E2b {
        E2b {
            addr: self.addr.clone(),
            key: key.map(str::to_string),
        }
    }

    /// One request on a new connection; `extra` headers after the SDK's.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.addr);
        for (k, v) in SDK_HEADERS.iter().chain(extra) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(key) = &self.key {
            head.push_str(&format!("x-api-key: {key}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("connection: close\r\n\r\n");
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        if let Some(b) = body {
            s.write_all(b).unwrap();
        }
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        parse(&all)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.send(method, path, bytes.as_deref(), &[])
    }

    /// Milliseconds sandbox `id` has left (its `endAt` from now).
    fn left_ms(&self, id: &str) -> i64 {
        let info = self.call("GET", &format!("/sandboxes/{id}"), None).body;
        ms(&info["endAt"]) - chrono::Utc::now().timestamp_millis()
    }

    /// `POST /sandboxes/{id}/{verb}` with `body`.
    fn post_to(&self, id: &str, verb: &str, body: Value) -> Answer {
        self.call("POST", &format!("/sandboxes/{id}/{verb}"), Some(body))
    }

    /// Status and bytes of each of `routes`.
    fn answers(&self, routes: Vec<(&str, String, Option<Value>)>) -> Vec<(u16, Vec<u8>)> {
        routes
            .into_iter()
            .map(|(m, p, body)| {
                let r = self.call(m, &p, body);
                (r.status, r.raw)
            })
            .collect()
    }

    /// `Sandbox.create()`: 201 and the `Sandbox` JSON.
    fn create(&self, body: Value) -> Value {
        let a = self.call("POST", "/v2/sandboxes", Some(body));
        assert_eq!(a.status, 201, "{a:?}");
        a.body
    }
}

/// Parses an HTTP/1.1 answer (content-length or chunked body).
fn parse(all: &[u8]) -> Answer {
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head");
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = &all[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let raw = if chunked {
        let mut out = Vec::new();
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap();
            rest = &rest[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()))
    };
    Answer {
        status,
        headers,
        raw,
        body,
    }
}

/// The E2B listener on a free port and the `base` template (the test
/// image, booted with `wait_ready`).
fn with_e2b(cfg: &mut Config) {
    cfg.e2b.listen = vec!["127.0.0.1:0".into()];
    cfg.e2b.templates.insert(
        "base".into(),
        E2bTemplate {
            image: "base.ext4".into(),
            slots: None,
            kernel: None,
            initrd: None,
            boot_args: None,
            snapshot: false,
        },
    );
}

/// A daemon with the E2B listener, the `base` template (the test image)
/// and the host agent; `tweak` changes the config further.
fn start(tweak: impl FnOnce(&mut Config)) -> Option<(Daemon, TestDir, HostAgent)> {
    if is_real() {
        agentenv_testkit::skip::skip_optional(
            "a real Firecracker boots no guest here, so no agent answers",
        );
        return None;
    }
    Some(common::start_with_agent(|cfg| {
        with_e2b(cfg);
        tweak(cfg);
    }))
}

fn done(d: Daemon, dir: TestDir, mut agent: HostAgent) {
    agent.stop();
    finish(d, dir);
}

/// Waits until `check` holds (or panics after `timeout`).
fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ms(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

fn ids(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// The SDK's `metadata` list filter: `urlencode({quote(k): quote(v)})`,
/// then url-encoded again as a query value.
fn metadata_query(pairs: &[(&str, &str)]) -> String {
    fn quote(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", quote(&quote(k)), quote(&quote(v))))
        .collect();
    quote(&inner.join("&"))
}

#[test]
fn create_info_list_kill_in_the_sdk_shapes() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    // What 2.63.0 sends by default.
    let s = c.create(json!({"templateID": "base", "metadata": {}, "envVars": {}}));
    let id = s["sandboxID"].as_str().unwrap().to_string();
    assert!(
        id.len() == 20
            && id.starts_with('i')
            && id[1..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{s}"
    );
    assert_eq!(s["templateID"], "base");
    assert_eq!(s["alias"], "base");
    assert_eq!(s["envdVersion"], "0.5.7");
    assert!(s["clientID"].is_string(), "{s}");
    assert!(s["domain"].is_null(), "{s}");
    let token = s["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 40, "{s}");
    // The sandbox is a VM of the caller, with its record (0600) in its session dir.
    let vm = d.engine.get(&id).unwrap();
    assert_eq!(vm.owner.as_deref(), Some(common::TEST_TOKEN_NAME));
    let record = std::path::Path::new(&vm.session_dir).join("e2b.json");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&record).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", record.display());
    }

    // get_info: SandboxDetail; default timeout 300 s.
    let info = c.call("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(info.status, 200, "{info:?}");
    let i = &info.body;
    for key in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
    ] {
        assert!(!i[key].is_null(), "{key} in {i}");
    }
    assert_eq!(i["state"], "running");
    assert_eq!(i["cpuCount"], 1);
    assert_eq!(i["memoryMB"], 128);
    assert_eq!(i["envdAccessToken"], token.as_str());
    assert_eq!(i["lifecycle"]["onTimeout"], "kill");
    assert_eq!(i["metadata"], json!({}));
    let life = ms(&i["endAt"]) - ms(&i["startedAt"]);
    assert!((299_000..=301_000).contains(&life), "{i}");

    // What 2.45.1 sends, on the v1 path, with metadata, envVars and a timeout.
    let v1 = c.call(
        "POST",
        "/sandboxes",
        Some(json!({"templateID": "base", "timeout": 60, "secure": true,
            "allow_internet_access": true, "metadata": {"k": "v"}, "envVars": {"FOO": "bar"}})),
    );
    assert_eq!(v1.status, 201, "{v1:?}");
    let id2 = v1.body["sandboxID"].as_str().unwrap().to_string();
    assert_ne!(id, id2);
    assert_ne!(v1.body["envdAccessToken"], token.as_str());
    let i2 = c.call("GET", &format!("/sandboxes/{id2}"), None).body;
    assert_eq!(i2["metadata"], json!({"k": "v"}));
    let life = ms(&i2["endAt"]) - ms(&i2["startedAt"]);
    assert!((59_000..=61_000).contains(&life), "{i2}");

    // list: both, as ListedSandbox.
    let l = c.call("GET", "/v2/sandboxes", None);
    assert_eq!(l.status, 200, "{l:?}");
    let mut want = vec![id.clone(), id2.clone()];
    want.sort();
    assert_eq!(ids(&l.body), want);
    assert!(l.header("x-next-token").is_none(), "{l:?}");
    assert!(
        l.body[0]["envdAccessToken"].is_null(),
        "a list carries no token"
    );

    // kill: 204, then 404 (the SDK's False), and the VM and its directory are gone.
    let k = c.call("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(k.status, 204, "{k:?}");
    assert!(d.engine.get(&id).is_err());
    assert!(!std::path::Path::new(&vm.session_dir).exists());
    c.call("DELETE", &format!("/sandboxes/{id}"), None)
        .error(404);
    c.call("GET", &format!("/sandboxes/{id}"), None).error(404);
    assert_eq!(
        ids(&c.call("GET", "/v2/sandboxes", None).body),
        vec![id2.clone()]
    );
    assert_eq!(
        c.call("DELETE", &format!("/sandboxes/{id2}"), None).status,
        204
    );
    assert!(d.engine.list().is_empty());
    done(d, dir, agent);
}

#[test]
fn bad_input_answers_e2b_errors_and_leaves_nothing() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let body = br#"{"templateID":"base"}"#.as_slice();
    // Keys: missing, unknown, malformed; Authorization is not a key.
    let m = c
        .as_key(None)
        .send("POST", "/v2/sandboxes", Some(body), &[])
        .error(401)
        .to_string();
    assert!(m.contains("X-API-KEY"), "{m}");
    c.as_key(Some("e2b_0000000000000000000000000000000000000000"))
        .call("GET", "/v2/sandboxes", None)
        .error(401);
    c.as_key(None)
        .send(
            "GET",
            "/v2/sandboxes",
            None,
            &[("authorization", &format!("Bearer {TEST_TOKEN}"))],
        )
        .error(401);
    // The header name's case does not matter; Authorization is ignored.
    let a = c.as_key(None).send(
        "GET",
        "/v2/sandboxes",
        None,
        &[("X-Api-Key", TEST_TOKEN), ("authorization", "Bearer junk")],
    );
    assert_eq!(a.status, 200, "{a:?}");

    // Unknown template: 404.
    let m = c
        .call("POST", "/v2/sandboxes", Some(json!({"templateID": "nope"})))
        .error(404)
        .to_string();
    assert!(m.contains("nope"), "{m}");
    // Bad timeouts: 400 naming `timeout`.
    for t in [json!(0), json!(-1), json!(86_401), json!("x"), json!(1.5)] {
        let a = c.call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "timeout": t})),
        );
        assert!(a.error(400).contains("timeout"), "{t}: {a:?}");
    }
    // Malformed bodies: 400, E2B-shaped.
    for raw in [&b"{"[..], b"[]", b"{\"templateID\": 5}", b"null x"] {
        let a = c.send("POST", "/v2/sandboxes", Some(raw), &[]);
        a.error(400);
    }
    assert!(c
        .call("POST", "/v2/sandboxes", Some(json!({"metadata": {}})))
        .error(400)
        .contains("templateID"));
    assert!(c
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "envVars": {"A=B": "x"}}))
        )
        .error(400)
        .contains("envVars"));
    assert!(c
        .call(
            "POST",
            "/v2/sandboxes",
            Some(json!({"templateID": "base", "metadata": {"k": 1}}))
        )
        .error(400)
        .contains("metadata"));
    assert!(c
        .send(
            "POST",
            "/v2/sandboxes",
            Some(body),
            &[("idempotency-key", "a b")]
        )
        .error(400)
        .contains("Idempotency-Key"));

    // Unknown sandbox: 404 on every route that names one.
    let ghost = "i0000000000000000000";
    for (method, path, body) in [
        ("GET", format!("/sandboxes/{ghost}"), None),
        ("DELETE", format!("/sandboxes/{ghost}"), None),
        (
            "POST",
            format!("/sandboxes/{ghost}/timeout"),
            Some(json!({"timeout": 10})),
        ),
        ("POST", format!("/sandboxes/{ghost}/pause"), Some(json!({}))),
        (
            "POST",
            format!("/v2/sandboxes/{ghost}/connect"),
            Some(json!({})),
        ),
        (
            "POST",
            format!("/sandboxes/{ghost}/connect"),
            Some(json!({"timeout": 300})),
        ),
        (
            "POST",
            format!("/sandboxes/{ghost}/fork"),
            Some(json!({"count": 1})),
        ),
        (
            "POST",
            format!("/sandboxes/{ghost}/snapshots"),
            Some(json!({})),
        ),
        ("GET", format!("/sandboxes/{ghost}/metrics"), None),
        (
            "DELETE",
            "/templates/s0000000000000000000".to_string(),
            None,
        ),
    ] {
        c.call(method, &path, body).error(404);
    }
    // axum's own rejections (a path that is not UTF-8) and the body limit
    // answer in the E2B shape too.
    c.call("GET", "/sandboxes/%FF", None).error(400);
    let huge = format!(
        r#"{{"templateID":"base","metadata":{{"k":"{}"}}}}"#,
        "x".repeat(70_000)
    );
    c.send("POST", "/v2/sandboxes", Some(huge.as_bytes()), &[])
        .error(413);
    // Unknown routes and methods, bad list queries.
    c.call("GET", "/nope", None).error(404);
    c.call("PUT", "/v2/sandboxes", Some(json!({}))).error(405);
    for (q, field) in [
        ("state=dead", "state"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("nextToken=zz", "nextToken"),
        ("order=up", "order"),
        ("startedAfter=yesterday", "startedAfter"),
        ("metadata=%3Dv", "metadata"),
    ] {
        let m = c
            .call("GET", &format!("/v2/sandboxes?{q}"), None)
            .error(400)
            .to_string();
        assert!(m.contains(field), "{q}: {m}");
    }
    // A Host that does not name the daemon: 421, before anything else.
    let a = {
        let mut s = std::net::TcpStream::connect(&c.addr).unwrap();
        write!(
            s,
            "GET /v2/sandboxes HTTP/1.1\r\nhost: evil.example\r\nx-api-key: {TEST_TOKEN}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        parse(&all)
    };
    assert!(a.error(421).contains("evil.example"), "{a:?}");
    assert!(d.engine.list().is_empty(), "nothing was created");
    done(d, dir, agent);
}

#[test]
fn pause_connect_and_timeouts() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let s = c.create(json!({"templateID": "base", "timeout": 100}));
    let id = s["sandboxID"].as_str().unwrap().to_string();
    let token = s["envdAccessToken"].clone();
    let info = |c: &E2b| c.call("GET", &format!("/sandboxes/{id}"), None).body;

    // set_timeout: seconds from now, longer or shorter.
    let a = c.post_to(&id, "timeout", json!({"timeout": 1000}));
    assert_eq!(a.status, 204, "{a:?}");
    let end = c.left_ms(&id);
    assert!((990_000..=1_000_500).contains(&end), "{end}");
    c.post_to(&id, "timeout", json!({"timeout": 50}));
    let end = c.left_ms(&id);
    assert!((45_000..=50_500).contains(&end), "{end}");
    assert!(c
        .call("POST", &format!("/sandboxes/{id}/timeout"), Some(json!({})))
        .error(400)
        .contains("timeout"));
    assert!(c
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 0}))
        )
        .error(400)
        .contains("timeout"));

    // pause: 204, then 409 (the SDK's False); the VM is paused.
    assert_eq!(c.post_to(&id, "pause", json!({})).status, 204);
    assert_eq!(info(&c)["state"], "paused");
    assert_eq!(
        d.engine.get(&id).unwrap().state,
        agentenv_api::VmState::Paused
    );
    c.post_to(&id, "pause", json!({})).error(409);
    let paused = c.call("GET", "/v2/sandboxes?state=paused", None).body;
    assert_eq!(ids(&paused), vec![id.clone()]);
    assert_eq!(
        ids(&c.call("GET", "/v2/sandboxes?state=running", None).body),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&c
            .call("GET", "/v2/sandboxes?state=running,paused", None)
            .body),
        vec![id.clone()]
    );

    // connect resumes (201) with the same token and a fresh deadline; on a
    // running sandbox it is 200 and only extends.
    let a = c.call(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 200})),
    );
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["envdAccessToken"], token);
    assert_eq!(a.body["sandboxID"], id.as_str());
    assert_eq!(info(&c)["state"], "running");
    let end = c.left_ms(&id);
    assert!((195_000..=200_500).contains(&end), "{end}");
    let a = c.send("POST", &format!("/v2/sandboxes/{id}/connect"), None, &[]);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["envdAccessToken"], token);
    // v1 connect (2.45.1 always sends 300): extends, never shortens.
    let a = c.post_to(&id, "connect", json!({"timeout": 300}));
    assert_eq!(a.status, 200, "{a:?}");
    let end = c.left_ms(&id);
    assert!((295_000..=300_500).contains(&end), "{end}");
    c.post_to(&id, "connect", json!({"timeout": 10}));
    let end = c.left_ms(&id);
    assert!(end > 290_000, "{end}");
    assert!(c
        .call(
            "POST",
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": -5}))
        )
        .error(400)
        .contains("timeout"));
    assert_eq!(
        c.call("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    done(d, dir, agent);
}

#[test]
fn deadlines_kill_or_pause_and_survive_a_restart() {
    let Some((d, dir, mut agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let killed = c.create(json!({"templateID": "base", "timeout": 1}));
    let killed = killed["sandboxID"].as_str().unwrap().to_string();
    let paused = c.create(json!({"templateID": "base", "timeout": 1, "autoPause": true}));
    let paused = paused["sandboxID"].as_str().unwrap().to_string();
    let shortened = c.create(json!({"templateID": "base", "timeout": 3600}));
    let shortened = shortened["sandboxID"].as_str().unwrap().to_string();
    let info = c.call("GET", &format!("/sandboxes/{paused}"), None).body;
    assert_eq!(info["lifecycle"]["onTimeout"], "pause");
    c.post_to(&shortened, "timeout", json!({"timeout": 1}));
    let session = d.engine.get(&killed).unwrap().session_dir;

    eventually(
        "the expired sandboxes are killed",
        Duration::from_secs(15),
        || d.engine.get(&killed).is_err() && d.engine.get(&shortened).is_err(),
    );
    assert!(!std::path::Path::new(&session).exists());
    c.call("GET", &format!("/sandboxes/{killed}"), None)
        .error(404);
    c.call("GET", &format!("/sandboxes/{shortened}"), None)
        .error(404);
    eventually(
        "the autoPause sandbox is paused",
        Duration::from_secs(15),
        || c.call("GET", &format!("/sandboxes/{paused}"), None).body["state"] == "paused",
    );
    // Paused, it does not expire; connect resumes it with a new deadline.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        c.call("GET", &format!("/sandboxes/{paused}"), None).body["state"],
        "paused"
    );
    let a = c.call(
        "POST",
        &format!("/v2/sandboxes/{paused}/connect"),
        Some(json!({"timeout": 2})),
    );
    assert_eq!(a.status, 201, "{a:?}");
    c.post_to(&paused, "timeout", json!({"timeout": 3600}));

    // A restarted daemon re-arms the deadlines in the records.
    let later = c.create(json!({"templateID": "base", "timeout": 4}));
    let later = later["sandboxID"].as_str().unwrap().to_string();
    let cfg = d.cfg.clone();
    d.crash();
    let d = Daemon::start_with(cfg, dir.path());
    let c = E2b::new(&d, TEST_TOKEN);
    assert_eq!(
        c.call("GET", &format!("/sandboxes/{paused}"), None).status,
        200
    );
    assert_eq!(
        c.call("GET", &format!("/sandboxes/{later}"), None).status,
        200
    );
    eventually(
        "the re-armed deadline fires",
        Duration::from_secs(20),
        || d.engine.get(&later).is_err(),
    );
    c.call("GET", &format!("/sandboxes/{later}"), None)
        .error(404);
    assert_eq!(
        c.call("DELETE", &format!("/sandboxes/{paused}"), None)
            .status,
        204
    );
    assert!(d.engine.list().is_empty());
    agent.stop();
    finish(d, dir);
}

#[test]
fn idempotency_key_gives_the_same_sandbox_once() {
    let Some((d, dir, agent)) = start(|cfg| {
        common::write_tokens(
            &cfg.auth.tokens_file,
            &[
                (common::TEST_TOKEN_NAME, "admin", TEST_TOKEN),
                ("alice", "user", ALICE),
            ],
        );
    }) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let body = br#"{"templateID":"base","metadata":{},"envVars":{}}"#;
    let key = [("idempotency-key", "k-1")];
    let first = c.send("POST", "/v2/sandboxes", Some(body), &key);
    assert_eq!(first.status, 201, "{first:?}");
    let again = c.send("POST", "/v2/sandboxes", Some(body), &key);
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(d.engine.list().len(), 1);

    // Concurrent duplicates: one sandbox, both answers name it.
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let c = c.as_key(Some(TEST_TOKEN));
            std::thread::spawn(move || {
                c.send(
                    "POST",
                    "/v2/sandboxes",
                    Some(body),
                    &[("idempotency-key", "k-2")],
                )
            })
        })
        .collect();
    let answers: Vec<Answer> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for a in &answers {
        assert_eq!(a.status, 201, "{a:?}");
        assert_eq!(a.body["sandboxID"], answers[0].body["sandboxID"]);
    }
    assert_ne!(answers[0].body["sandboxID"], first.body["sandboxID"]);
    assert_eq!(d.engine.list().len(), 2);
    // The same key of another caller is another sandbox.
    let alice = c
        .as_key(Some(ALICE))
        .send("POST", "/v2/sandboxes", Some(body), &key);
    assert_eq!(alice.status, 201, "{alice:?}");
    assert_ne!(alice.body["sandboxID"], first.body["sandboxID"]);
    assert_eq!(d.engine.list().len(), 3);
    // A failed create is not remembered: the retry creates.
    let bad = c.send(
        "POST",
        "/v2/sandboxes",
        Some(br#"{"templateID":"nope"}"#),
        &[("idempotency-key", "k-3")],
    );
    bad.error(404);
    let retry = c.send(
        "POST",
        "/v2/sandboxes",
        Some(body),
        &[("idempotency-key", "k-3")],
    );
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(d.engine.list().len(), 4);

    // The key is kept in the sandbox's record: after a daemon restart a
    // retry still answers the first sandbox, and creates nothing.
    let cfg = d.cfg.clone();
    d.crash();
    let d = Daemon::start_with(cfg, dir.path());
    let c = E2b::new(&d, TEST_TOKEN);
    let after = c.send("POST", "/v2/sandboxes", Some(body), &key);
    assert_eq!(after.status, 201, "{after:?}");
    assert_eq!(after.body, first.body);
    assert_eq!(d.engine.list().len(), 4);
    done(d, dir, agent);
}

/// A sandbox whose VM ended by itself (powered off, crashed, OOM-killed) is
/// over: E2B has no stopped sandbox. It is not found, not listed, and its VM
/// is deleted; the others stay.
#[test]
fn a_sandbox_whose_vm_ended_is_gone_and_its_vm_deleted() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let body = json!({"templateID": "base", "metadata": {}, "envVars": {}});
    let ended = c.create(body.clone())["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let other = c.create(body.clone())["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let also_ended = c.create(body)["sandboxID"].as_str().unwrap().to_string();
    // The guests power off (as a shutdown through the native API makes them).
    for id in [&ended, &also_ended] {
        let (code, v) = d.call("POST", &format!("/v1/vm/{id}/shutdown"), None);
        assert_eq!((code, v["state"].as_str()), (200, Some("stopped")), "{v}");
    }
    // Seen through get_info: not found, at once.
    c.call("GET", &format!("/sandboxes/{ended}"), None)
        .error(404);
    // Seen through the list: only the live one is listed.
    let list = c.call("GET", "/v2/sandboxes", None);
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(ids(&list.body), vec![other.clone()]);
    // Both ended VMs are deleted (with their session directories); the
    // live sandbox is untouched.
    eventually(
        "the ended sandboxes' vms deleted",
        Duration::from_secs(10),
        || d.engine.get(&ended).is_err() && d.engine.get(&also_ended).is_err(),
    );
    c.call("GET", &format!("/sandboxes/{also_ended}"), None)
        .error(404);
    let live = c.call("GET", &format!("/sandboxes/{other}"), None);
    assert_eq!(
        (live.status, live.body["state"].as_str()),
        (200, Some("running")),
        "{live:?}"
    );
    done(d, dir, agent);
}

#[test]
fn list_filters_and_pages() {
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let mut made = Vec::new();
    for (i, meta) in [
        json!({"team": "a", "user id": "x&y=z w"}),
        json!({"team": "a"}),
        json!({"team": "b"}),
    ]
    .into_iter()
    .enumerate()
    {
        let s = c.create(json!({"templateID": "base", "metadata": meta}));
        made.push(s["sandboxID"].as_str().unwrap().to_string());
        if i < 2 {
            // Distinct start times for a stable order.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let q = |query: &str| c.call("GET", &format!("/v2/sandboxes?{query}"), None);
    let mut want = vec![made[0].clone(), made[1].clone()];
    want.sort();
    assert_eq!(
        ids(&q(&format!("metadata={}", metadata_query(&[("team", "a")]))).body),
        want
    );
    assert_eq!(
        ids(&q(&format!(
            "metadata={}",
            metadata_query(&[("team", "a"), ("user id", "x&y=z w")])
        ))
        .body),
        vec![made[0].clone()]
    );
    assert_eq!(
        ids(&q(&format!("metadata={}", metadata_query(&[("team", "c")]))).body),
        Vec::<String>::new()
    );
    assert_eq!(ids(&q("template=base").body).len(), 3);
    assert_eq!(ids(&q("template=other").body).len(), 0);

    // Pages of 2, oldest first; then newest first.
    let p1 = q("limit=2");
    let order: Vec<&str> = p1
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(order, [made[0].as_str(), made[1].as_str()]);
    let token = p1.header("x-next-token").expect("a next page").to_string();
    let p2 = q(&format!("limit=2&nextToken={token}"));
    assert_eq!(ids(&p2.body), vec![made[2].clone()]);
    assert!(p2.header("x-next-token").is_none(), "{p2:?}");
    let desc = q("order=desc&limit=1");
    assert_eq!(desc.body[0]["sandboxID"], made[2].as_str());
    let after = desc.header("x-next-token").unwrap().to_string();
    assert_eq!(
        q(&format!("order=desc&limit=5&nextToken={after}"))
            .body
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let first_start =
        c.call("GET", &format!("/sandboxes/{}", made[0]), None).body["startedAt"].clone();
    let started = first_start.as_str().unwrap().replace('Z', "%2B00:00");
    assert_eq!(ids(&q(&format!("startedAfter={started}")).body).len(), 2);
    for id in &made {
        assert_eq!(
            c.call("DELETE", &format!("/sandboxes/{id}"), None).status,
            204
        );
    }
    done(d, dir, agent);
}

#[test]
fn a_user_token_sees_only_its_own() {
    let Some((d, dir, agent)) = start(|cfg| {
        common::write_tokens(
            &cfg.auth.tokens_file,
            &[
                (common::TEST_TOKEN_NAME, "admin", TEST_TOKEN),
                ("alice", "user", ALICE),
                ("bob", "user", BOB),
            ],
        );
    }) else {
        return;
    };
    let admin = E2b::new(&d, TEST_TOKEN);
    let alice = admin.as_key(Some(ALICE));
    let bob = admin.as_key(Some(BOB));
    let a = alice.create(json!({"templateID": "base"}))["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let b = bob.create(json!({"templateID": "base"}))["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let snap = alice.call(
        "POST",
        &format!("/sandboxes/{a}/snapshots"),
        Some(json!({"name": "mine"})),
    );
    assert_eq!(snap.status, 201, "{snap:?}");
    let snap_id = snap.body["snapshotID"].as_str().unwrap().to_string();

    assert_eq!(
        ids(&alice.call("GET", "/v2/sandboxes", None).body),
        vec![a.clone()]
    );
    assert_eq!(
        ids(&bob.call("GET", "/v2/sandboxes", None).body),
        vec![b.clone()]
    );
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(ids(&admin.call("GET", "/v2/sandboxes", None).body), both);
    assert_eq!(bob.call("GET", "/snapshots", None).body, json!([]));
    assert_eq!(
        alice
            .call("GET", "/snapshots", None)
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Everything bob tries on alice's sandbox and snapshot: 404, the same
    // bytes an absent id gets.
    let routes = |id: &str| -> Vec<(&'static str, String, Option<Value>)> {
        vec![
            ("GET", format!("/sandboxes/{id}"), None),
            (
                "POST",
                format!("/sandboxes/{id}/timeout"),
                Some(json!({"timeout": 10})),
            ),
            ("POST", format!("/sandboxes/{id}/pause"), Some(json!({}))),
            (
                "POST",
                format!("/v2/sandboxes/{id}/connect"),
                Some(json!({})),
            ),
            ("POST", format!("/sandboxes/{id}/fork"), Some(json!({}))),
            (
                "POST",
                format!("/sandboxes/{id}/snapshots"),
                Some(json!({})),
            ),
            ("GET", format!("/sandboxes/{id}/metrics"), None),
            ("DELETE", format!("/sandboxes/{id}"), None),
        ]
    };
    let as_bob = bob.answers(routes(&a));
    let bob_template = bob.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": snap_id})),
    );
    let bob_delete = bob.call("DELETE", &format!("/templates/{snap_id}"), None);
    assert_eq!(d.engine.list().len(), 2, "bob made and broke nothing");
    assert_eq!(
        alice.call("GET", &format!("/sandboxes/{a}"), None).body["state"],
        "running"
    );
    // Now make them absent and ask again, as alice.
    assert_eq!(
        alice
            .call("DELETE", &format!("/templates/{snap_id}"), None)
            .status,
        204
    );
    assert_eq!(
        alice
            .call("DELETE", &format!("/sandboxes/{a}"), None)
            .status,
        204
    );
    let absent = alice.answers(routes(&a));
    assert_eq!(as_bob, absent);
    assert!(as_bob.iter().all(|(s, _)| *s == 404));
    let t = alice.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": snap_id})),
    );
    assert_eq!((bob_template.status, &bob_template.raw), (t.status, &t.raw));
    let t = alice.call("DELETE", &format!("/templates/{snap_id}"), None);
    assert_eq!((bob_delete.status, &bob_delete.raw), (t.status, &t.raw));
    assert_eq!(
        bob.call("DELETE", &format!("/sandboxes/{b}"), None).status,
        204
    );
    done(d, dir, agent);
}

#[test]
fn metrics_fork_and_snapshots() {
    let Some((d, dir, agent)) = start(|cfg| cfg.agent.ready_timeout_s = 2) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let s = c.create(json!({"templateID": "base", "metadata": {"k": "v"}, "envVars": {"A": "1"}}));
    let id = s["sandboxID"].as_str().unwrap().to_string();

    // metrics: one sample with every field the SDK parses.
    let m = c.call(
        "GET",
        &format!("/sandboxes/{id}/metrics?start=0&end=9999999999"),
        None,
    );
    assert_eq!(m.status, 200, "{m:?}");
    let sample = &m.body[0];
    for key in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!sample[key].is_null(), "{key} in {sample}");
    }
    assert_eq!(sample["cpuCount"], 1);
    assert_eq!(sample["memTotal"], 128u64 << 20);
    assert_eq!(sample["diskTotal"], 1u64 << 30);
    let pct = sample["cpuUsedPct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{sample}");

    // fork: count 1-20.
    for bad in [
        json!({"count": 0}),
        json!({"count": 21}),
        json!({"count": "x"}),
    ] {
        assert!(c.post_to(&id, "fork", bad).error(400).contains("count"));
    }
    // The double's clones never become ready (the host agent refuses to
    // take a restored VM's identity), so here each fork is an `error`
    // entry (504 after agent.ready_timeout_s) and leaves no VM; forks that
    // answer are checked on real guests (`forks_and_snapshot_templates_*`).
    let f = c.post_to(&id, "fork", json!({"count": 2}));
    assert_eq!(f.status, 201, "{f:?}");
    let entries = f.body.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{f:?}");
    for e in entries {
        assert_eq!(e["error"]["code"], 504, "{f:?}");
        assert!(e["sandbox"].is_null(), "{f:?}");
    }
    assert_eq!(
        ids(&c.call("GET", "/v2/sandboxes", None).body),
        vec![id.clone()]
    );
    eventually(
        "the unready clones are gone",
        Duration::from_secs(10),
        || d.engine.list().len() == 1,
    );

    // snapshots: full ones, listed, filtered, in pages.
    assert!(c
        .post_to(&id, "snapshots", json!({"name": "bad name"}))
        .error(400)
        .contains("name"));
    let snap = snapshot(&c, &id, Some("my-snap"));
    let unnamed = c.post_to(&id, "snapshots", json!({}));
    assert_eq!(unnamed.status, 201, "{unnamed:?}");
    assert_eq!(unnamed.body["names"], json!([]));
    let unnamed = unnamed.body["snapshotID"].as_str().unwrap().to_string();
    let l = c.call("GET", "/snapshots", None);
    assert_eq!(l.body.as_array().unwrap().len(), 2, "{l:?}");
    let l = c.call("GET", "/snapshots?name=my-snap", None);
    assert_eq!(l.body, json!([{"snapshotID": snap, "names": ["my-snap"]}]));
    let l = c.call("GET", &format!("/snapshots?sandboxID={id}&limit=1"), None);
    assert_eq!(l.body.as_array().unwrap().len(), 1);
    let next = l.header("x-next-token").expect("a second page").to_string();
    let l2 = c.call(
        "GET",
        &format!("/snapshots?sandboxID={id}&limit=1&nextToken={next}"),
        None,
    );
    assert_eq!(l2.body.as_array().unwrap().len(), 1);
    assert_ne!(l2.body[0], l.body[0]);
    assert!(l2.header("x-next-token").is_none(), "{l2:?}");
    assert_eq!(
        c.call("GET", "/snapshots?sandboxID=other", None).body,
        json!([])
    );
    // A create from it restores (here: never ready, so 504 and no VM).
    c.call(
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "my-snap"})),
    )
    .error(504);
    assert_eq!(d.engine.list().len(), 1);
    delete_snapshots(&c, &d, &[&snap, &unnamed]);
    assert_eq!(
        c.call("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    done(d, dir, agent);
}

/// Takes a snapshot of sandbox `id` named `name`: its id.
fn snapshot(c: &E2b, id: &str, name: Option<&str>) -> String {
    let body = match name {
        Some(n) => json!({ "name": n }),
        None => json!({}),
    };
    let sn = c.post_to(id, "snapshots", body);
    assert_eq!(sn.status, 201, "{sn:?}");
    let snap = sn.body["snapshotID"].as_str().unwrap().to_string();
    assert!(snap.starts_with('s') && snap.len() == 20, "{sn:?}");
    assert_eq!(
        sn.body["names"],
        json!(name.into_iter().collect::<Vec<_>>())
    );
    snap
}

/// delete_snapshot of each: 204, then 404 (the SDK's False); a create from
/// it is then 404 too, and the registry file is gone with the last one.
fn delete_snapshots(c: &E2b, d: &Daemon, snaps: &[&str]) {
    for sid in snaps {
        let a = c.call("DELETE", &format!("/templates/{sid}"), None);
        assert_eq!(a.status, 204, "{a:?}");
        c.call("DELETE", &format!("/templates/{sid}"), None)
            .error(404);
        c.call("POST", "/v2/sandboxes", Some(json!({"templateID": sid})))
            .error(404);
    }
    assert_eq!(c.call("GET", "/snapshots", None).body, json!([]));
    assert!(!d.cfg.session_root.join(".e2b-snapshots.json").exists());
}

/// Real QEMU guests (the artifacts' kernel and `minimal.ext4`): a fork's
/// sandboxes and a create from an E2B snapshot answer once their agents
/// do (the SDK's first envd call comes at once), each with its own token,
/// the source's template, metadata and envVars.
#[test]
fn forks_and_snapshot_templates_give_ready_sandboxes_on_real_guests() {
    let art = need_artifacts!();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut dir = TestDir::new();
    let mut cfg = Config {
        request_timeout_ms: 20_000,
        tmpfs_snapshot_root: shm.path().join("tier"),
        guest_memory_root: Some(shm.path().join("ram")),
        ..common::qemu_config(&dir, &art)
    };
    cfg.agent.ready_timeout_s = common::GUEST_BOOT_TIMEOUT.as_secs();
    with_e2b(&mut cfg);
    cfg.e2b.templates.get_mut("base").unwrap().image = "minimal.ext4".into();
    for p in [&cfg.tmpfs_snapshot_root, &cfg.guest_memory_dir()] {
        std::fs::create_dir_all(p).unwrap();
    }
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let c = E2b::new(&d, TEST_TOKEN);
    let s = c.create(json!({"templateID": "base", "metadata": {"k": "v"}, "envVars": {"A": "1"}}));
    let id = s["sandboxID"].as_str().unwrap().to_string();
    assert!(d.engine.get(&id).unwrap().ready);

    let f = c.post_to(&id, "fork", json!({"count": 2, "timeout": 120}));
    assert_eq!(f.status, 201, "{f:?}");
    let forks: Vec<String> = f
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["sandbox"]["sandboxID"]
                .as_str()
                .unwrap_or_else(|| panic!("{f:?}"))
                .to_string()
        })
        .collect();
    assert_eq!(forks.len(), 2, "{f:?}");
    let mut tokens = std::collections::BTreeSet::new();
    tokens.insert(s["envdAccessToken"].as_str().unwrap().to_string());
    for (fork, fid) in f.body.as_array().unwrap().iter().zip(&forks) {
        let fork = &fork["sandbox"];
        assert_eq!(fork["templateID"], "base");
        assert!(tokens.insert(fork["envdAccessToken"].as_str().unwrap().to_string()));
        assert!(
            d.engine.get(fid).unwrap().ready,
            "a fork answers once its agent does"
        );
        let i = c.call("GET", &format!("/sandboxes/{fid}"), None).body;
        assert_eq!(i["metadata"], json!({"k": "v"}));
        assert_eq!(i["state"], "running");
        assert!((100_000..=120_500).contains(&c.left_ms(fid)), "{i}");
    }

    let snap = snapshot(&c, &id, Some("my-snap"));
    for template in [snap.as_str(), "my-snap"] {
        let r = c.create(json!({"templateID": template, "envVars": {"B": "2"}}));
        let rid = r["sandboxID"].as_str().unwrap();
        assert_eq!(r["templateID"], template);
        let vm = d.engine.get(rid).unwrap();
        assert_eq!(vm.restored_from.as_deref(), Some(snap.as_str()), "{vm:?}");
        assert!(vm.ready, "a restore answers once its agent does: {vm:?}");
        let record = d.engine.config().session_root.join(rid).join("e2b.json");
        let record: Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        assert_eq!(
            record["envVars"],
            json!({"A": "1", "B": "2"}),
            "the snapshot's envVars, then the create's"
        );
        assert_eq!(
            c.call("DELETE", &format!("/sandboxes/{rid}"), None).status,
            204
        );
    }
    delete_snapshots(&c, &d, &[&snap]);
    for s in forks.iter().chain([&id]) {
        assert_eq!(
            c.call("DELETE", &format!("/sandboxes/{s}"), None).status,
            204
        );
    }
    finish(d, dir);
    let mut left = Vec::new();
    let mut stack = vec![shm.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                left.push(e.path());
            }
        }
    }
    assert!(left.is_empty(), "left in the tmpfs tier: {left:?}");
}

#[test]
fn mutating_calls_leave_audit_lines() {
    let lines = common::audit_lines();
    let Some((d, dir, agent)) = start(|_| {}) else {
        return;
    };
    let c = E2b::new(&d, TEST_TOKEN);
    let id = c.create(json!({"templateID": "base"}))["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    c.post_to(&id, "pause", json!({}));
    c.call("GET", &format!("/sandboxes/{id}"), None);
    c.as_key(Some("e2b_ffffffffffffffffffffffffffffffffffffffff"))
        .call("DELETE", &format!("/sandboxes/{id}"), None)
        .error(401);
    assert_eq!(
        c.call("DELETE", &format!("/sandboxes/{id}"), None).status,
        204
    );
    let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&id)).collect();
    let want = [
        (common::TEST_TOKEN_NAME, "POST /v2/sandboxes", 201),
        (
            common::TEST_TOKEN_NAME,
            &format!("POST /sandboxes/{id}/pause"),
            204,
        ),
        ("-", &format!("DELETE /sandboxes/{id}"), 401),
        (
            common::TEST_TOKEN_NAME,
            &format!("DELETE /sandboxes/{id}"),
            204,
        ),
    ];
    assert_eq!(mine.len(), want.len(), "reads are not audited: {mine:#?}");
    for (line, (who, request, status)) in mine.iter().zip(want) {
        for part in [
            format!("principal={who}"),
            format!("request={request}"),
            format!("target=vm={id}"),
            format!("status={status}"),
        ] {
            assert!(line.contains(&part), "{part} in {line}");
        }
    }
    done(d, dir, agent);
}

#[test]
fn a_create_that_fails_late_leaves_no_vm() {
    // No agent answers: the template's wait_ready times out (504) after
    // the VM was made; the E2B create deletes it (the native API keeps it).
    let mut dir = TestDir::new();
    dir.baseline = Some(common::baseline(dir.path()));
    let mut cfg = dir.config();
    cfg.agent.ready_timeout_s = 1;
    with_e2b(&mut cfg);
    let d = Daemon::start_with(cfg, dir.path());
    let c = E2b::new(&d, TEST_TOKEN);
    let a = c.send(
        "POST",
        "/v2/sandboxes",
        Some(br#"{"templateID":"base"}"#),
        &[("idempotency-key", "late")],
    );
    a.error(504);
    assert!(d.engine.list().is_empty(), "{:?}", d.engine.list());
    assert_eq!(c.call("GET", "/v2/sandboxes", None).body, json!([]));
    finish(d, dir);
}
