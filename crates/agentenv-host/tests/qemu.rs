//! The QEMU driver against real QEMU.
//!
//! Needs `qemu-system-x86_64` on PATH (tests skip with a message otherwise). The
//! guest tests also need the guest artifacts (`kernels/vmlinuz`,
//! `initramfs/initrd.img`, `rootfs/minimal.ext4`) under `$AGENTENV_ARTIFACTS` or
//! the repository's `artifacts/`. Guests run under TCG (see GUEST-NOTES: KVM here
//! is kvm_pvm, where guests hang), one at a time so that boots stay fast.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::agent::{AgentLink, ExecEvent};
use agentenv_core::backend::AgentChannel;
use agentenv_core::backend::{
    wait_exit, AdoptSpec, DriveSpec, FullSnapshotFiles, LaunchSpec, RestoreSpec, SavedMemory, Vmm,
    VmmError, VmmInstance,
};
use agentenv_host::agent::AgentClient;
use agentenv_host::qemu::{
    Accel, GuestMemory, InstanceMemory, QemuInstance, QemuVmm, StartMode, COMMAND_FILE,
};
use agentenv_proto as proto;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Guests boot one at a time: two TCG guests on two cores slow each other down.
static GUESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
}

fn artifacts() -> Result<Artifacts, String> {
    let root = std::env::var_os("AGENTENV_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../artifacts"));
    let a = Artifacts {
        kernel: root.join("kernels/vmlinuz"),
        initrd: root.join("initramfs/initrd.img"),
        rootfs: root.join("rootfs/minimal.ext4"),
    };
    for p in [&a.kernel, &a.initrd, &a.rootfs] {
        if !p.is_file() {
            return Err(format!("missing {}", p.display()));
        }
    }
    Ok(a)
}

macro_rules! need_qemu {
    () => {
        match qemu_binary() {
            Some(q) => q,
            None => {
                agentenv_testkit::skip::skip("qemu-system-x86_64 is not on PATH");
                return;
            }
        }
    };
}

macro_rules! need_guest {
    () => {
        match (qemu_binary(), artifacts()) {
            (Some(q), Ok(a)) => (q, a),
            (None, _) => {
                agentenv_testkit::skip::skip("qemu-system-x86_64 is not on PATH");
                return;
            }
            (_, Err(e)) => {
                agentenv_testkit::skip::skip(&format!(
                    "no guest artifacts ({e}); set AGENTENV_ARTIFACTS"
                ));
                return;
            }
        }
    };
}

/// Kills the VMM's process group when the test ends, however it ends.
struct KillGuard(Option<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        }
    }
}

fn group_alive(pgid: u32) -> bool {
    killpg(Pid::from_raw(pgid as i32), None).is_ok()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

fn spec(dir: &Path, vm_id: &str, kernel: PathBuf) -> LaunchSpec {
    LaunchSpec {
        memory_file: None,
        cgroup_procs: Vec::new(),
        vm_id: vm_id.into(),
        session_dir: dir.to_path_buf(),
        control_socket: dir.join("qmp.sock"),
        console_log: dir.join("console.log"),
        console_log_max_bytes: 4 << 20,
        vcpus: 1,
        memory_mib: 256,
        kernel,
        initrd: None,
        boot_args: format!("console=ttyS0 reboot=k panic=1 pci=off agentenv.vm_id={vm_id}"),
        drives: vec![],
        net: None,
        agent_socket: None,
        startup_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
    }
}

/// A spec that boots the test guest from a private copy of the rootfs (the
/// root is mounted read-write without an overlay).
fn guest_spec(dir: &Path, vm_id: &str, a: &Artifacts) -> LaunchSpec {
    let root = dir.join("root.ext4");
    std::fs::copy(&a.rootfs, &root).unwrap();
    let mut s = spec(dir, vm_id, a.kernel.clone());
    s.initrd = Some(a.initrd.clone());
    s.boot_args
        .push_str(" agentenv.root=/dev/vda agentenv.heartbeat=1");
    s.drives.push(DriveSpec {
        id: "rootfs".into(),
        path: root,
        read_only: false,
        is_root: true,
        fd: None,
    });
    s
}

fn console(s: &LaunchSpec) -> String {
    String::from_utf8_lossy(&std::fs::read(&s.console_log).unwrap_or_default()).into_owned()
}

fn heartbeats(s: &LaunchSpec) -> usize {
    console(s)
        .lines()
        .filter(|l| l.contains("agentenv-heartbeat "))
        .count()
}

/// Waits until `cond` holds, polling every 20 ms, for at most `timeout`.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

fn tail(s: &LaunchSpec) -> String {
    let c = console(s);
    let lines: Vec<&str> = c.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[tokio::test]
async fn a_missing_kernel_fails_the_launch_and_leaves_nothing() {
    let qemu = need_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "nokernel", dir.path().join("no-such-vmlinuz"));
    let vmm = QemuVmm::new(qemu.clone(), Accel::Tcg);
    let start = Instant::now();
    let err = vmm.start(&s).await.unwrap_err();
    eprintln!("launch failed after {:?}: {err}", start.elapsed());
    match &err {
        VmmError::ExitedEarly { exit, detail } => {
            assert!(!exit.success(), "{exit}");
            assert!(detail.contains("no-such-vmlinuz"), "{detail}");
        }
        other => panic!("expected ExitedEarly, got {other:?}"),
    }
    assert!(!s.control_socket.exists(), "qmp socket left behind");
    let left = processes_mentioning(&dir.path().to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:?}");
    // The command was recorded before the spawn.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(COMMAND_FILE)).unwrap()).unwrap();
    assert_eq!(doc["binary"], qemu.to_string_lossy().as_ref());
    let args: Vec<&str> = doc["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &args[..6],
        [
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-accel",
            "tcg,tb-size=128",
            "-cpu",
            "max"
        ]
    );
    // Under TCG the kernel is told the host's TSC rate.
    let append = args[args.iter().position(|a| *a == "-append").unwrap() + 1];
    if let Some(khz) = vmm.tsc_khz() {
        assert!(
            append.ends_with(&format!(" tsc_early_khz={khz}")),
            "{append}"
        );
    }
}

#[tokio::test]
async fn a_vmm_that_never_serves_qmp_times_out_and_is_killed() {
    // No QEMU needed: a stand-in that never creates the socket, with a child.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-qemu");
    std::fs::write(&fake, "#!/bin/sh\nsleep 987654 &\nwait\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut s = spec(dir.path(), "silent", dir.path().join("vmlinuz"));
    s.startup_timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = QemuVmm::new(fake, Accel::Tcg)
        .launch(&s)
        .await
        .err()
        .expect("launch must fail");
    assert!(matches!(err, VmmError::SocketTimeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let mut left = processes_mentioning(&dir.path().to_string_lossy());
    left.extend(processes_mentioning("sleep 987654"));
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[tokio::test]
async fn a_non_socket_at_the_control_path_is_refused_before_spawning() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "blocked", dir.path().join("vmlinuz"));
    std::fs::write(&s.control_socket, b"not a socket").unwrap();
    let err = QemuVmm::new("/nonexistent/qemu".into(), Accel::Tcg)
        .launch(&s)
        .await
        .err()
        .expect("launch must fail");
    match err {
        VmmError::Io { context, .. } => assert!(context.contains("qmp.sock"), "{context}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn guest_pauses_resumes_and_powers_off() {
    let (qemu, a) = need_guest!();
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s = guest_spec(dir.path(), "lifecycle", &a);
    let vmm = QemuVmm::new(qemu, Accel::Tcg);

    let t = Instant::now();
    let vm: QemuInstance = vmm.start(&s).await.unwrap();
    let qmp_ready = t.elapsed();
    let _guard = KillGuard(vm.pid());
    assert_eq!(vm.query_status().await.unwrap(), "running");

    let ready = wait_until(Duration::from_secs(90), || {
        console(&s).contains("AGENTENV_READY vm_id=lifecycle")
    })
    .await;
    assert!(ready, "no READY line; console tail:\n{}", tail(&s));
    let booted = t.elapsed();
    assert!(
        wait_until(Duration::from_secs(10), || heartbeats(&s) >= 2).await,
        "no heartbeats; console tail:\n{}",
        tail(&s)
    );

    let t = Instant::now();
    vm.pause().await.unwrap();
    let pause_ms = t.elapsed();
    assert_eq!(vm.query_status().await.unwrap(), "paused");
    // Let output written before the pause reach the log, then watch for a second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = heartbeats(&s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(heartbeats(&s), before, "heartbeats went on while paused");

    let t = Instant::now();
    vm.resume().await.unwrap();
    let resume_ms = t.elapsed();
    assert_eq!(vm.query_status().await.unwrap(), "running");
    assert!(
        wait_until(Duration::from_secs(5), || heartbeats(&s) >= before + 2).await,
        "heartbeats did not continue; console tail:\n{}",
        tail(&s)
    );

    let t = Instant::now();
    vm.request_shutdown().await.unwrap();
    let exit = wait_exit(vm.exit_watch(), Duration::from_secs(20)).await;
    let off = t.elapsed();
    let exit = exit.unwrap_or_else(|| panic!("no exit 20 s after powerdown:\n{}", tail(&s)));
    assert!(exit.success(), "{exit}:\n{}", tail(&s));
    assert!(
        wait_until(Duration::from_secs(2), || !s.control_socket.exists()).await,
        "qmp socket left behind"
    );
    assert!(matches!(vm.query_status().await, Err(VmmError::NotRunning)));
    eprintln!(
        "timings: spawn->qmp ready {qmp_ready:?}, spawn->READY {booted:?}, pause {pause_ms:?}, \
         resume {resume_ms:?}, powerdown->exit {off:?}"
    );
}

#[tokio::test]
async fn kill_takes_the_whole_group_and_the_socket() {
    let (qemu, a) = need_guest!();
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s = guest_spec(dir.path(), "killed", &a);
    let vm: Box<dyn VmmInstance> = QemuVmm::new(qemu, Accel::Tcg).launch(&s).await.unwrap();
    let pgid = vm.pid().unwrap();
    let _guard = KillGuard(Some(pgid));
    assert!(group_alive(pgid));
    assert!(s.control_socket.exists());
    // Its RAM is the machine's own (no memory file): no full snapshot.
    let files = FullSnapshotFiles {
        state: dir.path().join("state"),
        memory: dir.path().join("memory"),
    };
    match vm.save_full(&files).await {
        Err(VmmError::Refused { message, .. }) => {
            assert!(message.contains("memory file"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Let the guest get going, so that it is killed mid-boot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let exit = vm.kill().await.unwrap();
    eprintln!("kill took {:?}: {exit}", t.elapsed());
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(!group_alive(pgid), "process group {pgid} survived");
    assert!(!s.control_socket.exists(), "qmp socket left behind");
    assert!(processes_mentioning(&dir.path().to_string_lossy()).is_empty());
    assert!(matches!(vm.pause().await, Err(VmmError::NotRunning)));
    // A second kill reports the same exit.
    assert_eq!(vm.kill().await.unwrap(), exit);
}

/// Boots with every host core saturated (TCG's TSC calibration fails then; the
/// driver's `tsc_early_khz=` must carry the boot). Slow: `AGENTENV_SLOW_TESTS=1`.
#[tokio::test]
async fn guest_boots_while_the_host_is_saturated() {
    if std::env::var_os("AGENTENV_SLOW_TESTS").is_none() {
        agentenv_testkit::skip::skip_optional("set AGENTENV_SLOW_TESTS=1 to run");
        return;
    }
    let (qemu, a) = need_guest!();
    let _one = GUESTS.lock().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..cores * 2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let s = guest_spec(dir.path(), "loaded", &a);
    let t = Instant::now();
    let vm = QemuVmm::new(qemu, Accel::Tcg).start(&s).await.unwrap();
    let _guard = KillGuard(vm.pid());
    let ready = wait_until(Duration::from_secs(240), || {
        console(&s).contains("AGENTENV_READY vm_id=loaded")
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in spinners {
        t.join().unwrap();
    }
    assert!(ready, "no READY line; console tail:\n{}", tail(&s));
    let tsc: Vec<String> = console(&s)
        .lines()
        .filter(|l| l.contains("tsc:"))
        .map(str::to_string)
        .collect();
    eprintln!("booted under load in {:?}; {tsc:?}", t.elapsed());
    vm.kill().await.unwrap();
}

/// True when the test rootfs carries the guest agent (else says why not).
fn rootfs_has_agent(a: &Artifacts) -> bool {
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /usr/sbin/agentenv-guest"])
        .arg(&a.rootfs)
        .output()
        .unwrap();
    let ok = String::from_utf8_lossy(&out.stdout).contains("Inode:");
    if !ok {
        agentenv_testkit::skip::skip(&format!(
            "{} has no /usr/sbin/agentenv-guest",
            a.rootfs.display()
        ));
    }
    ok
}

/// Reads frames from a raw agent connection until one of `kind` on `stream`.
async fn read_until(
    sock: &mut tokio::net::UnixStream,
    kind: proto::Kind,
    stream: u32,
) -> proto::Frame {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(f) = proto::take_frame(&mut buf).unwrap() {
            if f.kind == kind && f.stream == stream {
                return f;
            }
        }
        assert!(Instant::now() < deadline, "no {kind:?} on stream {stream}");
        let n = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut chunk))
            .await
            .expect("the agent answers")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn the_guest_agent_refuses_malformed_frames_and_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let (qemu, a) = need_guest!();
    if !rootfs_has_agent(&a) {
        return;
    }
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (vm, _guard, s, sock) = launch_with_agent(qemu, &a, dir.path(), "agentframes").await;
    let ep = AgentChannel::Stream(sock.clone());
    assert_eq!(
        vm.agent_channel(),
        Some(agentenv_core::backend::AgentChannel::Stream(sock.clone()))
    );

    // The agent answers once the guest is up.
    let t = Instant::now();
    let client = loop {
        match AgentClient::connect(&ep, Duration::from_secs(2)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(90), "{e}\n{}", tail(&s));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!(
        "agent answered {:?} after launch: {:?}",
        t.elapsed(),
        client.hello()
    );
    client.shutdown();
    drop(client);

    // An oversized length: an error on stream 0.
    let mut raw = tokio::net::UnixStream::connect(&sock).await.unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 1])
        .await
        .unwrap();
    let f = read_until(&mut raw, proto::Kind::Error, 0).await;
    let msg: proto::ErrorMsg = f.parse().unwrap();
    assert_eq!(msg.code, proto::ErrorCode::Protocol, "{msg:?}");
    drop(raw);

    // After a hello, an unknown kind: an error on stream 0 again.
    let mut raw = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let hello = proto::Frame::json(
        proto::Kind::Hello,
        0,
        &proto::Hello {
            version: proto::PROTOCOL_VERSION,
            nonce: "0123456789abcdef".into(),
        },
    );
    raw.write_all(&hello.encode()).await.unwrap();
    read_until(&mut raw, proto::Kind::HelloOk, 0).await;
    raw.write_all(&[0, 0, 0, 5, 0x7f, 0, 0, 0, 1])
        .await
        .unwrap();
    let f = read_until(&mut raw, proto::Kind::Error, 0).await;
    let msg: proto::ErrorMsg = f.parse().unwrap();
    assert!(msg.error.contains("0x7f"), "{msg:?}");
    drop(raw);

    // The agent still serves a new connection.
    let client = AgentClient::connect(&ep, Duration::from_secs(10))
        .await
        .unwrap();
    let mut e = client
        .exec(
            &proto::ExecRequest {
                cmd: vec!["echo".into(), "still here".into()],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let status = loop {
        match e.next().await.unwrap() {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(st) => break st,
        }
    };
    assert_eq!(
        (status.exit_code, out.as_slice()),
        (Some(0), &b"still here\n"[..])
    );
    vm.kill().await.unwrap();
    assert!(!sock.exists(), "agent socket left behind");
}

/// Launches the test guest with its agent's socket at `dir/agent.sock`:
/// the VMM (killed with the guard), its spec and the socket.
async fn launch_with_agent(
    qemu: PathBuf,
    a: &Artifacts,
    dir: &Path,
    vm_id: &str,
) -> (Box<dyn VmmInstance>, KillGuard, LaunchSpec, PathBuf) {
    let mut s = guest_spec(dir, vm_id, a);
    let sock = dir.join("agent.sock");
    s.agent_socket = Some(sock.clone());
    let vm: Box<dyn VmmInstance> = QemuVmm::new(qemu, Accel::Tcg).launch(&s).await.unwrap();
    let guard = KillGuard(vm.pid());
    (vm, guard, s, sock)
}

/// Connects to the guest agent at `sock`, retrying while the guest comes up.
async fn agent_at(sock: &Path, within: Duration, s: &LaunchSpec) -> AgentClient {
    let ep = AgentChannel::Stream(sock.to_path_buf());
    let t = Instant::now();
    loop {
        match AgentClient::connect(&ep, Duration::from_secs(2)).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(t.elapsed() < within, "{e}\n{}", tail(s));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs `sh -c script` in the guest: (exit code, stdout).
async fn sh(client: &AgentClient, script: &str) -> (Option<i32>, String) {
    let mut e = client
        .exec(
            &proto::ExecRequest {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        match e.next().await.unwrap() {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(st) => return (st.exit_code, String::from_utf8_lossy(&out).into()),
        }
    }
}

/// Starts a counter loop (`/tmp/counter`) outside the exec's session and
/// writes `/tmp/unsynced` without syncing it; returns the loop's pid.
async fn start_counter(client: &AgentClient) -> String {
    let (code, pid) = sh(
        client,
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' \
         </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    assert_eq!(code, Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, _) = sh(client, "echo unsynced > /tmp/unsynced").await;
    assert_eq!(code, Some(0));
    pid.trim().to_string()
}

#[tokio::test]
async fn a_guest_restored_from_its_memory_snapshot_runs_on_without_booting() {
    let (qemu, a) = need_guest!();
    if !rootfs_has_agent(&a) {
        return;
    }
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let mem = shm.path().join("guest.mem");
    let mut s = guest_spec(dir.path(), "memsnap", &a);
    s.agent_socket = Some(dir.path().join("agent.sock"));
    let vmm = QemuVmm::new(qemu, Accel::Tcg);
    let shared = StartMode {
        memory: GuestMemory::File {
            path: &mem,
            shared: true,
        },
        incoming: false,
    };
    let vm = vmm.start_with(&s, shared).await.unwrap();
    let guard = KillGuard(vm.pid());
    let client = agent_at(
        s.agent_socket.as_ref().unwrap(),
        Duration::from_secs(90),
        &s,
    )
    .await;

    let pid = start_counter(&client).await;
    client.shutdown();

    // The snapshot: stop, device state to a file, RAM file copied, then gone.
    let state_path = dir.path().join("state");
    let copy = shm.path().join("snap.mem");
    let t = Instant::now();
    vm.pause().await.unwrap();
    let state = std::fs::File::create(&state_path).unwrap();
    vm.save_state(&state).await.unwrap();
    drop(state);
    let saved = t.elapsed();
    std::fs::copy(&mem, &copy).unwrap();
    let window = t.elapsed();
    assert_eq!(vm.query_status().await.unwrap(), "postmigrate");
    assert!(
        std::fs::metadata(&state_path).unwrap().len() < 1 << 20,
        "the device state holds no RAM"
    );
    vm.kill().await.unwrap();
    drop(guard);
    eprintln!("stop + device state {saved:?}, + RAM copy {window:?}");

    // The restore: new sockets, the same disk, RAM mapped privately from the copy.
    let mut r = s.clone();
    r.control_socket = dir.path().join("qmp2.sock");
    r.agent_socket = Some(dir.path().join("agent2.sock"));
    let state = std::fs::File::open(&state_path).unwrap();
    let t = Instant::now();
    let restored = vmm.restore(&r, &copy, &state).await.unwrap();
    let _guard = KillGuard(restored.pid());
    let running = t.elapsed();
    assert_eq!(restored.query_status().await.unwrap(), "running");
    let client = agent_at(
        r.agent_socket.as_ref().unwrap(),
        Duration::from_secs(10),
        &r,
    )
    .await;
    let connected = t.elapsed();
    let (_, first) = sh(&client, "cat /tmp/counter").await;
    eprintln!(
        "restored: running after {running:?}, agent connected after {connected:?}, \
         first exec answered after {:?}",
        t.elapsed()
    );
    // The restored guest takes its new identity.
    let identity = proto::Identity {
        hostname: "memsnap-clone".into(),
        net: None,
        entropy_hex: "a5".repeat(32),
        unix_time_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    let ti = Instant::now();
    client.set_identity(&identity).await.unwrap();
    eprintln!("restored: identity applied in {:?}", ti.elapsed());
    let (_, name) = sh(&client, "hostname").await;
    assert_eq!(name.trim(), "memsnap-clone");
    let (code, alive) = sh(&client, &format!("kill -0 {pid} && cat /tmp/unsynced")).await;
    assert_eq!((code, alive.as_str()), (Some(0), "unsynced\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, later) = sh(&client, "cat /tmp/counter").await;
    let (first, later): (u64, u64) = (first.trim().parse().unwrap(), later.trim().parse().unwrap());
    assert!(later > first, "the counter goes on: {first} then {later}");
    // The snapshot's RAM file was never written through.
    assert_eq!(std::fs::read(&copy).unwrap().len() as u64, 256 << 20);
    client.shutdown();
    restored.kill().await.unwrap();
    assert!(!r.agent_socket.as_ref().unwrap().exists());
    assert!(!r.control_socket.exists());
}

#[tokio::test]
async fn the_version_is_read_once_from_qemu() {
    let qemu = need_qemu!();
    let out = std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .unwrap();
    let banner = String::from_utf8_lossy(&out.stdout).into_owned();
    let vmm = QemuVmm::new(qemu, Accel::Tcg);
    let v = Vmm::version(&vmm).await.unwrap();
    let number = v.strip_prefix("qemu ").expect("qemu X.Y.Z");
    assert!(
        banner.starts_with(&format!("QEMU emulator version {number} ")),
        "{v} from {banner}"
    );
    // Cached: asked again, even by a clone of the driver, the same answer.
    let t = Instant::now();
    assert_eq!(vmm.clone().qemu_version().await.unwrap(), v);
    assert!(t.elapsed() < Duration::from_millis(5));
}

/// The VM `base` again in `dir`: its own sockets, console and a copy of its
/// disk taken now (`base` is paused), RAM as the restore decides.
fn clone_spec(base: &LaunchSpec, dir: &Path, vm_id: &str) -> LaunchSpec {
    std::fs::create_dir_all(dir).unwrap();
    let mut s = base.clone();
    s.vm_id = vm_id.into();
    s.session_dir = dir.to_path_buf();
    s.control_socket = dir.join("qmp.sock");
    s.console_log = dir.join("console.log");
    s.agent_socket = Some(dir.join("agent.sock"));
    s.memory_file = None;
    let root = dir.join("root.ext4");
    sparse_copy(&base.drives[0].path, &root);
    s.drives[0].path = root;
    s
}

fn sparse_copy(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

/// The largest mappings of a process by PSS (KiB), for the record.
fn pss_breakdown(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Pss:") {
            let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            maps.push((kib, name.clone()));
        } else if l.split_whitespace().next().is_some_and(|f| f.contains('-')) {
            let f: Vec<&str> = l.split_whitespace().collect();
            name = format!("{} {}", f[0], f.get(5).copied().unwrap_or("[anon]"));
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    maps.iter()
        .take(4)
        .map(|(k, n)| format!("{} MiB {n}", k >> 10))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The proportional set size of a process, in KiB.
fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no Pss in {rollup}"))
}

/// Checks a restored VM: it runs without a boot, its agent answers at once,
/// the counter process `pid` is alive and counting, the unsynced file is there.
async fn check_restored(vm: &QemuInstance, s: &LaunchSpec, pid: &str) -> AgentClient {
    assert_eq!(vm.query_status().await.unwrap(), "running");
    let ep = AgentChannel::Stream(s.agent_socket.clone().unwrap());
    let t = Instant::now();
    let client = AgentClient::connect(&ep, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", s.vm_id, tail(s)));
    let connected = t.elapsed();
    let (code, out) = sh(
        &client,
        &format!("kill -0 {pid} && cat /tmp/unsynced /tmp/counter"),
    )
    .await;
    eprintln!(
        "{}: agent connected {connected:?}, first exec answered {:?} after the restore",
        s.vm_id,
        t.elapsed()
    );
    assert!(
        connected < Duration::from_millis(900),
        "{}: the agent took {connected:?}",
        s.vm_id
    );
    assert_eq!(code, Some(0), "{}: {out}", s.vm_id);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("unsynced"));
    let first: u64 = lines.next().unwrap().trim().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, later) = sh(&client, "cat /tmp/counter").await;
    let later: u64 = later.trim().parse().unwrap();
    assert!(later > first, "{}: counter {first} then {later}", s.vm_id);
    client
}

/// Saves a full snapshot of the paused `vm` into `dir/state` and kills it;
/// returns the saved memory, the state path and how long the save took.
async fn snapshot_and_kill(vm: QemuInstance, dir: &Path) -> (SavedMemory, PathBuf, Duration) {
    let state = dir.join("state");
    let t = Instant::now();
    let saved = vm
        .save_full(&FullSnapshotFiles {
            state: state.clone(),
            memory: dir.join("memory-unused"),
        })
        .await
        .unwrap();
    let took = t.elapsed();
    let m = vm.execute("query-migrate", None).await.unwrap();
    eprintln!(
        "migration: total {} ms, downtime {} ms, ram {} MiB transferred, {} mbps",
        m["total-time"],
        m["downtime"],
        m["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        m["ram"]["mbps"]
    );
    // Still stopped: the caller resumes.
    assert_eq!(vm.query_status().await.unwrap(), "postmigrate");
    assert!(!dir.join("memory-unused").exists());
    vm.kill().await.unwrap();
    (saved, state, took)
}

#[tokio::test]
async fn full_snapshots_restore_into_clones_that_share_memory_and_snapshot_again() {
    let (qemu, a) = need_guest!();
    if !rootfs_has_agent(&a) {
        return;
    }
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    // The memory file's directory does not exist yet: the driver makes it.
    let mem = shm.path().join("src/guest.mem");
    std::fs::create_dir(dir.path().join("src")).unwrap();
    let mut s = guest_spec(&dir.path().join("src"), "fullsrc", &a);
    s.agent_socket = Some(dir.path().join("src/agent.sock"));
    s.memory_file = Some(mem.clone());
    // The benchmark's guest size: PSS per clone is measured against it.
    s.memory_mib = 512;
    let vmm = QemuVmm::new(qemu, Accel::Tcg);
    let vm = vmm.start(&s).await.unwrap();
    let guard = KillGuard(vm.pid());
    assert_eq!(vm.memory(), &InstanceMemory::SharedFile(mem.clone()));
    let m = std::fs::metadata(&mem).unwrap();
    assert_eq!(m.len(), s.memory_mib << 20);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        0o600
    );
    let client = agent_at(
        s.agent_socket.as_ref().unwrap(),
        Duration::from_secs(90),
        &s,
    )
    .await;
    let pid = start_counter(&client).await;

    // Full snapshot: the device state only; RAM is the shared file, copied
    // (with the disk) while the guest is stopped. Not of a running guest.
    let running = FullSnapshotFiles {
        state: dir.path().join("running.state"),
        memory: dir.path().join("unused.mem"),
    };
    match vm.save_full(&running).await {
        Err(VmmError::Refused { message, .. }) => assert!(message.contains("paused"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(!running.state.exists());
    vm.pause().await.unwrap();
    let state = dir.path().join("src.state");
    let t = Instant::now();
    let saved = vm
        .save_full(&FullSnapshotFiles {
            state: state.clone(),
            memory: dir.path().join("unused.mem"),
        })
        .await
        .unwrap();
    let save_ms = t.elapsed();
    assert_eq!(saved, SavedMemory::InFile(mem.clone()));
    assert_eq!(vm.query_status().await.unwrap(), "postmigrate");
    let state_len = std::fs::metadata(&state).unwrap().len();
    assert!(state_len < 1 << 20, "device state of {state_len} bytes");
    let snap_mem = shm.path().join("snap.mem");
    sparse_copy(&mem, &snap_mem);
    let c1 = clone_spec(&s, &dir.path().join("c1"), "clone1");
    let c2 = clone_spec(&s, &dir.path().join("c2"), "clone2");
    eprintln!(
        "full snapshot: device state {state_len} bytes in {save_ms:?}, paused {:?}",
        t.elapsed()
    );
    // A guest still paused after a snapshot can be snapshotted again.
    let again = dir.path().join("again.state");
    let files = FullSnapshotFiles {
        state: again.clone(),
        memory: dir.path().join("unused.mem"),
    };
    assert_eq!(vm.save_full(&files).await.unwrap(), saved);
    assert!(std::fs::metadata(&again).unwrap().len() < 1 << 20);

    // The source runs on, its disk writable again.
    vm.resume().await.unwrap();
    let (code, out) = sh(&client, "echo after > /after && sync && cat /after").await;
    assert_eq!((code, out.as_str()), (Some(0), "after\n"));
    client.shutdown();
    drop(client);

    // Re-adopted (a daemon restart): QEMU says where its RAM is; killing
    // the adopted VMM removes the memory file.
    let (adopted, st) = readopt(&vmm, vm, &s).await;
    assert_eq!(st, agentenv_core::backend::AdoptedState::Running);
    assert_eq!(adopted.memory(), &InstanceMemory::SharedFile(mem.clone()));
    adopted.kill().await.unwrap();
    drop(guard);
    assert!(!mem.exists(), "the memory file outlived its qemu");
    assert!(!s.control_socket.exists());

    // Two clones at once from the one memory copy.
    let restore = |l: &LaunchSpec, memory: Option<&Path>, state: &Path| RestoreSpec {
        launch: l.clone(),
        state: state.to_path_buf(),
        memory: memory.map(Path::to_path_buf),
    };
    let (r1, r2) = (
        restore(&c1, Some(&snap_mem), &state),
        restore(&c2, Some(&snap_mem), &state),
    );
    let t = Instant::now();
    let (v1, v2) = tokio::join!(vmm.restore_full(&r1), vmm.restore_full(&r2));
    let both = t.elapsed();
    let (v1, v2) = (v1.unwrap(), v2.unwrap());
    let _g1 = KillGuard(v1.pid());
    let _g2 = KillGuard(v2.pid());
    eprintln!("two clones running {both:?} after the restores began");
    assert_eq!(v1.memory(), &InstanceMemory::PrivateFile(snap_mem.clone()));
    let a1 = check_restored(&v1, &c1, &pid).await;
    let a2 = check_restored(&v2, &c2, &pid).await;
    // The clones' writes stay their own.
    assert_eq!(sh(&a1, "echo one > /tmp/who").await.0, Some(0));
    assert_eq!(sh(&a2, "echo two > /tmp/who").await.0, Some(0));
    assert_eq!(sh(&a1, "cat /tmp/who").await.1, "one\n");
    assert_eq!(sh(&a2, "cat /tmp/who").await.1, "two\n");
    let guest_kib = s.memory_mib * 1024;
    for (name, vm) in [("clone1", &v1), ("clone2", &v2)] {
        let pss = pss_kib(vm.pid().unwrap());
        eprintln!(
            "{name}: qemu PSS {} MiB for a {} MiB guest ({:.0} %)",
            pss / 1024,
            s.memory_mib,
            pss as f64 * 100.0 / guest_kib as f64
        );
        eprintln!("  largest: {}", pss_breakdown(vm.pid().unwrap()));
        // The bound for an idle clone: 20 % of guest memory.
        assert!(pss <= guest_kib / 5, "{name}: PSS {pss} KiB");
    }
    a2.shutdown();
    // Re-adopted, a clone still maps the snapshot's memory privately, and
    // its end leaves that file alone.
    let (v2, _) = readopt(&vmm, v2, &c2).await;
    assert_eq!(v2.memory(), &InstanceMemory::PrivateFile(snap_mem.clone()));
    v2.kill().await.unwrap();
    assert!(!c2.control_socket.exists() && !c2.agent_socket.as_ref().unwrap().exists());
    // The snapshot's memory was never written through, nor removed.
    assert_eq!(
        std::fs::metadata(&snap_mem).unwrap().len(),
        s.memory_mib << 20
    );

    // A restored VM's RAM is private: its full snapshot carries the RAM, and a
    // restore from that state alone works, and again.
    a1.shutdown();
    v1.pause().await.unwrap();
    let c3 = clone_spec(&c1, &dir.path().join("c3"), "clone3");
    let (saved, state1, took) = snapshot_and_kill(v1, &dir.path().join("c1")).await;
    assert_eq!(saved, SavedMemory::InState);
    let len1 = std::fs::metadata(&state1).unwrap().len();
    eprintln!(
        "clone1's state with its RAM: {} MiB in {took:?}",
        len1 >> 20
    );
    assert!(len1 > 8 << 20, "the state holds RAM: {len1} bytes");
    let t = Instant::now();
    let v3 = vmm
        .restore_full(&restore(&c3, None, &state1))
        .await
        .unwrap();
    let _g3 = KillGuard(v3.pid());
    eprintln!("clone3 running {:?} after its restore began", t.elapsed());
    assert_eq!(v3.memory(), &InstanceMemory::Ram);
    let a3 = check_restored(&v3, &c3, &pid).await;
    assert_eq!(sh(&a3, "cat /tmp/who").await.1, "one\n");
    v3.pause().await.unwrap();
    let c4 = clone_spec(&c3, &dir.path().join("c4"), "clone4");
    let state3 = dir.path().join("c3/state");
    let saved = v3
        .save_full(&FullSnapshotFiles {
            state: state3.clone(),
            memory: dir.path().join("c3/memory-unused"),
        })
        .await
        .unwrap();
    assert_eq!(saved, SavedMemory::InState);
    // After its RAM went into a state the VM runs on, its disk writable.
    v3.resume().await.unwrap();
    let (code, out) = sh(&a3, "echo on > /on && sync && cat /on /tmp/who").await;
    assert_eq!((code, out.as_str()), (Some(0), "on\none\n"));
    a3.shutdown();
    v3.kill().await.unwrap();
    let v4 = vmm
        .restore_full(&restore(&c4, None, &state3))
        .await
        .unwrap();
    let _g4 = KillGuard(v4.pid());
    let a4 = check_restored(&v4, &c4, &pid).await;
    a4.shutdown();
    let (v4, _) = readopt(&vmm, v4, &c4).await;
    assert_eq!(v4.memory(), &InstanceMemory::Ram);
    v4.kill().await.unwrap();

    // A truncated state: refused naming the file, nothing left behind.
    let cut = dir.path().join("cut.state");
    let bytes = std::fs::read(&state1).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let c5 = clone_spec(&c1, &dir.path().join("c5"), "clone5");
    expect_refused(&vmm, &restore(&c5, None, &cut)).await;
    let cut_dev = dir.path().join("cut-device.state");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&cut_dev, &bytes[..bytes.len() / 2]).unwrap();
    expect_refused(&vmm, &restore(&c5, Some(&snap_mem), &cut_dev)).await;
    for d in ["src", "c1", "c2", "c3", "c4", "c5"] {
        let left = processes_mentioning(&dir.path().join(d).to_string_lossy());
        assert!(left.is_empty(), "processes left: {left:?}");
    }
}

/// Adopts the QEMU of `vm` as a restarted daemon would (`vm`'s own QMP
/// connection closed first: QEMU serves one client).
async fn readopt(
    vmm: &QemuVmm,
    vm: QemuInstance,
    s: &LaunchSpec,
) -> (QemuInstance, agentenv_core::backend::AdoptedState) {
    let identity = vm.identity().unwrap();
    drop(vm);
    vmm.adopt_instance(&AdoptSpec {
        vm_id: s.vm_id.clone(),
        process: identity,
        control_socket: s.control_socket.clone(),
        agent_socket: s.agent_socket.clone(),
        console_log: s.console_log.clone(),
        console_log_max_bytes: s.console_log_max_bytes,
        request_timeout: s.request_timeout,
    })
    .await
    .unwrap()
}

/// A restore from `spec` fails naming its state file, and leaves no process
/// or socket behind.
async fn expect_refused(vmm: &QemuVmm, spec: &RestoreSpec) {
    let t = Instant::now();
    let err = vmm.restore_full(spec).await.expect_err("restore must fail");
    eprintln!("refused after {:?}: {err}", t.elapsed());
    let msg = err.to_string();
    assert!(msg.contains(&*spec.state.to_string_lossy()), "{msg}");
    let l = &spec.launch;
    assert!(!l.control_socket.exists(), "qmp socket left");
    assert!(
        !l.agent_socket.as_ref().unwrap().exists(),
        "agent socket left"
    );
    let left = processes_mentioning(&l.session_dir.to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[tokio::test]
async fn a_garbage_or_missing_state_is_refused_and_leaves_nothing() {
    let (qemu, a) = need_guest!();
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "garbage", a.kernel.clone());
    s.initrd = Some(a.initrd.clone());
    s.agent_socket = Some(dir.path().join("agent.sock"));
    let vmm = QemuVmm::new(qemu, Accel::Tcg);
    let garbage = dir.path().join("garbage.state");
    let noise: Vec<u8> = (0..64u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &noise).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let memory = shm.path().join("snap.mem");
    std::fs::File::create(&memory)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    for memory in [None, Some(memory.clone())] {
        let r = RestoreSpec {
            launch: s.clone(),
            state: garbage.clone(),
            memory,
        };
        expect_refused(&vmm, &r).await;
    }
    let r = RestoreSpec {
        launch: s.clone(),
        state: dir.path().join("no-such.state"),
        memory: None,
    };
    match vmm.restore_full(&r).await {
        Err(VmmError::Io { context, .. }) => {
            assert!(context.contains("no-such.state"), "{context}")
        }
        other => panic!("{other:?}"),
    }
    // The snapshot's memory file is the caller's: still there.
    assert!(memory.exists());
    // A missing or short memory file is refused before QEMU starts (QEMU
    // would create or grow it), naming it.
    let short = shm.path().join("short.mem");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    for bad in [shm.path().join("no-such.mem"), short.clone()] {
        let r = RestoreSpec {
            launch: s.clone(),
            state: garbage.clone(),
            memory: Some(bad.clone()),
        };
        match vmm.restore_full(&r).await {
            Err(VmmError::Io { context, .. }) => {
                assert!(context.contains(&*bad.to_string_lossy()), "{context}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!shm.path().join("no-such.mem").exists());
    assert_eq!(std::fs::metadata(&short).unwrap().len(), 128 << 20);
    assert!(!s.control_socket.exists() && !s.agent_socket.as_ref().unwrap().exists());
}

#[tokio::test]
async fn a_guest_takes_the_identity_the_host_gives_it() {
    let (qemu, a) = need_guest!();
    if !rootfs_has_agent(&a) {
        return;
    }
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = guest_spec(dir.path(), "identity", &a);
    s.agent_socket = Some(dir.path().join("agent.sock"));
    // With a NIC, QEMU runs in a network namespace of the test's own, where
    // it makes its TAP: the host's namespace is never touched.
    let ns = match agentenv_testkit::netns::unavailable() {
        None => Some(agentenv_testkit::netns::NetnsPair::new("ident").unwrap()),
        Some(why) => {
            eprintln!("the guest gets no NIC ({why}): the net step is not tested");
            None
        }
    };
    let nic = ns.is_some();
    let qemu = match &ns {
        Some(ns) => {
            s.net = Some(agentenv_core::backend::NetAttachment {
                tap_name: "aeid0".into(),
                guest_mac: "06:00:0a:00:00:02".into(),
            });
            let w = dir.path().join("qemu-in-netns");
            std::fs::write(
                &w,
                format!(
                    "#!/bin/sh\nexec ip netns exec '{}' '{}' \"$@\"\n",
                    ns.host,
                    qemu.display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
            w
        }
        None => qemu,
    };
    let vm = QemuVmm::new(qemu, Accel::Tcg).launch(&s).await.unwrap();
    let _guard = KillGuard(vm.pid());
    let client = agent_at(
        s.agent_socket.as_ref().unwrap(),
        Duration::from_secs(90),
        &s,
    )
    .await;
    // The boot scripts are done (they set the host name and eth0 themselves).
    assert!(
        wait_until(Duration::from_secs(60), || heartbeats(&s) > 0).await,
        "no heartbeat\n{}",
        tail(&s)
    );

    // The guest's clock is far off, as a snapshot's is after a while.
    let (code, _) = sh(&client, "date -s @1000000000 >/dev/null").await;
    assert_eq!(code, Some(0));
    let (_, before) = sh(&client, "cat /proc/sys/kernel/random/entropy_avail").await;
    if nic {
        // The source's address (and a secondary one) and a neighbour it knew.
        let (code, _) = sh(
            &client,
            "ip link set dev eth0 up && ip addr add 10.9.9.9/24 dev eth0 && \
             ip addr add 10.9.9.10/24 dev eth0 && \
             arp -i eth0 -s 10.9.9.1 06:00:00:00:00:01 && \
             ip route add default via 10.9.9.1 dev eth0",
        )
        .await;
        assert_eq!(code, Some(0));
        let (_, neigh) = sh(&client, "ip neigh show dev eth0").await;
        assert!(neigh.contains("10.9.9.1"), "{neigh}");
    }

    let entropy: String = (0..64)
        .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 251))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let identity = proto::Identity {
        hostname: "clone-7".into(),
        net: nic.then(|| proto::IdentityNet {
            address: "10.0.0.6".into(),
            prefix_len: 30,
            gateway: "10.0.0.5".into(),
            mac: "06:00:0a:00:00:06".into(),
        }),
        entropy_hex: entropy,
        unix_time_ns: now.as_nanos() as u64,
    };
    let t = Instant::now();
    client.set_identity(&identity).await.unwrap();
    eprintln!("identity applied in {:?}", t.elapsed());

    let (_, name) = sh(&client, "hostname").await;
    assert_eq!(name.trim(), "clone-7");
    let (_, guest_now) = sh(&client, "date +%s").await;
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest_now: u64 = guest_now.trim().parse().unwrap();
    assert!(
        guest_now.abs_diff(host_now) <= 5,
        "guest clock {guest_now}, host clock {host_now}"
    );
    let (_, after) = sh(&client, "cat /proc/sys/kernel/random/entropy_avail").await;
    eprintln!(
        "entropy_avail {} before, {} after",
        before.trim(),
        after.trim()
    );
    let after: u32 = after.trim().parse().unwrap();
    assert!(
        after >= 256,
        "512 bits were credited: entropy_avail is {after}"
    );
    if nic {
        let (_, mac) = sh(&client, "cat /sys/class/net/eth0/address").await;
        assert_eq!(mac.trim(), "06:00:0a:00:00:06");
        let (_, addrs) = sh(&client, "ip -4 addr show dev eth0").await;
        assert!(addrs.contains("inet 10.0.0.6/30"), "{addrs}");
        assert_eq!(addrs.matches("inet ").count(), 1, "{addrs}");
        let (_, neigh) = sh(&client, "ip neigh show dev eth0").await;
        assert!(!neigh.contains("10.9.9.1"), "{neigh}");
        let (_, routes) = sh(&client, "ip route").await;
        assert!(routes.contains("default via 10.0.0.5 dev eth0"), "{routes}");
        assert!(!routes.contains("10.9.9"), "{routes}");
        let (_, up) = sh(&client, "cat /sys/class/net/eth0/flags").await;
        let flags = u32::from_str_radix(up.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "eth0 is up: flags {up}");
    }

    // A bad identity is refused and changes nothing.
    let mut bad = identity.clone();
    bad.hostname = "other".into();
    bad.entropy_hex = "00".repeat(8);
    match client.set_identity(&bad).await {
        Err(agentenv_core::agent::AgentError::Remote(m)) => {
            assert_eq!(m.field.as_deref(), Some("entropy_hex"), "{m:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (_, name) = sh(&client, "hostname").await;
    assert_eq!(name.trim(), "clone-7");
    client.shutdown();
    vm.kill().await.unwrap();
}

/// The E2B surface's requests in a real guest: its own /etc/passwd, a pty
/// from its devpts, inotify on its file systems.
#[tokio::test]
async fn the_guest_agent_serves_users_ptys_file_operations_and_watches() {
    let (qemu, a) = need_guest!();
    if !rootfs_has_agent(&a) {
        return;
    }
    let _one = GUESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (vm, _guard, s, sock) = launch_with_agent(qemu, &a, dir.path(), "e2bops").await;
    let client = agent_at(&sock, Duration::from_secs(60), &s).await;
    assert_eq!(client.hello().features, proto::FEATURES);

    // Watch /tmp before anything happens there.
    let mut watch = client
        .watch(&proto::WatchRequest {
            path: "/tmp".into(),
            recursive: true,
            user: None,
        })
        .await
        .unwrap();

    let run = |req: proto::ExecRequest| {
        let client = client.clone();
        async move {
            let mut e = client.exec(&req, None).await.unwrap();
            let mut out = Vec::new();
            loop {
                match e.next().await.unwrap() {
                    ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => out.extend(b),
                    ExecEvent::Exit(st) => {
                        return (
                            st.exit_code,
                            String::from_utf8_lossy(&out).replace('\r', ""),
                        )
                    }
                }
            }
        }
    };
    let sh = |script: &str| proto::ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let mut nobody = sh("id -u; echo $HOME $USER; touch /tmp/by-nobody");
    nobody.user = Some("nobody".into());
    assert_eq!(
        run(nobody).await,
        (Some(0), "65534\n/nonexistent nobody\n".to_string())
    );
    let mut tty = sh("tty; test -t 0 && echo on-a-terminal");
    tty.pty = Some(proto::PtySize { cols: 80, rows: 24 });
    let (code, out) = run(tty).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("/dev/pts/") && out.contains("on-a-terminal"),
        "{out}"
    );

    let made = client
        .fs(&proto::FsRequest {
            user: Some("nobody".into()),
            op: proto::FsOp::MakeDir {
                path: "/tmp/a/b".into(),
            },
        })
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(
        (made.owner.as_str(), made.group.as_str()),
        ("nobody", "nogroup")
    );
    let listed = client
        .fs(&proto::FsRequest {
            user: None,
            op: proto::FsOp::List {
                path: "/tmp".into(),
                depth: 2,
            },
        })
        .await
        .unwrap()
        .entries;
    let paths: Vec<&str> = listed.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"/tmp/a/b") && paths.contains(&"/tmp/by-nobody"),
        "{paths:?}"
    );

    // The watch saw the command's file and the new directories, by name.
    let mut seen = Vec::new();
    while !seen.contains(&"a/b".to_string()) {
        let ev = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("an event in time")
            .unwrap();
        if ev.op == proto::FsEventOp::Create {
            seen.push(ev.name);
        }
    }
    assert_eq!(seen, ["by-nobody", "a", "a/b"]);
    drop(watch);
    client.ping().await.unwrap();
    vm.kill().await.unwrap();
}
