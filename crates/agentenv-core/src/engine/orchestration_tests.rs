//! The engine's orchestration over recording fakes of every seam
//! (`crate::testing`): create and its rollback, restore at startup, snapshot.
//! No root, no VMM, no files: each test builds its own world in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentenv_api::{BackendKind, CreateVmRequest, DiskSpec, ShareSpec, VmState};

use super::{Engine, SnapshotInProgress, VmRecord, RECORD_FILE};
use crate::backend::AdoptedState;
use crate::config::{AgentConfig, Config};
use crate::error::EngineError;
use crate::snapshot::{NewSnapshot, SnapshotStore};
use crate::testing::{
    FakeHost, FakeNetwork, FakeSnapshots, FakeVmm, HostCall, NetCall, SnapshotCall, VmmCall,
};

const SESSIONS: &str = "/srv/sessions";
const SOCKETS: &str = "/run/ae";

/// One world of fakes; engines started on it share it, as daemons share a host.
struct Rig {
    host: Arc<FakeHost>,
    vmm: Arc<FakeVmm>,
    net: Arc<FakeNetwork>,
    snaps: Arc<FakeSnapshots>,
    cfg: Config,
}

impl Rig {
    fn new() -> Rig {
        let host = FakeHost::new(8192);
        host.mkdir_p(Path::new(SESSIONS));
        host.mkdir_p(Path::new(SOCKETS));
        host.put_file(Path::new("/srv/kernels/vmlinux"), b"kernel");
        host.put_file(Path::new("/srv/rootfs/base.ext4"), b"base");
        host.put_file(Path::new("/srv/direct/disk.ext4"), b"disk");
        host.put_file(Path::new("/srv/direct/share/a.txt"), b"hello");
        let cfg = Config {
            session_root: SESSIONS.into(),
            socket_root: SOCKETS.into(),
            rootfs_root: "/srv/rootfs".into(),
            kernel_root: "/srv/kernels".into(),
            initramfs_root: "/srv/initramfs".into(),
            direct_disk_roots: vec!["/srv/direct".into()],
            agent: AgentConfig {
                enable: false,
                ..AgentConfig::default()
            },
            ..Config::default()
        };
        Rig {
            vmm: FakeVmm::new(host.clone()),
            net: FakeNetwork::new(),
            snaps: FakeSnapshots::new(host.clone()),
            host,
            cfg,
        }
    }

    async fn start(&self) -> Arc<Engine> {
        Engine::start(
            self.cfg.clone(),
            self.vmm.clone(),
            self.host.seams(),
            Some(self.net.clone()),
            self.snaps.clone(),
            Arc::new(super::agent::fake::FakeAgents::new()),
        )
        .await
        .expect("engine starts")
    }

    fn session(&self, vm_id: &str) -> PathBuf {
        Path::new(SESSIONS).join(vm_id)
    }

    fn socket(&self, vm_id: &str) -> PathBuf {
        Path::new(SOCKETS).join(format!("{vm_id}.sock"))
    }

    fn record(&self, vm_id: &str) -> VmRecord {
        let bytes = self
            .host
            .file(&self.session(vm_id).join(RECORD_FILE))
            .expect("a record");
        serde_json::from_slice(&bytes).expect("a readable record")
    }

    /// Rewrites a record as a daemon that crashed mid-operation left it.
    fn edit_record(&self, vm_id: &str, f: impl FnOnce(&mut VmRecord)) {
        let mut r = self.record(vm_id);
        f(&mut r);
        self.host.put_file(
            &self.session(vm_id).join(RECORD_FILE),
            &serde_json::to_vec(&r).unwrap(),
        );
    }

    /// Nothing of `vm_id` is left: no table entry, session, socket, VMM or TAP.
    fn assert_gone(&self, engine: &Engine, vm_id: &str, why: &str) {
        assert!(engine.get(vm_id).is_err(), "{why}: still in the table");
        assert!(
            !engine.list().iter().any(|v| v.vm_id == vm_id),
            "{why}: still listed"
        );
        assert_eq!(self.host.node(&self.session(vm_id)), None, "{why}: session");
        assert_eq!(self.host.node(&self.socket(vm_id)), None, "{why}: socket");
        assert_eq!(self.vmm.live(), Vec::<u32>::new(), "{why}: vmm");
        assert_eq!(self.host.processes(), Vec::<u32>::new(), "{why}: process");
        assert_eq!(self.net.taps(), Vec::<String>::new(), "{why}: tap");
        let holds = engine.snapshot_holds.lock().unwrap();
        assert!(holds.is_empty(), "{why}: snapshot holds {holds:?}");
    }
}

fn overlay(vm_id: &str) -> CreateVmRequest {
    CreateVmRequest {
        vm_id: vm_id.into(),
        slots: Some(1),
        disk: Some(DiskSpec::Overlay {
            rootfs_id: "base.ext4".into(),
            disk_size_gib: Some(1),
        }),
        restore: None,
        network: None,
        kernel: None,
        initrd: None,
        boot_args: None,
        shares: vec![ShareSpec {
            host_path: "/srv/direct/share".into(),
            guest_path: "/mnt/share".into(),
            read_only: true,
        }],
        wait_ready: false,
        wait_ready_timeout_s: None,
    }
}

fn from_snapshot(vm_id: &str, snapshot_id: &str) -> CreateVmRequest {
    CreateVmRequest {
        disk: Some(DiskSpec::Snapshot {
            snapshot_id: snapshot_id.into(),
        }),
        shares: Vec::new(),
        ..overlay(vm_id)
    }
}

/// A snapshot in the store, made without a VM.
async fn seed_snapshot(rig: &Rig, snapshot_id: &str) {
    rig.snaps
        .create(NewSnapshot {
            snapshot_id: snapshot_id.into(),
            vm_id: "gone".into(),
            rootfs_id: Some("base.ext4".into()),
            backend: BackendKind::Firecracker,
            source: "/srv/direct/disk.ext4".into(),
            fs_frozen: false,
            rootfs_fingerprint: None,
            full: None,
            owner: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn create_boots_the_vm_and_writes_its_record() {
    let rig = Rig::new();
    let engine = rig.start().await;
    let info = engine.create(overlay("vm1")).await.unwrap();
    assert_eq!(info.state, VmState::Running);
    let pid = info.pid.expect("a pid");
    assert_eq!(rig.vmm.live(), vec![pid]);
    assert_eq!(rig.vmm.calls(), vec![VmmCall::Launch("vm1".into())]);
    assert_eq!(rig.net.taps(), vec!["agtap1".to_string()]);

    let record = rig.record("vm1");
    assert_eq!(record.vm.state, VmState::Running);
    assert_eq!(record.vm.pid, Some(pid));
    assert_eq!(record.vmm_process.map(|p| p.pid), Some(pid));
    assert_eq!(record.net.map(|l| l.tap_name), Some("agtap1".into()));
    assert_eq!(record.vm.guest_ip.as_deref(), Some("172.20.1.2"));
    assert!(record.snapshot.is_none());

    // The steps ran in order: session, disks, record, then nothing more.
    let session = rig.session("vm1");
    let made: Vec<HostCall> = rig
        .host
        .calls()
        .into_iter()
        .filter(|c| !matches!(c, HostCall::KillStale(..)))
        .collect();
    let record_path = session.join(RECORD_FILE);
    assert_eq!(
        made,
        vec![
            HostCall::CreateDir(session.clone()),
            HostCall::CreateExt4Disk(session.join("overlay.ext4"), 1 << 30),
            // The share is copied through its opened directory into the
            // session, the image built from the copy, the copy removed.
            HostCall::StageShare(
                "/srv/direct/share".into(),
                session.join("share0.staging"),
                4096 << 20,
            ),
            HostCall::CreateExt4FromDir(
                session.join("share0.staging"),
                session.join("share0.ext4"),
                (64 << 20) + (1 << 20),
            ),
            HostCall::RemoveDirAll(session.join("share0.staging")),
            HostCall::WriteAtomic(record_path.clone()),
            HostCall::WriteAtomic(record_path),
        ]
    );
}

#[tokio::test]
async fn a_failure_at_any_create_step_rolls_everything_back() {
    for fp in super::FAILPOINTS
        .iter()
        .filter(|p| p.starts_with("create."))
    {
        let rig = Rig::new();
        let engine = rig.start().await;
        engine.failpoints.arm(fp);
        assert!(engine.create(overlay("vm1")).await.is_err(), "{fp}");
        rig.assert_gone(&engine, "vm1", fp);
        // Nothing stays reserved: the same id, memory and subnet are free.
        engine.failpoints.clear();
        let info = engine.create(overlay("vm1")).await.unwrap();
        assert_eq!(info.tap_name.as_deref(), Some("agtap1"), "{fp}");
    }
}

#[tokio::test]
async fn a_failing_seam_during_create_rolls_everything_back() {
    type Inject = fn(&Rig);
    let cases: [(&str, Inject); 6] = [
        ("host create_dir", |r| r.host.faults.inject("create_dir")),
        ("host create_ext4_disk", |r| {
            r.host.faults.inject("create_ext4_disk")
        }),
        ("host create_ext4_from_dir", |r| {
            r.host.faults.inject("create_ext4_from_dir")
        }),
        ("host write_atomic", |r| {
            r.host.faults.inject("write_atomic")
        }),
        ("network setup", |r| r.net.faults.inject("setup")),
        ("vmm launch", |r| r.vmm.faults().inject("launch")),
    ];
    for (why, inject) in cases {
        let rig = Rig::new();
        let engine = rig.start().await;
        inject(&rig);
        assert!(engine.create(overlay("vm1")).await.is_err(), "{why}");
        rig.assert_gone(&engine, "vm1", why);
        rig.host.faults.clear();
        rig.net.faults.clear();
        rig.vmm.faults().clear();
        engine.create(overlay("vm1")).await.unwrap();
    }
}

#[tokio::test]
async fn a_failed_restore_from_a_snapshot_rolls_back_and_releases_the_snapshot() {
    let rig = Rig::new();
    let engine = rig.start().await;
    seed_snapshot(&rig, "s1").await;
    rig.snaps.faults.inject("restore");
    assert!(engine.create(from_snapshot("vm1", "s1")).await.is_err());
    rig.assert_gone(&engine, "vm1", "snapshot restore");
    // No hold is left: the snapshot can go.
    engine.delete_snapshot("s1").await.unwrap();
}

#[tokio::test]
async fn a_create_from_a_snapshot_restores_its_disk() {
    let rig = Rig::new();
    let engine = rig.start().await;
    seed_snapshot(&rig, "s1").await;
    let info = engine.create(from_snapshot("vm1", "s1")).await.unwrap();
    assert_eq!(info.state, VmState::Running);
    let overlay = rig.session("vm1").join("overlay.ext4");
    assert!(rig
        .snaps
        .calls()
        .contains(&SnapshotCall::Restore("s1".into(), overlay.clone())));
    assert!(rig.host.node(&overlay).is_some());
    assert!(engine.snapshot_holds.lock().unwrap().is_empty());
}

#[tokio::test]
async fn restore_re_adopts_a_live_matching_vmm() {
    let rig = Rig::new();
    let first = rig.start().await;
    let pid = first.create(overlay("vm1")).await.unwrap().pid.unwrap();
    first.create(overlay("vm2")).await.unwrap();
    first.pause("vm2").await.unwrap();
    drop(first);

    let engine = rig.start().await;
    let vm1 = engine.get("vm1").unwrap();
    assert_eq!(vm1.state, VmState::Running);
    assert_eq!(vm1.pid, Some(pid));
    assert_eq!(engine.get("vm2").unwrap().state, VmState::Paused);
    assert!(rig.vmm.calls().contains(&VmmCall::Adopt("vm1".into(), pid)));
    assert_eq!(rig.vmm.live().len(), 2);
    // The leases are kept, and the network keeps their TAPs.
    assert_eq!(rig.net.taps(), vec!["agtap1".to_string(), "agtap2".into()]);
    assert_eq!(
        rig.net.calls().last(),
        Some(&NetCall::Init(vec!["agtap1".into(), "agtap2".into()]))
    );
    // The re-adopted VM is driven as before.
    engine.shutdown("vm1").await.unwrap();
    assert_eq!(rig.record("vm1").vm.state, VmState::Stopped);
}

/// Cleanup at startup matches a VMM's control socket as a whole argument:
/// finishing VM `a`'s interrupted create never touches the VMM of VM
/// `a.sock.b`, and no sweep touches an operator's `socat` on a socket.
#[tokio::test]
async fn restore_cleanup_never_matches_a_substring_of_a_command_line() {
    let rig = Rig::new();
    let first = rig.start().await;
    let pid_a = first.create(overlay("a")).await.unwrap().pid.unwrap();
    let pid_b = first
        .create(overlay("a.sock.b"))
        .await
        .unwrap()
        .pid
        .unwrap();
    drop(first);
    // VM `a`'s create was cut short before its VMM was recorded.
    rig.edit_record("a", |r| {
        r.vm.state = VmState::Creating;
        r.vm.pid = None;
        r.vmm_process = None;
    });
    rig.host
        .spawn_process(9000, format!("socat UNIX-CONNECT:{SOCKETS}/a.sock -"));
    rig.host.spawn_process(
        9001,
        format!("socat UNIX-LISTEN:{SOCKETS}/operator.sock,fork -"),
    );

    let engine = rig.start().await;
    assert!(engine.get("a").is_err());
    let b = engine.get("a.sock.b").unwrap();
    assert_eq!((b.state, b.pid), (VmState::Running, Some(pid_b)));
    let procs = rig.host.processes();
    assert!(!procs.contains(&pid_a), "VM a's vmm is killed: {procs:?}");
    for p in [pid_b, 9000, 9001] {
        assert!(procs.contains(&p), "{p} must live: {procs:?}");
    }
}

/// A VM recorded with a backend this daemon has no driver for is left
/// running: never killed, shown `failed` with the cause, its record kept
/// for a daemon that has the driver.
#[tokio::test]
async fn restore_leaves_a_vm_of_another_backend_running_when_no_driver() {
    let rig = Rig::new();
    let first = rig.start().await;
    let pid = first.create(overlay("vm1")).await.unwrap().pid.unwrap();
    drop(first);
    rig.edit_record("vm1", |r| r.vm.backend = BackendKind::Qemu);

    let engine = rig.start().await;
    let info = engine.get("vm1").unwrap();
    assert_eq!(info.state, VmState::Failed);
    let cause = info.exit.expect("a cause").cause;
    assert!(cause.starts_with("not managed: its qemu vmm"), "{cause}");
    assert_eq!(rig.vmm.live(), vec![pid], "left running");
    assert_eq!(rig.record("vm1").vm.state, VmState::Running, "record kept");
    assert_eq!(rig.net.taps(), vec!["agtap1".to_string()], "its TAP kept");
    // A delete kills it.
    engine.delete("vm1").await.unwrap();
    rig.assert_gone(&engine, "vm1", "deleted");
}

#[tokio::test]
async fn restore_leaves_a_vm_whose_vmm_died_failed_with_the_cause() {
    let rig = Rig::new();
    let first = rig.start().await;
    let pid = first.create(overlay("vm1")).await.unwrap().pid.unwrap();
    drop(first);
    assert!(rig.vmm.crash(pid));

    let engine = rig.start().await;
    let info = engine.get("vm1").unwrap();
    assert_eq!(info.state, VmState::Failed);
    assert_eq!(info.pid, None);
    let cause = info.exit.expect("an exit").cause;
    assert!(
        cause.starts_with("agentenv restarted while the vm was running: its vmm (pid"),
        "{cause}"
    );
    let record = rig.record("vm1");
    assert_eq!(record.vm.state, VmState::Failed);
    assert!(record.net.is_none() && record.vmm_process.is_none());
    assert_eq!(rig.host.node(&rig.socket("vm1")), None);
    assert_eq!(rig.net.taps(), Vec::<String>::new(), "its TAP is reclaimed");
}

#[tokio::test]
async fn restore_finishes_an_interrupted_create_or_delete() {
    for cut in [VmState::Creating, VmState::Deleting] {
        let rig = Rig::new();
        let first = rig.start().await;
        let pid = first.create(overlay("vm1")).await.unwrap().pid.unwrap();
        drop(first);
        rig.edit_record("vm1", |r| r.vm.state = cut);

        let engine = rig.start().await;
        rig.assert_gone(&engine, "vm1", &cut.to_string());
        assert!(
            rig.host.calls().contains(&HostCall::KillStale(
                Some(pid),
                rig.socket("vm1"),
                vec![pid]
            )),
            "{cut}: its vmm is killed"
        );
    }
}

#[tokio::test]
async fn restore_removes_a_session_without_a_record() {
    let rig = Rig::new();
    rig.host
        .put_file(&rig.session("vm1").join("overlay.ext4"), b"");
    let engine = rig.start().await;
    rig.assert_gone(&engine, "vm1", "no record");
}

#[tokio::test]
async fn restore_re_adopts_and_resumes_a_vm_cut_short_in_a_snapshot() {
    for complete in [true, false] {
        let rig = Rig::new();
        let first = rig.start().await;
        let pid = first.create(overlay("vm1")).await.unwrap().pid.unwrap();
        drop(first);
        if complete {
            seed_snapshot(&rig, "s1").await;
        }
        // The snapshot had paused the guest when the daemon died.
        rig.vmm.set_guest(pid, AdoptedState::Paused);
        rig.edit_record("vm1", |r| {
            r.vm.state = VmState::Snapshotting;
            r.snapshot = Some(SnapshotInProgress {
                snapshot_id: "s1".into(),
                resume: true,
            });
        });

        let engine = rig.start().await;
        assert_eq!(engine.get("vm1").unwrap().state, VmState::Running);
        assert_eq!(rig.vmm.guest(pid), Some(AdoptedState::Running));
        assert!(rig.vmm.calls().contains(&VmmCall::Resume(pid)));
        let record = rig.record("vm1");
        assert_eq!(record.vm.state, VmState::Running);
        assert!(record.snapshot.is_none(), "the snapshot is finished");
        assert_eq!(rig.snaps.ids().len(), usize::from(complete));
    }
}

/// Takes a snapshot of a running VM with one step failing (or none), and
/// checks the VM runs again afterwards, in memory, in its VMM and on disk.
/// `refused_pauses` is how many pause requests the VMM refuses (nothing to undo).
async fn snapshot_with(
    why: &str,
    refused_pauses: usize,
    inject: impl FnOnce(&Rig, &Engine),
) -> Result<(), String> {
    let rig = Rig::new();
    let engine = rig.start().await;
    let pid = engine.create(overlay("vm1")).await.unwrap().pid.unwrap();
    inject(&rig, &engine);
    let result = engine.snapshot("vm1", Some("s1".into()), false).await;
    assert_eq!(engine.get("vm1").unwrap().state, VmState::Running, "{why}");
    assert_eq!(rig.vmm.guest(pid), Some(AdoptedState::Running), "{why}");
    let record = rig.record("vm1");
    assert_eq!(record.vm.state, VmState::Running, "{why}");
    assert!(record.snapshot.is_none(), "{why}");
    let calls = rig.vmm.calls();
    let pauses = calls.iter().filter(|c| **c == VmmCall::Pause(pid)).count();
    let resumes = calls.iter().filter(|c| **c == VmmCall::Resume(pid)).count();
    assert_eq!(
        pauses - refused_pauses,
        resumes,
        "{why}: every pause is undone"
    );
    let kept = rig.snaps.ids();
    match &result {
        Ok(_) => assert_eq!(kept, vec!["s1".to_string()], "{why}"),
        Err(_) => assert!(kept.is_empty(), "{why}: {kept:?} left"),
    }
    result.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_snapshot_resumes_the_vm_on_every_path() {
    snapshot_with("success", 0, |_, _| {}).await.unwrap();
    for fp in [
        "snapshot.frozen",
        "snapshot.paused",
        "snapshot.saved",
        "snapshot.resumed",
        "snapshot.copied",
        "snapshot_store.copied",
        "snapshot_store.recorded",
    ] {
        let e = snapshot_with(fp, 0, |_, engine| engine.failpoints.arm(fp))
            .await
            .unwrap_err();
        assert!(e.contains(fp), "{fp}: {e}");
    }
    snapshot_with("host sync_file", 0, |rig, _| {
        rig.host.faults.inject("sync_file")
    })
    .await
    .unwrap_err();
    for step in ["begin", "copy_disk", "seal"] {
        snapshot_with(step, 0, |rig, _| rig.snaps.faults.inject(step))
            .await
            .unwrap_err();
    }
    snapshot_with("vmm pause", 1, |rig, _| rig.vmm.faults().inject("pause"))
        .await
        .unwrap_err();
}

#[tokio::test]
async fn a_snapshot_of_a_paused_vm_leaves_it_paused() {
    let rig = Rig::new();
    let engine = rig.start().await;
    let pid = engine.create(overlay("vm1")).await.unwrap().pid.unwrap();
    engine.pause("vm1").await.unwrap();
    engine
        .snapshot("vm1", Some("s1".into()), false)
        .await
        .unwrap();
    assert_eq!(engine.get("vm1").unwrap().state, VmState::Paused);
    assert_eq!(rig.vmm.guest(pid), Some(AdoptedState::Paused));
    assert_eq!(rig.record("vm1").vm.state, VmState::Paused);
    assert_eq!(
        rig.vmm.calls(),
        vec![VmmCall::Launch("vm1".into()), VmmCall::Pause(pid)]
    );
}

#[tokio::test]
async fn a_deleted_vm_leaves_nothing() {
    let rig = Rig::new();
    let engine = rig.start().await;
    engine.create(overlay("vm1")).await.unwrap();
    engine.delete("vm1").await.unwrap();
    rig.assert_gone(&engine, "vm1", "delete");
}

#[tokio::test]
async fn a_vmm_that_dies_on_its_own_leaves_its_vm_failed_and_its_lease_freed() {
    let rig = Rig::new();
    let engine = rig.start().await;
    let pid = engine.create(overlay("vm1")).await.unwrap().pid.unwrap();
    assert!(rig.vmm.crash(pid));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while engine.get("vm1").unwrap().state != VmState::Failed {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let record = rig.record("vm1");
    assert_eq!(record.vm.state, VmState::Failed);
    assert_eq!(
        record.vm.exit.map(|e| e.cause),
        Some("vmm killed by signal 9 unexpectedly".to_string())
    );
    assert!(record.net.is_none() && record.vmm_process.is_none());
    assert_eq!(rig.net.taps(), Vec::<String>::new());
    assert_eq!(rig.host.node(&rig.socket("vm1")), None);
}

/// An overlay VM without shares (full snapshots refuse shares).
fn plain(vm_id: &str) -> CreateVmRequest {
    CreateVmRequest {
        shares: Vec::new(),
        ..overlay(vm_id)
    }
}

fn restore_req(vm_id: &str, snapshot_id: &str) -> CreateVmRequest {
    CreateVmRequest::restore(vm_id, snapshot_id)
}

/// A running VM `src` and a full snapshot `full` of it.
async fn with_full_snapshot(rig: &Rig) -> Arc<Engine> {
    let engine = rig.start().await;
    engine.create(plain("src")).await.unwrap();
    let snap = engine
        .snapshot("src", Some("full".into()), true)
        .await
        .unwrap();
    assert_eq!(snap.kind, agentenv_api::SnapshotKind::Full);
    let full = snap.full.expect("a full record");
    assert_eq!(full.vmm_version, "fake 1.0");
    assert_eq!(full.kernel, "/srv/kernels/vmlinux");
    assert!(full.network);
    assert!(snap.rootfs_fingerprint.is_some());
    engine
}

#[tokio::test]
async fn a_full_snapshot_saves_the_paused_vm_and_runs_it_again() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    let pid = engine.get("src").unwrap().pid.unwrap();
    let calls = rig.vmm.calls();
    let at = calls
        .iter()
        .position(|c| *c == VmmCall::Pause(pid))
        .unwrap();
    assert_eq!(
        calls[at..],
        [
            VmmCall::Pause(pid),
            VmmCall::SaveFull(pid),
            VmmCall::Resume(pid)
        ]
    );
    assert_eq!(engine.get("src").unwrap().state, VmState::Running);
    // The checksums come after the VM runs again: the seal is the last step.
    let store = rig.snaps.calls();
    let tail: Vec<_> = store.iter().rev().take(2).rev().cloned().collect();
    assert_eq!(
        tail,
        [
            SnapshotCall::CopyDisk("full".into()),
            SnapshotCall::Seal("full".into())
        ]
    );
}

#[tokio::test]
async fn a_vm_with_shares_cannot_have_a_full_snapshot() {
    let rig = Rig::new();
    let engine = rig.start().await;
    engine.create(overlay("vm1")).await.unwrap();
    let e = engine
        .snapshot("vm1", Some("s".into()), true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("shares"), "{e}");
    assert!(rig.snaps.ids().is_empty());
    assert_eq!(engine.get("vm1").unwrap().state, VmState::Running);
}

#[tokio::test]
async fn a_restored_vm_runs_without_booting_with_its_own_disk_and_tap() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    let vm = engine.create(restore_req("clone", "full")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.restored_from.as_deref(), Some("full"));
    assert_eq!(vm.tap_name.as_deref(), Some("agtap2"));
    assert_ne!(vm.guest_ip, engine.get("src").unwrap().guest_ip);
    assert!(rig
        .vmm
        .calls()
        .iter()
        .any(|c| matches!(c, VmmCall::Restore(id, _) if id == "clone")));
    assert!(!rig.vmm.calls().contains(&VmmCall::Launch("clone".into())));
    let disk = rig.session("clone").join("overlay.ext4");
    assert!(rig.host.node(&disk).is_some());
    assert!(rig
        .snaps
        .calls()
        .contains(&SnapshotCall::OpenFull("full".into(), disk)));
    // Its identity: its own name and address, fresh entropy.
    let slot = engine.slot("clone").unwrap();
    let id = slot.identity().expect("an identity to apply");
    assert_eq!(id.hostname, "clone");
    assert_eq!(
        id.net.as_ref().unwrap().address,
        vm.guest_ip.clone().unwrap()
    );
    assert_eq!(id.net.as_ref().unwrap().mac, vm.guest_mac.clone().unwrap());
    let other = engine.identity_for(&slot);
    assert_ne!(id.entropy_hex, other.entropy_hex, "fresh entropy each time");
    // The snapshot cannot go while the clone maps it.
    assert_eq!(engine.snapshot_info("full").unwrap().mapped_by, ["clone"]);
    let e = engine.delete_snapshot("full").await.unwrap_err();
    assert!(e.to_string().contains("clone"), "{e}");
    engine.delete("clone").await.unwrap();
    engine.delete_snapshot("full").await.unwrap();
}

#[tokio::test]
async fn restores_refuse_what_the_snapshot_decides_and_what_does_not_match() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    let mut req = restore_req("c", "full");
    req.slots = Some(2);
    let e = engine.create(req).await.unwrap_err();
    assert_eq!(e.field(), Some("slots"), "{e}");
    let mut req = restore_req("c", "full");
    req.disk = plain("c").disk;
    assert_eq!(engine.create(req).await.unwrap_err().field(), Some("disk"));
    let e = engine.create(restore_req("c", "nope")).await.unwrap_err();
    assert_eq!(e.field(), Some("restore.snapshot_id"), "{e}");
    // A disk snapshot: 409.
    engine
        .snapshot("src", Some("disk".into()), false)
        .await
        .unwrap();
    let e = engine.create(restore_req("c", "disk")).await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("disk snapshot"), "{e}");
    // A changed base image or kernel: 409 naming it.
    rig.host
        .put_file(Path::new("/srv/rootfs/base.ext4"), b"another base");
    let e = engine.create(restore_req("c", "full")).await.unwrap_err();
    assert!(e.to_string().contains("base image"), "{e}");
    rig.host
        .put_file(Path::new("/srv/rootfs/base.ext4"), b"base");
    rig.host
        .put_file(Path::new("/srv/kernels/vmlinux"), b"a new kernel");
    let e = engine.create(restore_req("c", "full")).await.unwrap_err();
    assert!(e.to_string().contains("kernel"), "{e}");
    assert!(engine.get("c").is_err());
    assert_eq!(rig.host.node(&rig.session("c")), None);
    assert_eq!(rig.vmm.live().len(), 1, "only the source's vmm");
    assert_eq!(rig.net.taps(), ["agtap1"]);
}

#[tokio::test]
async fn a_failed_restore_rolls_back_everything() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    for fault in ["restore", "open_full"] {
        match fault {
            "restore" => rig.vmm.faults().inject(fault),
            _ => rig.snaps.faults.inject(fault),
        }
        engine.create(restore_req("c", "full")).await.unwrap_err();
        assert!(engine.get("c").is_err(), "{fault}");
        assert_eq!(rig.host.node(&rig.session("c")), None, "{fault}");
        assert_eq!(rig.net.taps(), ["agtap1"], "{fault}: only the source's tap");
        assert!(engine.snapshot_holds.lock().unwrap().is_empty(), "{fault}");
    }
    assert!(engine.snapshot_info("full").unwrap().mapped_by.is_empty());
}

#[tokio::test]
async fn fork_makes_running_clones_and_its_snapshot_goes_with_the_last() {
    let rig = Rig::new();
    let engine = rig.start().await;
    engine.create(plain("src")).await.unwrap();
    let vms = engine
        .fork(
            "src",
            agentenv_api::ForkRequest {
                count: 3,
                vm_ids: None,
            },
        )
        .await
        .unwrap();
    let ids: Vec<_> = vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(ids, ["src-fork-1", "src-fork-2", "src-fork-3"]);
    let mut ips: Vec<_> = vms.iter().map(|v| v.guest_ip.clone().unwrap()).collect();
    ips.push(engine.get("src").unwrap().guest_ip.unwrap());
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4, "every clone has its own address");
    assert!(vms.iter().all(|v| v.state == VmState::Running));
    assert_eq!(engine.get("src").unwrap().state, VmState::Running);
    let snaps = engine.snapshots();
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].full.as_ref().unwrap().ephemeral);
    assert_eq!(snaps[0].mapped_by.len(), 3);
    for v in &vms {
        engine.delete(&v.vm_id).await.unwrap();
    }
    assert!(
        engine.snapshots().is_empty(),
        "the fork's snapshot went with its last clone"
    );
}

#[tokio::test]
async fn fork_checks_its_count_and_ids() {
    let rig = Rig::new();
    let engine = rig.start().await;
    engine.create(plain("src")).await.unwrap();
    let fork = |count, vm_ids| agentenv_api::ForkRequest { count, vm_ids };
    for (req, field) in [
        (fork(0, None), "count"),
        (fork(65, None), "count"),
        (fork(2, Some(vec!["a".into()])), "vm_ids"),
        (fork(2, Some(vec!["a".into(), "a".into()])), "vm_ids[1]"),
        (fork(1, Some(vec!["../x".into()])), "vm_ids[0]"),
    ] {
        let e = engine.fork("src", req).await.unwrap_err();
        assert_eq!(e.field(), Some(field), "{e}");
    }
    let e = engine
        .fork("src", fork(1, Some(vec!["src".into()])))
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Conflict { .. }), "{e}");
    assert!(engine.snapshots().is_empty());
}

#[tokio::test]
async fn a_fork_that_fails_half_way_leaves_no_clone_and_no_snapshot() {
    let rig = Rig::new();
    let engine = rig.start().await;
    engine.create(plain("src")).await.unwrap();
    rig.vmm.faults().inject("restore");
    let e = engine
        .fork(
            "src",
            agentenv_api::ForkRequest {
                count: 2,
                vm_ids: None,
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("restore"), "{e}");
    assert_eq!(engine.list().len(), 1);
    assert!(engine.snapshots().is_empty());
    assert_eq!(rig.net.taps(), ["agtap1"]);
    assert_eq!(engine.get("src").unwrap().state, VmState::Running);
}

#[tokio::test]
async fn reset_puts_the_vm_back_in_place_and_refuses_disk_snapshots() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    let before = engine.get("src").unwrap();
    let old_pid = before.pid.unwrap();
    let after = engine.reset("src", "full").await.unwrap();
    assert_eq!(after.state, VmState::Running);
    assert_eq!(after.tap_name, before.tap_name);
    assert_eq!(after.guest_ip, before.guest_ip);
    assert_eq!(after.api_socket, before.api_socket);
    assert_ne!(after.pid, Some(old_pid));
    assert_eq!(after.restored_from.as_deref(), Some("full"));
    assert!(rig.vmm.calls().contains(&VmmCall::Kill(old_pid)));
    assert_eq!(rig.vmm.live().len(), 1);
    assert!(rig.record("src").reset.is_none());
    // Again and again: the loop a fuzzer runs.
    for _ in 0..5 {
        assert_eq!(
            engine.reset("src", "full").await.unwrap().state,
            VmState::Running
        );
    }
    assert_eq!(rig.vmm.live().len(), 1);
    engine
        .snapshot("src", Some("disk".into()), false)
        .await
        .unwrap();
    let e = engine.reset("src", "disk").await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict { .. }), "{e}");
    assert_eq!(engine.get("src").unwrap().state, VmState::Running);
}

#[tokio::test]
async fn a_reset_cut_short_by_a_crash_is_finished_at_the_next_start() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    let pid = engine.get("src").unwrap().pid.unwrap();
    drop(engine);
    // The crash: the record says resetting, the old VMM is already gone.
    rig.edit_record("src", |r| {
        r.vm.state = VmState::Resetting;
        r.reset = Some("full".into());
    });
    rig.vmm.crash(pid);
    let engine = rig.start().await;
    let vm = engine.get("src").unwrap();
    assert_eq!(vm.state, VmState::Running, "{:?}", vm.exit);
    assert_eq!(vm.restored_from.as_deref(), Some("full"));
    assert_eq!(rig.vmm.live().len(), 1);
    assert!(rig.record("src").reset.is_none());
}

#[tokio::test]
async fn a_restore_needs_the_same_vmm_version_and_the_memory_it_restores() {
    let mut rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    rig.vmm.set_version("fake 2.0");
    let e = engine.create(restore_req("c", "full")).await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict { .. }), "{e}");
    assert!(
        e.to_string().contains("fake 1.0") && e.to_string().contains("fake 2.0"),
        "{e}"
    );
    let e = engine.reset("src", "full").await.unwrap_err();
    assert!(e.to_string().contains("fake 2.0"), "{e}");
    assert_eq!(engine.get("src").unwrap().state, VmState::Running);
    rig.vmm.set_version("fake 1.0");
    drop(engine);
    // Not enough memory for another VM of the snapshot's size: 507 before
    // any VMM starts.
    let src_mib = rig.record("src").vm.memory_mib;
    rig.cfg.max_memory_mib = Some(src_mib);
    let engine = rig.start().await;
    let before = rig.vmm.calls().len();
    let e = engine.create(restore_req("c", "full")).await.unwrap_err();
    assert!(matches!(e, EngineError::InsufficientMemory { .. }), "{e}");
    assert_eq!(rig.vmm.calls().len(), before, "no vmm call");
    assert!(engine.get("c").is_err());
    assert_eq!(rig.host.node(&rig.session("c")), None);
}

#[tokio::test]
async fn a_persist_keeps_the_tmpfs_copy_that_restored_vms_map() {
    let rig = Rig::new();
    let engine = with_full_snapshot(&rig).await;
    engine.create(restore_req("c", "full")).await.unwrap();
    let s = engine.persist_snapshot("full", false).await.unwrap();
    assert!(s.tmpfs_path.is_some(), "{s:?}");
    assert!(s.durable_path.is_some(), "{s:?}");
}

/// An engine on `rig` whose VMMs go into the cgroups of `cg`.
async fn start_with_cgroups(rig: &Rig, cg: &Arc<crate::testing::FakeCgroups>) -> Arc<Engine> {
    let mut host = rig.host.seams();
    host.cgroups = Some(cg.clone());
    Engine::start(
        rig.cfg.clone(),
        rig.vmm.clone(),
        host,
        Some(rig.net.clone()),
        rig.snaps.clone(),
        Arc::new(super::agent::fake::FakeAgents::new()),
    )
    .await
    .expect("engine starts")
}

#[tokio::test]
async fn a_vm_gets_its_cgroup_before_its_vmm_and_loses_it_on_delete() {
    use crate::limits::VmLimits;
    use crate::testing::{CgroupCall, FakeCgroups};
    let rig = Rig::new();
    let cg = Arc::new(FakeCgroups::default());
    let engine = start_with_cgroups(&rig, &cg).await;
    let info = engine.create(overlay("vm1")).await.unwrap();
    let want = VmLimits::compute(&rig.cfg.cgroup, 1, rig.cfg.memory_mib_per_slot);
    assert_eq!(
        *cg.calls.lock().unwrap(),
        vec![CgroupCall::Prepare("vm1".into(), want)]
    );
    let limits = info.limits.expect("limits shown");
    assert_eq!(limits.memory_bytes, want.memory_bytes);
    assert_eq!(limits.cpu_quota_us, 125_000);
    // Recorded, so a restarted daemon shows them too.
    assert_eq!(rig.record("vm1").vm.limits, Some(limits));
    engine.delete("vm1").await.unwrap();
    assert_eq!(cg.names(), Vec::<String>::new());
    rig.assert_gone(&engine, "vm1", "delete");
}

#[tokio::test]
async fn a_cgroup_that_cannot_be_made_is_a_503_and_leaves_nothing() {
    use crate::testing::FakeCgroups;
    let rig = Rig::new();
    let cg = Arc::new(FakeCgroups::default());
    let engine = start_with_cgroups(&rig, &cg).await;
    cg.faults.inject("prepare");
    let e = engine.create(overlay("vm1")).await.unwrap_err();
    assert!(matches!(e, EngineError::Cgroup(_)), "{e:?}");
    assert!(e.to_string().contains("memory.limit_in_bytes"), "{e}");
    assert!(rig.vmm.calls().is_empty(), "no vmm started");
    rig.assert_gone(&engine, "vm1", "prepare failed");
    assert_eq!(cg.names(), Vec::<String>::new());

    // A VMM that fails to start: its cgroup goes with the rollback.
    cg.faults.clear();
    rig.vmm.faults().inject("launch");
    assert!(engine.create(overlay("vm1")).await.is_err());
    rig.assert_gone(&engine, "vm1", "launch failed");
    assert_eq!(cg.names(), Vec::<String>::new());
}

#[tokio::test]
async fn a_vmm_the_oom_killer_ended_fails_its_vm_with_that_cause() {
    use crate::testing::FakeCgroups;
    let rig = Rig::new();
    let cg = Arc::new(FakeCgroups::default());
    let engine = start_with_cgroups(&rig, &cg).await;
    let pid = engine.create(overlay("vm1")).await.unwrap().pid.unwrap();
    let pid2 = engine.create(overlay("vm2")).await.unwrap().pid.unwrap();
    cg.oom.lock().unwrap().insert("vm1".into());
    assert!(rig.vmm.crash(pid));
    assert!(rig.vmm.crash(pid2));
    let settled = |id: &str| {
        let engine = engine.clone();
        let id = id.to_string();
        async move {
            for _ in 0..200 {
                let i = engine.get(&id).unwrap();
                if i.state == VmState::Failed {
                    return i;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("{id} did not fail");
        }
    };
    let cause = settled("vm1").await.exit.unwrap().cause;
    assert!(cause.contains("out-of-memory killer"), "{cause}");
    assert!(cause.contains("memory limit of"), "{cause}");
    let cause = settled("vm2").await.exit.unwrap().cause;
    assert!(!cause.contains("out-of-memory"), "{cause}");
    // The cgroups went with their VMMs; the limits are no longer shown.
    assert_eq!(cg.names(), Vec::<String>::new());
    assert_eq!(engine.get("vm1").unwrap().limits, None);
}

#[tokio::test]
async fn a_restart_keeps_the_vms_cgroups_and_removes_orphans() {
    use crate::testing::{CgroupCall, FakeCgroups};
    let rig = Rig::new();
    let cg = Arc::new(FakeCgroups::default());
    let first = start_with_cgroups(&rig, &cg).await;
    first.create(overlay("vm1")).await.unwrap();
    drop(first);
    cg.live.lock().unwrap().insert("stray".into());
    cg.calls.lock().unwrap().clear();

    let engine = start_with_cgroups(&rig, &cg).await;
    let info = engine.get("vm1").unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(info.limits.is_some());
    let calls = cg.calls.lock().unwrap().clone();
    assert!(
        matches!(&calls[..], [CgroupCall::Prepare(a, _), CgroupCall::Remove(b)] if a == "vm1" && b == "stray"),
        "{calls:?}"
    );
    assert_eq!(cg.names(), ["vm1"]);
}

/// A snapshot the daemon keeps for itself (an E2B template's warm snapshot)
/// is restored for a user only by `create_as_from` naming its owner; the VM
/// is the user's. Anyone else's snapshot stays invisible there too.
#[tokio::test]
async fn a_daemon_snapshot_is_restored_for_a_user_only_through_create_as_from() {
    use crate::principal::{Principal, Scope};
    let rig = Rig::new();
    let engine = rig.start().await;
    // `who`'s VM `vm` and a full snapshot `id` of it, `who`'s too.
    let owned_snapshot = |who: Principal, vm: &'static str, id: &'static str| {
        let engine = engine.clone();
        async move {
            engine.create_as(&who, plain(vm)).await.unwrap();
            engine
                .snapshot_as(&who, vm, Some(id.into()), true)
                .await
                .unwrap();
        }
    };
    owned_snapshot(Principal::new("daemon:t", Scope::User), "warm", "w").await;
    let alice = Principal::new("alice", Scope::User);
    let e = engine
        .create_as(&alice, restore_req("a1", "w"))
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("restore.snapshot_id"), "{e}");
    assert!(engine.get("a1").is_err());
    let vm = engine
        .create_as_from(&alice, restore_req("a2", "w"), "daemon:t")
        .await
        .unwrap();
    assert_eq!(vm.owner.as_deref(), Some("alice"));
    assert_eq!(vm.restored_from.as_deref(), Some("w"));
    // Bob's snapshot is not the daemon's: absent for alice.
    owned_snapshot(Principal::new("bob", Scope::User), "b", "bobs").await;
    let e = engine
        .create_as_from(&alice, restore_req("a3", "bobs"), "daemon:t")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bobs"), "{e}");
    assert!(engine.get("a3").is_err());
    // A malformed id is refused by its field before any lookup.
    let e = engine
        .create_as_from(&alice, restore_req("a4", "../w"), "daemon:t")
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("restore.snapshot_id"), "{e}");
}
