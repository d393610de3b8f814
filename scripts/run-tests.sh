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
USAGE
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
if command -v mkfs.ext4 >/dev/null && command -v busybox >/dev/null && command -v lz4 >/dev/null; then
  echo "==> building guest artifacts (cached)"
  scripts/build-artifacts.sh --output artifacts
else
  echo "==> skipping guest artifacts: mkfs.ext4, busybox or lz4 missing; tests that boot real guests will skip"
fi
export AGENTENV_ARTIFACTS="$PWD/artifacts"
echo "==> cargo test --workspace $*"
exec cargo test --workspace "$@"
