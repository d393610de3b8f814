//! Host paths from requests (direct disks, share directories) over real HTTP
//! with the Firecracker double: a symlink at any component is refused, the
//! daemon's own directories are out of reach, a disk in use by another VM is
//! refused by its inode, shares are capped — and a path swapped for a symlink
//! while creates run never gets a file outside the root into a guest (the
//! VMM is checked for what it really has open).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

fn direct(vm_id: &str, path: &Path) -> Value {
    json!({"vm_id": vm_id, "disk": {"kind": "direct", "path": path}})
}

fn with_share(mut body: Value, host: &Path) -> Value {
    body["shares"] = json!([{"host_path": host, "guest_path": "/mnt/s"}]);
    body
}

fn disk_file(p: &Path, marker: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut data = marker.to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(p, data).unwrap();
}

fn symlink(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// Asserts an error answer: its status, its field, a word of its message.
fn refused(got: &(u16, Value), code: u16, field: &str, word: &str, ctx: &str) {
    assert_eq!(got.0, code, "{ctx}: {}", got.1);
    assert_eq!(got.1["field"], field, "{ctx}: {}", got.1);
    let msg = got.1["error"].as_str().unwrap_or("");
    assert!(msg.contains(word), "{ctx}: {word:?} not in {msg}");
}

#[test]
fn symlinks_daemon_roots_shared_disks_and_big_shares_are_refused() {
    let mut dir = TestDir::new();
    let d0 = dir.path().to_path_buf();
    let disks = d0.join("disks");
    let outside = d0.join("outside");
    disk_file(&disks.join("a/b/ok.img"), b"inside");
    disk_file(&outside.join("b/ok.img"), b"outside");
    // A symlink as the first, a middle and the last component.
    symlink(&outside, &disks.join("first"));
    symlink(&outside.join("b"), &disks.join("a/mid"));
    symlink(&outside.join("b/ok.img"), &disks.join("a/b/last.img"));
    std::fs::create_dir_all(disks.join("share/sub")).unwrap();
    std::fs::write(disks.join("share/sub/f"), b"x").unwrap();
    std::fs::create_dir_all(outside.join("share")).unwrap();
    symlink(&outside.join("share"), &disks.join("share-first"));
    symlink(&outside.join("share"), &disks.join("share/sub/last"));
    std::fs::create_dir_all(disks.join("big")).unwrap();
    std::fs::write(disks.join("big/f"), vec![7u8; 2 << 20]).unwrap();
    // The daemon's roots, reachable from a direct-disk root that holds them.
    std::fs::create_dir_all(d0.join("var/sessions")).unwrap();
    // The jail's base, beside session_root, stays (as TestDir's own jail/).
    std::fs::create_dir_all(d0.join("var/jail")).unwrap();
    disk_file(&d0.join("rootfs/other.img"), b"base");
    disk_file(&d0.join("snap/durable/x.img"), b"snapshot");
    let mut cfg = dir.config();
    cfg.session_root = d0.join("var/sessions");
    cfg.direct_disk_roots = vec![disks.clone(), d0.clone()];
    cfg.max_share_mib = 1;
    dir.baseline = Some(common::baseline(&d0));
    let d = Daemon::start_with(cfg, &d0);

    for (path, ctx) in [
        (disks.join("first/b/ok.img"), "first component"),
        (disks.join("a/mid/ok.img"), "middle component"),
        (disks.join("a/b/last.img"), "last component"),
    ] {
        let got = d.call("POST", "/v1/vm", Some(direct("v", &path)));
        refused(&got, 400, "disk.path", "symlink", ctx);
    }
    let ok = disks.join("a/b/ok.img");
    for (share, ctx) in [
        (disks.join("share-first"), "share, first component"),
        (disks.join("share/sub/last"), "share, last component"),
    ] {
        let got = d.call("POST", "/v1/vm", Some(with_share(direct("v", &ok), &share)));
        refused(&got, 400, "shares[0].host_path", "symlink", ctx);
    }
    for (path, word) in [
        (d0.join("rootfs/other.img"), "rootfs_root"),
        (d0.join("snap/durable/x.img"), "snapshots_root"),
    ] {
        let got = d.call("POST", "/v1/vm", Some(direct("v", &path)));
        refused(&got, 403, "disk.path", word, "daemon root");
    }
    for (share, word) in [
        (d0.join("var"), "holds the daemon's session_root"),
        (d0.join("snap"), "inside the daemon's snapshots_root"),
    ] {
        let got = d.call("POST", "/v1/vm", Some(with_share(direct("v", &ok), &share)));
        refused(
            &got,
            403,
            "shares[0].host_path",
            word,
            "share and daemon root",
        );
    }
    let got = d.call(
        "POST",
        "/v1/vm",
        Some(with_share(direct("v", &ok), &disks.join("big"))),
    );
    refused(
        &got,
        400,
        "shares[0].host_path",
        "max_share_mib",
        "share over cap",
    );

    // A disk in use is found by its inode, not its name: renamed, it is
    // still the first VM's (409, as for the same path: the conflict ends
    // when that VM is deleted).
    let got = d.call(
        "POST",
        "/v1/vm",
        Some(with_share(direct("one", &ok), &disks.join("share"))),
    );
    assert_eq!(got.0, 201, "{}", got.1);
    let renamed = disks.join("a/b/renamed.img");
    std::fs::rename(&ok, &renamed).unwrap();
    let got = d.call("POST", "/v1/vm", Some(direct("two", &renamed)));
    assert_eq!(got.0, 409, "{}", got.1);
    let msg = got.1["error"].as_str().unwrap();
    assert!(msg.contains("disk.path") && msg.contains("vm one"), "{msg}");
    let (code, body) = d.call("DELETE", "/v1/vm/one", None);
    assert_eq!(code, 204, "{body}");
    std::fs::rename(&renamed, &ok).unwrap();
    assert!(d.engine.is_empty());
    finish(d, dir);
}

/// (device, inode) of a file.
fn id_of(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

/// (device, inode) of every file process `pid` has open.
fn open_inodes(pid: u64) -> Vec<(u64, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect()
        })
        .unwrap_or_default()
}

/// The names in the root of an ext4 image.
fn image_names(image: &Path) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ls -p /"])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Swaps `at` between the entries `real` and `link` (renames only, so every
/// state is whole) until told to stop, always ending with both back. Each
/// state holds for a varying few hundred microseconds, so checks and opens
/// of one create fall on either side of a swap.
fn swapper(
    at: PathBuf,
    real: PathBuf,
    link: PathBuf,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = common::Rng(seed);
        let mut hold = move || {
            let us = rng.below(600) as u64;
            std::thread::sleep(std::time::Duration::from_micros(us));
        };
        let mut swaps = 0;
        while !stop.load(Ordering::Relaxed) {
            std::fs::rename(&real, &at).unwrap();
            hold();
            std::fs::rename(&at, &real).unwrap();
            std::fs::rename(&link, &at).unwrap();
            hold();
            std::fs::rename(&at, &link).unwrap();
            swaps += 1;
        }
        swaps
    })
}

#[test]
fn a_path_swapped_for_a_symlink_during_200_creates_never_reaches_a_guest() {
    if common::is_real() {
        eprintln!(
            "runs against the Firecracker double: it opens /proc/self/fd paths like Firecracker"
        );
    }
    let mut dir = TestDir::new();
    let d0 = dir.path().to_path_buf();
    let disks = d0.join("disks");
    let outside = d0.join("outside");
    // The middle component `sw` and the last component `l.img` swap between
    // a real entry and a symlink to one outside; so does the share `sh`.
    disk_file(&disks.join("sw.real/d.img"), b"INSIDE");
    disk_file(&outside.join("d.img"), b"OUTSIDE");
    symlink(&outside, &disks.join("sw.link"));
    disk_file(&disks.join("last/l.img.real"), b"INSIDE-LAST");
    disk_file(&outside.join("l.img"), b"OUTSIDE");
    symlink(&outside.join("l.img"), &disks.join("last/l.img.link"));
    std::fs::create_dir_all(disks.join("sh.real")).unwrap();
    std::fs::write(disks.join("sh.real/inside_file"), b"inside").unwrap();
    std::fs::create_dir_all(outside.join("share")).unwrap();
    std::fs::write(outside.join("share/OUTSIDE_SECRET"), b"secret").unwrap();
    symlink(&outside.join("share"), &disks.join("sh.link"));
    let outside_ids = [id_of(&outside.join("d.img")), id_of(&outside.join("l.img"))];
    let inside_ids = [
        id_of(&disks.join("sw.real/d.img")),
        id_of(&disks.join("last/l.img.real")),
    ];
    let mut cfg = dir.config();
    cfg.direct_disk_roots = vec![disks.clone()];
    dir.baseline = Some(common::baseline(&d0));
    let d = Daemon::start_with(cfg, &d0);

    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        swapper(
            disks.join("sw"),
            disks.join("sw.real"),
            disks.join("sw.link"),
            stop.clone(),
            1,
        ),
        swapper(
            disks.join("last/l.img"),
            disks.join("last/l.img.real"),
            disks.join("last/l.img.link"),
            stop.clone(),
            2,
        ),
        swapper(
            disks.join("sh"),
            disks.join("sh.real"),
            disks.join("sh.link"),
            stop.clone(),
            3,
        ),
    ];
    let (mut made, mut refused_n) = (0, 0);
    for i in 0..200 {
        // Turn about: a disk swapped at a middle component, one swapped at
        // its last, a share swapped (with an overlay disk).
        let vm = format!("race{i}");
        let body = match i % 3 {
            0 => direct(&vm, &disks.join("sw/d.img")),
            1 => direct(&vm, &disks.join("last/l.img")),
            _ => with_share(
                json!({"vm_id": vm, "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}}),
                &disks.join("sh"),
            ),
        };
        let (code, v) = d.call("POST", "/v1/vm", Some(body));
        if code != 201 {
            // Refused: a symlink met, or nothing there mid-swap.
            assert!(matches!(code, 400 | 404), "{i}: {code} {v}");
            let field = v["field"].as_str().unwrap_or("");
            assert!(
                field == "disk.path" || field == "shares[0].host_path",
                "{i}: {v}"
            );
            refused_n += 1;
            continue;
        }
        made += 1;
        if i % 3 < 2 {
            let pid = v["pid"].as_u64().expect("a running vm has a pid");
            let open = open_inodes(pid);
            for o in &outside_ids {
                assert!(!open.contains(o), "{i}: the vmm has the outside file open");
            }
            assert!(
                open.contains(&inside_ids[i % 3]),
                "{i}: the vmm does not have the inside disk open: {open:?}"
            );
        } else {
            let image = PathBuf::from(v["shares"][0]["image_path"].as_str().unwrap());
            let names = image_names(&image);
            assert!(names.contains("inside_file"), "{i}: {names}");
            assert!(!names.contains("OUTSIDE_SECRET"), "{i}: {names}");
        }
        let (code, body) = d.call("DELETE", &format!("/v1/vm/{vm}"), None);
        assert_eq!(code, 204, "{body}");
    }
    stop.store(true, Ordering::Relaxed);
    let swaps: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    println!("race: {made} created, {refused_n} refused, swaps {swaps:?}");
    assert!(made >= 10, "too few creates got through to test: {made}");
    assert!(swaps.iter().all(|&s| s > 0), "{swaps:?}");
    finish(d, dir);
}

/// A real QEMU guest boots from a direct disk that QEMU reaches only through
/// the descriptor the daemon opened: its command line names
/// `/proc/self/fd/N`, never the path, and the guest reads the disk's own
/// data even though the path was renamed and replaced by a symlink to
/// another image right after the create.
#[test]
fn a_qemu_guest_boots_from_the_direct_disk_the_daemon_opened() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let disks = dir.path().join("disks");
    let disk = disks.join("root.ext4");
    std::fs::copy(art.join("rootfs/minimal.ext4"), &disk).unwrap();
    let marker = dir.path().join("marker");
    std::fs::write(&marker, b"the opened disk").unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-w", "-R", &format!("write {} /marker", marker.display())])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_file(&marker).unwrap();
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.direct_disk_roots = vec![disks.clone()];
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let (code, vm) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "direct",
            "boot_args": "console=ttyS0 reboot=k panic=1 agentenv.check=file:/marker",
            "disk": {"kind": "direct", "path": disk}})),
    );
    assert_eq!(code, 201, "{vm}");
    // Swapped at once: the guest must still boot from the opened file.
    std::fs::rename(&disk, disks.join("moved.ext4")).unwrap();
    symlink(&art.join("rootfs/minimal.ext4"), &disk);
    let pid = vm["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("file=/proc/self/fd/"), "{cmdline}");
    assert!(!cmdline.contains("root.ext4"), "{cmdline}");
    assert!(open_inodes(pid).contains(&id_of(&disks.join("moved.ext4"))));
    let log = PathBuf::from(vm["console_log"].as_str().unwrap());
    let start = std::time::Instant::now();
    let want = "agentenv-check file /marker ok the opened disk";
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        if text.contains(want) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "no {want:?} on the console:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, body) = d.call("DELETE", "/v1/vm/direct", None);
    assert_eq!(code, 204, "{body}");
    std::fs::remove_file(&disk).unwrap();
    std::fs::rename(disks.join("moved.ext4"), &disk).unwrap();
    finish(d, dir);
}

/// A snapshot of a VM on a direct disk copies the file the daemon opened for
/// it, not whatever its path names by then.
#[test]
fn a_snapshot_of_a_direct_disk_copies_the_opened_file() {
    let mut dir = TestDir::new();
    let d0 = dir.path().to_path_buf();
    let disks = d0.join("disks");
    let disk = disks.join("s.img");
    disk_file(&disk, b"INSIDE");
    let mut cfg = dir.config();
    cfg.direct_disk_roots = vec![disks.clone()];
    dir.baseline = Some(common::baseline(&d0));
    let d = Daemon::start_with(cfg, &d0);
    let (code, v) = d.call("POST", "/v1/vm", Some(direct("src", &disk)));
    assert_eq!(code, 201, "{v}");
    // Swapped under the running VM for another file, then a symlink.
    std::fs::rename(&disk, disks.join("s.moved")).unwrap();
    disk_file(&d0.join("outside.img"), b"OUTSIDE");
    symlink(&d0.join("outside.img"), &disk);
    let (code, s) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "s1"})),
    );
    assert_eq!(code, 201, "{s}");
    let (code, v) = d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": "copy", "disk": {"kind": "snapshot", "snapshot_id": "s1"}})),
    );
    assert_eq!(code, 201, "{v}");
    let copy = std::fs::read(v["disk"]["writable_path"].as_str().unwrap()).unwrap();
    assert!(
        copy.starts_with(b"INSIDE"),
        "the snapshot copied another file"
    );
    for vm in ["copy", "src"] {
        let (code, body) = d.call("DELETE", &format!("/v1/vm/{vm}"), None);
        assert_eq!(code, 204, "{body}");
    }
    let (code, body) = d.call("DELETE", "/v1/snapshots/s1", None);
    assert!(code == 204 || code == 200, "{code} {body}");
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(d0.join("outside.img")).unwrap();
    std::fs::rename(disks.join("s.moved"), &disk).unwrap();
    finish(d, dir);
}
