//! Disk snapshots through the HTTP API, against the Firecracker double, on real
//! files: take, list, create a VM from one, persist, delete, and the errors.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

/// Writes `data` at `offset` of a VM's overlay, as the guest would.
fn write_into(path: &str, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

fn read_at(path: &str, offset: u64, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Firecracker's own view of the instance state (`Running`, `Paused`).
fn fc_state(d: &Daemon, vm_id: &str) -> String {
    let (_, v) = d.call("GET", &format!("/v1/vm/{vm_id}"), None);
    common::fc_state(v["api_socket"].as_str().unwrap())
}

#[test]
fn snapshot_restore_persist_delete() {
    let (d, dir) = Daemon::start();
    let vm = d.create_ok("src");
    let overlay = vm["disk"]["writable_path"].as_str().unwrap().to_string();
    let marker = b"written by the guest before the snapshot";
    write_into(&overlay, 512 << 20, marker);

    let (code, s) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "s1"})),
    );
    assert_eq!(code, 201, "{s}");
    assert_eq!(s["snapshot_id"], "s1");
    assert_eq!(s["vm_id"], "src");
    assert_eq!(s["rootfs_id"], "base.ext4");
    assert_eq!(s["tier"], "tmpfs");
    assert_eq!(s["status"], "ready");
    assert_eq!(s["logical_bytes"], 1u64 << 30);
    assert!(s["allocated_bytes"].as_u64().unwrap() < 64 << 20, "{s}");
    assert_eq!(s["sha256"].as_str().unwrap().len(), 64);
    // The source VM keeps running, and Firecracker agrees.
    let (_, v) = d.call("GET", "/v1/vm/src", None);
    assert_eq!(v["state"], "running");
    assert_eq!(fc_state(&d, "src"), "Running");

    // An empty body generates an id.
    let (code, s2) = d.call("POST", "/v1/vm/src/snapshot", None);
    assert_eq!(code, 201, "{s2}");
    assert!(
        s2["snapshot_id"].as_str().unwrap().starts_with("src-"),
        "{s2}"
    );
    let (code, list) = d.call("GET", "/v1/snapshots", None);
    assert_eq!(code, 200);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 2);

    // The source's later writes do not reach the snapshot.
    write_into(&overlay, 512 << 20, b"XXXXXXXX");
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "copy", "disk": {"kind": "snapshot", "snapshot_id": "s1"}})),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["disk"]["kind"], "snapshot");
    assert_eq!(v["disk"]["snapshot_id"], "s1");
    assert!(v["boot_args"]
        .as_str()
        .unwrap()
        .contains("agentenv.overlay=/dev/vdb"));
    let copy = v["disk"]["writable_path"].as_str().unwrap();
    assert_eq!(read_at(copy, 512 << 20, marker.len()), marker);

    // Persist: tmpfs → durable, idempotent.
    let (code, p) = d.call(
        "POST",
        "/v1/snapshots/s1/persist",
        Some(json!({"keep_tmpfs": true})),
    );
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["tier"], "durable");
    assert!(p["persisted_at"].is_string());
    assert!(Path::new(p["durable_path"].as_str().unwrap()).exists());
    assert!(Path::new(p["tmpfs_path"].as_str().unwrap()).exists());
    let (code, p2) = d.call("POST", "/v1/snapshots/s1/persist", None);
    assert_eq!(code, 200, "{p2}");
    assert_eq!(p2["persisted_at"], p["persisted_at"]);
    let id2 = s2["snapshot_id"].as_str().unwrap();
    let (code, p) = d.call("POST", &format!("/v1/snapshots/{id2}/persist"), None);
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["tmpfs_path"], Value::Null, "tmpfs copy dropped: {p}");

    // Delete.
    for id in ["s1", id2] {
        let (code, v) = d.call("DELETE", &format!("/v1/snapshots/{id}"), None);
        assert_eq!(code, 204, "{v}");
    }
    let (code, _) = d.call("GET", "/v1/snapshots/s1", None);
    assert_eq!(code, 404);
    finish(d, dir);
}

#[test]
fn a_paused_vm_stays_paused_and_errors_are_named() {
    let (d, dir) = Daemon::start();
    d.create_ok("p");
    assert_eq!(d.call("POST", "/v1/vm/p/pause", None).0, 200);
    let (code, s) = d.call(
        "POST",
        "/v1/vm/p/snapshot",
        Some(json!({"snapshot_id": "sp"})),
    );
    assert_eq!(code, 201, "{s}");
    let (_, v) = d.call("GET", "/v1/vm/p", None);
    assert_eq!(v["state"], "paused");
    assert_eq!(fc_state(&d, "p"), "Paused");

    let cases = [
        (
            "/v1/vm/p/snapshot",
            json!({"snapshot_id": "sp"}),
            409,
            "already exists",
        ),
        (
            "/v1/vm/p/snapshot",
            json!({"snapshot_id": "../x"}),
            400,
            "snapshot_id",
        ),
        (
            "/v1/vm/p/snapshot",
            json!({"snapshot_id": "a", "x": 1}),
            400,
            "unknown field",
        ),
        ("/v1/vm/nope/snapshot", json!({}), 404, "nope"),
        ("/v1/snapshots/nope/persist", json!({}), 404, "nope"),
    ];
    for (path, body, code, word) in cases {
        let (got, v) = d.call("POST", path, Some(body.clone()));
        assert_eq!(got, code, "{path} {body} → {v}");
        assert!(v["error"].as_str().unwrap().contains(word), "{v}");
    }
    let (code, v) = d.call("GET", "/v1/snapshots/.bad", None);
    assert_eq!(
        (code, v["field"].as_str()),
        (400, Some("snapshot_id")),
        "{v}"
    );
    let (code, _) = d.call("DELETE", "/v1/snapshots/nope", None);
    assert_eq!(code, 404);

    // A stopped VM has nothing to snapshot.
    assert_eq!(d.call("POST", "/v1/vm/p/shutdown", None).0, 200);
    let (code, v) = d.call("POST", "/v1/vm/p/snapshot", None);
    assert_eq!((code, v["state"].as_str()), (409, Some("stopped")), "{v}");

    // A source whose base image is gone is refused with 404.
    std::fs::rename(
        dir.path().join("rootfs/base.ext4"),
        dir.path().join("rootfs/moved.ext4"),
    )
    .unwrap();
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "x", "disk": {"kind": "snapshot", "snapshot_id": "sp"}})),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("base.ext4"), "{v}");
    std::fs::rename(
        dir.path().join("rootfs/moved.ext4"),
        dir.path().join("rootfs/base.ext4"),
    )
    .unwrap();

    // A corrupt snapshot is reported and refused as a source with 422.
    let (_, s) = d.call("GET", "/v1/snapshots/sp", None);
    let disk = s["tmpfs_path"].as_str().unwrap();
    let disk = if Path::new(disk).is_dir() {
        format!("{disk}/disk.ext4")
    } else {
        disk.to_string()
    };
    let byte = read_at(&disk, 1024, 1)[0];
    write_into(&disk, 1024, &[byte ^ 0xff]);
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "x", "disk": {"kind": "snapshot", "snapshot_id": "sp"}})),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["field"], "disk.snapshot_id");
    let (_, s) = d.call("GET", "/v1/snapshots/sp", None);
    assert_eq!(s["status"], "corrupt");
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "x", "disk": {"kind": "snapshot", "snapshot_id": "sp"}})),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(d.call("DELETE", "/v1/snapshots/sp", None).0, 204);
    finish(d, dir);
}

#[test]
fn a_snapshot_cannot_be_deleted_while_a_vm_is_created_from_it() {
    let (d, dir) = Daemon::start();
    d.create_ok("src");
    assert_eq!(
        d.call(
            "POST",
            "/v1/vm/src/snapshot",
            Some(json!({"snapshot_id": "busy"}))
        )
        .0,
        201
    );
    // A create from it, held after its disk was copied.
    d.engine.failpoints.arm_hang("create.disk");
    let creator = common::fire(
        &d,
        "POST",
        "/v1/vm".into(),
        json!({"vm_id": "from", "disk": {"kind": "snapshot", "snapshot_id": "busy"}}),
        Duration::from_secs(60),
    );
    common::wait_hung(&d, "create.disk");
    let (code, v) = d.call("DELETE", "/v1/snapshots/busy", None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("being created"),
        "{v}"
    );
    // Once the create has finished, the snapshot can go.
    d.engine.failpoints.clear();
    creator.join().unwrap();
    assert_eq!(d.call("GET", "/v1/vm/from", None).1["state"], "running");
    assert_eq!(d.call("DELETE", "/v1/snapshots/busy", None).0, 204);
    finish(d, dir);
}

/// A tmpfs mounted for one test; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str, extra: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let opts = format!("size={size}{extra}");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_or_missing_tiers_fail_cleanly_and_the_vm_runs_on() {
    if nix::unistd::geteuid().as_raw() != 0 {
        agentenv_testkit::skip::skip("needs root to mount small tmpfs tiers");
        return;
    }
    let mut dir = TestDir::new();
    let cfg = dir.config();
    let Some(tmpfs) = Tmpfs::mount(&cfg.tmpfs_snapshot_root, "2m", "") else {
        agentenv_testkit::skip::skip("cannot mount a tmpfs");
        return;
    };
    let durable = Tmpfs::mount(&cfg.hdfs_snapshot_root, "2m", "").unwrap();
    // The guests' RAM directory the daemon keeps in the tier (also under the mount).
    std::fs::create_dir(cfg.guest_memory_dir()).unwrap();
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg.clone(), dir.path());
    let vm = d.create_ok("big");
    // 8 MiB of guest data: more than either tier holds.
    write_into(
        vm["disk"]["writable_path"].as_str().unwrap(),
        1 << 20,
        &vec![0xa5; 8 << 20],
    );
    let (code, v) = d.call(
        "POST",
        "/v1/vm/big/snapshot",
        Some(json!({"snapshot_id": "nope"})),
    );
    assert_eq!(code, 507, "{v}");
    let (_, v) = d.call("GET", "/v1/vm/big", None);
    assert_eq!(v["state"], "running");
    assert_eq!(
        fc_state(&d, "big"),
        "Running",
        "the VM is resumed after a failed snapshot"
    );
    assert_eq!(d.call("GET", "/v1/snapshots/nope", None).0, 404);
    for tier in [&cfg.tmpfs_snapshot_root, &cfg.hdfs_snapshot_root] {
        // (The guests' RAM directory lives in the tmpfs tier by default.)
        let left: Vec<_> = std::fs::read_dir(tier)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(".guest-memory"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", tier.display());
    }
    d.stop();

    // A read-only durable tier, needed because tmpfs is too small: 503 naming it.
    drop(durable);
    let ro = Tmpfs::mount(&cfg.hdfs_snapshot_root, "64m", ",ro").unwrap();
    let d = Daemon::start_with(cfg, dir.path());
    let (code, v) = d.call(
        "POST",
        "/v1/vm/big/snapshot",
        Some(json!({"snapshot_id": "nope"})),
    );
    // The restarted daemon did not re-adopt `big` (it is failed): make a new VM.
    assert_eq!(code, 409, "{v}");
    let vm = d.create_ok("big2");
    write_into(
        vm["disk"]["writable_path"].as_str().unwrap(),
        1 << 20,
        &vec![0xa5; 8 << 20],
    );
    let (code, v) = d.call("POST", "/v1/vm/big2/snapshot", None);
    assert_eq!(code, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(dir.path().join("snap/durable").to_str().unwrap()),
        "{v}"
    );
    assert_eq!(fc_state(&d, "big2"), "Running");
    drop((tmpfs, ro));
    finish(d, dir);
}

/// A disk snapshot records its base image's fingerprint: once the base has
/// changed, a VM from the snapshot is a 409 naming the rootfs (its overlay
/// holds block changes to the base as it was), and nothing is left behind.
#[test]
fn a_disk_snapshot_over_a_changed_base_is_a_409_naming_the_rootfs() {
    let (d, dir) = Daemon::start();
    d.create_ok("src");
    let (code, s) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "s1"})),
    );
    assert_eq!(code, 201, "{s}");
    assert!(
        s["rootfs_fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("fp1:")),
        "{s}"
    );
    let req = |id: &str| json!({"vm_id": id, "disk": {"kind": "snapshot", "snapshot_id": "s1"}});
    let (code, v) = d.call("POST", "/v1/vm", Some(req("same")));
    assert_eq!(code, 201, "the base as it was: {v}");

    // The base image changes (as a rebuilt image would).
    let base = dir.path().join("rootfs/base.ext4");
    write_into(base.to_str().unwrap(), 4096, b"a rebuilt base image");
    let (code, v) = d.call("POST", "/v1/vm", Some(req("changed")));
    assert_eq!(code, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("base image (rootfs)") && msg.contains(base.to_str().unwrap()),
        "{v}"
    );
    assert!(d.engine.get("changed").is_err());
    assert!(!dir.path().join("sessions/changed").exists());
    let (code, v) = d.call("DELETE", "/v1/snapshots/s1", None);
    assert_eq!(code, 204, "{v}");
    finish(d, dir);
}
