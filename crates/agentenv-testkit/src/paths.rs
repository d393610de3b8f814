//! Where the test binaries and guest artifacts are.

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .expect("testkit lives at crates/agentenv-testkit")
        .to_path_buf()
}

/// The `fc-double` binary, built on first use when another package's tests need it.
pub fn fc_double() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/fc-double
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binaries live in target/<profile>/deps");
    let bin = dir.join("fc-double");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "agentenv-testkit",
                "--bin",
                "fc-double",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building fc-double failed");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// A real Firecracker binary to test against, from `AGENTENV_TEST_FIRECRACKER`.
pub fn real_firecracker() -> Option<PathBuf> {
    std::env::var_os("AGENTENV_TEST_FIRECRACKER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The guest artifacts directory: `AGENTENV_ARTIFACTS` or `<workspace>/artifacts`.
pub fn artifacts() -> PathBuf {
    std::env::var_os("AGENTENV_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("artifacts"))
}
