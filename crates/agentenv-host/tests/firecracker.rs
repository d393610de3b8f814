//! The Firecracker driver against the Firecracker double (`fc-double`): the
//! repeated Ctrl-Alt-Del of a shutdown, and snapshot create/restore.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_core::backend::{
    wait_exit, DriveSpec, LaunchSpec, NetAttachment, Vmm, VmmError, VmmInstance,
};
use agentenv_host::firecracker::models::{
    InstanceState, MemBackend, MemBackendType, NetworkOverride, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, VsockOverride,
};
use agentenv_host::firecracker::{FirecrackerInstance, FirecrackerVmm, LoadSpec, ProcessSpec};
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
            },
            DriveSpec {
                id: "overlay".into(),
                path: file(dir, "overlay.ext4"),
                read_only: false,
                is_root: false,
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
    match vmm.load_snapshot(&load_spec(dir.path(), "clone", load)).await {
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
