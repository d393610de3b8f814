#!/usr/bin/env bash
# Runs agentenv's whole test suite: builds the guest artifacts (cached under
# /var/cache/agentenv), then `cargo test --workspace`. Tests that need root,
# QEMU or the artifacts say so and skip where those are missing.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
Usage: scripts/run-tests.sh [CARGO TEST ARGS...]

Builds the guest artifacts into artifacts/ (skipped with a note when the tools
are missing), then runs `cargo test --workspace` with AGENTENV_ARTIFACTS set.
Extra arguments go to cargo test, e.g. `scripts/run-tests.sh -p agentenv`.
Set AGENTENV_TEST_FIRECRACKER=/path/to/firecracker to also run the daemon
tests against a real Firecracker.

Without arguments it then runs the E2B SDK suite (tests/e2b/run.sh: the
official e2b SDK from PyPI, every pinned version, against real guests); its
cases are counted in the same summary. With arguments (a subset of the cargo
tests) the SDK suite is left out, and the summary says so.

A test that cannot run here (no root, QEMU, artifacts, ...) is reported as
skipped, with its reason, never as passed. With AGENTENV_REQUIRE_ALL=1 (set by
.ci/run) such a skip fails the test instead; only the optional ones (a real
Firecracker or jailer, AGENTENV_SLOW_TESTS) may still skip.
USAGE
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
if command -v mkfs.ext4 >/dev/null && command -v busybox >/dev/null && command -v lz4 >/dev/null; then
  echo "==> building guest artifacts (cached)"
  # With --e2b also the E2B base template image (tests/e2b, the e2b_* tests):
  # Debian by debootstrap, which needs root and the Debian mirror.
  e2b=()
  if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null &&
    [[ $(scripts/build-artifacts.sh --help) == *--e2b* ]]; then
    e2b=(--e2b)
  fi
  scripts/build-artifacts.sh --output artifacts "${e2b[@]}"
else
  echo "==> skipping guest artifacts: mkfs.ext4, busybox or lz4 missing; tests that boot real guests will skip"
fi
export AGENTENV_ARTIFACTS="$PWD/artifacts"
# Show what tests print. Skip lines (AGENTENV-SKIP:) reach the log either way.
export RUST_TEST_NOCAPTURE=1
echo "==> cargo test --workspace --all-targets --no-fail-fast $*"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [ $# -eq 0 ]; then
  echo "==> tests/e2b/run.sh (the E2B SDK suite)"
  tests/e2b/run.sh 2>&1 | tee -a "$log" || status=1
else
  echo "==> not running the E2B SDK suite (tests/e2b/run.sh): arguments select cargo tests"
fi
# One closing line for the whole run, summed over every test binary. A test that
# could not run here prints `AGENTENV-SKIP: <test> <reason>` (agentenv_testkit::skip)
# and returns, which the harness counts as passed: such tests are counted as skipped
# instead ("optional" ones need a real Firecracker or jailer, or AGENTENV_SLOW_TESTS).
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
          if ($(i + 1) ~ /^passed/) p += $i
          if ($(i + 1) ~ /^failed/) f += $i
          if ($(i + 1) ~ /^ignored/) ig += $i
        }
      }
      /^AGENTENV-SKIP: / {
        if (!($2 in skipped)) { skipped[$2] = ($3 == "(optional)") ? "optional" : "required" }
      }
      /^test .* \.\.\. ok$/ { ok[$2] = 1 }
      END {
        for (t in skipped) if (t in ok) { s++; if (skipped[t] == "optional") o++ }
        printf "\ntests: %d passed, %d failed, %d skipped (%d of them optional), %d ignored\n", p - s, f, s, o, ig
        for (t in skipped) if (t in ok) printf "  skipped: %s (%s)\n", t, skipped[t]
      }' "$log"
skips=$(grep -c '^AGENTENV-SKIP: ' "$log" || true)
[ "$skips" -gt 0 ] && echo "($skips skip reasons: grep '^AGENTENV-SKIP' in the output)"
exit "$status"
