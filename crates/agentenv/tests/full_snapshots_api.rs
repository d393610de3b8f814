//! Full snapshots, restore, fork and reset through the HTTP API against the
//! Firecracker double (or a real Firecracker with AGENTENV_TEST_FIRECRACKER),
//! on real files, with the leak check at the end of each test.

mod common;

use common::{finish, Daemon};
use serde_json::{json, Value};

fn ok(d: &Daemon, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
    let (code, v) = d.call(method, path, body);
    assert_eq!(code, want, "{method} {path}: {v}");
    v
}

fn restore(d: &Daemon, vm_id: &str, snapshot_id: &str) -> (u16, Value) {
    d.call(
        "POST",
        "/v1/vm",
        Some(json!({"vm_id": vm_id, "restore": {"snapshot_id": snapshot_id}})),
    )
}

#[test]
fn full_snapshot_restore_fork_reset_and_delete() {
    let (d, dir) = Daemon::start();
    d.create_ok("src");
    let s = ok(
        &d,
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "full", "memory": true})),
        201,
    );
    assert_eq!(s["kind"], "full", "{s}");
    let full = &s["full"];
    assert!(
        full["vmm_version"]
            .as_str()
            .unwrap()
            .starts_with("firecracker "),
        "{s}"
    );
    assert_eq!(full["vcpus"], 1);
    assert_eq!(full["memory_mib"], 128);
    assert!(full["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(full["state_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["rootfs_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("fp1:"));
    assert_eq!(ok(&d, "GET", "/v1/vm/src", None, 200)["state"], "running");
    assert_eq!(
        common::fc_state(
            ok(&d, "GET", "/v1/vm/src", None, 200)["api_socket"]
                .as_str()
                .unwrap()
        ),
        "Running"
    );

    // Restore: a running VM with its own session, disk and socket.
    let (code, r) = restore(&d, "r1", "full");
    assert_eq!(code, 201, "{r}");
    assert_eq!(r["state"], "running");
    assert_eq!(r["restored_from"], "full");
    assert_eq!(r["vcpus"], 1);
    assert_eq!(r["memory_mib"], 128);
    let src = ok(&d, "GET", "/v1/vm/src", None, 200);
    assert_ne!(r["disk"]["writable_path"], src["disk"]["writable_path"]);
    assert_ne!(r["api_socket"], src["api_socket"]);
    assert!(std::path::Path::new(r["disk"]["writable_path"].as_str().unwrap()).exists());
    assert_eq!(
        common::fc_state(r["api_socket"].as_str().unwrap()),
        "Running"
    );

    // Deleting the snapshot while r1 maps it: 409 naming r1.
    let (code, e) = d.call("DELETE", "/v1/snapshots/full", None);
    assert_eq!(code, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("r1"), "{e}");

    // Fork: three running clones, ids by default.
    let f = ok(
        &d,
        "POST",
        "/v1/vm/src/fork",
        Some(json!({"count": 3})),
        201,
    );
    let ids: Vec<&str> = f["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["src-fork-1", "src-fork-2", "src-fork-3"]);
    for v in f["vms"].as_array().unwrap() {
        assert_eq!(v["state"], "running", "{v}");
    }
    let snaps = ok(&d, "GET", "/v1/snapshots", None, 200);
    let fork_snap = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["full"]["ephemeral"] == true)
        .expect("the fork's snapshot")
        .clone();
    assert_eq!(fork_snap["mapped_by"].as_array().unwrap().len(), 3);

    // Reset in place: same id, socket, disk path; a new VMM.
    let before = ok(&d, "GET", "/v1/vm/r1", None, 200);
    let after = ok(
        &d,
        "POST",
        "/v1/vm/r1/reset",
        Some(json!({"snapshot_id": "full"})),
        200,
    );
    assert_eq!(after["state"], "running");
    assert_eq!(after["api_socket"], before["api_socket"]);
    assert_eq!(
        after["disk"]["writable_path"],
        before["disk"]["writable_path"]
    );
    assert_ne!(after["pid"], before["pid"]);

    for id in ids.iter().chain(["r1"].iter()) {
        ok(&d, "DELETE", &format!("/v1/vm/{id}"), None, 204);
    }
    // The fork's snapshot went with its last clone; ours stays until deleted.
    let (code, _) = d.call(
        "GET",
        &format!(
            "/v1/snapshots/{}",
            fork_snap["snapshot_id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(code, 404);
    ok(&d, "DELETE", "/v1/snapshots/full", None, 204);
    finish(d, dir);
}

#[test]
fn bad_requests_name_the_field_and_leave_nothing() {
    let (d, dir) = Daemon::start();
    d.create_ok("src");
    ok(
        &d,
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "disk"})),
        201,
    );
    ok(
        &d,
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "full", "memory": true})),
        201,
    );
    // Unknown snapshot: 404 naming restore.snapshot_id.
    let (code, e) = restore(&d, "x", "nope");
    assert_eq!(
        (code, e["field"].as_str()),
        (404, Some("restore.snapshot_id")),
        "{e}"
    );
    // A disk snapshot cannot be restored or reset to: 409.
    let (code, e) = restore(&d, "x", "disk");
    assert_eq!(code, 409, "{e}");
    let (code, e) = d.call(
        "POST",
        "/v1/vm/src/reset",
        Some(json!({"snapshot_id": "disk"})),
    );
    assert_eq!(code, 409, "{e}");
    // Fields the snapshot decides: 400.
    for (k, v) in [
        ("slots", json!(2)),
        ("kernel", json!("vmlinux")),
        ("disk", json!({"kind": "overlay", "rootfs_id": "base.ext4"})),
    ] {
        let mut body = json!({"vm_id": "x", "restore": {"snapshot_id": "full"}});
        body[k] = v;
        let (code, e) = d.call("POST", "/v1/vm", Some(body));
        assert_eq!((code, e["field"].as_str()), (400, Some(k)), "{e}");
    }
    // Fork counts: 0 and above max_fork are 400; mismatched ids too.
    for (body, field) in [
        (json!({"count": 0}), "count"),
        (json!({"count": 65}), "count"),
        (json!({"count": 2, "vm_ids": ["a"]}), "vm_ids"),
    ] {
        let (code, e) = d.call("POST", "/v1/vm/src/fork", Some(body));
        assert_eq!((code, e["field"].as_str()), (400, Some(field)), "{e}");
    }
    let (code, e) = d.call(
        "POST",
        "/v1/vm/src/fork",
        Some(json!({"count": 1, "vm_ids": ["src"]})),
    );
    assert_eq!(code, 409, "{e}");
    // A full snapshot file that is cut short: 422 and nothing made.
    let full = ok(&d, "GET", "/v1/snapshots/full", None, 200);
    let dir_of = std::path::PathBuf::from(full["tmpfs_path"].as_str().unwrap());
    let mem = if dir_of.is_dir() {
        dir_of.join("memory")
    } else {
        dir_of.parent().unwrap().join("memory")
    };
    let len = std::fs::metadata(&mem).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, e) = restore(&d, "x", "full");
    assert_eq!(code, 422, "{e}");
    assert_eq!(d.call("GET", "/v1/vm/x", None).0, 404);
    assert_eq!(
        ok(&d, "GET", "/v1/vm", None, 200)["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    ok(&d, "DELETE", "/v1/snapshots/full", None, 204);
    ok(&d, "DELETE", "/v1/snapshots/disk", None, 204);
    finish(d, dir);
}
