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
    workspace_bin("agentenv-testkit", "fc-double")
}

/// Writes `dir/name`, a script that runs `fc-double` with `extra` flags
/// before the ones it is given (the double's failure injection and guest
/// scripting, for code that only takes a VMM binary), and returns its path.
pub fn fc_double_wrapper(dir: &std::path::Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let quoted: Vec<String> = extra.iter().map(|a| format!("'{a}'")).collect();
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nexec '{}' {} \"$@\"\n",
            fc_double().display(),
            quoted.join(" ")
        ),
    )
    .expect("write the fc-double wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
        .expect("make the fc-double wrapper executable");
    p
}

/// The guest agent binary `agentenv-guest` (a host build, for tests that run the
/// agent outside a VM, behind the Firecracker double's vsock).
pub fn guest_agent() -> PathBuf {
    workspace_bin("agentenv-guest", "agentenv-guest")
}

/// A binary of this workspace next to the running test, built on first use.
fn workspace_bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binaries live in target/<profile>/deps");
    let bin = dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", package, "--bin", name])
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building {name} failed");
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

/// Firecracker's own jailer to test through, from `AGENTENV_TEST_JAILER`.
pub fn real_jailer() -> Option<PathBuf> {
    std::env::var_os("AGENTENV_TEST_JAILER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The guest artifacts directory: `AGENTENV_ARTIFACTS` or `<workspace>/artifacts`.
pub fn artifacts() -> PathBuf {
    std::env::var_os("AGENTENV_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("artifacts"))
}
