//! `docs/openapi.json` is generated from the code; this fails when they drift.
//! Regenerate with `UPDATE_OPENAPI=1 cargo test -p agentenv --test openapi`.

use std::path::PathBuf;

#[test]
fn checked_in_openapi_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = agentenv::server::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/openapi.json is out of date; run UPDATE_OPENAPI=1 cargo test -p agentenv --test openapi"
    );
}
