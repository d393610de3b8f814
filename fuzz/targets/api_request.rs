// The body of the `api_request` fuzz target: arbitrary bytes into the daemon's
// request parser. Shared, through include!(), by the cargo-fuzz target
// (fuzz/fuzz_targets/api_request.rs) and the ordinary test that runs it over
// PRNG-made inputs (crates/agentenv/tests/fuzz_targets.rs), so it uses only
// crates both have and has no inner attributes.
//
// Properties, for every request type:
// - parsing never panics (deep nesting, huge numbers, bad UTF-8 included);
// - a refusal is a 400 with a message that names the field it blames;
// - an accepted request serialises, and parses back to the same value;
// - an accepted id either fails the id grammar or joins under its root as
//   exactly one plain component.

use agentenv::server::json::parse;
use agentenv_api::{CreateSnapshotRequest, CreateVmRequest, DiskSpec, ExecRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Runs every property on one input.
pub fn api_request(data: &[u8]) {
    if let Some(req) = check::<CreateVmRequest>(data, |a, b| a == b) {
        id_joins("vm_id", &req.vm_id);
        match &req.disk {
            Some(DiskSpec::Overlay { rootfs_id, .. }) => id_joins("disk.rootfs_id", rootfs_id),
            Some(DiskSpec::Snapshot { snapshot_id }) => id_joins("disk.snapshot_id", snapshot_id),
            Some(DiskSpec::Direct { .. }) | None => {}
        }
        if let Some(r) = &req.restore {
            id_joins("restore.snapshot_id", &r.snapshot_id);
        }
        for name in req.kernel.iter().chain(req.initrd.iter()) {
            id_joins("kernel", name);
        }
    }
    check::<ExecRequest>(data, exec_eq);
    if let Some(req) = check::<CreateSnapshotRequest>(data, |a, b| a == b) {
        if let Some(id) = &req.snapshot_id {
            id_joins("snapshot_id", id);
        }
    }
    // The raw bytes as an id, too.
    id_joins("vm_id", &String::from_utf8_lossy(data));
}

/// Parses `data` as `T` and checks the outcome; returns what was accepted.
fn check<T: DeserializeOwned + Serialize>(data: &[u8], same: fn(&T, &T) -> bool) -> Option<T> {
    match parse::<T>(data) {
        Ok(v) => {
            let bytes = serde_json::to_vec(&v).expect("an accepted request serialises");
            match parse::<T>(&bytes) {
                Ok(back) => assert!(
                    same(&v, &back),
                    "a round trip changed the request: {}",
                    String::from_utf8_lossy(&bytes)
                ),
                Err(e) => panic!(
                    "the request's own JSON is refused: {} ({})",
                    e.body.error,
                    String::from_utf8_lossy(&bytes)
                ),
            }
            Some(v)
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{}", e.body.error);
            assert!(!e.body.error.is_empty());
            // A named field is named in the message too, unless the JSON
            // itself is broken there (it may be empty: `{"": 1}` is an
            // unknown field with an empty name).
            if let Some(f) = &e.body.field {
                assert!(
                    e.body.error.starts_with("malformed JSON") || e.body.error.contains(f.as_str()),
                    "{f:?} not in {}",
                    e.body.error
                );
            }
            None
        }
    }
}

/// Exec requests are equal up to the last bits of `timeout_s`: without
/// serde_json's `float_roundtrip` a decimal may parse one ulp off.
fn exec_eq(a: &ExecRequest, b: &ExecRequest) -> bool {
    let t = match (a.timeout_s, b.timeout_s) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
        (x, y) => x == y,
    };
    t && ExecRequest {
        timeout_s: None,
        ..a.clone()
    } == ExecRequest {
        timeout_s: None,
        ..b.clone()
    }
}

/// An id the grammar accepts joins under a root as one plain component; one it
/// refuses is refused by the join too.
fn id_joins(field: &str, id: &str) {
    use agentenv_core::ids::{checked_join, validate_id};
    let root = std::path::Path::new("/srv/root");
    match validate_id(field, id) {
        Ok(()) => {
            assert!(!id.is_empty() && id.len() <= agentenv_core::ids::MAX_ID_LEN);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            assert!(id != "." && id != "..");
            let p = checked_join(root, field, id).expect("a valid id joins");
            assert_eq!(p.parent(), Some(root), "{id:?} escaped: {}", p.display());
            assert_eq!(p.file_name().and_then(|n| n.to_str()), Some(id));
        }
        Err(e) => {
            assert!(e.to_string().starts_with(field), "{e}");
            assert!(checked_join(root, field, id).is_err(), "{id:?} joined");
        }
    }
}
