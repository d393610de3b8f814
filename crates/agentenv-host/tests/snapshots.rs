//! The snapshot store and the sparse copy on real file systems: tmpfs tiers
//! mounted small enough to fill, loop-mounted XFS for reflinks, ext4 with
//! 1 KiB blocks to make a tmpfs copy outgrow its source.
//!
//! Mounting needs root; without it each such test prints why it skips.
//! Reflinks need `mkfs.xfs` (xfsprogs).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use agentenv_api::{BackendKind, SnapshotStatus, SnapshotTier};
use agentenv_core::host::DiskImages;
use agentenv_core::snapshot::{NewSnapshot, PendingSnapshot, SnapshotError, SnapshotStore};
use agentenv_host::disk::{self, CopyMethod};
use agentenv_host::snapshots::TieredStore;
use agentenv_host::LocalHost;

const MIB: u64 = 1 << 20;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("-V").output().is_ok()
}

/// Returns false (and says why) when the test cannot run here.
fn can_mount(test: &str) -> bool {
    if !is_root() {
        agentenv_testkit::skip::skip(&format!(
            "{test}: mounting a tmpfs or loop device needs root"
        ));
        return false;
    }
    true
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount on a fresh directory, unmounted when dropped (then the directory
/// goes).
struct Mounted {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn tmpfs(opts: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir.path()));
        Mounted {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    /// Formats `image` (a sparse file of `size`) with `mkfs` and loop-mounts it.
    fn image(image: &Path, size: u64, mkfs: &[&str]) -> Mounted {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(image));
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(image)
            .arg(dir.path()));
        Mounted {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Deterministic bytes that are never all zero.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x | 1).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A sparse file of `size` with `(offset, len)` data regions.
fn sparse(path: &Path, size: u64, regions: &[(u64, u64)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in regions.iter().enumerate() {
        f.write_all_at(&noise(len as usize, i as u64 + 1), off)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn new_snapshot(id: &str, source: &Path) -> NewSnapshot {
    NewSnapshot {
        rootfs_fingerprint: None,
        full: None,
        snapshot_id: id.into(),
        vm_id: "vm1".into(),
        rootfs_id: None,
        backend: BackendKind::Qemu,
        source: source.to_path_buf(),
        fs_frozen: false,
        owner: None,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn used_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.blocks() - s.blocks_free()) * s.fragment_size()
}

/// What a tmpfs uses once its freed pages show: they can take a moment to
/// show in statvfs on a busy host. Waits (at most 5 s) for less than a MiB.
fn settled_used_bytes(path: &Path) -> u64 {
    let t = std::time::Instant::now();
    while used_bytes(path) >= MIB && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    used_bytes(path)
}

fn extents(path: &Path) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    disk::data_extents(&f, len).unwrap()
}

#[test]
fn sparse_copy_into_tmpfs_moves_only_data_and_keeps_holes() {
    if !can_mount("sparse_copy_into_tmpfs_moves_only_data_and_keeps_holes") {
        return;
    }
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("disk");
    let regions = [(0, MIB), (3 << 30, 2 * MIB), ((8 << 30) - MIB, MIB)];
    sparse(&src, 8 << 30, &regions);
    let tmpfs = Mounted::tmpfs("size=64m");
    let dst = tmpfs.join("copy");
    let (stats, sum) = disk::copy_sparse_hashed(&src, &dst).unwrap();
    // ext4 → tmpfs: copy_file_range refuses other file-system types.
    assert_eq!(stats.method, CopyMethod::ReadWrite);
    assert_eq!(stats.logical_bytes, 8 << 30);
    assert_eq!(stats.data_bytes, 4 * MIB);
    assert_eq!(stats.bytes_copied, 4 * MIB);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 30);
    assert_eq!(disk::allocated_bytes(&dst).unwrap(), 4 * MIB);
    assert_eq!(extents(&dst), extents(&src));
    assert_eq!(sum, disk::sparse_sha256(&src).unwrap());
    assert_eq!(sum, disk::sparse_sha256(&dst).unwrap());
    let f = std::fs::File::open(&dst).unwrap();
    for (i, &(off, len)) in regions.iter().enumerate() {
        let mut got = vec![0u8; len as usize];
        f.read_exact_at(&mut got, off).unwrap();
        assert!(got == noise(len as usize, i as u64 + 1), "region {i}");
    }
    // And back onto ext4.
    let back = src_dir.path().join("back");
    disk::copy_sparse(&dst, &back).unwrap();
    assert_eq!(extents(&back), extents(&src));
    assert_eq!(disk::sparse_sha256(&back).unwrap(), sum);
}

#[test]
fn reflink_is_used_where_the_file_system_shares_extents() {
    let test = "reflink_is_used_where_the_file_system_shares_extents";
    if !can_mount(test) {
        return;
    }
    if !have("mkfs.xfs") {
        agentenv_testkit::skip::skip(&format!("{test}: mkfs.xfs (xfsprogs) is not installed"));
        return;
    }
    let img_dir = tempfile::tempdir().unwrap();
    let xfs = Mounted::image(
        &img_dir.path().join("xfs.img"),
        512 * MIB,
        &["mkfs.xfs", "-q", "-m", "reflink=1"],
    );
    let src = xfs.join("disk");
    sparse(&src, 4 << 30, &[(0, 8 * MIB), (2 << 30, 8 * MIB)]);
    let before = used_bytes(&xfs.path);
    let (stats, sum) = disk::copy_sparse_hashed(&src, &xfs.join("clone")).unwrap();
    assert_eq!(stats.method, CopyMethod::Reflink);
    assert_eq!(stats.bytes_copied, 0);
    assert_eq!(sum, disk::sparse_sha256(&src).unwrap());
    assert_eq!(disk::sparse_sha256(&xfs.join("clone")).unwrap(), sum);
    assert!(
        used_bytes(&xfs.path) - before < 4 * MIB,
        "a reflink used {} bytes",
        used_bytes(&xfs.path) - before
    );

    // The store clones too when its durable tier shares the source's
    // file system (no tmpfs tier here).
    std::fs::create_dir(xfs.join("durable")).unwrap();
    let store = TieredStore::new(xfs.join("s"), xfs.join("no-tmpfs"), xfs.join("durable"), 0);
    let before = used_bytes(&xfs.path);
    let info = tokio_run(store.create(new_snapshot("r", &src))).unwrap();
    assert_eq!(info.tier, SnapshotTier::Durable);
    assert_eq!(info.sha256, sum);
    assert!(used_bytes(&xfs.path) - before < 4 * MIB);
    tokio_run(store.restore("r", &xfs.join("restored"))).unwrap();
    assert_eq!(disk::sparse_sha256(&xfs.join("restored")).unwrap(), sum);
}

fn tokio_run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[tokio::test]
async fn tmpfs_is_chosen_only_when_it_has_room() {
    if !can_mount("tmpfs_is_chosen_only_when_it_has_room") {
        return;
    }
    let tmpfs = Mounted::tmpfs("size=16m");
    let dir = tempfile::tempdir().unwrap();
    let durable = dir.path().join("durable");
    std::fs::create_dir(&durable).unwrap();
    let small = dir.path().join("small");
    let big = dir.path().join("big");
    sparse(&small, 1 << 30, &[(0, 2 * MIB)]);
    sparse(&big, 1 << 30, &[(0, 10 * MIB), (512 * MIB, 10 * MIB)]);
    // 2 MiB + 13 MiB overhead fits in 16 MiB; 20 MiB does not.
    let store = TieredStore::new(dir.path(), &tmpfs.path, &durable, 13 * MIB);
    store.init().await.unwrap();
    let s = store.create(new_snapshot("small", &small)).await.unwrap();
    assert_eq!(s.tier, SnapshotTier::Tmpfs);
    let b = store.create(new_snapshot("big", &big)).await.unwrap();
    assert_eq!(b.tier, SnapshotTier::Durable);
    assert_eq!(names(&tmpfs.path), ["small"]);
    assert_eq!(names(&durable), ["big"]);
    // A second small one no longer fits beside the first with its overhead.
    let s2 = store.create(new_snapshot("small2", &small)).await.unwrap();
    assert_eq!(s2.tier, SnapshotTier::Durable);

    // Persist from the real tmpfs to disk, then restore from each tier.
    let p = store.persist("small", true).await.unwrap();
    assert_eq!(p.tier, SnapshotTier::Durable);
    assert_eq!(p.sha256, s.sha256);
    for (id, sum) in [("small", &s.sha256), ("big", &b.sha256)] {
        let dest = dir.path().join(format!("{id}.restored"));
        store.restore(id, &dest).await.unwrap();
        assert_eq!(&disk::sparse_sha256(&dest).unwrap(), sum);
        assert_eq!(extents(&dest), extents(&dir.path().join(id)));
    }
}

#[tokio::test]
async fn tmpfs_filling_up_during_the_copy_falls_back_to_durable() {
    let test = "tmpfs_filling_up_during_the_copy_falls_back_to_durable";
    if !can_mount(test) {
        return;
    }
    // The source lives on ext4 with 1 KiB blocks: 1 KiB of data every
    // 4 KiB allocates 1 KiB there but a whole 4 KiB page on tmpfs. So the
    // free-space check passes (4 MiB allocated < 8 MiB free) and the copy
    // (16 MiB of pages) fills the tmpfs.
    let img_dir = tempfile::tempdir().unwrap();
    let ext4 = Mounted::image(
        &img_dir.path().join("ext4-1k.img"),
        64 * MIB,
        &["mkfs.ext4", "-q", "-F", "-b", "1024"],
    );
    let src = ext4.join("disk");
    let regions: Vec<(u64, u64)> = (0..4096).map(|i| (i * 4096, 1024)).collect();
    sparse(&src, 32 * MIB, &regions);
    let allocated = disk::allocated_bytes(&src).unwrap();
    assert!(allocated <= 5 * MIB, "source allocates {allocated}");

    let tmpfs = Mounted::tmpfs("size=8m");
    let dir = tempfile::tempdir().unwrap();
    let durable = dir.path().join("durable");
    std::fs::create_dir(&durable).unwrap();
    let store = TieredStore::new(dir.path(), &tmpfs.path, &durable, 0);
    let info = store.create(new_snapshot("s", &src)).await.unwrap();
    assert_eq!(info.tier, SnapshotTier::Durable);
    assert!(names(&tmpfs.path).is_empty(), "{:?}", names(&tmpfs.path));
    assert!(settled_used_bytes(&tmpfs.path) < MIB);
    assert_eq!(names(&durable), ["s"]);
    assert_eq!(info.sha256, disk::sparse_sha256(&src).unwrap());
}

#[tokio::test]
async fn both_tiers_full_is_no_space_and_leaves_nothing() {
    if !can_mount("both_tiers_full_is_no_space_and_leaves_nothing") {
        return;
    }
    let tmpfs = Mounted::tmpfs("size=8m");
    let durable = Mounted::tmpfs("size=8m");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk");
    sparse(&src, 1 << 30, &[(0, 12 * MIB), (100 * MIB, 4 * MIB)]);
    let store = TieredStore::new(dir.path(), &tmpfs.path, &durable.path, 0);
    let e = store.create(new_snapshot("s", &src)).await.unwrap_err();
    match &e {
        SnapshotError::NoSpace { id, why } => {
            assert_eq!(id, "s");
            assert!(why.contains(tmpfs.path.to_str().unwrap()), "{why}");
            assert!(why.contains(durable.path.to_str().unwrap()), "{why}");
        }
        e => panic!("{e}"),
    }
    assert!(names(&tmpfs.path).is_empty());
    assert!(
        names(&durable.path).is_empty(),
        "{:?}",
        names(&durable.path)
    );
    let used = settled_used_bytes(&durable.path);
    assert!(used < MIB, "{used} bytes used");
    assert!(store.list().is_empty());
    // The id is free again.
    let small = dir.path().join("small");
    sparse(&small, 1 << 30, &[(0, MIB)]);
    store.create(new_snapshot("s", &small)).await.unwrap();
}

#[tokio::test]
async fn a_read_only_durable_tier_is_unavailable() {
    if !can_mount("a_read_only_durable_tier_is_unavailable") {
        return;
    }
    let tmpfs = Mounted::tmpfs("size=8m");
    let durable = Mounted::tmpfs("ro,size=8m");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    sparse(&big, 1 << 30, &[(0, 16 * MIB)]);
    let small = dir.path().join("small");
    sparse(&small, 1 << 30, &[(0, MIB)]);
    let store = TieredStore::new(dir.path(), &tmpfs.path, &durable.path, 0);
    let e = store.create(new_snapshot("big", &big)).await.unwrap_err();
    match &e {
        SnapshotError::TierUnavailable { path, why } => {
            assert_eq!(path, &durable.path);
            assert!(why.contains("read-only"), "{why}");
        }
        e => panic!("{e}"),
    }
    assert!(names(&tmpfs.path).is_empty());
    // The tmpfs tier still works, but persisting needs the durable one.
    store.create(new_snapshot("small", &small)).await.unwrap();
    let e = store.persist("small", false).await.unwrap_err();
    assert!(matches!(e, SnapshotError::TierUnavailable { .. }), "{e}");
    assert_eq!(store.get("small").unwrap().tier, SnapshotTier::Tmpfs);
    // Not left busy.
    store.delete("small").await.unwrap();
}

#[tokio::test]
async fn corruption_on_tmpfs_is_caught_at_restore_and_remembered() {
    if !can_mount("corruption_on_tmpfs_is_caught_at_restore_and_remembered") {
        return;
    }
    let tmpfs = Mounted::tmpfs("size=64m");
    let dir = tempfile::tempdir().unwrap();
    let durable = dir.path().join("durable");
    std::fs::create_dir(&durable).unwrap();
    let src = dir.path().join("disk");
    sparse(&src, 1 << 30, &[(0, MIB), (700 * MIB, MIB)]);
    let store = TieredStore::new(dir.path(), &tmpfs.path, &durable, 0);
    store.create(new_snapshot("s", &src)).await.unwrap();
    let disk_path = tmpfs.join("s/disk.ext4");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_path)
        .unwrap();
    f.write_all_at(b"X", 700 * MIB + 12345).unwrap();
    let dest = dir.path().join("restored");
    let e = store.restore("s", &dest).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    assert!(!dest.exists());
    let text = std::fs::read_to_string(tmpfs.join("s/meta.json")).unwrap();
    assert!(text.contains("\"status\": \"corrupt\""), "{text}");
    let again = TieredStore::new(dir.path(), &tmpfs.path, &durable, 0);
    again.init().await.unwrap();
    assert_eq!(again.get("s").unwrap().status, SnapshotStatus::Corrupt);
}

#[tokio::test]
async fn crash_leftovers_in_a_real_tmpfs_are_cleaned_by_init() {
    if !can_mount("crash_leftovers_in_a_real_tmpfs_are_cleaned_by_init") {
        return;
    }
    let tmpfs = Mounted::tmpfs("size=16m");
    let dir = tempfile::tempdir().unwrap();
    let partial = tmpfs.join(".partial-s1-12345-0");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("disk.ext4"), noise(4 * MIB as usize, 9)).unwrap();
    let store = TieredStore::new(dir.path(), &tmpfs.path, dir.path(), 0);
    let cleanup = store.init().await.unwrap();
    assert_eq!(cleanup.removed, [partial]);
    assert!(names(&tmpfs.path).is_empty());
    let used = settled_used_bytes(&tmpfs.path);
    assert!(used < MIB, "{used} bytes used");
    assert!(store.list().is_empty());
}

#[tokio::test]
async fn template_overlays_are_cheap_distinct_and_mountable() {
    let test = "template_overlays_are_cheap_distinct_and_mountable";
    if !have("mkfs.ext4") {
        agentenv_testkit::skip::skip(&format!("{test}: mkfs.ext4 is not installed"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = LocalHost::with_templates(dir.path().join("templates"));
    let a = dir.path().join("a.ext4");
    let b = dir.path().join("b.ext4");
    let size = 16u64 << 30;
    host.create_ext4_disk(&a, size).await.unwrap();
    host.create_ext4_disk(&b, size).await.unwrap();
    let e = host.create_ext4_disk(&a, size).await.unwrap_err();
    assert!(e.to_string().contains("a.ext4"), "{e}");
    for p in [&a, &b] {
        assert_eq!(std::fs::metadata(p).unwrap().len(), size);
        assert!(disk::allocated_bytes(p).unwrap() < 32 * MIB);
    }
    // A clone allocates what the template does (give or take extent blocks).
    let template = host.templates().unwrap().path_for(size);
    let t = disk::allocated_bytes(&template).unwrap();
    assert!(
        disk::allocated_bytes(&a).unwrap() <= t + MIB,
        "template {t}"
    );
    if !can_mount(test) {
        return;
    }
    // The kernel mounts both at once (distinct UUIDs) and they take writes.
    let ma = Mounted::image_existing(&a);
    let mb = Mounted::image_existing(&b);
    std::fs::write(ma.join("hello"), b"a").unwrap();
    std::fs::write(mb.join("hello"), b"b").unwrap();
    drop((ma, mb));
    for p in [&a, &b] {
        run(Command::new("e2fsck").args(["-f", "-n"]).arg(p));
    }
}

impl Mounted {
    fn image_existing(image: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(image)
            .arg(dir.path()));
        Mounted {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

fn full_snapshot(id: &str, source: &Path, memory_mib: u64) -> NewSnapshot {
    NewSnapshot {
        rootfs_fingerprint: Some("fp".into()),
        full: Some(agentenv_api::FullSnapshotInfo {
            vmm_version: "qemu 7.2.19".into(),
            vcpus: 1,
            memory_mib,
            kernel: "/k".into(),
            kernel_fingerprint: "kf".into(),
            initrd: None,
            initrd_fingerprint: None,
            boot_args: String::new(),
            network: false,
            agent: true,
            memory_bytes: 0,
            state_bytes: 0,
            ephemeral: false,
        }),
        ..new_snapshot(id, source)
    }
}

/// A real tmpfs tier of `tmpfs_size`, a durable directory, a store over
/// them, a 1 GiB sparse disk with `disk_mib` MiB of data and a 32 MiB
/// sparse memory file with the given data regions.
struct FullTiers {
    tmpfs: Mounted,
    dir: tempfile::TempDir,
    durable: PathBuf,
    src: PathBuf,
    ram: PathBuf,
    store: TieredStore,
}

impl FullTiers {
    async fn new(tmpfs_size: &str, overhead: u64, disk_mib: u64, ram: &[(u64, u64)]) -> Self {
        let tmpfs = Mounted::tmpfs(&format!("size={tmpfs_size}"));
        let dir = tempfile::tempdir().unwrap();
        let durable = dir.path().join("durable");
        std::fs::create_dir(&durable).unwrap();
        let src = dir.path().join("disk");
        sparse(&src, 1 << 30, &[(0, disk_mib * MIB)]);
        let ram_path = dir.path().join("ram");
        sparse(&ram_path, 32 * MIB, ram);
        let store = TieredStore::new(dir.path(), &tmpfs.path, &durable, overhead);
        store.init().await.unwrap();
        FullTiers {
            tmpfs,
            dir,
            durable,
            src,
            ram: ram_path,
            store,
        }
    }

    /// Begins a full snapshot whose guest has `memory_mib` and writes its
    /// state file, as the VMM would.
    async fn begin(&self, id: &str, memory_mib: u64) -> PendingSnapshot {
        let p = self
            .store
            .begin(full_snapshot(id, &self.src, memory_mib))
            .await
            .unwrap();
        std::fs::write(&p.files.state, b"state").unwrap();
        p
    }

    /// Copies the memory and the disk and seals.
    async fn finish(&self, p: PendingSnapshot) -> agentenv_api::SnapshotInfo {
        self.store.copy_memory(&p, &self.ram).await.unwrap();
        self.store.copy_disk(&p).await.unwrap();
        self.store.seal(p).await.unwrap()
    }
}

#[tokio::test]
async fn a_full_snapshot_goes_durable_when_tmpfs_lacks_room_for_its_memory() {
    if !can_mount("a_full_snapshot_goes_durable_when_tmpfs_lacks_room_for_its_memory") {
        return;
    }
    let t = FullTiers::new("16m", MIB, 2, &[(0, MIB), (20 * MIB, 3 * MIB)]).await;
    // 2 MiB of disk + 32 MiB of memory + 1 MiB do not fit in 16 MiB; the
    // disk alone does.
    let p = t.begin("f", 32).await;
    assert_eq!(p.tier, SnapshotTier::Durable);
    let d = t.store.begin(new_snapshot("d", &t.src)).await.unwrap();
    assert_eq!(d.tier, SnapshotTier::Tmpfs);
    t.store.copy_disk(&d).await.unwrap();
    t.store.seal(d).await.unwrap();

    let info = t.finish(p).await;
    assert_eq!(info.tier, SnapshotTier::Durable);
    assert_eq!(info.full.as_ref().unwrap().memory_bytes, 32 * MIB);
    assert_eq!(names(&t.durable), ["f"]);
    assert_eq!(names(&t.tmpfs.path), ["d"]);
    let dest = t.dir.path().join("clone.ext4");
    let files = t.store.open_full("f", &dest).await.unwrap();
    assert_eq!(files.memory, Some(t.durable.join("f/memory")));
    assert_eq!(extents(&t.durable.join("f/memory")), extents(&t.ram));
    assert_eq!(disk::sparse_sha256(&dest).unwrap(), info.sha256);
}

#[tokio::test]
async fn a_full_snapshot_filling_tmpfs_is_no_space_and_abort_leaves_nothing() {
    if !can_mount("a_full_snapshot_filling_tmpfs_is_no_space_and_abort_leaves_nothing") {
        return;
    }
    // The guest says 4 MiB, its memory file holds 24 MiB of data: the
    // tier is chosen by the former, the copy meets the latter.
    let t = FullTiers::new("16m", 0, 1, &[(0, 24 * MIB)]).await;
    let p = t.begin("f", 4).await;
    assert_eq!(p.tier, SnapshotTier::Tmpfs);
    let e = t.store.copy_memory(&p, &t.ram).await.unwrap_err();
    assert!(matches!(e, SnapshotError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains("memory"), "{e}");
    t.store.abort(p).await;
    assert!(names(&t.tmpfs.path).is_empty());
    assert!(names(&t.durable).is_empty());
    assert!(used_bytes(&t.tmpfs.path) < MIB);
    assert!(t.store.list().is_empty());
}

#[tokio::test]
async fn a_full_snapshot_on_tmpfs_catches_a_damaged_memory_page() {
    if !can_mount("a_full_snapshot_on_tmpfs_catches_a_damaged_memory_page") {
        return;
    }
    let t = FullTiers::new("64m", 0, 1, &[(0, 32 * MIB)]).await;
    let p = t.begin("f", 32).await;
    t.finish(p).await;
    // A byte in a sampled page, the mtime put back.
    let mem = t.tmpfs.path.join("f/memory");
    let before = std::fs::metadata(&mem).unwrap().modified().unwrap();
    let off = agentenv_host::snapshots::quick::sample_ranges(32 * MIB, 64)[10].0;
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.write_all_at(b"\0\0\0\0", off).unwrap();
    f.set_modified(before).unwrap();
    drop(f);
    let dest = t.dir.path().join("clone.ext4");
    let e = t.store.open_full("f", &dest).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    assert!(!dest.exists());
    assert_eq!(t.store.get("f").unwrap().status, SnapshotStatus::Corrupt);
}
