//! The daemon started in-process on port 0, over real HTTP, with the Firecracker
//! double (or a real Firecracker when `AGENTENV_TEST_FIRECRACKER` is set).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv::server::listen::Listener;
use agentenv_client::{ApiClient, Body, Request, ResponseHead, Stream};
use agentenv_core::config::{Config, VmmChoice};
use agentenv_core::Engine;
use agentenv_testkit::leaks::Baseline;
use agentenv_testkit::paths;
use serde_json::Value;

/// The admin token every test daemon accepts (its hash is in the test
/// directory's `tokens` file, name [`TEST_TOKEN_NAME`]); the harness's
/// clients and raw requests send it, so every test runs with auth on.
pub const TEST_TOKEN: &str = "e2b_0123456789abcdef0123456789abcdef01234567";

/// The name of [`TEST_TOKEN`] in the tokens file (the owner of what tests create).
pub const TEST_TOKEN_NAME: &str = "harness";

/// Writes a tokens file (mode 0600) with `tokens` as (name, scope, token).
pub fn write_tokens(path: &Path, tokens: &[(&str, &str, &str)]) {
    use std::os::unix::fs::PermissionsExt;
    let text: String = tokens
        .iter()
        .map(|(name, scope, token)| {
            format!("{name} {scope} {}\n", agentenv::tokens::hash_hex(token))
        })
        .collect();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `request` with `Authorization: Bearer TEST_TOKEN` after its request line,
/// unless it has an `Authorization` header already.
pub fn with_auth(request: Vec<u8>) -> Vec<u8> {
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(request.len());
    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
    if head.contains("\r\nauthorization:") {
        return request;
    }
    let Some(line_end) = request.windows(2).position(|w| w == b"\r\n") else {
        return request;
    };
    let mut out = request[..line_end + 2].to_vec();
    out.extend_from_slice(format!("Authorization: Bearer {TEST_TOKEN}\r\n").as_bytes());
    out.extend_from_slice(&request[line_end + 2..]);
    out
}

/// A running daemon and the directory holding all its state.
pub struct Daemon {
    pub base: String,
    /// The E2B API's `http://IP:PORT`, when `cfg.e2b.listen` names one
    /// (`127.0.0.1:0` picks a free port).
    pub e2b_base: Option<String>,
    pub engine: Arc<Engine>,
    pub dir: PathBuf,
    pub cfg: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    abort: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A fresh test directory with the layout a daemon needs and a fake (or, with a
/// real Firecracker, the real) kernel and a small base image.
pub struct TestDir {
    pub tmp: tempfile::TempDir,
    pub baseline: Option<Baseline>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let tmp = tempfile::Builder::new()
            .prefix("ae")
            .tempdir_in("/tmp")
            .unwrap();
        let d = tmp.path();
        for sub in [
            "sessions",
            "s",
            "rootfs",
            "kernels",
            "initramfs",
            "snap/tmpfs",
            "snap/tmpfs/.guest-memory",
            "snap/durable",
            "disks",
            // `[jail] chroot_base` (its default: beside `sessions`).
            "jail",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        match real_kernel() {
            Some(k) => {
                std::fs::copy(k, d.join("kernels/vmlinux")).unwrap();
            }
            None => std::fs::write(d.join("kernels/vmlinux"), b"not a kernel").unwrap(),
        }
        let base = std::fs::File::create(d.join("rootfs/base.ext4")).unwrap();
        base.set_len(8 << 20).unwrap();
        write_tokens(&d.join("tokens"), &[(TEST_TOKEN_NAME, "admin", TEST_TOKEN)]);
        TestDir {
            tmp,
            baseline: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// A config whose roots all live in this directory.
    pub fn config(&self) -> Config {
        let d = self.path();
        Config {
            session_root: d.join("sessions"),
            socket_root: d.join("s"),
            rootfs_root: d.join("rootfs"),
            snapshots_root: d.join("snap"),
            tmpfs_snapshot_root: d.join("snap/tmpfs"),
            hdfs_snapshot_root: d.join("snap/durable"),
            kernel_root: d.join("kernels"),
            initramfs_root: d.join("initramfs"),
            firecracker_binary: firecracker(),
            vmm: VmmChoice::Firecracker,
            default_slots: 1,
            memory_mib_per_slot: 128,
            default_disk_size_gib: 1,
            shutdown_timeout_s: 5,
            startup_timeout_ms: 3000,
            request_timeout_ms: 3000,
            // Tests stop their VMs with the daemon (the default leaves them).
            on_shutdown: agentenv_core::config::OnShutdown::Stop,
            // These tests run in the host's namespace: never touch its network.
            network: agentenv_core::config::NetworkConfig {
                enable: false,
                ..Default::default()
            },
            // Auth on, with the harness's admin token (`TEST_TOKEN`).
            auth: agentenv_core::config::AuthConfig {
                tokens_file: d.join("tokens"),
                ..Default::default()
            },
            // Each test daemon has its own parent cgroup (checked for leaks).
            cgroup: agentenv_core::config::CgroupConfig {
                parent: Baseline::cgroup_parent(d),
                ..Default::default()
            },
            // The double's wrapper scripts run it: jailed VMMs must see it.
            // With AGENTENV_TEST_JAILER (and root, which the jail needs),
            // every Firecracker starts through Firecracker's own jailer.
            jail: agentenv_core::config::JailConfig {
                read_only_paths: vec![paths::fc_double()],
                firecracker_jailer: paths::real_jailer()
                    .filter(|_| nix::unistd::geteuid().is_root()),
                ..Default::default()
            },
            ..Config::default()
        }
    }

    /// Writes a wrapper script that runs the VMM binary with extra flags (the
    /// double's failure injection), returning its path.
    pub fn wrapper(&self, name: &str, extra: &[&str]) -> PathBuf {
        paths::fc_double_wrapper(self.path(), name, extra)
    }
}

/// The leak baseline of a test directory; overlay templates are a cache that may stay.
pub fn baseline(dir: &Path) -> Baseline {
    Baseline::capture(dir).allow(&dir.join("snap/templates"))
}

/// The VMM binary under test.
pub fn firecracker() -> PathBuf {
    paths::real_firecracker().unwrap_or_else(paths::fc_double)
}

/// True when running against a real Firecracker (tests of the double's
/// failure-injection flags skip then).
pub fn is_real() -> bool {
    paths::real_firecracker().is_some()
}

/// A real vmlinux for a real Firecracker (it refuses a fake kernel at InstanceStart).
fn real_kernel() -> Option<PathBuf> {
    paths::real_firecracker()?;
    let k = paths::artifacts().join("kernels/vmlinux");
    assert!(
        k.exists(),
        "AGENTENV_TEST_FIRECRACKER needs a real kernel at {} (scripts/build-kernel.sh)",
        k.display()
    );
    Some(k)
}

impl Daemon {
    /// Starts a daemon on a fresh test directory.
    pub fn start() -> (Daemon, TestDir) {
        let mut dir = TestDir::new();
        dir.baseline = Some(baseline(dir.path()));
        let cfg = dir.config();
        (Daemon::start_with(cfg, dir.path()), dir)
    }

    /// Starts a daemon with a given config.
    pub fn start_with(cfg: Config, dir: &Path) -> Daemon {
        Daemon::start_in(cfg, dir, None)
    }

    /// Starts a daemon whose VM networking lives in the namespace `netns`.
    pub fn start_in(cfg: Config, dir: &Path, netns: Option<PathBuf>) -> Daemon {
        let setup = move |c| async move {
            let engine = agentenv::daemon::build_engine_in(c, netns)
                .await
                .expect("engine builds");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            Ok((vec![Listener::tcp(listener)], engine))
        };
        Daemon::serve_thread(cfg, dir, setup)
            .expect("daemon starts")
            .0
    }

    /// Starts a daemon on the listeners `addrs` name (`IP:PORT`, HTTPS when
    /// `cfg.tls` has a certificate, or `unix:/PATH`), as `agentenv serve`
    /// binds them; returns it with every listener's address
    /// (`http://…`, `https://…`, `unix:…`; the first is its `base`), or the
    /// startup error.
    pub fn start_listening(
        cfg: Config,
        dir: &Path,
        addrs: &[&str],
    ) -> Result<(Daemon, Vec<String>), String> {
        use agentenv::server::listen::ListenAddr;
        let addrs = addrs
            .iter()
            .map(|a| a.parse::<ListenAddr>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let setup = move |c: Config| async move {
            let listeners = agentenv::daemon::bind_listeners(&c, &addrs)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let engine = agentenv::daemon::build_engine(c)
                .await
                .expect("engine builds");
            Ok((listeners, engine))
        };
        Daemon::serve_thread(cfg, dir, setup)
    }

    /// Runs a daemon on a runtime thread of its own: `setup` binds its
    /// listeners and builds its engine (or fails, and the error is returned),
    /// then it serves until stopped or aborted.
    fn serve_thread<F>(
        cfg: Config,
        dir: &Path,
        setup: impl FnOnce(Config) -> F + Send + 'static,
    ) -> Result<(Daemon, Vec<String>), String>
    where
        F: std::future::Future<Output = Result<(Vec<Listener>, Arc<Engine>), String>>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let c = cfg.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (listeners, engine) = match setup(c).await {
                    Ok(ready) => ready,
                    Err(e) => {
                        ready_tx.send(Err(e)).unwrap();
                        return;
                    }
                };
                let c = engine.config().clone();
                let e2b_addrs = c
                    .e2b
                    .listen
                    .iter()
                    .map(|a| a.parse::<agentenv::server::listen::ListenAddr>().unwrap())
                    .collect::<Vec<_>>();
                let e2b_listeners = match agentenv::daemon::bind_listeners(&c, &e2b_addrs).await {
                    Ok(l) => l,
                    Err(e) => {
                        ready_tx.send(Err(format!("{e:#}"))).unwrap();
                        return;
                    }
                };
                let bases: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
                let e2b_base = e2b_listeners.first().map(|l| l.describe());
                ready_tx
                    .send(Ok((bases, e2b_base, engine.clone())))
                    .unwrap();
                let auth = agentenv::server::auth::Auth::from_config(engine.config())
                    .expect("the tokens file loads");
                let serve =
                    agentenv::server::run_surfaces(listeners, e2b_listeners, engine, auth, async {
                        let _ = rx.await;
                    });
                tokio::select! {
                    biased;
                    Ok(()) = abort_rx => {}
                    r = serve => r.unwrap(),
                }
            });
            // After an abort: every task is dropped where it stands.
            rt.shutdown_background();
        });
        let (bases, e2b_base, engine) = match ready_rx.recv().expect("daemon starts or fails") {
            Ok(ready) => ready,
            Err(e) => {
                thread.join().unwrap();
                return Err(e);
            }
        };
        let d = Daemon {
            base: bases[0].clone(),
            e2b_base,
            engine,
            dir: dir.to_path_buf(),
            cfg,
            stop: Some(tx),
            abort: Some(abort_tx),
            thread: Some(thread),
        };
        Ok((d, bases))
    }

    /// Stops the daemon (its VMs are stopped as `on_shutdown` says).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    /// Ends the daemon as a crash would: every operation stops where it is,
    /// nothing is cleaned up, VMMs are left running.
    pub fn crash(mut self) {
        if let Some(tx) = self.abort.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// One request; returns the status and the JSON body (`Null` when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http_call(&self.base, method, path, body)
    }

    /// Sends raw bytes as a POST body.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        send(
            &client(&self.base, Duration::from_secs(60)),
            Request::new("POST", path).body(Body::Bytes(body)),
        )
    }

    /// A client of this daemon.
    pub fn client(&self) -> ApiClient {
        client(&self.base, Duration::from_secs(60))
    }

    /// Creates an overlay VM on the test base image.
    pub fn create(&self, vm_id: &str) -> (u16, Value) {
        self.call("POST", "/v1/vm", Some(overlay_req(vm_id)))
    }

    /// Creates an overlay VM and checks it is running.
    pub fn create_ok(&self, vm_id: &str) -> Value {
        let (code, v) = self.create(vm_id);
        assert_eq!(code, 201, "create {vm_id}: {v}");
        assert_eq!(v["state"], "running", "{v}");
        v
    }

    /// Waits until the VM reaches `state` (or panics after `timeout`).
    pub fn wait_state(&self, vm_id: &str, state: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (code, v) = self.call("GET", &format!("/v1/vm/{vm_id}"), None);
            if code == 200 && v["state"] == state {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "vm {vm_id} not {state} after {timeout:?}: {code} {v}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// A create request for an overlay VM on `base.ext4`.
pub fn overlay_req(vm_id: &str) -> Value {
    serde_json::json!({
        "vm_id": vm_id,
        "disk": {"kind": "overlay", "rootfs_id": "base.ext4"},
    })
}

/// Deletes every VM, stops the daemon, and checks nothing was left behind.
pub fn finish(d: Daemon, dir: TestDir) {
    for vm in d.engine.list() {
        let (code, body) = d.call("DELETE", &format!("/v1/vm/{}", vm.vm_id), None);
        assert_eq!(code, 204, "{body}");
    }
    d.stop();
    if let Some(b) = &dir.baseline {
        b.assert_clean();
    }
    agentenv_testkit::leaks::remove_test_cgroups();
}

/// An answer read off a raw HTTP connection.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub content_type: String,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: Value,
}

/// Sends `request` (bytes as given: no URL normalisation, any method,
/// header or body; the harness's token added by [`with_auth`] unless it has
/// an `Authorization` header) on a new connection to the daemon and reads the answer.
/// The request should say `Connection: close`. Panics when no answer comes
/// within `timeout`. The request is written from another thread while the
/// answer is read, so a daemon that answers before reading a whole (huge)
/// body is seen answering.
pub fn raw_http(base: &str, request: Vec<u8>, timeout: Duration) -> RawAnswer {
    let request = with_auth(request);
    raw_exchange(base, timeout, move |mut w, _| {
        use std::io::Write;
        // Write errors are expected when the daemon answers early and closes.
        let _ = w.write_all(&request);
    })
    .0
}

/// Opens a connection to the daemon, runs `write` on it from another thread
/// (it should stop once the flag is set), and reads the answer; panics when
/// none comes within `timeout`. Also returns how long the answer took.
pub fn raw_exchange(
    base: &str,
    timeout: Duration,
    write: impl FnOnce(Stream, &std::sync::atomic::AtomicBool) + Send + 'static,
) -> (RawAnswer, Duration) {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    let endpoint = client(base, timeout).endpoint();
    let s = endpoint.open(timeout).expect("daemon accepts connections");
    let w = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_w = stop.clone();
    let writer = std::thread::spawn(move || write(w, &stop_w));
    let start = Instant::now();
    let mut r = std::io::BufReader::new(s);
    let head = ResponseHead::read(&mut r)
        .unwrap_or_else(|e| panic!("no answer after {:?} ({e})", start.elapsed()));
    let mut raw = Vec::new();
    match head.body(&mut r).read_to_end(&mut raw) {
        Ok(_) => {}
        // A reset after the answer was read (the daemon closed on an unread body).
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "incomplete answer after {:?} ({e}): {:?}",
            start.elapsed(),
            String::from_utf8_lossy(&raw[..raw.len().min(2000)])
        ),
    }
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = r.get_ref().shutdown();
    let _ = writer.join();
    let body = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
    let answer = RawAnswer {
        status: head.status,
        content_type: head.header("content-type").unwrap_or_default().to_string(),
        body,
    };
    (answer, took)
}

impl Daemon {
    /// One request with the target sent verbatim (`path` may hold `..`,
    /// percent-escapes, anything) and an optional content type; the answer
    /// must come within 10 s.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> RawAnswer {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        raw_http(&self.base, bytes, Duration::from_secs(10))
    }

    /// Answers `GET /v1/health` with 200 (the daemon still serves).
    pub fn assert_healthy(&self) {
        let (code, v) = self.call("GET", "/v1/health", None);
        assert_eq!((code, v["status"].as_str()), (200, Some("ok")), "{v}");
    }
}

/// The test process's resident memory (kB) and open file descriptors; the
/// in-process daemon lives in it.
pub fn rss_kib_and_fds() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/self/status");
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (rss, fds)
}

/// Writes a daemon config file (TOML) for this directory, plus `extra` lines.
pub fn write_config(dir: &TestDir, extra: &str) -> std::path::PathBuf {
    let c = dir.config();
    // These tests run in the host's namespace: networking stays off.
    let extra = if extra.contains("[network]") {
        extra.replace("[network]", "[network]\nenable = false")
    } else {
        format!("{extra}\n[network]\nenable = false")
    };
    // Its own parent cgroup, as in `TestDir::config`.
    let parent = format!("parent = \"{}\"", Baseline::cgroup_parent(dir.path()));
    let extra = if extra.contains("parent =") {
        extra
    } else if extra.contains("[cgroup]") {
        extra.replace("[cgroup]", &format!("[cgroup]\n{parent}"))
    } else {
        format!("{extra}\n[cgroup]\n{parent}")
    };
    let text = format!(
        r#"session_root = "{}"
socket_root = "{}"
rootfs_root = "{}"
snapshots_root = "{}"
tmpfs_snapshot_root = "{}"
hdfs_snapshot_root = "{}"
kernel_root = "{}"
initramfs_root = "{}"
firecracker_binary = "{}"
vmm = "firecracker"
memory_mib_per_slot = 128
default_slots = 1
default_disk_size_gib = 1
shutdown_timeout_s = 3
{on_shutdown}
{extra}
{auth}
"#,
        c.session_root.display(),
        c.socket_root.display(),
        c.rootfs_root.display(),
        c.snapshots_root.display(),
        c.tmpfs_snapshot_root.display(),
        c.hdfs_snapshot_root.display(),
        c.kernel_root.display(),
        c.initramfs_root.display(),
        c.firecracker_binary.display(),
        on_shutdown = if extra.contains("on_shutdown") {
            ""
        } else {
            "on_shutdown = \"stop\""
        },
        auth = if extra.contains("[auth]") {
            String::new()
        } else {
            format!("[auth]\ntokens_file = \"{}\"", c.auth.tokens_file.display())
        },
    );
    let p = dir.path().join("agentenv.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The daemon process, killed if the test fails before stopping it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub use agentenv_testkit::agent::HostAgent;

/// A daemon whose Firecracker double bridges the guest agent's vsock port to
/// an agent running on the host, so the whole agent path runs without a VM.
pub fn start_with_agent(tweak: impl FnOnce(&mut Config)) -> (Daemon, TestDir, HostAgent) {
    let mut dir = TestDir::new();
    // In a directory of its own, which jailed VMMs see (the double connects
    // to the agent from inside the jail; a restarted agent is a new socket).
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    let sock = agent_dir.join("agent-host.sock");
    let spec = format!("{}={}", agentenv_proto::VSOCK_PORT, sock.display());
    let wrapper = dir.wrapper("fc-agent", &["--vsock-agent", &spec]);
    dir.baseline = Some(baseline(dir.path()));
    let agent = HostAgent::start(&sock);
    let mut cfg = dir.config();
    cfg.jail.read_only_paths.push(agent_dir);
    cfg.firecracker_binary = wrapper;
    tweak(&mut cfg);
    let d = Daemon::start_with(cfg, dir.path());
    (d, dir, agent)
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// splitmix64: the same pseudo-random sequence on every run.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `n` pseudo-random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// One of `xs` (not empty).
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// A client of the daemon at `base` whose reads and writes block at most `timeout`.
pub fn client(base: &str, timeout: Duration) -> ApiClient {
    anonymous_client(base, timeout).with_token(TEST_TOKEN)
}

/// A client of the daemon at `base` that sends no token.
pub fn anonymous_client(base: &str, timeout: Duration) -> ApiClient {
    ApiClient::new(base)
        .unwrap_or_else(|e| panic!("{base}: {e}"))
        .with_timeout(timeout)
}

/// True when the daemon at `base` answers `GET /v1/health` with 200.
pub fn healthy(base: &str) -> bool {
    client(base, Duration::from_secs(10)).health().is_ok()
}

/// Sends `req` (the target verbatim); the status and the JSON body (`Null`
/// when empty, a string when not JSON). Panics when no answer comes.
pub fn send(c: &ApiClient, req: Request<'_>) -> (u16, Value) {
    let what = format!("{} {}", req.method, req.target);
    let resp = c.send(req).unwrap_or_else(|e| panic!("{what}: {e}"));
    let json = if resp.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&resp.body).unwrap_or(Value::String(resp.text()))
    };
    (resp.status, json)
}

/// One request to a daemon at `base`; the status and the JSON body (`Null`
/// when empty, a string when not JSON).
pub fn http_call(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    let req = Request::new(method, path).body(bytes.as_deref().map_or(Body::Empty, Body::Bytes));
    send(&client(base, Duration::from_secs(60)), req)
}

/// Sends a request from its own thread, whose client gives up after
/// `patience`; what it gets back does not matter.
pub fn fire(
    d: &Daemon,
    method: &'static str,
    path: String,
    body: serde_json::Value,
    patience: Duration,
) -> std::thread::JoinHandle<()> {
    let c = client(&d.base, patience);
    std::thread::spawn(move || {
        let bytes = body.to_string();
        let _ = c.send(Request::new(method, &path).body(Body::Bytes(bytes.as_bytes())));
    })
}

/// Firecracker's own view of the instance state (`Running`, `Paused`), over
/// its API socket.
pub fn fc_state(socket: &str) -> String {
    let endpoint = agentenv_client::Endpoint::Unix(socket.into());
    let mut c = agentenv_client::Client::new(endpoint, Duration::from_secs(5));
    let v = c.request("GET", "/", None).unwrap().json().unwrap();
    v["state"].as_str().unwrap().to_string()
}

/// Waits until an operation hangs at its failpoint.
pub fn wait_hung(d: &Daemon, fp: &str) {
    let start = Instant::now();
    while d.engine.failpoints.hung() < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{fp} never reached"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs 100 `true` one after another, then `n` commands at once that each
/// sleep `sleep_s` and echo their number, through the daemon's exec API;
/// each must answer with its own output.
pub fn sequential_and_concurrent_execs(d: &Daemon, vm: &str, n: usize, sleep_s: f64) {
    for i in 0..100 {
        let (code, r) = d.call(
            "POST",
            &format!("/v1/vm/{vm}/exec"),
            Some(serde_json::json!({"cmd": ["true"]})),
        );
        assert_eq!(
            (code, r["exit_code"].as_i64()),
            (200, Some(0)),
            "exec {i}: {r}"
        );
    }
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (base, path) = (d.base.clone(), format!("/v1/vm/{vm}/exec"));
            std::thread::spawn(move || {
                let cmd = format!("sleep {sleep_s}; echo {i}");
                let body = serde_json::json!({"cmd": ["sh", "-c", cmd]});
                let (code, r) = http_call(&base, "POST", &path, Some(body));
                assert_eq!(code, 200, "{r}");
                assert_eq!(r["stdout"], format!("{i}\n"), "{r}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The guest artifacts for tests that boot real QEMU guests, or why such a
/// test cannot run here.
pub fn guest_artifacts() -> Result<PathBuf, String> {
    let dir = paths::artifacts();
    for f in [
        "kernels/vmlinuz",
        "initramfs/initrd.img",
        "rootfs/minimal.ext4",
    ] {
        if !dir.join(f).exists() {
            return Err(format!(
                "{} missing (run scripts/build-artifacts.sh)",
                dir.join(f).display()
            ));
        }
    }
    if agentenv::daemon::find_binary(Path::new("qemu-system-x86_64")).is_none() {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    Ok(dir)
}

/// The guest artifacts, or returns from the test saying why it skips.
#[macro_export]
macro_rules! need_artifacts {
    () => {
        match common::guest_artifacts() {
            Ok(a) => a,
            Err(why) => {
                agentenv_testkit::skip::skip(&why);
                return;
            }
        }
    };
}

/// A wrapper that runs QEMU inside network namespace `ns`.
pub fn qemu_in_netns(dir: &TestDir, ns: &str) -> PathBuf {
    let p = dir.path().join("qemu-in-netns");
    std::fs::write(
        &p,
        // Jailed (not root), QEMU is in the namespace already: the daemon's
        // jail joins the one it was started with.
        format!(
            "#!/bin/sh\n[ \"$(id -u)\" = 0 ] || exec qemu-system-x86_64 \"$@\"\n\
             exec ip netns exec '{ns}' qemu-system-x86_64 \"$@\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A QEMU config over the guest artifacts in `art` (base images are only read).
pub fn qemu_config(dir: &TestDir, art: &Path) -> Config {
    Config {
        vmm: VmmChoice::Qemu,
        kernel_root: art.join("kernels"),
        initramfs_root: art.join("initramfs"),
        rootfs_root: art.join("rootfs"),
        default_kernel: "vmlinuz".into(),
        default_initrd: Some("initrd.img".into()),
        memory_mib_per_slot: 256,
        default_slots: 1,
        default_disk_size_gib: 2,
        startup_timeout_ms: 10_000,
        request_timeout_ms: 10_000,
        shutdown_timeout_s: 60,
        ..dir.config()
    }
}

/// How long a real (QEMU/TCG) guest may take to boot and answer ready.
pub const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// `method path` with `body`, asserting the status is `want`; the body.
pub fn call_ok(d: &Daemon, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let (code, v) = d.call(method, path, body);
    assert_eq!(code, want, "{method} {path}: {v}");
    v
}

/// Creates `vm_id` on the `minimal.ext4` base image and waits until its agent
/// is ready ([`GUEST_BOOT_TIMEOUT`]); the VM.
pub fn boot_ready(d: &Daemon, vm_id: &str) -> Value {
    let v = call_ok(
        d,
        "POST",
        "/v1/vm",
        Some(serde_json::json!({"vm_id": vm_id, "wait_ready": true,
                    "wait_ready_timeout_s": GUEST_BOOT_TIMEOUT.as_secs(),
                    "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}})),
        201,
    );
    assert_eq!(v["ready"], true, "{v}");
    v
}

/// A daemon whose VMs get automatic networking inside the test's namespace
/// pair `ns` (QEMU run there through [`qemu_in_netns`]), with `cfg` otherwise
/// as given; the leak baseline is taken just before it starts.
pub fn start_networked(
    mut cfg: Config,
    dir: &mut TestDir,
    ns: &agentenv_testkit::netns::NetnsPair,
) -> Daemon {
    cfg.network.enable = true;
    cfg.qemu_binary = qemu_in_netns(dir, &ns.host);
    dir.baseline = Some(baseline(dir.path()));
    Daemon::start_in(cfg, dir.path(), Some(ns.host_path()))
}

/// Every `agentenv::audit` line written in this test process.
pub fn audit_lines() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LINES: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LINES
        .get_or_init(|| {
            let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("agentenv::audit=info")
                .with_ansi(false)
                .with_writer(move || Sink(sink.clone()))
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
            buf
        })
        .clone()
}

/// Where [`audit_lines`] collects the lines.
pub struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A field of /proc/PID/status.
pub fn status_field(pid: u64, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// A path as the process `pid` sees it (through /proc/PID/root).
pub fn seen_by(pid: u64, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

/// Checks a shutdown's answer: `stopped`, the VMM exited 0 by itself (no
/// signal) after the request.
pub fn assert_shut_down_by_request(v: &Value) {
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["exit"]["exit_code"], 0, "{v}");
    assert_eq!(v["exit"]["signal"], Value::Null, "{v}");
    assert!(
        v["exit"]["cause"]
            .as_str()
            .unwrap_or_default()
            .starts_with("shut down by request"),
        "{v}"
    );
}

/// Checks that process `pid` runs unprivileged as PID 1 of its own PID
/// namespace: one non-root uid, no root gid, no supplementary groups or
/// capabilities, `no_new_privs`, and mount, PID, IPC and UTS namespaces
/// other than the daemon's. Returns its uid.
pub fn assert_unprivileged_pid1(pid: u64) -> u32 {
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|&u| u == uids[0] && u != 0), "{uids:?}");
    let gids = status_field(pid, "Gid");
    assert!(!gids.split_whitespace().any(|g| g == "0"), "{gids}");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1")
    );
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the daemon");
    }
    uids[0]
}
