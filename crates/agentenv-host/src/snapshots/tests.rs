//! Store tests on plain directories (no root needed). The tier tests that
//! need real tmpfs mounts, full file systems and reflinks are in
//! `tests/snapshots.rs`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use agentenv_api::{BackendKind, SnapshotStatus, SnapshotTier};
use agentenv_core::snapshot::{NewSnapshot, SnapshotError, SnapshotStore};
use sha2::Digest;

use super::*;

/// Holds a restore after it registered, until the test releases it.
#[derive(Debug)]
pub(super) struct Gate {
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

pub(super) fn pass_gate(inner: &Inner) {
    let gate = inner
        .restore_gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(g) = gate {
        let _ = g.entered.send(());
        let _ = g.release.recv();
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: TieredStore,
}

impl Fixture {
    fn new(overhead: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for d in ["tmpfs", "durable", "vm"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let store = TieredStore::new(
            dir.path(),
            dir.path().join("tmpfs"),
            dir.path().join("durable"),
            overhead,
        );
        Fixture { dir, store }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A 256 MiB sparse "disk" with 1 MiB of data in two places.
    fn source(&self) -> PathBuf {
        let p = self.path("vm/overlay.ext4");
        if !p.exists() {
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(256 << 20).unwrap();
            f.write_all_at(&vec![0xa5; 512 << 10], 0).unwrap();
            f.write_all_at(&vec![0x5a; 512 << 10], 200 << 20).unwrap();
        }
        p
    }

    fn new_snapshot(&self, id: &str) -> NewSnapshot {
        NewSnapshot {
            rootfs_fingerprint: None,
            full: None,
            snapshot_id: id.into(),
            vm_id: "vm1".into(),
            rootfs_id: Some("base.ext4".into()),
            backend: BackendKind::Firecracker,
            source: self.source(),
            fs_frozen: false,
            owner: Some("alice".into()),
        }
    }

    fn entries(&self, tier: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(tier))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn flip_byte(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
}

#[tokio::test]
async fn create_goes_to_tmpfs_when_it_fits() {
    let fx = Fixture::new(1 << 20);
    let info = fx.store.create(fx.new_snapshot("s1")).await.unwrap();
    assert_eq!(info.tier, SnapshotTier::Tmpfs);
    assert_eq!(info.status, SnapshotStatus::Ready);
    assert_eq!(info.logical_bytes, 256 << 20);
    assert!(info.allocated_bytes >= 1 << 20 && info.allocated_bytes < 2 << 20);
    assert_eq!(info.sha256, disk::sparse_sha256(&fx.source()).unwrap());
    let disk_path = fx.path("tmpfs/s1/disk.ext4");
    assert_eq!(
        info.tmpfs_path.as_deref(),
        Some(disk_path.to_str().unwrap())
    );
    assert_eq!(info.durable_path, None);
    assert_eq!(fx.entries("tmpfs"), ["s1"]);
    assert_eq!(fx.entries("tmpfs/s1"), ["disk.ext4", "meta.json"]);
    assert!(fx.entries("durable").is_empty());
    assert_eq!(fx.store.list(), vec![info.clone()]);
    assert_eq!(fx.store.get("s1").unwrap(), info);
    assert!(matches!(
        fx.store.get("nope"),
        Err(SnapshotError::NotFound(_))
    ));
    let e = fx.store.create(fx.new_snapshot("s1")).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Exists(_)), "{e}");
}

#[tokio::test]
async fn create_goes_durable_when_tmpfs_lacks_room() {
    // An overhead no file system has.
    let fx = Fixture::new(u64::MAX / 2);
    let info = fx.store.create(fx.new_snapshot("s1")).await.unwrap();
    assert_eq!(info.tier, SnapshotTier::Durable);
    assert!(info.persisted_at.is_some());
    assert!(fx.entries("tmpfs").is_empty());
    assert_eq!(fx.entries("durable/s1"), ["disk.ext4", "meta.json"]);
    // Persisting a durable snapshot does nothing.
    assert_eq!(fx.store.persist("s1", false).await.unwrap(), info);
}

#[tokio::test]
async fn missing_durable_tier_matters_only_when_needed() {
    let fx = Fixture::new(0);
    std::fs::remove_dir(fx.path("durable")).unwrap();
    fx.store.create(fx.new_snapshot("fits")).await.unwrap();
    let e = fx.store.persist("fits", false).await.unwrap_err();
    match e {
        SnapshotError::TierUnavailable { path, why } => {
            assert_eq!(path, fx.path("durable"));
            assert_eq!(why, "does not exist");
        }
        e => panic!("{e}"),
    }
    // Still a tmpfs snapshot, not busy.
    assert_eq!(fx.store.get("fits").unwrap().tier, SnapshotTier::Tmpfs);

    let big = Fixture::new(u64::MAX / 2);
    std::fs::remove_dir(big.path("durable")).unwrap();
    let e = big.store.create(big.new_snapshot("s")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(big.path("durable").to_str().unwrap()),
        "{e}"
    );
    assert!(matches!(e, SnapshotError::TierUnavailable { .. }), "{e}");
    assert!(big.store.list().is_empty());
    assert!(big.entries("tmpfs").is_empty());
}

#[tokio::test]
async fn persist_drops_or_keeps_the_tmpfs_copy() {
    let fx = Fixture::new(0);
    let a = fx.store.create(fx.new_snapshot("a")).await.unwrap();
    fx.store.create(fx.new_snapshot("b")).await.unwrap();

    let pa = fx.store.persist("a", false).await.unwrap();
    assert_eq!(pa.tier, SnapshotTier::Durable);
    assert_eq!(pa.tmpfs_path, None);
    assert!(pa.durable_path.is_some());
    assert!(pa.persisted_at.is_some());
    assert_eq!(pa.sha256, a.sha256);
    assert_eq!(fx.entries("tmpfs"), ["b"]);
    assert_eq!(fx.entries("durable"), ["a"]);

    let pb = fx.store.persist("b", true).await.unwrap();
    assert_eq!(pb.tier, SnapshotTier::Durable);
    assert!(pb.tmpfs_path.is_some() && pb.durable_path.is_some());
    assert_eq!(fx.entries("tmpfs"), ["b"]);
    assert_eq!(fx.entries("durable"), ["a", "b"]);
    // Both records say the same.
    let t = meta::SnapshotMeta::load(&fx.path("tmpfs/b/meta.json")).unwrap();
    let d = meta::SnapshotMeta::load(&fx.path("durable/b/meta.json")).unwrap();
    assert_eq!(t, d);
    assert_eq!(t.tier, SnapshotTier::Durable);

    // Idempotent.
    assert_eq!(fx.store.persist("b", false).await.unwrap(), pb);
    assert_eq!(fx.store.persist("a", true).await.unwrap(), pa);

    // A fresh store reads the same thing back.
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    let cleanup = again.init().await.unwrap();
    assert!(cleanup.removed.is_empty());
    assert_eq!(again.list(), fx.store.list());
}

#[tokio::test]
async fn restore_copies_and_refuses_an_existing_dest() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    let dest = fx.path("vm/restored.ext4");
    fx.store.restore("s", &dest).await.unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(fx.source()).unwrap()
    );
    assert!(disk::allocated_bytes(&dest).unwrap() < 2 << 20);
    std::fs::write(&dest, b"mine").unwrap();
    let e = fx.store.restore("s", &dest).await.unwrap_err();
    assert!(e.to_string().contains("restored.ext4"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"mine");
    assert!(matches!(
        fx.store.restore("nope", &dest).await,
        Err(SnapshotError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_flipped_byte_marks_the_snapshot_corrupt() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    flip_byte(&fx.path("tmpfs/s/disk.ext4"), (200 << 20) + 7);
    let dest = fx.path("vm/restored.ext4");
    let e = fx.store.restore("s", &dest).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    assert!(!dest.exists());
    assert_eq!(fx.store.get("s").unwrap().status, SnapshotStatus::Corrupt);
    let m = meta::SnapshotMeta::load(&fx.path("tmpfs/s/meta.json")).unwrap();
    assert_eq!(m.status, SnapshotStatus::Corrupt);
    // It stays corrupt across a restart, and is refused without a copy.
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    assert_eq!(again.get("s").unwrap().status, SnapshotStatus::Corrupt);
    assert!(matches!(
        again.restore("s", &dest).await,
        Err(SnapshotError::Corrupt { .. })
    ));
    assert!(matches!(
        again.persist("s", false).await,
        Err(SnapshotError::Corrupt { .. })
    ));
    // It can still be deleted.
    again.delete("s").await.unwrap();
    assert!(fx.entries("tmpfs").is_empty());
}

#[tokio::test]
async fn persist_refuses_a_corrupt_tmpfs_copy() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    flip_byte(&fx.path("tmpfs/s/disk.ext4"), 3);
    let e = fx.store.persist("s", false).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    assert!(fx.entries("durable").is_empty());
    assert_eq!(fx.store.get("s").unwrap().status, SnapshotStatus::Corrupt);
}

#[tokio::test]
async fn a_bad_tmpfs_copy_falls_back_to_the_durable_one() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    fx.store.persist("s", true).await.unwrap();
    flip_byte(&fx.path("tmpfs/s/disk.ext4"), 3);
    let dest = fx.path("vm/restored.ext4");
    let info = fx.store.restore("s", &dest).await.unwrap();
    assert_eq!(info.status, SnapshotStatus::Ready);
    assert_eq!(info.tmpfs_path, None);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(fx.source()).unwrap()
    );
    assert!(fx.entries("tmpfs").is_empty());
}

#[tokio::test]
async fn init_removes_crash_leftovers_and_loads_the_rest() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("kept")).await.unwrap();
    // A copy interrupted mid-way, a meta write interrupted, a directory
    // without a record (not ours to remove), and a non-snapshot file.
    let partial = fx.path("tmpfs/.partial-s2-999-0");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("disk.ext4"), b"half").unwrap();
    let dpartial = fx.path("durable/.partial-s3-1-1");
    std::fs::create_dir(&dpartial).unwrap();
    let temp = fx.path("tmpfs/kept/.meta.json.tmp.4242");
    std::fs::write(&temp, b"{").unwrap();
    std::fs::create_dir(fx.path("durable/norecord")).unwrap();
    std::fs::write(fx.path("durable/README"), b"x").unwrap();

    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    let mut removed = again.init().await.unwrap().removed;
    removed.sort();
    let mut expected = vec![partial, dpartial, temp];
    expected.sort();
    assert_eq!(removed, expected);
    let ids: Vec<String> = again.list().into_iter().map(|s| s.snapshot_id).collect();
    assert_eq!(ids, ["kept"]);
    assert!(fx.path("durable/norecord").exists());
}

#[tokio::test]
async fn the_owner_is_kept_in_the_record_through_persist_and_a_restart() {
    let fx = Fixture::new(0);
    let made = fx.store.create(fx.new_snapshot("mine")).await.unwrap();
    assert_eq!(made.owner.as_deref(), Some("alice"));
    fx.store.persist("mine", false).await.unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    assert_eq!(again.get("mine").unwrap().owner.as_deref(), Some("alice"));
}

#[tokio::test]
async fn a_lost_tmpfs_tier_leaves_the_durable_copy() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    fx.store.persist("s", true).await.unwrap();
    // A reboot empties tmpfs.
    std::fs::remove_dir_all(fx.path("tmpfs/s")).unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    let info = again.get("s").unwrap();
    assert_eq!(info.tier, SnapshotTier::Durable);
    assert_eq!(info.tmpfs_path, None);
    again.restore("s", &fx.path("vm/r.ext4")).await.unwrap();
}

#[tokio::test]
async fn delete_removes_every_copy() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    fx.store.persist("s", true).await.unwrap();
    fx.store.delete("s").await.unwrap();
    assert!(fx.store.list().is_empty());
    assert!(fx.entries("tmpfs").is_empty());
    assert!(fx.entries("durable").is_empty());
    assert!(matches!(
        fx.store.delete("s").await,
        Err(SnapshotError::NotFound(_))
    ));
    // The id can be used again.
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
}

#[tokio::test]
async fn delete_is_refused_while_a_restore_runs() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("s")).await.unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *fx.store.inner.restore_gate.lock().unwrap() = Some(Gate {
        entered: entered_tx,
        release: release_rx,
    });
    let store = fx.store.clone();
    let dest = fx.path("vm/r.ext4");
    let d2 = dest.clone();
    let restore = tokio::spawn(async move { store.restore("s", &d2).await });
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    let e = fx.store.delete("s").await.unwrap_err();
    match &e {
        SnapshotError::Busy { id, why } => {
            assert_eq!(id, "s");
            assert!(why.contains("restore"), "{why}");
        }
        e => panic!("{e}"),
    }
    release_tx.send(()).unwrap();
    restore.await.unwrap().unwrap();
    assert!(dest.exists());
    fx.store.delete("s").await.unwrap();
}

#[tokio::test]
async fn ids_are_checked_before_any_path_is_built() {
    let fx = Fixture::new(0);
    let mut n = fx.new_snapshot("x");
    n.snapshot_id = "../escape".into();
    let e = fx.store.create(n).await.unwrap_err();
    assert!(e.to_string().contains("escape"), "{e}");
    assert!(!fx.path("escape").exists());
    assert!(fx.store.list().is_empty());
}

#[tokio::test]
async fn a_missing_source_is_an_io_error_naming_it() {
    let fx = Fixture::new(0);
    let mut n = fx.new_snapshot("x");
    n.source = fx.path("vm/none.ext4");
    let e = fx.store.create(n).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
    assert!(e.to_string().contains("none.ext4"), "{e}");
    assert!(fx.store.list().is_empty());
    // The id was released.
    fx.store.create(fx.new_snapshot("x")).await.unwrap();
}

// ---- full snapshots: begin → copy → seal → open_full ----

fn full_info(memory_mib: u64) -> agentenv_api::FullSnapshotInfo {
    agentenv_api::FullSnapshotInfo {
        vmm_version: "qemu 7.2.19".into(),
        vcpus: 1,
        memory_mib,
        kernel: "/k/vmlinux".into(),
        kernel_fingerprint: "kf".into(),
        initrd: None,
        initrd_fingerprint: None,
        boot_args: "console=ttyS0".into(),
        network: true,
        agent: true,
        memory_bytes: 0,
        state_bytes: 0,
        ephemeral: false,
    }
}

impl Fixture {
    /// A 64 MiB "guest memory" file with data at both ends and in the middle.
    fn memory_source(&self) -> PathBuf {
        let p = self.path("vm/ram");
        if !p.exists() {
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all_at(&vec![0x11; 256 << 10], 0).unwrap();
            f.write_all_at(&vec![0x22; 3 << 20], 30 << 20).unwrap();
            f.write_all_at(&vec![0x33; 4096], (64 << 20) - 4096)
                .unwrap();
        }
        p
    }

    fn new_full(&self, id: &str) -> NewSnapshot {
        NewSnapshot {
            rootfs_fingerprint: Some("rootfs-fp".into()),
            full: Some(full_info(64)),
            ..self.new_snapshot(id)
        }
    }

    /// A full snapshot made the way the engine makes one: begin, the VMM's
    /// state file, the memory copy, the disk copy, seal.
    async fn full(&self, id: &str, memory_in_state: bool) -> agentenv_api::SnapshotInfo {
        let mut p = self.store.begin(self.new_full(id)).await.unwrap();
        std::fs::write(&p.files.state, b"vmm device state").unwrap();
        if memory_in_state {
            p.memory_in_state = true;
        } else {
            self.store
                .copy_memory(&p, &self.memory_source())
                .await
                .unwrap();
        }
        self.store.copy_disk(&p).await.unwrap();
        self.store.seal(p).await.unwrap()
    }
}

#[tokio::test]
async fn a_full_snapshot_round_trips_through_every_step() {
    let fx = Fixture::new(1 << 20);
    let p = fx.store.begin(fx.new_full("f")).await.unwrap();
    assert_eq!(p.tier, SnapshotTier::Tmpfs);
    assert!(p
        .dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with(".partial-f-"));
    assert_eq!(p.disk, p.dir.join("disk.ext4"));
    assert_eq!(p.files.state, p.dir.join("state"));
    assert_eq!(p.files.memory, p.dir.join("memory"));
    // Invisible until sealed, and the id is taken.
    assert!(fx.store.list().is_empty());
    assert!(matches!(
        fx.store.begin(fx.new_full("f")).await,
        Err(SnapshotError::Exists(_))
    ));
    assert!(matches!(
        fx.store.create(fx.new_snapshot("f")).await,
        Err(SnapshotError::Exists(_))
    ));
    std::fs::write(&p.files.state, b"vmm device state").unwrap();
    fx.store.copy_memory(&p, &fx.memory_source()).await.unwrap();
    fx.store.copy_disk(&p).await.unwrap();
    let info = fx.store.seal(p).await.unwrap();

    assert_eq!(info.kind, agentenv_api::SnapshotKind::Full);
    assert_eq!(info.tier, SnapshotTier::Tmpfs);
    assert_eq!(info.rootfs_fingerprint.as_deref(), Some("rootfs-fp"));
    assert_eq!(info.sha256, disk::sparse_sha256(&fx.source()).unwrap());
    let full = info.full.clone().unwrap();
    assert_eq!(full.memory_bytes, 64 << 20);
    assert_eq!(full.state_bytes, 16);
    assert_eq!(full.vmm_version, "qemu 7.2.19");
    assert_eq!(fx.entries("tmpfs"), ["f"]);
    assert_eq!(fx.store.get("f").unwrap(), info);
    let m = meta::SnapshotMeta::load(&fx.path("tmpfs/f/meta.json")).unwrap();
    let rec = m.full.as_ref().unwrap();
    assert_eq!(
        rec.memory.as_ref().unwrap().sha256,
        disk::sparse_sha256(&fx.memory_source()).unwrap()
    );
    assert_eq!(
        rec.state_sha256,
        quick::hex(&sha2::Sha256::digest(b"vmm device state"))
    );
    // The memory copy stayed sparse.
    assert!(disk::allocated_bytes(&fx.path("tmpfs/f/memory")).unwrap() < 8 << 20);

    let dest = fx.path("vm/clone.ext4");
    let files = fx.store.open_full("f", &dest).await.unwrap();
    assert_eq!(files.state, fx.path("tmpfs/f/state"));
    assert_eq!(files.memory, Some(fx.path("tmpfs/f/memory")));
    assert_eq!(files.info, info);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(fx.source()).unwrap()
    );

    // Persist copies and checks every file; open_full then reads durable.
    let pi = fx.store.persist("f", false).await.unwrap();
    assert_eq!(pi.tier, SnapshotTier::Durable);
    assert_eq!(fx.entries("tmpfs"), Vec::<String>::new());
    let mut files_there: Vec<String> = std::fs::read_dir(fx.path("durable/f"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files_there.sort();
    assert_eq!(files_there, ["disk.ext4", "memory", "meta.json", "state"]);
    let dest2 = fx.path("vm/clone2.ext4");
    let files = fx.store.open_full("f", &dest2).await.unwrap();
    assert_eq!(files.memory, Some(fx.path("durable/f/memory")));

    // A fresh store loads it as it was.
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    assert_eq!(again.list(), fx.store.list());
    again
        .open_full("f", &fx.path("vm/clone3.ext4"))
        .await
        .unwrap();

    fx.store.delete("f").await.unwrap();
    assert!(fx.entries("durable").is_empty());
    assert!(fx.store.list().is_empty());
}

#[tokio::test]
async fn persist_keeping_tmpfs_keeps_both_copies_openable() {
    let fx = Fixture::new(0);
    fx.full("f", false).await;
    fx.store.persist("f", true).await.unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    // tmpfs first, and the durable copy's own mtime is on record too.
    let files = again.open_full("f", &fx.path("vm/a.ext4")).await.unwrap();
    assert_eq!(files.memory, Some(fx.path("tmpfs/f/memory")));
    std::fs::remove_dir_all(fx.path("tmpfs/f")).unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    let files = again.open_full("f", &fx.path("vm/b.ext4")).await.unwrap();
    assert_eq!(files.memory, Some(fx.path("durable/f/memory")));
}

#[tokio::test]
async fn memory_in_the_state_file_means_no_memory_file() {
    let fx = Fixture::new(0);
    let info = fx.full("f", true).await;
    assert_eq!(info.full.as_ref().unwrap().memory_bytes, 0);
    let files = fx
        .store
        .open_full("f", &fx.path("vm/c.ext4"))
        .await
        .unwrap();
    assert_eq!(files.memory, None);
    assert_eq!(files.state, fx.path("tmpfs/f/state"));
    assert!(!fx.path("tmpfs/f/memory").exists());
    fx.store.persist("f", false).await.unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    assert_eq!(again.list(), fx.store.list());
    let files = again.open_full("f", &fx.path("vm/d.ext4")).await.unwrap();
    assert_eq!(files.memory, None);
}

/// Damages a sealed full snapshot with `damage`, then expects `open_full`
/// to say `Corrupt` (naming `what`) and to leave nothing at the destination.
async fn expect_corrupt(damage: impl FnOnce(&Fixture), what: &str) {
    let fx = Fixture::new(0);
    fx.full("f", false).await;
    damage(&fx);
    let dest = fx.path("vm/clone.ext4");
    let e = fx.store.open_full("f", &dest).await.unwrap_err();
    match &e {
        SnapshotError::Corrupt { why, .. } => assert!(why.contains(what), "{why}"),
        e => panic!("{e}"),
    }
    assert!(!dest.exists());
    assert_eq!(fx.store.get("f").unwrap().status, SnapshotStatus::Corrupt);
    // Refused at once from now on, and still deletable.
    assert!(matches!(
        fx.store.open_full("f", &dest).await,
        Err(SnapshotError::Corrupt { .. })
    ));
    fx.store.delete("f").await.unwrap();
}

#[tokio::test]
async fn a_truncated_memory_file_is_corrupt() {
    expect_corrupt(
        |fx| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(fx.path("tmpfs/f/memory"))
                .unwrap();
            f.set_len(32 << 20).unwrap();
        },
        "bytes, recorded",
    )
    .await;
}

#[tokio::test]
async fn a_flipped_byte_in_the_state_file_is_corrupt() {
    expect_corrupt(
        |fx| flip_byte(&fx.path("tmpfs/f/state"), 3),
        "tmpfs/f/state",
    )
    .await;
}

#[tokio::test]
async fn a_write_to_the_memory_file_is_caught_by_its_mtime() {
    expect_corrupt(
        |fx| {
            // Well away from the sampled pages: only the mtime tells.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let off = quick::sample_ranges(64 << 20, quick::SAMPLE_PAGES)[20].0 + 3 * 4096;
            flip_byte(&fx.path("tmpfs/f/memory"), off);
        },
        "modified after the snapshot",
    )
    .await;
}

#[tokio::test]
async fn a_flipped_sampled_byte_with_its_mtime_put_back_is_corrupt() {
    expect_corrupt(
        |fx| {
            let p = fx.path("tmpfs/f/memory");
            let before = std::fs::metadata(&p).unwrap().modified().unwrap();
            let off = quick::sample_ranges(64 << 20, quick::SAMPLE_PAGES)[30].0 + 100;
            flip_byte(&p, off);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_modified(before).unwrap();
            drop(f);
            assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), before);
        },
        "sample sha256",
    )
    .await;
}

#[tokio::test]
async fn a_bad_tmpfs_copy_of_a_full_snapshot_falls_back_to_durable() {
    let fx = Fixture::new(0);
    fx.full("f", false).await;
    fx.store.persist("f", true).await.unwrap();
    flip_byte(&fx.path("tmpfs/f/state"), 0);
    let files = fx
        .store
        .open_full("f", &fx.path("vm/x.ext4"))
        .await
        .unwrap();
    assert_eq!(files.state, fx.path("durable/f/state"));
    assert_eq!(files.info.status, SnapshotStatus::Ready);
    assert!(fx.entries("tmpfs").is_empty());
}

#[tokio::test]
async fn persist_checks_the_memory_file_in_full() {
    let fx = Fixture::new(0);
    fx.full("f", false).await;
    // Outside the sample, mtime put back: the quick check cannot see it,
    // persist's full hash does.
    let p = fx.path("tmpfs/f/memory");
    let before = std::fs::metadata(&p).unwrap().modified().unwrap();
    flip_byte(&p, (31 << 20) + 12345);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(before)
        .unwrap();
    let e = fx.store.persist("f", false).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    assert!(fx.entries("durable").is_empty());
}

#[tokio::test]
async fn open_full_refuses_a_disk_snapshot_and_unknown_ids() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("d")).await.unwrap();
    let dest = fx.path("vm/x.ext4");
    let e = fx.store.open_full("d", &dest).await.unwrap_err();
    assert!(e.to_string().contains("disk snapshot"), "{e}");
    assert!(!dest.exists());
    assert!(matches!(
        fx.store.open_full("none", &dest).await,
        Err(SnapshotError::NotFound(_))
    ));
    // Nothing held: it can be deleted.
    fx.store.delete("d").await.unwrap();
}

#[tokio::test]
async fn abort_and_failed_seals_leave_nothing() {
    let fx = Fixture::new(0);
    let p = fx.store.begin(fx.new_full("f")).await.unwrap();
    std::fs::write(&p.files.state, b"s").unwrap();
    fx.store.copy_disk(&p).await.unwrap();
    fx.store.abort(p).await;
    assert!(fx.entries("tmpfs").is_empty());
    assert!(fx.store.list().is_empty());
    // The id is free again; a seal without the VMM's state file fails
    // and leaves nothing either.
    let p = fx.store.begin(fx.new_full("f")).await.unwrap();
    fx.store.copy_disk(&p).await.unwrap();
    let e = fx.store.seal(p).await.unwrap_err();
    assert!(e.to_string().contains("state"), "{e}");
    assert!(fx.entries("tmpfs").is_empty());
    assert!(fx.store.list().is_empty());
    // A disk snapshot in steps, as the engine now makes them.
    let p = fx.store.begin(fx.new_snapshot("f")).await.unwrap();
    fx.store.copy_disk(&p).await.unwrap();
    let info = fx.store.seal(p).await.unwrap();
    assert_eq!(info.kind, agentenv_api::SnapshotKind::Disk);
    assert_eq!(info.full, None);
    assert_eq!(info.sha256, disk::sparse_sha256(&fx.source()).unwrap());
    assert_eq!(fx.entries("tmpfs"), ["f"]);
    assert!(!fx.path("tmpfs/f/state").exists());
}

#[tokio::test]
async fn a_pending_snapshot_from_elsewhere_is_refused() {
    let fx = Fixture::new(0);
    let other = Fixture::new(0);
    let p = other.store.begin(other.new_full("f")).await.unwrap();
    let e = fx.store.copy_disk(&p).await.unwrap_err();
    assert!(e.to_string().contains("not a pending snapshot"), "{e}");
    fx.store.abort(shallow(&p)).await;
    assert!(
        p.dir.exists(),
        "abort of a foreign pending snapshot removed it"
    );
    other.store.abort(p).await;
}

#[tokio::test]
async fn without_a_tmpfs_tier_a_full_snapshot_goes_durable() {
    let fx = Fixture::new(0);
    std::fs::remove_dir(fx.path("tmpfs")).unwrap();
    let p = fx.store.begin(fx.new_full("f")).await.unwrap();
    assert_eq!(p.tier, SnapshotTier::Durable);
    assert_eq!(p.dir.parent().unwrap(), fx.path("durable"));
    fx.store.abort(p).await;
    // Memory beyond any free space: refused before anything is written.
    let mut n = fx.new_full("g");
    n.full.as_mut().unwrap().memory_mib = u64::MAX >> 21;
    let e = fx.store.begin(n).await.unwrap_err();
    assert!(matches!(e, SnapshotError::NoSpace { .. }), "{e}");
    assert!(fx.entries("durable").is_empty());
}

#[tokio::test]
async fn init_removes_partial_full_snapshots_and_checks_their_files() {
    let fx = Fixture::new(0);
    fx.full("kept", false).await;
    fx.full("nomem", false).await;
    std::fs::remove_file(fx.path("tmpfs/nomem/memory")).unwrap();
    // A crash between begin and seal: state and memory in a partial dir.
    let p = fx.store.begin(fx.new_full("crashed")).await.unwrap();
    std::fs::write(&p.files.state, b"s").unwrap();
    fx.store.copy_memory(&p, &fx.memory_source()).await.unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    let removed = again.init().await.unwrap().removed;
    assert_eq!(removed, vec![p.dir.clone()]);
    assert!(!p.dir.exists());
    let ids: Vec<String> = again.list().into_iter().map(|s| s.snapshot_id).collect();
    assert_eq!(ids, ["kept"]);
}

#[tokio::test]
async fn version_1_records_on_disk_still_load() {
    let fx = Fixture::new(0);
    fx.store.create(fx.new_snapshot("old")).await.unwrap();
    // Rewrite its record as version 1 wrote it.
    let path = fx.path("tmpfs/old/meta.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["schema_version"] = 1.into();
    let o = v.as_object_mut().unwrap();
    for k in ["kind", "rootfs_fingerprint", "full"] {
        o.remove(k);
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let again = TieredStore::new(fx.dir.path(), fx.path("tmpfs"), fx.path("durable"), 0);
    again.init().await.unwrap();
    let info = again.get("old").unwrap();
    assert_eq!(info.kind, agentenv_api::SnapshotKind::Disk);
    again.restore("old", &fx.path("vm/r.ext4")).await.unwrap();
    // Its next record change writes version 2.
    again.persist("old", true).await.unwrap();
    let m = meta::SnapshotMeta::load(&path).unwrap();
    assert_eq!(m.schema_version, meta::SCHEMA_VERSION);
}
