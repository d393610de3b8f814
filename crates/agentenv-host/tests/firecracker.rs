//! The Firecracker driver against the Firecracker double (`fc-double`): the
//! repeated Ctrl-Alt-Del of a shutdown, and snapshot create/restore. The
//! full-snapshot tests through the VMM seam (`save_full`, `Vmm::restore`)
//! also run against a real Firecracker when `AGENTENV_TEST_FIRECRACKER` names
//! one (it needs a real kernel: `AGENTENV_TEST_KERNEL`, else
//! `<artifacts>/kernels/vmlinux`; no TAP devices are attached then).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::backend::{
    wait_exit, AdoptSpec, AdoptedState, AgentChannel, DriveSpec, FullSnapshotFiles, LaunchSpec,
    NetAttachment, RestoreSpec as SeamRestore, SavedMemory, Vmm, VmmError, VmmInstance,
};
use agentenv_host::firecracker::models::{
    InstanceState, MemBackend, MemBackendType, NetworkOverride, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, VsockOverride,
};
use agentenv_host::firecracker::{FirecrackerInstance, FirecrackerVmm, LoadSpec, ProcessSpec};
use agentenv_testkit::leaks::{open_files, processes_in};
use agentenv_testkit::paths;

/// The double behind a wrapper script that adds `extra` flags.
fn driver(dir: &Path, extra: &[&str]) -> FirecrackerVmm {
    let name = format!("fc-{}.sh", extra.len());
    FirecrackerVmm::new(paths::fc_double_wrapper(dir, &name, extra))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fcdrv")
        .tempdir_in("/tmp")
        .unwrap()
}

fn file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

fn spec(dir: &Path, vm_id: &str) -> LaunchSpec {
    LaunchSpec {
        memory_file: None,
        cgroup_procs: Vec::new(),
        vm_id: vm_id.into(),
        session_dir: dir.to_path_buf(),
        control_socket: dir.join(format!("{vm_id}.sock")),
        console_log: dir.join(format!("{vm_id}.log")),
        console_log_max_bytes: 1 << 20,
        vcpus: 1,
        memory_mib: 64,
        kernel: file(dir, "vmlinux"),
        initrd: None,
        boot_args: "console=ttyS0".into(),
        drives: vec![
            DriveSpec {
                id: "rootfs".into(),
                path: file(dir, "rootfs.ext4"),
                read_only: true,
                is_root: true,
                fd: None,
            },
            DriveSpec {
                id: "overlay".into(),
                path: file(dir, "overlay.ext4"),
                read_only: false,
                is_root: false,
                fd: None,
            },
        ],
        net: Some(NetAttachment {
            tap_name: "tap-src".into(),
            guest_mac: "06:00:00:00:00:01".into(),
        }),
        agent_socket: Some(dir.join("agent.sock")),
        startup_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
    }
}

fn load_spec(dir: &Path, vm_id: &str, load: SnapshotLoadParams) -> LoadSpec {
    let mut process = ProcessSpec::from(&spec(dir, vm_id));
    process.agent_socket = Some(dir.join("agent.sock"));
    LoadSpec { process, load }
}

fn file_load(snap: &Path, mem: &Path) -> SnapshotLoadParams {
    SnapshotLoadParams {
        snapshot_path: snap.to_path_buf(),
        mem_backend: Some(MemBackend {
            backend_path: mem.to_path_buf(),
            backend_type: MemBackendType::File,
        }),
        ..Default::default()
    }
}

/// A running VM of the double, paused and snapshotted: `(vm, state file, memory file)`.
async fn snapshotted(vmm: &FirecrackerVmm, dir: &Path) -> (FirecrackerInstance, PathBuf, PathBuf) {
    let inst = vmm.launch_instance(&spec(dir, "src")).await.unwrap();
    inst.pause().await.unwrap();
    let (snap, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    inst.snapshot_create(&SnapshotCreateParams {
        snapshot_type: Some(SnapshotType::Full),
        snapshot_path: snap.clone(),
        mem_file_path: mem.clone(),
    })
    .await
    .unwrap();
    (inst, snap, mem)
}

#[tokio::test]
async fn shutdown_presses_ctrl_alt_del_until_the_guest_takes_it() {
    let dir = tempdir();
    // The guest's keyboard driver comes up 1.2 s after the start: the first
    // key press is lost.
    let vmm = driver(
        dir.path(),
        &["--i8042-delay-ms", "1200", "--shutdown-delay-ms", "0"],
    );
    let inst = vmm.launch(&spec(dir.path(), "vm")).await.unwrap();
    let asked = Instant::now();
    inst.request_shutdown().await.unwrap();
    let exit = wait_exit(inst.exit_watch(), Duration::from_secs(10))
        .await
        .expect("the VMM exits after a repeated Ctrl-Alt-Del");
    assert!(exit.success(), "{exit:?}");
    assert!(
        asked.elapsed() >= Duration::from_millis(1000),
        "the first press was lost: {:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn snapshot_create_needs_a_paused_vm() {
    let dir = tempdir();
    let vmm = driver(dir.path(), &[]);
    let inst = vmm.launch_instance(&spec(dir.path(), "vm")).await.unwrap();
    let params = SnapshotCreateParams {
        snapshot_type: None,
        snapshot_path: dir.path().join("vm.snap"),
        mem_file_path: dir.path().join("vm.mem"),
    };
    match inst.snapshot_create(&params).await {
        Err(VmmError::Refused {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains("save/restore unavailable while running"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    inst.pause().await.unwrap();
    inst.snapshot_create(&params).await.unwrap();
    assert_eq!(
        std::fs::metadata(&params.mem_file_path).unwrap().len(),
        64 << 20
    );
    inst.kill().await.unwrap();
}

#[tokio::test]
async fn restore_loads_the_snapshot_into_a_fresh_vmm() {
    let dir = tempdir();
    let vmm = driver(dir.path(), &[]);
    let (source, snap, mem) = snapshotted(&vmm, dir.path()).await;
    // On v1.13 the vsock socket comes back at its saved path: the source
    // must be gone first.
    source.kill().await.unwrap();
    let mut load = file_load(&snap, &mem);
    load.resume_vm = true;
    load.network_overrides = vec![NetworkOverride {
        iface_id: "eth0".into(),
        host_dev_name: "tap-clone".into(),
    }];
    let started = Instant::now();
    let inst = vmm
        .load_snapshot(&load_spec(dir.path(), "clone", load))
        .await
        .unwrap();
    eprintln!("restore took {:?}", started.elapsed());
    let info = inst.instance_info().await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    assert_eq!(info.vmm_version, "1.13.1");
    assert!(dir.path().join("agent.sock").exists());
    inst.kill().await.unwrap();
    assert!(!dir.path().join("clone.sock").exists(), "sockets removed");
}

#[tokio::test]
async fn a_failed_restore_leaves_no_process_or_socket() {
    let dir = tempdir();
    let vmm = driver(dir.path(), &[]);
    let load = file_load(&dir.path().join("missing.snap"), &dir.path().join("m"));
    match vmm
        .load_snapshot(&load_spec(dir.path(), "clone", load))
        .await
    {
        Err(VmmError::Refused { message, .. }) => {
            assert!(
                message.contains("Failed to open snapshot file"),
                "{message}"
            )
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal"),
    }
    assert!(!dir.path().join("clone.sock").exists());
}

#[tokio::test]
async fn v1_16_restores_a_clone_beside_its_source_with_vsock_override() {
    let dir = tempdir();
    let vmm = driver(dir.path(), &["--fc-version", "1.16.1"]);
    let (source, snap, mem) = snapshotted(&vmm, dir.path()).await;
    let mut load = file_load(&snap, &mem);
    load.resume_vm = true;
    load.clock_realtime = true;
    load.vsock_override = Some(VsockOverride {
        uds_path: dir.path().join("clone-agent.sock"),
    });
    let mut rs = load_spec(dir.path(), "clone", load);
    rs.process.agent_socket = Some(dir.path().join("clone-agent.sock"));
    let clone = vmm.load_snapshot(&rs).await.unwrap();
    assert_eq!(clone.instance_info().await.unwrap().vmm_version, "1.16.1");
    assert!(dir.path().join("clone-agent.sock").exists());
    assert!(
        dir.path().join("agent.sock").exists(),
        "the source keeps its own"
    );
    clone.kill().await.unwrap();
    source.kill().await.unwrap();
}

// ------------------------------------------------ full snapshots through the seam

/// The VMM under test: the double emulating `version`, or (`version` None)
/// the real Firecracker with its real kernel, when given.
struct Target {
    vmm: FirecrackerVmm,
    kernel: Option<PathBuf>,
    /// What [`Vmm::version`] must say, when known in advance.
    version: Option<String>,
}

impl Target {
    fn double(dir: &Path, version: &str, extra: &[&str]) -> Target {
        let mut flags = vec!["--fc-version", version];
        flags.extend_from_slice(extra);
        Target {
            vmm: driver(dir, &flags),
            kernel: None,
            version: Some(format!("firecracker {version}")),
        }
    }

    /// The real Firecracker, when `AGENTENV_TEST_FIRECRACKER` and a kernel
    /// are given (else the test skips, saying so).
    fn real() -> Option<Target> {
        let Some(binary) = agentenv_testkit::paths::real_firecracker() else {
            agentenv_testkit::skip::skip_optional("AGENTENV_TEST_FIRECRACKER is not set");
            return None;
        };
        let kernel = std::env::var_os("AGENTENV_TEST_KERNEL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| agentenv_testkit::paths::artifacts().join("kernels/vmlinux"));
        if !kernel.exists() {
            agentenv_testkit::skip::skip_optional(&format!(
                "the real Firecracker: no kernel at {}",
                kernel.display()
            ));
            return None;
        }
        Some(Target {
            vmm: FirecrackerVmm::new(binary),
            kernel: Some(kernel),
            version: None,
        })
    }

    fn is_real(&self) -> bool {
        self.kernel.is_some()
    }

    /// A VM `vm_id` in its own session directory `root/vm_id` (made here),
    /// with base images shared in `root/base` and its overlay disk, TAP
    /// (double only: the real one needs a real TAP) and agent socket.
    fn launch(&self, root: &Path, vm_id: &str) -> LaunchSpec {
        let base = root.join("base");
        let session = root.join(vm_id);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&session).unwrap();
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => existing(&base, "vmlinux"),
        };
        let mut s = spec(&session, vm_id);
        // `spec` made its own files in the session directory: keep only the overlay.
        std::fs::remove_file(session.join("vmlinux")).unwrap();
        std::fs::remove_file(session.join("rootfs.ext4")).unwrap();
        s.kernel = kernel;
        s.drives[0].path = existing(&base, "rootfs.ext4");
        s.control_socket = root.join(format!("{vm_id}.sock"));
        s.console_log = session.join("console.log");
        s.memory_mib = if self.is_real() { 128 } else { 64 };
        s.net = (!self.is_real()).then(|| NetAttachment {
            tap_name: format!("tap-{vm_id}"),
            guest_mac: "06:00:00:00:00:01".into(),
        });
        s
    }
}

fn existing(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if !p.exists() {
        file(dir, name);
    }
    p
}

/// A source VM launched, paused, saved in full to `root/snap` and resumed:
/// `(source, its spec, the snapshot's files)`.
async fn saved_source(
    t: &Target,
    root: &Path,
) -> (Box<dyn VmmInstance>, LaunchSpec, FullSnapshotFiles) {
    let spec = t.launch(root, "src");
    std::fs::write(&spec.drives[1].path, b"the source's disk").unwrap();
    let src = t.vmm.launch(&spec).await.unwrap();
    let snap = root.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let files = FullSnapshotFiles {
        state: snap.join("vm.state"),
        memory: snap.join("vm.mem"),
    };
    src.pause().await.unwrap();
    assert_eq!(src.save_full(&files).await.unwrap(), SavedMemory::Written);
    src.resume().await.unwrap();
    assert_eq!(
        std::fs::metadata(&files.memory).unwrap().len(),
        spec.memory_mib << 20,
        "memory written by the VMM"
    );
    (src, spec, files)
}

/// The restore of `vm_id` from `files`: its own session directory with a
/// copy of the source's disk.
fn clone_spec(
    t: &Target,
    root: &Path,
    vm_id: &str,
    source: &LaunchSpec,
    files: &FullSnapshotFiles,
) -> SeamRestore {
    let launch = t.launch(root, vm_id);
    std::fs::copy(&source.drives[1].path, &launch.drives[1].path).unwrap();
    SeamRestore {
        launch,
        state: files.state.clone(),
        memory: Some(files.memory.clone()),
    }
}

/// Two clones restored at once from one snapshot while their source runs
/// on: each in its own session directory with its own disk copy, TAP and
/// vsock socket; neither holds the other's (or the source's) files.
async fn two_clones_from_one_snapshot(t: Target, root: &Path) {
    if let Some(v) = &t.version {
        assert_eq!(&t.vmm.version().await.unwrap(), v);
    }
    let version = t.vmm.version().await.unwrap();
    assert!(version.starts_with("firecracker 1."), "{version}");
    let (src, src_spec, files) = saved_source(&t, root).await;
    let a = clone_spec(&t, root, "c1", &src_spec, &files);
    let b = clone_spec(&t, root, "c2", &src_spec, &files);
    let started = Instant::now();
    let (ca, cb) = tokio::join!(t.vmm.restore_instance(&a), t.vmm.restore_instance(&b));
    eprintln!("two restores took {:?}", started.elapsed());
    let clones = [(ca.unwrap(), &a), (cb.unwrap(), &b)];

    for (clone, rs) in &clones {
        let session = &rs.launch.session_dir;
        assert_eq!(clone.guest_state().await.unwrap(), AdoptedState::Running);
        let socket = session.join("agent.sock");
        assert_eq!(
            clone.agent_channel(),
            Some(AgentChannel::HybridVsock {
                socket: socket.clone(),
                port: agentenv_host::firecracker::AGENT_VSOCK_PORT,
            })
        );
        assert!(socket.exists(), "{} bound", socket.display());
        let pid = clone.pid().unwrap();
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
            *session,
            "firecracker runs in the clone's session directory"
        );
        let open = open_files(pid);
        assert!(open.contains(&rs.launch.drives[1].path), "{open:?}");
        for other in [
            &src_spec.session_dir,
            &a.launch.session_dir,
            &b.launch.session_dir,
        ] {
            if other != session {
                assert!(
                    !open.iter().any(|f| f.starts_with(other)),
                    "{} holds a file of {}: {open:?}",
                    rs.launch.vm_id,
                    other.display()
                );
            }
        }
        let load: serde_json::Value =
            serde_json::from_slice(&std::fs::read(session.join("snapshot-load.json")).unwrap())
                .unwrap();
        assert_eq!(load["resume_vm"], true);
        if let Some(net) = &rs.launch.net {
            assert_eq!(
                load["network_overrides"],
                serde_json::json!([{"iface_id": "eth0", "host_dev_name": net.tap_name}])
            );
            let cfg: serde_json::Value =
                serde_json::from_slice(&clone_config(&rs.launch.control_socket).await).unwrap();
            assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], net.tap_name);
            assert_eq!(cfg["drives"][1]["path_on_host"], "overlay.ext4");
        }
        assert_eq!(
            load.get("vsock_override").is_some(),
            agentenv_host::firecracker::has_vsock_override(&version)
        );
        clone.pause().await.unwrap();
        assert_eq!(clone.guest_state().await.unwrap(), AdoptedState::Paused);
        clone.resume().await.unwrap();
    }
    // The source runs on with its own socket.
    assert_eq!(src.guest_state().await.unwrap(), AdoptedState::Running);
    assert!(src_spec.session_dir.join("agent.sock").exists());
    assert_eq!(
        std::fs::read(&src_spec.drives[1].path).unwrap(),
        b"the source's disk"
    );

    for (clone, rs) in &clones {
        let exit = clone.exit_watch();
        clone.kill().await.unwrap();
        assert!(wait_exit(exit, Duration::from_secs(5)).await.is_some());
        assert!(!rs.launch.control_socket.exists(), "control socket removed");
        assert!(
            !rs.launch.session_dir.join("agent.sock").exists(),
            "vsock socket removed"
        );
        assert!(processes_in(&rs.launch.session_dir).is_empty());
    }
    assert!(
        src_spec.session_dir.join("agent.sock").exists(),
        "the source's socket stays"
    );
    src.kill().await.unwrap();
}

/// `GET /vm/config` of a VMM, raw.
async fn clone_config(socket: &Path) -> Vec<u8> {
    let client = agentenv_host::firecracker::FcClient::new(socket, Duration::from_secs(5));
    client
        .request(hyper::Method::GET, "/vm/config", None)
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn two_clones_from_one_snapshot_on_v1_13() {
    let dir = tempdir();
    two_clones_from_one_snapshot(Target::double(dir.path(), "1.13.1", &[]), dir.path()).await;
}

#[tokio::test]
async fn two_clones_from_one_snapshot_on_v1_16() {
    let dir = tempdir();
    two_clones_from_one_snapshot(Target::double(dir.path(), "1.16.1", &[]), dir.path()).await;
}

#[tokio::test]
async fn two_clones_from_one_snapshot_on_a_real_firecracker() {
    let Some(t) = Target::real() else { return };
    let dir = tempdir();
    two_clones_from_one_snapshot(t, dir.path()).await;
}

/// Restores that must fail, each leaving no process, socket or file but what
/// the test made.
async fn refused_restores(t: Target, root: &Path) {
    let (src, src_spec, files) = saved_source(&t, root).await;
    src.kill().await.unwrap();
    let corrupt = root.join("snap/corrupt.state");
    std::fs::write(&corrupt, b"not a snapshot").unwrap();
    let short = root.join("snap/short.mem");
    std::fs::write(&short, b"too short").unwrap();
    let cases = [
        (
            "missing",
            root.join("snap/missing.state"),
            Some(files.memory.clone()),
        ),
        ("corrupt", corrupt, Some(files.memory.clone())),
        ("short", files.state.clone(), Some(short)),
        ("no-memory", files.state.clone(), None),
    ];
    for (name, state, memory) in cases {
        if name == "short" && t.is_real() {
            // What Firecracker does with a short file is not checked here
            // (the snapshot store checks the size before any restore).
            continue;
        }
        let mut rs = clone_spec(&t, root, name, &src_spec, &files);
        rs.state = state;
        rs.memory = memory;
        let before = agentenv_testkit::leaks::files_below(root);
        match t.vmm.restore(&rs).await {
            Ok(_) => panic!("{name}: restored"),
            Err(e) => {
                let text = e.to_string();
                eprintln!("{name}: {text}");
                assert!(
                    matches!(
                        e,
                        VmmError::Refused { .. }
                            | VmmError::Io { .. }
                            | VmmError::ExitedEarly { .. }
                    ),
                    "{name}: {text}"
                );
            }
        }
        let session = &rs.launch.session_dir;
        assert!(processes_in(session).is_empty(), "{name}: a vmm is left");
        assert!(
            !rs.launch.control_socket.exists(),
            "{name}: control socket left"
        );
        assert!(
            !session.join("agent.sock").exists(),
            "{name}: vsock socket left"
        );
        let after = agentenv_testkit::leaks::files_below(root);
        let new: Vec<_> = after
            .difference(&before)
            .filter(|p| !p.ends_with("console.log") && !p.ends_with("snapshot-load.json"))
            .collect();
        assert!(new.is_empty(), "{name}: left {new:?}");
    }
}

#[tokio::test]
async fn restores_from_bad_files_are_refused_with_nothing_left() {
    for version in ["1.13.1", "1.16.1"] {
        let dir = tempdir();
        refused_restores(Target::double(dir.path(), version, &[]), dir.path()).await;
    }
}

#[tokio::test]
async fn restores_from_bad_files_are_refused_on_a_real_firecracker() {
    let Some(t) = Target::real() else { return };
    let dir = tempdir();
    refused_restores(t, dir.path()).await;
}

/// A restored VM's agent channel reaches the guest's listener through the
/// clone's own vsock socket (the double's `--vsock-agent` stands in for the
/// guest agent).
#[tokio::test]
async fn a_clones_agent_channel_reaches_the_guest() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempdir();
    let root = dir.path();
    let listener_path = root.join("guest-agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&listener_path).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 5];
            if conn.read_exact(&mut buf).is_ok() {
                let _ = conn.write_all(&buf);
            }
        }
    });
    let flag = format!(
        "{}={}",
        agentenv_host::firecracker::AGENT_VSOCK_PORT,
        listener_path.display()
    );
    let t = Target::double(root, "1.13.1", &["--vsock-agent", &flag]);
    let (src, src_spec, files) = saved_source(&t, root).await;
    let clone = t
        .vmm
        .restore(&clone_spec(&t, root, "c1", &src_spec, &files))
        .await
        .unwrap();
    let Some(AgentChannel::HybridVsock { socket, port }) = clone.agent_channel() else {
        panic!("no hybrid vsock channel");
    };
    assert_eq!(socket, root.join("c1/agent.sock"));
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert!(ok.starts_with("OK "), "{ok:?}");
        s.write_all(b"hello").unwrap();
        let mut echo = [0u8; 5];
        reader.read_exact(&mut echo).unwrap();
        echo
    })
    .await
    .unwrap();
    assert_eq!(&answer, b"hello");
    clone.kill().await.unwrap();
    src.kill().await.unwrap();
}

/// A restored VM is re-adopted after a daemon restart like a booted one.
#[tokio::test]
async fn a_restored_vm_is_adopted_after_a_restart() {
    let dir = tempdir();
    let root = dir.path();
    let t = Target::double(root, "1.13.1", &[]);
    let (src, src_spec, files) = saved_source(&t, root).await;
    let rs = clone_spec(&t, root, "c1", &src_spec, &files);
    let clone = t.vmm.restore(&rs).await.unwrap();
    let l = &rs.launch;
    let (adopted, state) = t
        .vmm
        .adopt(&AdoptSpec {
            vm_id: l.vm_id.clone(),
            process: clone.identity().unwrap(),
            control_socket: l.control_socket.clone(),
            agent_socket: l.agent_socket.clone(),
            console_log: l.console_log.clone(),
            console_log_max_bytes: l.console_log_max_bytes,
            request_timeout: l.request_timeout,
        })
        .await
        .unwrap();
    assert_eq!(state, AdoptedState::Running);
    assert_eq!(adopted.agent_channel(), clone.agent_channel());
    adopted.pause().await.unwrap();
    assert_eq!(clone.guest_state().await.unwrap(), AdoptedState::Paused);
    adopted.kill().await.unwrap();
    assert!(wait_exit(clone.exit_watch(), Duration::from_secs(5))
        .await
        .is_some());
    assert!(!l.control_socket.exists());
    assert!(!l.session_dir.join("agent.sock").exists());
    src.kill().await.unwrap();
}
