//! Tests of the Firecracker API double (`fc-double`), over raw HTTP/1.1 on its
//! Unix socket.
//!
//! The API-level tests also run against a real Firecracker when
//! `AGENTENV_TEST_FIRECRACKER` names its binary, so that the double's answers
//! can be compared with the real ones. Tests that boot the VM need a real
//! kernel for the real binary (`AGENTENV_TEST_KERNEL`, else
//! `<artifacts>/kernels/vmlinux`); the Ctrl-Alt-Del power-off additionally
//! needs a root file system whose init handles it (`AGENTENV_TEST_ROOTFS`).
//! Tests of the double's failure-injection flags run against the double only.
//!
//! The vsock tests check Firecracker's hybrid vsock (host-initiated
//! `CONNECT <port>\n`). A real Firecracker only serves the vsock socket once
//! the guest's vsock driver is up, which a guest that does not boot (as on
//! hosts without usable KVM) never reaches: there, what the tests can check is
//! that no `OK` ever comes. Guest listeners need the double's `--vsock-agent`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
const VCPU_ERR: &str = "Machine config error: The number of vCPUs must be greater than 0, less \
                        than 32 and must be 1 or an even number if SMT is enabled.";
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off agentenv.vm_id=vm-test";

/// The tail of the body of Firecracker's HTTP-level rejections.
const DROPPED: &str = "\nAll previous unanswered requests will be dropped.\" }";

/// The `fault_message` of a body that could not be parsed.
fn serde_fault(detail: &str) -> String {
    format!("An error occurred when deserializing the json body of a request: {detail}")
}

// ------------------------------------------------------------------ targets

/// The binary under test.
#[derive(Clone, Debug)]
enum Target {
    Double,
    Real(PathBuf),
}

impl Target {
    fn binary(&self) -> PathBuf {
        match self {
            Target::Double => PathBuf::from(env!("CARGO_BIN_EXE_fc-double")),
            Target::Real(path) => path.clone(),
        }
    }

    fn is_double(&self) -> bool {
        matches!(self, Target::Double)
    }

    /// A kernel this target accepts at `InstanceStart`.
    fn kernel(&self, dir: &Path) -> Option<PathBuf> {
        match self {
            Target::Double => {
                let k = dir.join("vmlinux");
                std::fs::write(&k, b"not a kernel").unwrap();
                Some(k)
            }
            Target::Real(_) => real_kernel(),
        }
    }
}

fn real_firecracker() -> Option<PathBuf> {
    agentenv_testkit::paths::real_firecracker()
}

fn real_kernel() -> Option<PathBuf> {
    let from_env = std::env::var_os("AGENTENV_TEST_KERNEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let kernel =
        from_env.unwrap_or_else(|| agentenv_testkit::paths::artifacts().join("kernels/vmlinux"));
    kernel.exists().then_some(kernel)
}

/// The double, and the real binary when one is given.
fn targets() -> Vec<Target> {
    let mut out = vec![Target::Double];
    if let Some(real) = real_firecracker() {
        out.push(Target::Real(real));
    }
    out
}

/// The targets that can boot a VM (the real binary needs a real kernel).
fn bootable_targets() -> Vec<Target> {
    targets()
        .into_iter()
        .filter(|t| {
            let ok = t.is_double() || real_kernel().is_some();
            if !ok {
                agentenv_testkit::skip::skip_optional(
                    "the real Firecracker: no kernel (AGENTENV_TEST_KERNEL)",
                );
            }
            ok
        })
        .collect()
}

// ------------------------------------------------------------------- client

/// One HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }

    /// The reason of an HTTP-level rejection: Firecracker's HTTP server
    /// answers bytes it cannot parse as a request with
    /// `{ "error": "<reason>\nAll previous unanswered requests will be
    /// dropped." }` (with a raw newline, so not JSON).
    fn http_error(&self) -> &str {
        assert_eq!(self.status, 400, "{:?}", self.body);
        assert_eq!(self.header("Content-Type"), Some("application/json"));
        self.body
            .strip_prefix("{ \"error\": \"")
            .and_then(|b| b.strip_suffix(DROPPED))
            .unwrap_or_else(|| panic!("not an HTTP-level rejection: {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to the API socket.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(sock: &Path) -> Conn {
        let stream =
            UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&str>) {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(body) = body {
            req.push_str(body);
        }
        self.send_raw(req.as_bytes());
    }

    /// Reads one response; `None` when the connection was closed or timed out.
    fn read(&mut self) -> Option<Resp> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status: u16 = line.split(' ').nth(1)?.trim().parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h).ok()? == 0 {
                return None;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).ok()?;
        Some(Resp {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        })
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.send(method, path, body);
        self.read()
            .unwrap_or_else(|| panic!("{method} {path}: no response"))
    }
}

// --------------------------------------------------------------- processes

/// A running VMM (double or real) on a socket in its own directory.
struct Vmm {
    target: Target,
    dir: tempfile::TempDir,
    sock: PathBuf,
    child: Child,
    stdout: Arc<Mutex<String>>,
    /// Where stdout goes instead of a pipe, if it does (see
    /// [`Vmm::start_stdout_to_file`]).
    stdout_file: Option<PathBuf>,
    stderr: Arc<Mutex<String>>,
    /// The threads reading stdout and stderr (joined once the process ended).
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn collect(pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            into.lock().unwrap().push_str(&line);
            line.clear();
        }
    })
}

impl Vmm {
    /// Starts `target` with `extra` flags, without waiting for its socket.
    fn spawn(target: &Target, extra: &[&str]) -> Vmm {
        assert!(
            target.is_double() || extra.is_empty(),
            "the real Firecracker takes no injection flags"
        );
        let dir = tempfile::Builder::new()
            .prefix("fcd")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("api.sock");
        Self::spawn_on(target, dir, sock, extra)
    }

    fn spawn_on(target: &Target, dir: tempfile::TempDir, sock: PathBuf, extra: &[&str]) -> Vmm {
        Self::spawn_with(target, dir, sock, extra, false)
    }

    /// `stdout_to_file`: the process writes its stdout straight to a file in
    /// its directory rather than to a pipe drained by a thread.
    fn spawn_with(
        target: &Target,
        dir: tempfile::TempDir,
        sock: PathBuf,
        extra: &[&str],
        stdout_to_file: bool,
    ) -> Vmm {
        let stdout_file = stdout_to_file.then(|| dir.path().join("stdout.txt"));
        let out = match &stdout_file {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::piped(),
        };
        let mut child = Command::new(target.binary())
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", "vm-test"])
            .args(extra)
            // As agentenv's driver runs it: relative paths resolve in the
            // VM's own directory.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", target.binary().display()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = vec![collect(child.stderr.take().unwrap(), Arc::clone(&stderr))];
        if let Some(pipe) = child.stdout.take() {
            readers.push(collect(pipe, Arc::clone(&stdout)));
        }
        Vmm {
            target: target.clone(),
            dir,
            sock,
            child,
            stdout,
            stdout_file,
            stderr,
            readers,
            status: None,
        }
    }

    /// Starts `target` and waits until its API answers.
    fn start(target: &Target, extra: &[&str]) -> Vmm {
        let mut vmm = Self::spawn(target, extra);
        vmm.wait_ready();
        vmm
    }

    /// Like [`Vmm::start`], with stdout going to a file: what the process
    /// wrote before it answered a request is then all there when the answer
    /// arrives (with a pipe, the reader thread may still be behind).
    fn start_stdout_to_file(target: &Target, extra: &[&str]) -> Vmm {
        let dir = tempfile::Builder::new()
            .prefix("fcd")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("api.sock");
        let mut vmm = Self::spawn_with(target, dir, sock, extra, true);
        vmm.wait_ready();
        vmm
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while !(self.sock.exists() && UnixStream::connect(&self.sock).is_ok()) {
            if let Some(status) = self.try_status() {
                panic!("exited early ({status}): {}", self.stderr());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no socket after 10 s: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An (empty) file in the VMM's directory, e.g. a disk image.
    fn file(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        p
    }

    fn conn(&self) -> Conn {
        Conn::open(&self.sock)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        self.conn().call(method, path, body.as_deref())
    }

    fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None)
    }

    fn put(&self, path: &str, body: Value) -> Resp {
        self.call("PUT", path, Some(body))
    }

    fn patch(&self, path: &str, body: Value) -> Resp {
        self.call("PATCH", path, Some(body))
    }

    fn put_raw(&self, path: &str, body: &str) -> Resp {
        self.conn().call("PUT", path, Some(body))
    }

    fn action(&self, action: &str) -> Resp {
        self.put("/actions", json!({ "action_type": action }))
    }

    fn state(&self) -> String {
        let r = self.get("/");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["state"].as_str().unwrap().to_string()
    }

    /// Asserts a 204.
    fn ok(&self, r: Resp, what: &str) {
        assert_eq!(r.status, 204, "{what}: {} {}", r.status, r.body);
    }

    /// Configures a bootable VM (boot source and a root drive).
    /// Configures a vsock device (guest CID 3) whose host socket is `name` in
    /// the test directory; returns the socket's path.
    fn put_vsock(&self, name: &str) -> PathBuf {
        let uds = self.path(name);
        self.ok(
            self.put("/vsock", json!({"guest_cid": 3, "uds_path": uds})),
            "PUT /vsock",
        );
        uds
    }

    fn configure(&self) {
        let kernel = self.target.kernel(self.dir.path()).expect("a kernel");
        self.ok(
            self.put(
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false}),
            ),
            "machine-config",
        );
        self.ok(
            self.put(
                "/boot-source",
                json!({"kernel_image_path": kernel, "boot_args": BOOT_ARGS}),
            ),
            "boot-source",
        );
        let rootfs = std::env::var_os("AGENTENV_TEST_ROOTFS")
            .filter(|_| !self.target.is_double())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.file("rootfs.ext4"));
        self.ok(
            self.put(
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": rootfs,
                       "is_root_device": true, "is_read_only": true}),
            ),
            "drives/rootfs",
        );
        self.ok(
            self.put(
                "/drives/overlay",
                json!({"drive_id": "overlay", "path_on_host": self.file("overlay.ext4"),
                       "is_root_device": false, "is_read_only": false}),
            ),
            "drives/overlay",
        );
    }

    fn start_vm(&self) {
        self.configure();
        self.ok(self.action("InstanceStart"), "InstanceStart");
    }

    /// The exit status, once the process ended (its output is then complete).
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
            if self.status.is_some() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
            }
        }
        self.status
    }

    /// Waits for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn stdout(&self) -> String {
        match &self.stdout_file {
            Some(path) => String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned(),
            None => self.stdout.lock().unwrap().clone(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stdout contains `needle`.
    fn wait_stdout(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.stdout().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn heartbeats(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("agentenv-heartbeat "))
        .count()
}

// -------------------------------------------------------------- API tests

#[test]
fn happy_path_configure_start_pause_resume_power_off() {
    for target in bootable_targets() {
        let mut vmm = Vmm::start(&target, &[]);
        let info = vmm.get("/").json();
        assert_eq!(info["state"], "Not started");
        assert_eq!(info["id"], "vm-test");
        assert_eq!(info["app_name"], "Firecracker");
        assert!(
            info["vmm_version"].as_str().unwrap().starts_with("1."),
            "{info}"
        );

        vmm.configure();
        let cfg = vmm.get("/vm/config").json();
        assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
        assert_eq!(cfg["machine-config"]["mem_size_mib"], 256);
        assert_eq!(cfg["machine-config"]["smt"], false);
        assert_eq!(cfg["boot-source"]["boot_args"], BOOT_ARGS);
        let drives = cfg["drives"].as_array().unwrap();
        assert_eq!(drives.len(), 2);
        assert_eq!(drives[0]["drive_id"], "rootfs");
        assert_eq!(drives[0]["is_root_device"], true);
        assert_eq!(drives[0]["is_read_only"], true);
        assert_eq!(drives[1]["drive_id"], "overlay");
        assert_eq!(drives[1]["is_read_only"], false);
        assert_eq!(cfg["network-interfaces"], json!([]));

        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
        assert_eq!(vmm.state(), "Running");
        vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
        assert_eq!(vmm.state(), "Paused");
        vmm.ok(vmm.patch("/vm", json!({"state": "Resumed"})), "resume");
        assert_eq!(vmm.state(), "Running");

        let real_guest = std::env::var_os("AGENTENV_TEST_ROOTFS").is_some();
        if !target.is_double() && !real_guest {
            agentenv_testkit::skip::skip_optional(
                "Ctrl-Alt-Del on the real Firecracker: no AGENTENV_TEST_ROOTFS",
            );
            continue;
        }
        // A real guest only reacts once its keyboard driver is up: repeat.
        let mut status = None;
        let start = Instant::now();
        while status.is_none() && start.elapsed() < Duration::from_secs(60) {
            vmm.ok(vmm.action("SendCtrlAltDel"), "SendCtrlAltDel");
            status = vmm.wait_exit(Duration::from_secs(2));
        }
        let status = status.expect("the VMM exits after Ctrl-Alt-Del");
        assert!(status.success(), "{status}");
        if target.is_double() {
            // (Firecracker itself leaves its socket file behind.)
            assert!(!vmm.sock.exists(), "the socket file is removed on exit");
        }
    }
}

#[test]
fn bodies_are_checked_like_firecracker() {
    for target in targets() {
        let vmm = Vmm::start(&target, &[]);

        // An unknown field.
        let r = vmm.put_raw(
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "foo": 1}"#,
        );
        assert_eq!(r.status, 400);
        assert!(
            r.fault().starts_with(&serde_fault(
                "unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, \
                 `cpu_template`, `track_dirty_pages`, `huge_pages`"
            )),
            "{}",
            r.fault()
        );
        let r = vmm.put_raw(
            "/boot-source",
            r#"{"kernel_image_path": "/k", "initrd": "/i"}"#,
        );
        assert!(
            r.fault().contains("unknown field `initrd`"),
            "{}",
            r.fault()
        );

        // A wrong type.
        let r = vmm.put_raw(
            "/machine-config",
            r#"{"vcpu_count": "2", "mem_size_mib": 256}"#,
        );
        assert_eq!(r.status, 400);
        assert!(
            r.fault()
                .starts_with(&serde_fault("invalid type: string \"2\", expected u8")),
            "{}",
            r.fault()
        );
        let r = vmm.put_raw(
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": "yes"}"#,
        );
        assert!(r
            .fault()
            .contains("invalid type: string \"yes\", expected a boolean"));

        // Missing required fields.
        let r = vmm.put_raw("/boot-source", r#"{"boot_args": "console=ttyS0"}"#);
        assert_eq!(r.status, 400);
        assert!(
            r.fault()
                .starts_with(&serde_fault("missing field `kernel_image_path`")),
            "{}",
            r.fault()
        );
        let r = vmm.put_raw("/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(
            r.fault().contains("missing field `mem_size_mib`"),
            "{}",
            r.fault()
        );
        let rootfs = vmm.file("rootfs.ext4");
        let r = vmm.put(
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": rootfs}),
        );
        assert!(
            r.fault().contains("missing field `is_root_device`"),
            "{}",
            r.fault()
        );

        // The id in the path must be the one in the body, and a valid id.
        let r = vmm.put(
            "/drives/other",
            json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true}),
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault(),
            "The id from the path does not match the id from the body!"
        );
        let r = vmm.put(
            "/drives/root-fs",
            json!({"drive_id": "root-fs", "path_on_host": rootfs, "is_root_device": true}),
        );
        assert_eq!(
            r.fault(),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        // (Never sent to a real Firecracker: a PUT /network-interfaces that
        // got through would create a TAP device on the host.)
        if target.is_double() {
            let r = vmm.put(
                "/network-interfaces/eth0",
                json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
            );
            assert_eq!(
                r.fault(),
                "The id from the path [eth0] does not match the id from the body [eth1]!"
            );
            let r = vmm.put(
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0",
                       "guest_mac": "06:00:00:00:00"}),
            );
            assert!(
                r.fault().contains("The provided MAC address is invalid."),
                "{}",
                r.fault()
            );
        }

        // vCPU and memory limits.
        for (body, what) in [
            (json!({"vcpu_count": 0, "mem_size_mib": 128}), "0 vCPUs"),
            (json!({"vcpu_count": 33, "mem_size_mib": 128}), "33 vCPUs"),
            (
                json!({"vcpu_count": 3, "mem_size_mib": 128, "smt": true}),
                "odd with SMT",
            ),
        ] {
            let r = vmm.put("/machine-config", body);
            assert_eq!(r.status, 400, "{what}");
            assert_eq!(r.fault(), VCPU_ERR, "{what}");
        }
        let r = vmm.put(
            "/machine-config",
            json!({"vcpu_count": 32, "mem_size_mib": 128}),
        );
        vmm.ok(r, "32 vCPUs");
        let r = vmm.put(
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 0}),
        );
        assert!(
            r.fault()
                .starts_with("Machine config error: The memory size (MiB)"),
            "{}",
            r.fault()
        );
        let cfg = vmm.get("/vm/config").json();
        assert_eq!(cfg["machine-config"]["vcpu_count"], 32);

        // Files are opened when configured.
        let r = vmm.put(
            "/boot-source",
            json!({"kernel_image_path": vmm.path("missing")}),
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault(),
            "Boot source error: The kernel file cannot be opened: No such file or directory \
             (os error 2)"
        );
        let r = vmm.put(
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": vmm.path("missing"),
                   "is_root_device": true}),
        );
        assert_eq!(r.status, 400);
        assert!(
            r.fault().starts_with("Drive config error:"),
            "{}",
            r.fault()
        );
        assert!(
            r.fault().contains("No such file or directory"),
            "{}",
            r.fault()
        );

        // Only one root device.
        let body =
            |id: &str| json!({"drive_id": id, "path_on_host": rootfs, "is_root_device": true});
        vmm.ok(vmm.put("/drives/a", body("a")), "root a");
        vmm.ok(vmm.put("/drives/a", body("a")), "root a again");
        let r = vmm.put("/drives/b", body("b"));
        assert_eq!(
            r.fault(),
            "Drive config error: A root block device already exists!"
        );

        // A vhost-user drive needs its backend's socket.
        let r = vmm.put(
            "/drives/vu",
            json!({"drive_id": "vu", "socket": vmm.path("vu.sock"), "is_root_device": false}),
        );
        assert_eq!(
            r.fault(),
            "Drive config error: Unable to create the virtio block device: Vhost user backend \
             error: Vhost-user error: Failed to connect to UDS Unix stream: No such file or \
             directory (os error 2)"
        );

        // A deprecated field marks the answer, even a refusal, once the
        // body is parsed.
        let r = vmm.put(
            "/machine-config",
            json!({"vcpu_count": 0, "mem_size_mib": 128, "cpu_template": "T2"}),
        );
        assert_eq!(r.header("Deprecation"), Some("true"));
        assert_eq!(r.fault(), VCPU_ERR);
        let r = vmm.put_raw(
            "/machine-config",
            r#"{"vcpu_count": "x", "mem_size_mib": 128, "cpu_template": "T2"}"#,
        );
        assert_eq!(r.header("Deprecation"), None, "not parsed");

        // Unknown paths and wrong methods.
        let r = vmm.get("/foo/bar");
        assert_eq!(r.status, 400);
        assert_eq!(r.fault(), "Invalid request method and/or path: GET foo.");
        let r = vmm.get("/actions");
        assert_eq!(
            r.fault(),
            "Invalid request method and/or path: GET actions."
        );
        // Methods other than GET, PUT and PATCH are refused by the HTTP
        // layer, and the connection stays open.
        let mut conn = vmm.conn();
        let r = conn.call("DELETE", "/drives/a", None);
        assert_eq!(
            r.http_error(),
            "Invalid HTTP Method: Unsupported HTTP method."
        );
        assert_eq!(conn.call("GET", "/", None).status, 200);
        let r = vmm.patch("/boot-source", json!({"kernel_image_path": "/k"}));
        assert_eq!(
            r.fault(),
            "Invalid request method and/or path: PATCH boot-source."
        );
        let r = vmm.call("PUT", "/actions", None);
        assert_eq!(r.fault(), "Empty PUT request.");
        let r = vmm.call("GET", "/", Some(json!({})));
        assert_eq!(r.fault(), "GET request cannot have a body.");
        let r = vmm.put("/snapshot", json!({}));
        assert_eq!(r.fault(), "Missing snapshot operation type.");
        // Endpoints the driver never calls are not modelled, and say so.
        if target.is_double() {
            for (method, path) in [("PUT", "/balloon"), ("PATCH", "/machine-config")] {
                let r = vmm.call(method, path, Some(json!({})));
                assert_eq!(
                    r.fault(),
                    format!(
                        "fc-double does not model {method} {path} (agentenv's driver never \
                         calls it)"
                    )
                );
            }
            assert!(vmm
                .get("/mmds")
                .fault()
                .starts_with("fc-double does not model"));
        }
        let r = vmm.action("Reboot");
        assert!(
            r.fault().contains("unknown variant `Reboot`"),
            "{}",
            r.fault()
        );

        // Actions that need a started VM.
        let r = vmm.action("InstanceStart");
        assert_eq!(
            r.fault(),
            "Start microvm error: Cannot start microvm without kernel configuration."
        );
        assert_eq!(
            vmm.patch("/vm", json!({"state": "Paused"})).fault(),
            PRE_BOOT
        );
        assert_eq!(vmm.action("SendCtrlAltDel").fault(), PRE_BOOT);
        assert_eq!(vmm.action("FlushMetrics").fault(), PRE_BOOT);
        let r = vmm.put(
            "/snapshot/create",
            json!({"snapshot_path": vmm.path("s"), "mem_file_path": vmm.path("m")}),
        );
        assert_eq!(r.fault(), PRE_BOOT);
        assert_eq!(vmm.state(), "Not started");
    }
}

#[test]
fn preboot_only_calls_are_refused_after_start() {
    for target in bootable_targets() {
        let vmm = Vmm::start(&target, &[]);
        vmm.start_vm();
        let rootfs = vmm.file("other.ext4");
        let mut refused: Vec<(&str, &str, Value)> = vec![
            ("PUT", "/boot-source", json!({"kernel_image_path": rootfs})),
            (
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 128}),
            ),
            (
                "PUT",
                "/drives/extra",
                json!({"drive_id": "extra", "path_on_host": rootfs, "is_root_device": false}),
            ),
            (
                "PUT",
                "/vsock",
                json!({"guest_cid": 3, "uds_path": vmm.path("v.sock")}),
            ),
            (
                "PUT",
                "/snapshot/load",
                json!({"snapshot_path": vmm.path("s"), "mem_backend":
                       {"backend_type": "File", "backend_path": vmm.path("m")}}),
            ),
            ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        ];
        // (Never sent to a real Firecracker: should it get through, it would
        // create a TAP device on the host.)
        if target.is_double() {
            refused.push((
                "PUT",
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
            ));
        }
        for (method, path, body) in refused {
            let r = vmm.call(method, path, Some(body));
            assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
            assert_eq!(r.fault(), POST_BOOT, "{method} {path}");
        }
        // Refusals are marked when the body used a deprecated field.
        let r = vmm.put(
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}),
        );
        assert_eq!(r.fault(), POST_BOOT);
        assert_eq!(r.header("Deprecation"), Some("true"));

        // Reads still work.
        let cfg = vmm.get("/vm/config").json();
        assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
        vmm.ok(vmm.action("FlushMetrics"), "FlushMetrics");
        assert_eq!(vmm.state(), "Running");
    }
}

#[test]
fn vsock_and_version() {
    for target in targets() {
        let vmm = Vmm::start(&target, &[]);
        let version = vmm.get("/version").json();
        assert!(version["firecracker_version"]
            .as_str()
            .unwrap()
            .starts_with("1."));

        let uds = vmm.put_vsock("vsock.sock");
        assert!(uds.exists(), "the vsock socket is bound at configuration");
        let cfg = vmm.get("/vm/config").json();
        assert_eq!(cfg["vsock"]["guest_cid"], 3);
        assert_eq!(cfg["vsock"]["uds_path"], json!(uds));
    }
}

#[test]
fn keep_alive_and_concurrent_connections() {
    for target in targets() {
        let vmm = Vmm::start(&target, &[]);
        let mut conn = vmm.conn();
        for i in 0..20 {
            let r = conn.call("GET", "/", None);
            assert_eq!(r.status, 200, "request {i}");
            assert_eq!(r.header("Connection"), Some("keep-alive"));
        }
        // Pipelined requests on one connection are answered in order.
        conn.send("GET", "/version", None);
        conn.send("PUT", "/actions", None);
        conn.send("GET", "/vm/config", None);
        assert_eq!(conn.read().unwrap().status, 200);
        assert_eq!(conn.read().unwrap().status, 400);
        assert_eq!(
            conn.read().unwrap().json()["machine-config"]["vcpu_count"],
            1
        );

        let sock = vmm.sock.clone();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let mut conn = Conn::open(&sock);
                    for i in 0..10 {
                        let body = json!({"vcpu_count": 1 + t % 2, "mem_size_mib": 128 + i});
                        let r = conn.call("PUT", "/machine-config", Some(&body.to_string()));
                        assert_eq!(r.status, 204, "{}", r.body);
                        assert_eq!(conn.call("GET", "/", None).status, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(vmm.state(), "Not started");
    }
}

#[test]
fn malformed_http_gets_400_and_the_connection_stays_open() {
    const METHOD: &str = "Invalid HTTP Method: Unsupported HTTP method.";
    for target in targets() {
        let vmm = Vmm::start(&target, &[]);
        // A bad request line: 400, and the connection takes a new request.
        for (raw, reason) in [
            (&b"HELLO\r\n\r\n"[..], "Invalid request."),
            (b"\r\nGET / HTTP/1.1\r\n\r\n", "Invalid request."),
            (b"POST / HTTP/1.1\r\n\r\n", METHOD),
            (b"DELETE /drives/a HTTP/1.1\r\n\r\n", METHOD),
            (b"get / HTTP/1.1\r\n\r\n", METHOD),
            (
                b"GET / HTTP/2.0\r\n\r\n",
                "Invalid HTTP Version: Unsupported HTTP version.",
            ),
            (
                b"GET  / HTTP/1.1\r\n\r\n",
                "Invalid URI: Empty URI not allowed.",
            ),
        ] {
            let what = String::from_utf8_lossy(raw);
            let mut conn = vmm.conn();
            conn.send_raw(raw);
            let r = conn.read().unwrap_or_else(|| panic!("{what:?}: no answer"));
            assert_eq!(r.http_error(), reason, "{what:?}");
            assert_eq!(r.header("Connection"), Some("keep-alive"));
            assert_eq!(conn.call("GET", "/", None).status, 200, "{what:?}");
        }

        // A bad header: the lines that follow are still taken as headers of
        // the same request, until an empty line ends it.
        let mut conn = vmm.conn();
        conn.send_raw(b"PUT /actions HTTP/1.1\r\nContent-Length: x\r\n\r\n");
        assert_eq!(
            conn.read().unwrap().http_error(),
            "Invalid header. Reason: Invalid value. Key:Content-Length; Value: x"
        );
        conn.send_raw(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            conn.read().unwrap().http_error(),
            "Invalid header. Reason: Header is incorrectly formatted. Key: GET / HTTP/1.1"
        );
        conn.send_raw(b"\r\n");
        assert_eq!(conn.read().unwrap().fault(), "Empty PUT request.");
        assert_eq!(conn.call("GET", "/", None).status, 200);

        let mut conn = vmm.conn();
        conn.send_raw(b"PUT /actions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
        assert_eq!(
            conn.read().unwrap().http_error(),
            "Request payload with size 99999999 is larger than the limit of 51200 allowed by \
             server."
        );

        // Requests parsed from the same read as a bad one are dropped.
        let mut conn = vmm.conn();
        conn.send_raw(b"GET / HTTP/1.1\r\n\r\nDELETE / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(conn.read().unwrap().http_error(), METHOD);
        let r = conn.call("GET", "/version", None);
        assert!(r.json()["firecracker_version"].is_string(), "{}", r.body);

        // Unsupported header values are ignored; HTTP/1.0 keeps the
        // connection; `Expect: 100-continue` gets an interim answer.
        let mut conn = vmm.conn();
        conn.send_raw(b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(conn.read().unwrap().fault(), "Empty PUT request.");
        conn.send_raw(b"GET / HTTP/1.0\r\nAccept: text/html\r\n\r\n");
        assert_eq!(conn.read().unwrap().status, 200);
        let body = br#"{"action_type": "FlushMetrics"}"#;
        conn.send_raw(
            format!(
                "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        let interim = conn.read().unwrap();
        assert_eq!((interim.status, interim.body.as_str()), (100, ""));
        conn.send_raw(body);
        assert_eq!(conn.read().unwrap().fault(), PRE_BOOT);

        // Invalid JSON in a well-formed request is an API error.
        let r = conn.call("PUT", "/actions", Some("{not json"));
        assert_eq!(r.status, 400);
        assert!(
            r.fault().starts_with(&serde_fault("key must be a string")),
            "{}",
            r.fault()
        );
        assert_eq!(conn.call("GET", "/", None).status, 200);
        assert_eq!(vmm.state(), "Not started");
    }
}

#[test]
fn refuses_an_existing_socket_path() {
    for target in targets() {
        let dir = tempfile::Builder::new()
            .prefix("fcd")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("api.sock");
        std::fs::write(&sock, b"in the way").unwrap();
        let mut vmm = Vmm::spawn_on(&target, dir, sock.clone(), &[]);
        let status = vmm
            .wait_exit(Duration::from_secs(10))
            .expect("exits at once");
        assert!(!status.success(), "{status}");
        assert!(
            vmm.stderr().contains("FailedToBindSocket"),
            "stderr: {}",
            vmm.stderr()
        );
        assert_eq!(std::fs::read(&sock).unwrap(), b"in the way");
    }
}

// ----------------------------------------------------- double-only tests

#[test]
fn starts_quickly_and_reports_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_fc-double"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("Firecracker v1.13.1-double"), "{text}");

    // Startup to a connectable socket, best of a few runs.
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let vmm = Vmm::start(&Target::Double, &[]);
        best = best.min(start.elapsed());
        drop(vmm);
    }
    eprintln!("fc-double: socket ready after {best:?}");
    assert!(best < Duration::from_millis(500), "{best:?}");

    let out = Command::new(env!("CARGO_BIN_EXE_fc-double"))
        .args(["--api-sock", "/tmp/x.sock", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(153));
}

#[test]
fn fail_request_matches_method_and_path_prefix() {
    let vmm = Vmm::start(
        &Target::Double,
        &[
            "--fail-request",
            "PUT /drives",
            "--fail-request",
            "GET /version",
        ],
    );
    let rootfs = vmm.file("rootfs.ext4");
    let r = vmm.put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), "injected failure: PUT /drives/rootfs");
    assert_eq!(
        vmm.get("/version").fault(),
        "injected failure: GET /version"
    );
    // Other methods and paths are served.
    assert_eq!(vmm.get("/").status, 200);
    assert_eq!(vmm.get("/vm/config").json()["drives"], json!([]));
    let r = vmm.patch("/vm", json!({"state": "Paused"}));
    assert_eq!(r.fault(), PRE_BOOT);
}

#[test]
fn no_socket_and_exit_at_start() {
    let mut vmm = Vmm::spawn(&Target::Double, &["--no-socket"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(vmm.try_status().is_none(), "still running");
    assert!(!vmm.sock.exists(), "no socket");
    drop(vmm);

    let mut vmm = Vmm::spawn(&Target::Double, &["--exit-at-start", "7"]);
    let status = vmm.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(7));
    assert!(vmm.stderr().contains("exit"), "stderr: {}", vmm.stderr());
    assert!(!vmm.sock.exists());
}

#[test]
fn exit_on_start_and_panic_on_start() {
    let mut vmm = Vmm::start(&Target::Double, &["--exit-on-start"]);
    vmm.configure();
    vmm.ok(vmm.action("InstanceStart"), "InstanceStart is answered");
    let status = vmm.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(!vmm.sock.exists(), "the socket file is removed");

    let mut vmm = Vmm::start(&Target::Double, &["--panic-on-start"]);
    vmm.configure();
    vmm.ok(vmm.action("InstanceStart"), "InstanceStart is answered");
    let status = vmm.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        vmm.stdout()
            .contains("Kernel panic - not syncing: injected panic"),
        "{}",
        vmm.stdout()
    );
    assert!(!vmm.sock.exists());
}

#[test]
fn hang_on_never_answers_that_request() {
    let vmm = Vmm::start(&Target::Double, &["--hang-on", "PATCH /vm"]);
    vmm.start_vm();
    let mut hung = vmm.conn();
    hung.writer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    hung.send("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    let start = Instant::now();
    assert!(hung.read().is_none(), "no answer");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // Other requests are still answered; the state did not change.
    assert_eq!(vmm.state(), "Running");
}

#[test]
fn ctrl_alt_del_delay_and_ignore() {
    // A delay long enough that the state can be read before the power-off
    // even when this thread is descheduled for a while on a loaded machine.
    let delay = Duration::from_millis(2000);
    let mut vmm = Vmm::start(
        &Target::Double,
        &["--shutdown-delay-ms", &delay.as_millis().to_string()],
    );
    vmm.start_vm();
    let sent = Instant::now();
    vmm.ok(vmm.action("SendCtrlAltDel"), "SendCtrlAltDel");
    // The key press does not change the state; the guest runs on.
    assert_eq!(vmm.state(), "Running");
    let status = vmm.wait_exit(Duration::from_secs(10)).expect("exits");
    // Not before the delay (the double got the request after `sent`).
    assert!(sent.elapsed() >= delay, "exited after {:?}", sent.elapsed());
    assert_eq!(status.code(), Some(0));
    assert!(!vmm.sock.exists());

    // A paused guest does not act on the key press until resumed.
    let mut vmm = Vmm::start(&Target::Double, &["--shutdown-delay-ms", "0"]);
    vmm.start_vm();
    vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
    vmm.ok(vmm.action("SendCtrlAltDel"), "SendCtrlAltDel");
    assert!(
        vmm.wait_exit(Duration::from_millis(200)).is_none(),
        "paused"
    );
    vmm.ok(vmm.patch("/vm", json!({"state": "Resumed"})), "resume");
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(0)
    );

    let mut vmm = Vmm::start(&Target::Double, &["--ignore-ctrl-alt-del"]);
    vmm.start_vm();
    vmm.ok(vmm.action("SendCtrlAltDel"), "SendCtrlAltDel");
    assert!(
        vmm.wait_exit(Duration::from_millis(500)).is_none(),
        "ignored"
    );
    assert_eq!(vmm.state(), "Running");
}

#[test]
fn boot_console_prints_ready_and_heartbeats_only_while_running() {
    // The double prints each heartbeat under its state lock and answers the
    // pause after taking that lock, so once the pause is answered the file
    // holds every heartbeat printed before it.
    let vmm = Vmm::start_stdout_to_file(&Target::Double, &["--boot-console"]);
    vmm.start_vm();
    assert!(
        vmm.wait_stdout("AGENTENV_READY vm_id=vm-test", Duration::from_secs(5)),
        "{}",
        vmm.stdout()
    );
    assert!(vmm.stdout().contains(&format!("Command line: {BOOT_ARGS}")));
    assert!(vmm.wait_stdout("agentenv-heartbeat 2", Duration::from_secs(5)));

    vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
    let paused_at = heartbeats(&vmm.stdout());
    assert!(paused_at >= 2, "{}", vmm.stdout());
    // More than three heartbeat periods.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        heartbeats(&vmm.stdout()),
        paused_at,
        "no heartbeat while paused"
    );

    vmm.ok(vmm.patch("/vm", json!({"state": "Resumed"})), "resume");
    let next = format!("agentenv-heartbeat {}", paused_at + 1);
    assert!(
        vmm.wait_stdout(&next, Duration::from_secs(5)),
        "{}",
        vmm.stdout()
    );
}

/// The `fault_message` prefix of a failed snapshot load.
const LOAD_FAILED: &str = "Load snapshot error: Failed to restore from snapshot: ";

/// A paused double with a vsock device and a network interface, and the
/// snapshot it made: `(vmm, state file, memory file)`.
fn snapshotted(extra: &[&str]) -> (Vmm, PathBuf, PathBuf) {
    let vmm = Vmm::start(&Target::Double, extra);
    vmm.configure();
    vmm.put_vsock("agent.sock");
    vmm.ok(
        vmm.put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0",
                   "guest_mac": "06:00:00:00:00:01"}),
        ),
        "network-interfaces",
    );
    vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
    vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
    let snap = vmm.path("vm.snap");
    let mem = vmm.path("vm.mem");
    vmm.ok(
        vmm.put(
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}),
        ),
        "create",
    );
    (vmm, snap, mem)
}

fn load_body(snap: &Path, mem: &Path) -> Value {
    json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": mem}})
}

/// Loads `body` into a fresh double; returns it with the answer.
fn load_into_fresh(extra: &[&str], body: Value) -> (Vmm, Resp) {
    let vmm = Vmm::start(&Target::Double, extra);
    let r = vmm.put("/snapshot/load", body);
    (vmm, r)
}

/// A load that failed once it began: 400 with `detail` in the message, then
/// the process exits with status 1.
fn assert_fatal_load(mut vmm: Vmm, r: Resp, detail: &str) {
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.fault().starts_with(LOAD_FAILED), "{}", r.fault());
    assert!(r.fault().contains(detail), "{}", r.fault());
    let status = vmm.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn snapshot_create_only_when_paused_and_writes_both_files() {
    let vmm = Vmm::start(&Target::Double, &["--boot-console"]);
    vmm.start_vm();
    let snap = vmm.path("vm.snap");
    let mem = vmm.path("vm.mem");
    let body = json!({"snapshot_path": snap, "mem_file_path": mem});
    let r = vmm.put("/snapshot/create", body.clone());
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault(),
        "Create snapshot error: Cannot save the microVM state: Operation not allowed: \
         save/restore unavailable while running"
    );
    assert!(!snap.exists() && !mem.exists());
    vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
    let r = vmm.put(
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": snap, "mem_file_path": mem}),
    );
    assert_eq!(
        r.fault(),
        "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page \
         tracking disabled."
    );
    let r = vmm.put(
        "/snapshot/create",
        json!({"snapshot_path": vmm.path("no/such/dir"), "mem_file_path": mem}),
    );
    assert!(
        r.fault()
            .starts_with("Create snapshot error: Cannot perform open on the snapshot backing file"),
        "{}",
        r.fault()
    );
    vmm.ok(vmm.put("/snapshot/create", body), "create");
    assert_eq!(vmm.state(), "Paused", "the VM stays paused");

    // A versioned state file with the saved paths, and a sparse memory file
    // of the guest's size.
    let text = std::fs::read_to_string(&snap).unwrap();
    let (magic, doc) = text.split_once('\n').unwrap();
    assert_eq!(magic, "fc-double snapshot");
    let doc: Value = serde_json::from_str(doc).unwrap();
    assert_eq!(doc["format"], 2);
    assert_eq!(doc["vmm_version"], "1.13.1");
    assert_eq!(doc["machine_config"]["mem_size_mib"], 256);
    assert_eq!(
        doc["drives"][0]["path_on_host"],
        json!(vmm.path("rootfs.ext4"))
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "sparse: {} blocks",
        meta.blocks()
    );
}

#[test]
fn snapshot_load_restores_the_saved_devices() {
    let (source, snap, mem) = snapshotted(&["--boot-console"]);
    let saved = saved_state(&snap);
    assert_eq!(saved["vsock"]["uds_path"], json!(source.path("agent.sock")));

    // The source still holds the vsock socket: a v1.13 load, which binds the
    // saved path, fails (as two clones of one snapshot would).
    let (vmm, r) = load_into_fresh(&[], load_body(&snap, &mem));
    assert_fatal_load(vmm, r, "Vsock: Error binding to the host-side Unix socket");

    // Once it is gone, the load binds the same path; with `resume_vm` the
    // guest runs on, with new TAP devices from `network_overrides`.
    let agent = source.path("agent.sock");
    let mut source = source;
    // SAFETY: signals our own child.
    assert_eq!(
        unsafe { libc::kill(source.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    source.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(!agent.exists());
    let mut body = load_body(&snap, &mem);
    body["resume_vm"] = json!(true);
    body["network_overrides"] = json!([{"iface_id": "eth0", "host_dev_name": "tap9"}]);
    let (restored, r) = load_into_fresh(&["--boot-console"], body);
    restored.ok(r, "load");
    assert_eq!(restored.state(), "Running");
    assert!(
        agent.exists(),
        "the vsock socket is bound at its saved path"
    );
    let cfg = restored.get("/vm/config").json();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["drives"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], "tap9");
    assert_eq!(
        cfg["network-interfaces"][0]["guest_mac"],
        "06:00:00:00:00:01"
    );
    assert!(restored.wait_stdout("agentenv-heartbeat", Duration::from_secs(5)));
    // A restored guest is past its boot: Ctrl-Alt-Del powers it off.
    restored.ok(restored.action("SendCtrlAltDel"), "SendCtrlAltDel");
    let mut restored = restored;
    assert_eq!(
        restored.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(0)
    );

    // Without `resume_vm` it stays paused.
    let (paused, r) = load_into_fresh(&[], load_body(&snap, &mem));
    paused.ok(r, "load");
    assert_eq!(paused.state(), "Paused");
    paused.ok(paused.patch("/vm", json!({"state": "Resumed"})), "resume");
    assert_eq!(paused.state(), "Running");
}

#[test]
fn snapshot_load_only_into_a_fresh_process() {
    let (source, snap, mem) = snapshotted(&[]);
    // Not into a running VM.
    let r = source.put("/snapshot/load", load_body(&snap, &mem));
    assert_eq!(r.fault(), POST_BOOT);
    // Not after a boot resource (and the process carries on).
    let other = Vmm::start(&Target::Double, &[]);
    other.ok(
        other.put(
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
        "machine-config",
    );
    let r = other.put("/snapshot/load", load_body(&snap, &mem));
    assert_eq!(
        r.fault(),
        "Load snapshot error: Loading a microVM snapshot not allowed after configuring \
         boot-specific resources."
    );
    assert_eq!(other.state(), "Not started");
    // Exactly one memory source.
    let mut both = load_body(&snap, &mem);
    both["mem_file_path"] = json!(mem);
    let r = other.put("/snapshot/load", both);
    assert!(r.fault().contains("too many fields"), "{}", r.fault());
    let r = other.put("/snapshot/load", json!({"snapshot_path": snap}));
    assert!(r.fault().contains("missing field"), "{}", r.fault());
    let r = other.put(
        "/snapshot/load",
        json!({"snapshot_path": snap, "mem_backend": {"backend_type": "Disk", "backend_path": mem}}),
    );
    assert!(
        r.fault().contains("unknown variant `Disk`"),
        "{}",
        r.fault()
    );
    assert_eq!(other.get("/").status, 200, "still serving");
}

#[test]
fn snapshot_load_refuses_missing_and_corrupt_files() {
    let (source, snap, mem) = snapshotted(&[]);
    let dir = source.dir.path();
    // A missing state file (deprecated `mem_file_path`: marked).
    let (vmm, r) = load_into_fresh(
        &[],
        json!({"snapshot_path": dir.join("missing"), "mem_file_path": mem}),
    );
    assert_eq!(r.header("Deprecation"), Some("true"));
    assert_fatal_load(
        vmm,
        r,
        "Failed to open snapshot file: No such file or directory",
    );
    // Not a snapshot, a corrupt one, another format.
    let text = std::fs::read_to_string(&snap).unwrap();
    for (name, bytes, detail) in [
        (
            "garbage",
            "not a snapshot".to_string(),
            "not a snapshot made by this VMM",
        ),
        (
            "truncated",
            text[..text.len() / 2].to_string(),
            "corrupt state",
        ),
        (
            "format9",
            text.replace("\"format\": 2", "\"format\": 9"),
            "unsupported snapshot format 9",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let (vmm, r) = load_into_fresh(&[], load_body(&path, &mem));
        assert_fatal_load(vmm, r, detail);
    }
    // A memory file missing, or shorter than the guest memory.
    let (vmm, r) = load_into_fresh(&[], load_body(&snap, &dir.join("missing.mem")));
    assert_fatal_load(vmm, r, "Failed to load guest memory");
    let short = dir.join("short.mem");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (vmm, r) = load_into_fresh(&[], load_body(&snap, &short));
    assert_fatal_load(vmm, r, "holds 1048576 bytes, the guest has 268435456");
    // A network override for an interface the snapshot does not have.
    let mut body = load_body(&snap, &mem);
    body["network_overrides"] = json!([{"iface_id": "eth7", "host_dev_name": "tap7"}]);
    let (vmm, r) = load_into_fresh(&[], body);
    assert_fatal_load(vmm, r, "no network interface eth7");
    // A snapshot of another Firecracker version.
    let (vmm, r) = load_into_fresh(&["--fc-version", "1.16.1"], load_body(&snap, &mem));
    assert_fatal_load(
        vmm,
        r,
        "the snapshot was made by Firecracker v1.13.1, this is v1.16.1",
    );
}

#[test]
fn vsock_override_and_clock_realtime_only_on_1_16() {
    // v1.13.1 does not know the fields: a parse error (not fatal).
    let (source, snap, mem) = snapshotted(&[]);
    let mut body = load_body(&snap, &mem);
    body["vsock_override"] = json!({"uds_path": source.path("clone.sock")});
    let (v13, r) = load_into_fresh(&[], body.clone());
    assert_eq!(r.status, 400);
    assert!(
        r.fault().starts_with(&serde_fault(
            "unknown field `vsock_override`, expected one of `snapshot_path`, `mem_file_path`, \
             `mem_backend`, `enable_diff_snapshots`, `track_dirty_pages`, `resume_vm`, \
             `network_overrides`"
        )),
        "{}",
        r.fault()
    );
    let mut clock = load_body(&snap, &mem);
    clock["clock_realtime"] = json!(false);
    let r = v13.put("/snapshot/load", clock);
    assert!(
        r.fault().contains("unknown field `clock_realtime`"),
        "{}",
        r.fault()
    );
    assert_eq!(v13.get("/").status, 200, "still serving");

    // v1.16: the clone binds its own socket while the source keeps its own.
    let (source, snap, mem) = snapshotted(&["--fc-version", "1.16.1"]);
    assert_eq!(
        source.get("/version").json()["firecracker_version"],
        "1.16.1"
    );
    assert_eq!(source.get("/").json()["vmm_version"], "1.16.1");
    let clone_sock = source.path("clone.sock");
    let mut body = load_body(&snap, &mem);
    body["vsock_override"] = json!({"uds_path": clone_sock});
    body["clock_realtime"] = json!(true);
    body["resume_vm"] = json!(true);
    let (clone, r) = load_into_fresh(&["--fc-version", "1.16.1"], body);
    clone.ok(r, "load with vsock_override");
    assert!(clone_sock.exists());
    assert!(source.path("agent.sock").exists());
    assert_eq!(
        clone.get("/vm/config").json()["vsock"]["uds_path"],
        json!(clone_sock)
    );
    assert_eq!(clone.state(), "Running");
}

#[test]
fn instance_start_keeps_to_the_command_line_budget() {
    // `configure` adds a read-only root drive and a second drive: Firecracker
    // appends " pci=off" (even when the boot args have it), " root=/dev/vda
    // ro" and two " virtio_mmio.device=4K@0x…:N". The real binary (v1.13.1)
    // decides: the double must agree with it to the byte.
    let appended = " pci=off".len()
        + " root=/dev/vda ro".len()
        + 2 * " virtio_mmio.device=4K@0xd0000000:5".len();
    let budget = 2047 - appended;
    for target in bootable_targets() {
        let vmm = Vmm::start(&target, &[]);
        vmm.configure();
        let kernel = target.kernel(vmm.dir.path()).expect("a kernel");
        let boot = |args: String| {
            vmm.put(
                "/boot-source",
                json!({"kernel_image_path": kernel, "boot_args": args}),
            )
        };
        // Accepted by PUT /boot-source, refused at InstanceStart.
        vmm.ok(boot("a".repeat(budget + 1)), "boot-source");
        let r = vmm.action("InstanceStart");
        assert_eq!(r.status, 400, "{target:?}: {}", r.body);
        assert!(
            r.fault()
                .ends_with("Inserting string would make command line too long."),
            "{target:?}: {}",
            r.fault()
        );
        if target.is_double() {
            assert_eq!(
                r.fault(),
                "Start microvm error: Invalid kernel command line: Inserting string would make \
                 command line too long."
            );
            assert_eq!(vmm.state(), "Not started");
        }
        // A real Firecracker that failed InstanceStart cannot start again:
        // the budget itself is tried on a fresh one.
        let vmm = if target.is_double() {
            vmm
        } else {
            let fresh = Vmm::start(&target, &[]);
            fresh.configure();
            fresh
        };
        let kernel = target.kernel(vmm.dir.path()).expect("a kernel");
        vmm.ok(
            vmm.put(
                "/boot-source",
                json!({"kernel_image_path": kernel, "boot_args": "a".repeat(budget)}),
            ),
            "boot-source",
        );
        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
        assert_eq!(vmm.state(), "Running", "{target:?}");
    }
}

#[test]
fn ctrl_alt_del_is_lost_before_the_keyboard_driver_is_up() {
    let mut vmm = Vmm::start(
        &Target::Double,
        &["--i8042-delay-ms", "1000", "--shutdown-delay-ms", "0"],
    );
    vmm.start_vm();
    let started = Instant::now();
    vmm.ok(vmm.action("SendCtrlAltDel"), "early SendCtrlAltDel");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "sent in time"
    );
    // Lost: the guest runs on, also past the keyboard driver's start.
    assert!(vmm.wait_exit(Duration::from_millis(1500)).is_none(), "lost");
    assert_eq!(vmm.state(), "Running");
    // Pressed again once the driver is up: it powers off.
    vmm.ok(vmm.action("SendCtrlAltDel"), "SendCtrlAltDel");
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn sigterm_removes_the_socket() {
    use std::os::unix::process::ExitStatusExt;
    let mut vmm = Vmm::start(&Target::Double, &[]);
    let pid = vmm.child.id() as libc::pid_t;
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = vmm.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(!vmm.sock.exists());
}

#[test]
fn log_path_receives_the_log() {
    let dir = tempfile::Builder::new()
        .prefix("fcd")
        .tempdir_in("/tmp")
        .unwrap();
    let log = dir.path().join("fc.log");
    std::fs::File::create(&log).unwrap();
    let vmm = Vmm::start(&Target::Double, &["--log-path", log.to_str().unwrap()]);
    vmm.start_vm();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("Running Firecracker v1.13.1"), "{text}");
    assert!(text.contains("InstanceStart"), "{text}");
}

// ------------------------------------------------------------------ vsock

/// The guest port the agent listens on.
const AGENT_PORT: u32 = 10789;
/// The first host side port Firecracker hands out for host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A Unix socket listener that echoes every connection (the "guest program").
struct Echo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Echo {
    fn start() -> Echo {
        let dir = tempfile::Builder::new()
            .prefix("fcd-echo")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut reader = conn.try_clone().unwrap();
                    let mut writer = conn;
                    let _ = std::io::copy(&mut reader, &mut writer);
                    let _ = writer.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Echo { _dir: dir, path }
    }

    fn flag(&self, port: u32) -> String {
        format!("{port}={}", self.path.display())
    }
}

/// Connects to the vsock socket and sends `bytes` (a `CONNECT` line, maybe more).
fn vsock_connect(uds: &Path, bytes: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap_or_else(|e| panic!("{}: {e}", uds.display()));
    s.write_all(bytes).unwrap();
    s
}

/// Reads one line byte by byte (so nothing after it is consumed).
fn read_line_raw(s: &mut UnixStream, timeout: Duration) -> std::io::Result<String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut byte)? {
            0 => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The host side port of an `OK <port>\n` line.
fn ok_port(line: &str) -> u32 {
    line.strip_prefix("OK ")
        .and_then(|l| l.strip_suffix('\n'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {line:?}"))
}

/// When to stop waiting for the answers to vsock connections made now: the
/// double closes them at once; a real Firecracker whose guest never brought
/// up its vsock driver leaves them waiting, so there only silence is checked.
fn silence_deadline(target: &Target) -> Instant {
    Instant::now()
        + if target.is_double() {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(2)
        }
}

/// Checks that the connection got no answer by `deadline` (see [`silence_deadline`]).
fn assert_closed_without_reply(target: &Target, s: &mut UnixStream, deadline: Instant, what: &str) {
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        // Closed; a reset when bytes behind the line were never read.
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what}: expected no reply, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e)
            if !target.is_double()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
        {
            eprintln!(
                "{what}: no reply from the real Firecracker (its guest's vsock driver is not \
                 up, so the connection waits)"
            );
        }
        Err(e) => panic!("{what}: expected the connection closed, got {e}"),
    }
}

/// Echoes `data` through an established connection.
fn assert_echo(s: &mut UnixStream, data: &[u8]) {
    s.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn vsock_connect_is_bridged_to_a_guest_listener() {
    for target in targets() {
        if !target.is_double() {
            agentenv_testkit::skip::skip_optional(
                "the real Firecracker: a guest listener needs a booted guest (the \
                 double's --vsock-agent stands in for one)",
            );
            continue;
        }
        let echo = Echo::start();
        let flag = echo.flag(AGENT_PORT);
        let vmm = Vmm::start(&target, &["--vsock-agent", &flag]);
        vmm.configure();
        let uds = vmm.put_vsock("v.sock");

        // Before the guest runs, a connection waits (in the listen backlog).
        let mut early = vsock_connect(&uds, b"CONNECT 10789\n");
        let r = read_line_raw(&mut early, Duration::from_millis(300));
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
        let line = read_line_raw(&mut early, Duration::from_secs(5)).unwrap();
        let first = ok_port(&line);
        assert_eq!(first, FIRST_HOST_PORT, "{line:?}");
        assert_echo(&mut early, b"hello through the vsock");

        // Bytes right behind the CONNECT line belong to the stream; the
        // keyword is case-insensitive; host ports are handed out in order.
        let mut second = vsock_connect(&uds, b"connect 10789\nping");
        let line = read_line_raw(&mut second, Duration::from_secs(5)).unwrap();
        assert_eq!(ok_port(&line), first + 1);
        let mut ping = [0u8; 4];
        second.read_exact(&mut ping).unwrap();
        assert_eq!(&ping, b"ping");

        // Large transfers in both directions at once.
        let blob: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let mut writer = second.try_clone().unwrap();
        let sent = blob.clone();
        let t = std::thread::spawn(move || writer.write_all(&sent).unwrap());
        let mut back = vec![0u8; blob.len()];
        second.read_exact(&mut back).unwrap();
        t.join().unwrap();
        assert!(back == blob, "the echo differs");

        // The host closing its side reaches the guest, whose close comes back.
        second.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        second.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());

        // Paused: connections are still served (Firecracker queues them).
        vmm.ok(vmm.patch("/vm", json!({"state": "Paused"})), "pause");
        let mut third = vsock_connect(&uds, b"CONNECT 10789\n");
        let line = read_line_raw(&mut third, Duration::from_secs(5)).unwrap();
        assert!(ok_port(&line) > first);
        vmm.ok(vmm.patch("/vm", json!({"state": "Resumed"})), "resume");
        assert_echo(&mut third, b"after resume");
        assert_echo(&mut early, b"the first one still works");
    }
}

#[test]
fn vsock_connect_without_a_guest_listener_is_closed() {
    for target in bootable_targets() {
        // Port 52: the double's "guest listener" there is a socket nobody serves.
        let flags: Vec<String> = if target.is_double() {
            vec!["--vsock-agent".into(), "52=/nonexistent/agent.sock".into()]
        } else {
            vec![]
        };
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let vmm = Vmm::start(&target, &flags);
        vmm.configure();
        let uds = vmm.put_vsock("v.sock");
        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
        let deadline = silence_deadline(&target);
        let mut conns = vec![(
            "no listener on 10789",
            vsock_connect(&uds, b"CONNECT 10789\n"),
        )];
        if target.is_double() {
            conns.push((
                "a listener that is gone",
                vsock_connect(&uds, b"CONNECT 52\n"),
            ));
        }
        for (what, mut conn) in conns {
            assert_closed_without_reply(&target, &mut conn, deadline, what);
        }
        assert!(uds.exists(), "the vsock socket stays");
    }
}

#[test]
fn vsock_malformed_connect_lines_are_closed() {
    for target in bootable_targets() {
        let echo = Echo::start();
        let flag = echo.flag(AGENT_PORT);
        let flags: Vec<&str> = if target.is_double() {
            vec!["--vsock-agent", &flag]
        } else {
            vec![]
        };
        let vmm = Vmm::start(&target, &flags);
        vmm.configure();
        let uds = vmm.put_vsock("v.sock");
        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");
        let lines: [&[u8]; 6] = [
            b"BOGUS 10789\n",
            b"CONNECT\n",
            b"CONNECT port\n",
            b"CONNECT -10789\n",
            b"CONNECT 99999999999\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        // All sent first, so a real Firecracker's silence is waited for once.
        let deadline = silence_deadline(&target);
        let conns: Vec<(String, UnixStream)> = lines
            .iter()
            .map(|l| {
                (
                    format!("{:?}", String::from_utf8_lossy(l)),
                    vsock_connect(&uds, l),
                )
            })
            .collect();
        for (what, mut conn) in conns {
            assert_closed_without_reply(&target, &mut conn, deadline, &what);
        }
        if target.is_double() {
            // A good line still works afterwards.
            let mut good = vsock_connect(&uds, b"CONNECT 10789\n");
            let line = read_line_raw(&mut good, Duration::from_secs(5)).unwrap();
            ok_port(&line);
            assert_echo(&mut good, b"ok");
        }
    }
}

#[test]
fn vsock_is_configured_before_boot_only() {
    for target in bootable_targets() {
        let vmm = Vmm::start(&target, &[]);
        vmm.configure();
        let uds = vmm.path("v.sock");
        // `vsock_id` is deprecated: accepted, and the answer says so.
        let r = vmm.put(
            "/vsock",
            json!({"vsock_id": "agent", "guest_cid": 3, "uds_path": uds}),
        );
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(r.header("Deprecation"), Some("true"));
        let r = vmm.put("/vsock", json!({"guest_cid": 3, "uds_path": uds}));
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(r.header("Deprecation"), None);
        vmm.ok(vmm.action("InstanceStart"), "InstanceStart");

        let other = vmm.path("v2.sock");
        let r = vmm.put("/vsock", json!({"guest_cid": 4, "uds_path": other}));
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.fault(), POST_BOOT);
        assert!(!other.exists(), "a refused vsock binds nothing");
        assert!(uds.exists(), "the configured vsock socket stays");
        let cfg = vmm.get("/vm/config").json();
        assert_eq!(cfg["vsock"]["guest_cid"], 3);
        assert_eq!(cfg["vsock"]["uds_path"], json!(uds));
    }
}

/// The configuration a state file of the double records.
fn saved_state(snap: &Path) -> Value {
    let text = std::fs::read_to_string(snap).unwrap();
    serde_json::from_str(text.split_once('\n').unwrap().1).unwrap()
}

/// A fresh double with an `overlay.ext4` in its directory that loads the
/// snapshot giving interface `iface` the TAP `tap`.
fn load_with_override(snap: &Path, mem: &Path, iface: &str, tap: &str) -> (Vmm, Resp) {
    let vmm = Vmm::start(&Target::Double, &[]);
    vmm.file("overlay.ext4");
    let mut body = load_body(snap, mem);
    body["resume_vm"] = json!(true);
    body["network_overrides"] = json!([{"iface_id": iface, "host_dev_name": tap}]);
    let r = vmm.put("/snapshot/load", body);
    (vmm, r)
}

#[test]
fn snapshot_load_resolves_saved_relative_paths_in_its_own_directory() {
    // A source whose overlay disk and vsock socket are given relative to its
    // working directory, as agentenv's driver gives them.
    let source = Vmm::start(&Target::Double, &[]);
    let kernel = source.file("vmlinux");
    source.ok(
        source.put(
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": BOOT_ARGS}),
        ),
        "boot-source",
    );
    let rootfs = source.file("rootfs.ext4");
    source.ok(
        source.put(
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": rootfs,
                   "is_root_device": true, "is_read_only": true}),
        ),
        "rootfs",
    );
    source.file("overlay.ext4");
    source.ok(
        source.put(
            "/drives/overlay",
            json!({"drive_id": "overlay", "path_on_host": "overlay.ext4",
                   "is_root_device": false, "is_read_only": false}),
        ),
        "overlay",
    );
    source.ok(
        source.put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
        ),
        "eth0",
    );
    source.ok(
        source.put("/vsock", json!({"guest_cid": 3, "uds_path": "agent.sock"})),
        "vsock",
    );
    assert!(source.path("agent.sock").exists(), "bound in its directory");
    source.ok(source.action("InstanceStart"), "start");
    source.ok(source.patch("/vm", json!({"state": "Paused"})), "pause");
    let (snap, mem) = (source.path("vm.snap"), source.path("vm.mem"));
    source.ok(
        source.put(
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}),
        ),
        "create",
    );
    source.ok(source.patch("/vm", json!({"state": "Resumed"})), "resume");
    let saved = saved_state(&snap);
    assert_eq!(saved["drives"][1]["path_on_host"], "overlay.ext4");
    assert_eq!(saved["vsock"]["uds_path"], "agent.sock");

    // Two clones at once, each in its own directory with its own disk copy:
    // v1.13 binds the saved (relative) socket name there, beside the
    // running source.
    let clones: Vec<Vmm> = ["tap-c1", "tap-c2"]
        .iter()
        .map(|tap| {
            let (clone, r) = load_with_override(&snap, &mem, "eth0", tap);
            clone.ok(r, "load");
            clone
        })
        .collect();
    for (clone, tap) in clones.iter().zip(["tap-c1", "tap-c2"]) {
        assert_eq!(clone.state(), "Running");
        assert!(clone.path("agent.sock").exists());
        let open = agentenv_testkit::leaks::open_files(clone.child.id());
        assert!(open.contains(&clone.path("overlay.ext4")), "{open:?}");
        assert!(open.contains(&mem), "the memory file is mapped: {open:?}");
        assert!(!open.contains(&source.path("overlay.ext4")), "{open:?}");
        let cfg = clone.get("/vm/config").json();
        assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], tap);
        assert_eq!(cfg["drives"][1]["path_on_host"], "overlay.ext4");
    }
    assert_eq!(source.state(), "Running");
    assert!(source.path("agent.sock").exists());

    // Without a disk under the saved name in its directory, a load fails.
    let (vmm, r) = load_into_fresh(&[], load_body(&snap, &mem));
    assert_fatal_load(vmm, r, "Block: Virtio backend error");
    // A TAP name the kernel refuses; an interface the snapshot does not have.
    let (vmm, r) = load_with_override(&snap, &mem, "eth0", "a-tap-name-too-long");
    assert_fatal_load(vmm, r, "Open tap device failed");
    let (vmm, r) = load_with_override(&snap, &mem, "eth1", "tap1");
    assert_fatal_load(vmm, r, "Invalid network override");
}
