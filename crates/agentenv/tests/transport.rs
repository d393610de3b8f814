//! Transports and cross-site refusals (issue 14): Unix-socket listeners (mode,
//! group, peer uid, another uid refused), HTTPS and mTLS with a CA made here,
//! TLS startup errors, 415 / 421 / no CORS, the loopback rule of
//! `auth.mode = "none"`, and the mode of every file and directory the daemon
//! makes over a whole VM life.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentenv_client::{ApiClient, TlsOptions};
use agentenv_core::config::{AuthMode, Config, TlsConfig};
use common::{finish, Daemon, TestDir};
use serde_json::json;

/// What the daemon logs in this test process.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&log().lock().unwrap()).contains(needle)
}

fn wait_logged(needle: &str) {
    let start = std::time::Instant::now();
    while !logged(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never logged {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A directory others may traverse (a TestDir is 0700), for sockets another
/// uid must be able to reach.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("ae-sock")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

/// `curl` over the Unix socket as `uid`/`gid`: its HTTP status, or its error.
fn curl_as(uid: u32, gid: u32, sock: &Path) -> Result<u16, String> {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(sock)
        .arg("http://localhost/v1/health")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("curl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_unix_socket_is_0660_in_its_group_and_its_peer_is_known() {
    log();
    let dir = TestDir::new();
    let socks = open_dir();
    let sock = socks.path().join("api.sock");
    let mut cfg = dir.config();
    cfg.http.socket_group = Some("nogroup".into());
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("the test host has a group nogroup")
        .gid
        .as_raw();
    // A stale socket from a dead daemon is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (d, bases) = Daemon::start_listening(
        cfg.clone(),
        dir.path(),
        &[&format!("unix:{}", sock.display())],
    )
    .unwrap();
    assert_eq!(bases, [format!("unix:{}", sock.display())]);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(meta.gid(), nogroup);

    // Requests work over it with no token; the peer's uid is logged.
    let c = ApiClient::new(&d.base).unwrap();
    assert_eq!(c.health().unwrap().status, "ok");
    d.create_ok("u1");
    wait_logged(&format!("connection on unix:{} from uid 0", sock.display()));

    // A member of the socket's group gets in; another uid does not.
    assert_eq!(curl_as(65534, nogroup, &sock), Ok(200));
    wait_logged(&format!(
        "connection on unix:{} from uid 65534",
        sock.display()
    ));
    let refused = curl_as(65534, 12345, &sock).unwrap_err();
    assert!(
        refused.contains("Permission denied") || refused.contains("Couldn't connect"),
        "{refused}"
    );

    // A second daemon on the same (live) socket is refused, and leaves it be.
    let e = Daemon::start_listening(cfg, dir.path(), &[&format!("unix:{}", sock.display())])
        .err()
        .expect("a live socket is an error");
    assert!(
        e.contains("already answers") && e.contains("api.sock"),
        "{e}"
    );
    assert_eq!(c.health().unwrap().status, "ok");

    // A clean stop removes the socket.
    finish(d, dir);
    assert!(!sock.exists(), "the socket file outlived the daemon");
}

#[test]
fn socket_paths_and_groups_that_cannot_be_used_are_named() {
    let dir = TestDir::new();
    let socks = open_dir();
    let file = socks.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let mut cases = 0;
    let e = Daemon::start_listening(
        dir.config(),
        dir.path(),
        &[&format!("unix:{}", file.display())],
    )
    .err()
    .unwrap();
    assert!(
        e.contains("not a socket") && e.contains("not-a-socket"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    cases += 1;
    let mut cfg = dir.config();
    cfg.http.socket_group = Some("no-such-group-ae".into());
    let sock = socks.path().join("g.sock");
    let e = Daemon::start_listening(cfg, dir.path(), &[&format!("unix:{}", sock.display())])
        .err()
        .unwrap();
    assert!(
        e.contains("http.socket_group") && e.contains("no-such-group-ae"),
        "{e}"
    );
    assert!(!sock.exists(), "nothing is left behind");
    cases += 1;
    for bad in ["unix:relative.sock", "localhost:80"] {
        let e = Daemon::start_listening(dir.config(), dir.path(), &[bad])
            .err()
            .unwrap();
        assert!(e.contains(bad), "{e}");
        cases += 1;
    }
    println!("fault cases: {cases}");
}

#[test]
fn auth_none_allows_only_loopback_and_unix_listeners() {
    let dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.auth.mode = AuthMode::None;
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let e = Daemon::start_listening(cfg.clone(), dir.path(), &["127.0.0.1:0", addr])
            .err()
            .expect("a non-loopback listener is refused");
        assert!(
            e.contains("auth.mode") && e.contains(&addr.replace(":0", "")),
            "{e}"
        );
    }
    let socks = open_dir();
    let sock = socks.path().join("none.sock");
    let (d, bases) = Daemon::start_listening(
        cfg,
        dir.path(),
        &["127.0.0.1:0", &format!("unix:{}", sock.display())],
    )
    .unwrap();
    // One daemon, both listeners.
    for base in &bases {
        assert_eq!(
            ApiClient::new(base).unwrap().health().unwrap().status,
            "ok",
            "{base}"
        );
    }
    finish(d, dir);
}

/// A CA, and certificates it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names` with subject CN `cn`: (cert PEM, key PEM).
    fn issue(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }
}

/// A test directory with an empty `pki/` for certificates.
fn dir_with_pki() -> (TestDir, PathBuf) {
    let dir = TestDir::new();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    (dir, pki)
}

fn write_pair(dir: &Path, name: &str, (cert, key): (String, String)) -> (PathBuf, PathBuf) {
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A daemon on a Unix socket (its `base`, for the harness) and TCP with TLS;
/// returns it and the `https://` address.
fn tls_daemon(
    dir: &TestDir,
    (cert, key): (PathBuf, PathBuf),
    client_ca: Option<PathBuf>,
) -> (Daemon, String) {
    let mut cfg = dir.config();
    cfg.tls = TlsConfig {
        cert_file: Some(cert),
        key_file: Some(key),
        client_ca_file: client_ca,
    };
    let sock = dir.path().join("tls.sock");
    let (d, bases) = Daemon::start_listening(
        cfg,
        dir.path(),
        &[&format!("unix:{}", sock.display()), "127.0.0.1:0"],
    )
    .unwrap();
    let https = bases[1].clone();
    assert!(https.starts_with("https://127.0.0.1:"), "{https}");
    (d, https)
}

fn tls_client(https: &str, cacert: &Path, pair: Option<&(PathBuf, PathBuf)>) -> ApiClient {
    let opts = TlsOptions {
        cacert: Some(cacert.to_path_buf()),
        cert: pair.map(|p| p.0.clone()),
        key: pair.map(|p| p.1.clone()),
    };
    let c = ApiClient::with_tls(https, &opts)
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    // A client certificate is a credential of its own (mTLS); without one,
    // the harness's bearer token.
    match pair {
        Some(_) => c,
        None => c.with_token(common::TEST_TOKEN),
    }
}

#[test]
fn https_with_a_test_ca() {
    let (dir, pki) = dir_with_pki();
    let ca = Ca::new("agentenv test CA");
    let ca_file = ca.write(&pki, "ca.crt");
    let (cert, key) = write_pair(
        &pki,
        "server",
        ca.issue("localhost", &["localhost", "127.0.0.1"], false),
    );
    let (d, https) = tls_daemon(&dir, (cert, key), None);
    let c = tls_client(&https, &ca_file, None);
    assert_eq!(c.health().unwrap().status, "ok");
    let (code, v) = common::send(
        &c,
        agentenv_client::Request::new("POST", "/v1/vm").body(agentenv_client::Body::Bytes(
            &serde_json::to_vec(&common::overlay_req("t1")).unwrap(),
        )),
    );
    assert_eq!(code, 201, "{v}");
    // The same name as a host name.
    let by_name = https.replace("127.0.0.1", "localhost");
    assert_eq!(
        tls_client(&by_name, &ca_file, None)
            .health()
            .unwrap()
            .status,
        "ok"
    );
    // A client trusting another CA refuses the daemon.
    let other = Ca::new("another CA");
    let other_file = other.write(&pki, "other.crt");
    let e = tls_client(&https, &other_file, None)
        .health()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    // Plain HTTP to the TLS port gets no answer.
    let plain = https.replace("https://", "http://");
    assert!(ApiClient::new(&plain)
        .unwrap()
        .with_timeout(Duration::from_secs(10))
        .health()
        .is_err());
    // An https:// server without --cacert is refused by the client itself.
    let e = ApiClient::new(&https).err().unwrap().to_string();
    assert!(e.contains("--cacert"), "{e}");
    d.assert_healthy();
    finish(d, dir);
}

#[test]
fn mtls_needs_a_client_certificate_from_the_configured_ca() {
    log();
    let (dir, pki) = dir_with_pki();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let server_ca_file = server_ca.write(&pki, "server-ca.crt");
    let client_ca_file = client_ca.write(&pki, "client-ca.crt");
    let (cert, key) = write_pair(
        &pki,
        "server",
        server_ca.issue("localhost", &["127.0.0.1"], false),
    );
    let (d, https) = tls_daemon(&dir, (cert, key), Some(client_ca_file));
    let mut cases = 0;
    // No client certificate: the handshake is refused.
    assert!(tls_client(&https, &server_ca_file, None).health().is_err());
    cases += 1;
    // A certificate from another CA (here the server's): refused.
    let stranger = write_pair(&pki, "stranger", server_ca.issue("mallory", &[], true));
    assert!(tls_client(&https, &server_ca_file, Some(&stranger))
        .health()
        .is_err());
    cases += 1;
    wait_logged("TLS handshake with 127.0.0.1:");
    // A good one: in, named by its CN.
    let alice = write_pair(&pki, "alice", client_ca.issue("alice", &[], true));
    let c = tls_client(&https, &server_ca_file, Some(&alice));
    assert_eq!(c.health().unwrap().status, "ok");
    wait_logged("certificate CN \"alice\"");
    // `--cert` without `--key` is the client's own error.
    let e = ApiClient::with_tls(
        &https,
        &TlsOptions {
            cacert: Some(server_ca_file.clone()),
            cert: Some(alice.0.clone()),
            key: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--key"), "{e}");
    cases += 1;
    println!("fault cases: {cases}");
    finish(d, dir);
}

#[test]
fn tls_files_that_cannot_be_used_stop_the_start() {
    let (dir, pki) = dir_with_pki();
    let ca = Ca::new("ca");
    let a = write_pair(&pki, "a", ca.issue("a", &["127.0.0.1"], false));
    let b = write_pair(&pki, "b", ca.issue("b", &["127.0.0.1"], false));
    let junk = pki.join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let empty = pki.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = pki.join("missing.pem");
    let tls = |cert: &Path, key: &Path, ca: Option<&Path>| TlsConfig {
        cert_file: Some(cert.into()),
        key_file: Some(key.into()),
        client_ca_file: ca.map(Path::to_path_buf),
    };
    let cases: Vec<(TlsConfig, &[&str])> = vec![
        (tls(&a.0, &b.1, None), &["does not match", "b.key", "a.crt"]),
        (tls(&missing, &a.1, None), &["tls.cert_file", "missing.pem"]),
        (tls(&a.0, &missing, None), &["tls.key_file", "missing.pem"]),
        (tls(&junk, &a.1, None), &["tls.cert_file", "junk.pem"]),
        (tls(&empty, &a.1, None), &["tls.cert_file", "empty.pem"]),
        (tls(&a.0, &a.0, None), &["tls.key_file", "a.crt"]),
        (
            tls(&a.0, &a.1, Some(&missing)),
            &["tls.client_ca_file", "missing.pem"],
        ),
        (
            tls(&a.0, &a.1, Some(&empty)),
            &["tls.client_ca_file", "empty.pem"],
        ),
    ];
    let socks = open_dir();
    let sock = socks.path().join("t.sock");
    let n = cases.len();
    for (t, words) in cases {
        let mut cfg = dir.config();
        cfg.tls = t;
        let e = Daemon::start_listening(
            cfg,
            dir.path(),
            &[&format!("unix:{}", sock.display()), "127.0.0.1:0"],
        )
        .err()
        .expect("the start fails");
        for w in words {
            assert!(e.contains(w), "{w:?} not in {e}");
        }
        assert!(!sock.exists(), "nothing bound: {e}");
    }
    // Half a pair, in the config file itself.
    let e = Config::parse("[tls]\ncert_file = \"/x.crt\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("tls.key_file"), "{e}");
    let e = Config::parse("[tls]\nclient_ca_file = \"/x.crt\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("tls.client_ca_file"), "{e}");
    println!("fault cases: {}", n + 2);
}

#[test]
fn cross_site_requests_are_refused_before_anything_runs() {
    let dir = TestDir::new();
    let mut cfg = dir.config();
    cfg.http.allowed_hosts = vec!["api.example.test".into()];
    cfg.max_inflight_ops = 1;
    let (d, _) = Daemon::start_listening(cfg, dir.path(), &["127.0.0.1:0"]).unwrap();
    let port = d.base.rsplit(':').next().unwrap().to_string();
    let raw = |head: &str, body: &[u8]| {
        let mut bytes = head.replace("\n", "\r\n").into_bytes();
        bytes.extend_from_slice(body);
        common::raw_http(&d.base, bytes, Duration::from_secs(10))
    };
    let body = serde_json::to_vec(&common::overlay_req("x")).unwrap();
    let mut cases = 0;

    // The issue's simple cross-site POST: 415, nothing created.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=b",
    ] {
        let a = raw(
            &format!("POST /v1/vm HTTP/1.1\nHost: 127.0.0.1:{port}\nOrigin: http://evil.example\nContent-Type: {ct}\nContent-Length: {}\nConnection: close\n\n", body.len()),
            &body,
        );
        assert_eq!(a.status, 415, "{ct}: {:?}", a.body);
        assert_eq!(a.body["field"], "Content-Type", "{:?}", a.body);
        assert!(a.body["error"]
            .as_str()
            .unwrap()
            .contains("application/json"));
        cases += 1;
    }
    // No type at all, and a chunked body: the same.
    let a = raw(
        &format!(
            "POST /v1/vm HTTP/1.1\nHost: localhost\nContent-Length: {}\nConnection: close\n\n",
            body.len()
        ),
        &body,
    );
    assert_eq!(a.status, 415, "{:?}", a.body);
    let a = raw(
        "POST /v1/vm HTTP/1.1\nHost: localhost\nContent-Type: text/plain\nTransfer-Encoding: chunked\nConnection: close\n\n",
        b"2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(a.status, 415, "{:?}", a.body);
    // An upload must be octet-stream (a form upload is refused).
    let a = raw(
        "PUT /v1/vm/x/files?path=/tmp/a HTTP/1.1\nHost: localhost\nContent-Type: text/plain\nContent-Length: 2\nConnection: close\n\n",
        b"hi",
    );
    assert_eq!(a.status, 415, "{:?}", a.body);
    assert!(a.body["error"]
        .as_str()
        .unwrap()
        .contains("application/octet-stream"));
    cases += 3;
    assert_eq!(
        d.call("GET", "/v1/vm/x", None).0,
        404,
        "nothing was created"
    );
    assert!(d.engine.list().is_empty());

    // A bad Host is 421 (DNS rebinding), whatever the method.
    for (m, host) in [
        ("GET", "evil.example"),
        ("GET", "evil.example:8080"),
        ("POST", "localhost.evil.example"),
        ("GET", "127.0.0.2"),
    ] {
        let a = raw(
            &format!("{m} /v1/vm HTTP/1.1\nHost: {host}\nContent-Type: application/json\nContent-Length: {}\nConnection: close\n\n", body.len()),
            &body,
        );
        assert_eq!(a.status, 421, "{m} {host}: {:?}", a.body);
        assert_eq!(a.body["field"], "Host");
        cases += 1;
    }
    let a = raw("GET /v1/health HTTP/1.1\nConnection: close\n\n", b"");
    assert_eq!(a.status, 421, "no Host: {:?}", a.body);
    cases += 1;
    assert!(d.engine.list().is_empty());
    // Allowed: the loopback names, the listen address, configured names.
    for host in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "[::1]".to_string(),
        "api.example.test".to_string(),
        "API.example.test:443".to_string(),
    ] {
        let a = raw(
            &format!("GET /v1/health HTTP/1.1\nHost: {host}\nConnection: close\n\n"),
            b"",
        );
        assert_eq!(a.status, 200, "{host}: {:?}", a.body);
    }
    // Refusals take no in-flight slot: with max_inflight_ops = 1, a real
    // create still goes through after all of the above.
    d.create_ok("ok1");

    // No CORS, ever: a preflight and a cross-origin GET get no
    // Access-Control-* header.
    for head in [
        "OPTIONS /v1/vm HTTP/1.1\nHost: localhost\nOrigin: http://evil.example\nAccess-Control-Request-Method: POST\nAccess-Control-Request-Headers: content-type\nConnection: close\n\n",
        "GET /v1/vm HTTP/1.1\nHost: localhost\nOrigin: http://evil.example\nConnection: close\n\n",
        "POST /v1/vm/ok1/pause HTTP/1.1\nHost: localhost\nOrigin: http://evil.example\nContent-Length: 0\nConnection: close\n\n",
    ] {
        let mut s = agentenv_client::Endpoint::parse(&d.base)
            .unwrap()
            .open(Duration::from_secs(10))
            .unwrap();
        s.write_all(head.replace("\n", "\r\n").as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let h = agentenv_client::ResponseHead::read(&mut r).unwrap();
        let cors: Vec<_> = h
            .headers
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{head}: {cors:?}");
        cases += 1;
    }
    println!("fault cases: {cases}");
    finish(d, dir);
}

/// Checks the mode of everything under `root` not in `before`; returns how
/// many were checked.
fn check_modes(
    root: &Path,
    before: &BTreeSet<PathBuf>,
    sockets_0660: &[PathBuf],
    seen: &mut BTreeSet<PathBuf>,
) {
    use std::os::unix::fs::FileTypeExt;
    for p in agentenv_testkit::leaks::files_below(root) {
        if before.contains(&p) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let m = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let jail_group = agentenv_core::config::JailConfig::default().group();
        let want = if ft.is_dir() {
            0o700
        } else if ft.is_socket() && sockets_0660.contains(&p) {
            0o660
        } else if ft.is_file() && meta.gid() == jail_group && m & 0o040 != 0 {
            // A read-only input the jail shares with jailed VMMs (a full
            // snapshot's memory file, which restored VMs map): readable by
            // the jail group only, never by other users.
            0o640
        } else {
            0o600
        };
        assert!(
            !ft.is_symlink(),
            "the daemon made a symlink {}",
            p.display()
        );
        assert_eq!(m, want, "{} is {m:o}, not {want:o}", p.display());
        seen.insert(p);
    }
}

#[test]
fn everything_the_daemon_makes_is_private_over_a_whole_vm_life() {
    let dir = TestDir::new();
    // The test process's own umask lets group and others read: the modes
    // must come from the daemon's code, not from the umask.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let before = agentenv_testkit::leaks::files_below(dir.path());
    let sock = dir.path().join("api.sock");
    let (d, _) = Daemon::start_listening(
        dir.config(),
        dir.path(),
        &[&format!("unix:{}", sock.display())],
    )
    .unwrap();
    let own = [sock.clone()];
    let mut seen = BTreeSet::new();
    let mut check = |what: &str| {
        check_modes(dir.path(), &before, &own, &mut seen);
        println!("{what}: {} paths checked so far", seen.len());
    };
    let vm = d.create_ok("life");
    check("created");
    let ok = |m: &str, p: &str, body: Option<serde_json::Value>, want: u16| {
        let (code, v) = d.call(m, p, body);
        assert_eq!(code, want, "{m} {p}: {v}");
        v
    };
    ok(
        "POST",
        "/v1/vm/life/snapshot",
        Some(json!({"snapshot_id": "disk1"})),
        201,
    );
    ok(
        "POST",
        "/v1/vm/life/snapshot",
        Some(json!({"snapshot_id": "full1", "memory": true})),
        201,
    );
    check("snapshots");
    ok(
        "POST",
        "/v1/snapshots/disk1/persist",
        Some(json!({"keep_tmpfs": true})),
        200,
    );
    ok(
        "POST",
        "/v1/snapshots/full1/persist",
        Some(json!({"keep_tmpfs": true})),
        200,
    );
    check("persisted");
    ok(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "restored", "restore": {"snapshot_id": "full1"}})),
        201,
    );
    ok(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "copy", "disk": {"kind": "snapshot", "snapshot_id": "disk1"}})),
        201,
    );
    check("restored");
    ok("POST", "/v1/vm/life/pause", None, 200);
    ok("POST", "/v1/vm/life/shutdown", None, 200);
    check("stopped");
    for id in ["life", "restored", "copy"] {
        ok("DELETE", &format!("/v1/vm/{id}"), None, 204);
    }
    for id in ["disk1", "full1"] {
        ok("DELETE", &format!("/v1/snapshots/{id}"), None, 204);
    }
    check("deleted");
    nix::sys::stat::umask(old);
    // What was checked covers each kind of thing the daemon makes.
    let session = Path::new(vm["disk"]["writable_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let names: Vec<String> = seen
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        seen.contains(&session),
        "the session directory {} was checked",
        session.display()
    );
    for want in ["console.log", "vm.json", "meta.json"] {
        assert!(names.iter().any(|n| n == want), "no {want} among {names:?}");
    }
    assert!(
        names.iter().any(|n| n.ends_with(".sock")),
        "no socket among {names:?}"
    );
    assert!(seen.contains(&sock));
    println!("{} paths checked", seen.len());
    finish(d, dir);
}

#[test]
fn the_daemon_binary_serves_tcp_and_a_unix_socket_and_removes_it_on_sigterm() {
    let dir = TestDir::new();
    let config = common::write_config(&dir, "[http]\nsocket_group = \"nogroup\"\n");
    let sock = dir.path().join("bin.sock");
    let log = dir.path().join("daemon.log");
    let port = common::free_port();
    let mut d = common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_agentenv"))
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("unix:{}", sock.display())])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let unix = ApiClient::new(&format!("unix:{}", sock.display())).unwrap();
    let start = std::time::Instant::now();
    while unix.health().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no answer: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            matches!(d.0.try_wait(), Ok(None)),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&sock), 0o660);
    let tcp = ApiClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    assert_eq!(tcp.health().unwrap().status, "ok");
    let vm = unix
        .create_vm(&serde_json::from_value(common::overlay_req("b1")).unwrap())
        .unwrap();
    assert_eq!(vm.vm_id, "b1");
    let text = std::fs::read_to_string(&log).unwrap();
    for want in [
        format!("listening on unix:{}", sock.display()),
        format!("listening on http://127.0.0.1:{port}"),
        format!("connection on unix:{} from uid 0", sock.display()),
    ] {
        assert!(text.contains(&want), "{want:?} not in the log:\n{text}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.0.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!sock.exists(), "the socket outlived the daemon");
}
