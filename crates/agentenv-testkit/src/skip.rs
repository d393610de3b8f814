//! Skipped tests that are counted as skipped, never as passed.
//!
//! A test that cannot run here calls [`skip`] (or [`skip_optional`]) and
//! returns. Either prints one machine-readable line straight to the process's
//! standard error (not through the test harness's capture):
//!
//! ```text
//! AGENTENV-SKIP: <test name> <reason>
//! ```
//!
//! `scripts/run-tests.sh` counts those lines and reports them as skipped
//! (subtracted from "passed"). With `AGENTENV_REQUIRE_ALL=1` (set by
//! `.ci/run`, where root, QEMU, namespaces and the artifacts are all there)
//! [`skip`] panics instead: in CI a skip is a failure. [`skip_optional`] is
//! for tests of optional components that CI does not provide (a real
//! Firecracker or jailer, `AGENTENV_TEST_FIRECRACKER` / `AGENTENV_TEST_JAILER`):
//! it is always reported as skipped and never fails.

use std::io::Write;

/// The environment variable that turns every [`skip`] into a failure.
pub const REQUIRE_ALL: &str = "AGENTENV_REQUIRE_ALL";

/// The prefix of the line a skipped test prints.
pub const SKIP_LINE: &str = "AGENTENV-SKIP:";

/// The calling test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .replace(char::is_whitespace, "_")
}

fn report(reason: &str, kind: &str) {
    let line = format!("{SKIP_LINE} {} {kind}{reason}\n", test_name());
    // Straight to fd 2: the harness's capture would hide it for a passing test.
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// True when every test must run (`AGENTENV_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1")
}

/// Reports the calling test as skipped for `reason`; the caller then returns.
/// Panics with the reason under `AGENTENV_REQUIRE_ALL=1`.
pub fn skip(reason: &str) {
    if require_all() {
        panic!("{REQUIRE_ALL}=1 and this test would skip: {reason}");
    }
    report(reason, "");
}

/// Reports the calling test (or a part of it) as skipped for `reason`, also
/// under `AGENTENV_REQUIRE_ALL=1`: for what needs an optional component CI
/// does not have (a real Firecracker or jailer).
pub fn skip_optional(reason: &str) {
    report(reason, "(optional) ");
}

/// Skips the calling test (see [`skip`]) and returns from it.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        $crate::skip::skip(&format!($($arg)*));
        return;
    }};
}

/// Skips the calling test as optional (see [`skip_optional`]) and returns from it.
#[macro_export]
macro_rules! skip_optional {
    ($($arg:tt)*) => {{
        $crate::skip::skip_optional(&format!($($arg)*));
        return;
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_name_is_the_threads() {
        assert_eq!(test_name(), "skip::tests::the_test_name_is_the_threads");
    }
}
