#!/usr/bin/env bash
# Runs agentenv's E2B SDK suite (tests/e2b/*.py) against a real daemon with real
# QEMU guests, under each pinned SDK version. See --help and tests/e2b/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
mapfile -t SDK_VERSIONS < <(grep -v '^\s*#' "$here/sdk-versions.txt" | grep -v '^\s*$')

usage() {
    cat <<EOF
Usage: tests/e2b/run.sh [--python PY]... [--keep] [--session-timeout S] [-- PYTEST ARGS...]

Starts an agentenv daemon (QEMU backend, networking off, run directory under
/dev/shm when it has 6 GiB free, else \$TMPDIR) serving the E2B API on a free loopback port with a \`base\` template,
writes a tokens file holding one e2b_<40 hex> key, waits until the base
template's warm snapshot exists, then runs pytest in tests/e2b under each
Python given (default: the venvs of the pinned SDKs ${SDK_VERSIONS[*]}, see
below) with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set. Then it stops the
daemon and fails if a sandbox, VMM, process, TAP, mount or cgroup is left.

It builds nothing but \`cargo build -p agentenv --bin agentenv\` (a no-op when
fresh). It needs root, qemu-system-x86_64 and:
  \$AGENTENV_ARTIFACTS (default artifacts/): kernels/vmlinuz, initramfs/initrd.img
  the base template image: \$AGENTENV_E2B_BASE_IMAGE (default
      \$AGENTENV_ARTIFACTS/rootfs/e2b-base.ext4, built by scripts/build-artifacts.sh --e2b)
  the SDK venvs: \$AGENTENV_E2B_VENVS/e2b-<version> (default
      /var/cache/agentenv/e2b-venvs; .ci/run makes them)

A missing prerequisite is reported as a skip (AGENTENV-SKIP line), or as a
failure with AGENTENV_REQUIRE_ALL=1 (CI). The last lines are libtest-style
"test result:" lines so scripts/run-tests.sh counts the cases.

Options:
  --python PY           run the suite under this interpreter (repeatable)
  --keep                keep the run directory (config, daemon.log, sessions)
  --session-timeout S   bound on each pytest session (default 1200)
  -h, --help            this text
EOF
}

pythons=()
keep=0
session_timeout=1200
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --python) pythons+=("$2"); shift 2 ;;
        --keep) keep=1; shift ;;
        --session-timeout) session_timeout=$2; shift 2 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[e2b-suite] $*" >&2; }

# A missing prerequisite: a skip, or a failure under AGENTENV_REQUIRE_ALL=1.
skip() {
    if [ "${AGENTENV_REQUIRE_ALL:-}" = 1 ]; then
        say "FAILED: AGENTENV_REQUIRE_ALL=1 and the E2B SDK suite would skip: $*"
        echo "test e2b_sdk_suite ... FAILED"
        echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (e2b SDK suite)"
        exit 1
    fi
    echo "AGENTENV-SKIP: e2b_sdk_suite $*"
    echo "test e2b_sdk_suite ... ok"
    echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out (e2b SDK suite: skipped)"
    exit 0
}

artifacts=${AGENTENV_ARTIFACTS:-$repo/artifacts}
base_image=${AGENTENV_E2B_BASE_IMAGE:-$artifacts/rootfs/e2b-base.ext4}
venvs=${AGENTENV_E2B_VENVS:-/var/cache/agentenv/e2b-venvs}
if [ ${#pythons[@]} -eq 0 ]; then
    for v in "${SDK_VERSIONS[@]}"; do pythons+=("$venvs/e2b-$v/bin/python"); done
fi

[ "$(id -u)" = 0 ] || skip "needs root (the daemon's jail and cgroups; CI runs as root)"
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
command -v curl >/dev/null || skip "curl not found"
for f in kernels/vmlinuz initramfs/initrd.img; do
    [ -f "$artifacts/$f" ] || skip "guest artifact $artifacts/$f missing (scripts/build-artifacts.sh --output artifacts)"
done
[ -f "$base_image" ] || skip "base template image $base_image missing (scripts/build-artifacts.sh --output artifacts --e2b builds it: root, debootstrap)"
for py in "${pythons[@]}"; do
    [ -x "$py" ] || skip "no Python at $py (.ci/run makes the SDK venvs; or pass --python)"
    "$py" -c 'import e2b, pytest, pytest_asyncio' 2>/dev/null ||
        skip "$py lacks e2b, pytest or pytest-asyncio"
done

say "cargo build -p agentenv --bin agentenv"
(cd "$repo" && cargo build -q -p agentenv --bin agentenv)
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
agentenv="$target_dir/debug/agentenv"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Everything of the run lives here (guests' RAM files and snapshots on tmpfs).
# /dev/shm when it has room for a few guests' RAM and the warm snapshot
# (containers often give it 64 MiB), else $TMPDIR.
parent=/dev/shm
shm_free_gib=$(df --output=avail -BG "$parent" 2>/dev/null | tail -1 | tr -dc '0-9')
if [ ! -w "$parent" ] || [ "${shm_free_gib:-0}" -lt 6 ]; then
    parent=${TMPDIR:-/tmp}
fi
run=$(mktemp -d "$parent/ae-e2b-XXXXXX")
name=$(basename "$run")
# From the hierarchies' roots, so the leak check knows where to look.
cgroup_parent="/agentenv-e2b-suite/$name"
daemon_pid=""
status=0

# The links carrying agentenv's TAP alias (agentenv:<vm_id>).
taps() { ip -o link show 2>/dev/null | grep -o 'alias agentenv:[^ ]*' | sed 's/^alias //' | sort || true; }
taps_before=$(taps)

# Leaks: processes naming the run directory, TAPs of this daemon, mounts under
# it, VM cgroups under its parent cgroup (in every hierarchy).
leaks() {
    local out=""
    local p
    local cmd
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
        if [[ $cmd == *"$run"* ]]; then
            out+="process ${p#/proc/}: ${cmd:0:160}"$'\n'
        fi
    done
    # agentenv's TAPs carry the alias agentenv:<vm_id>; networking is off, so
    # any new one is this daemon's leak.
    local t
    for t in $(taps); do
        grep -qxF "$t" <<<"$taps_before" || out+="TAP: $t"$'\n'
    done
    local m
    m=$(awk -v r="$run" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo)
    [ -n "$m" ] && out+="mount: $m"$'\n'
    local d
    for d in /sys/fs/cgroup/*"$cgroup_parent" /sys/fs/cgroup"$cgroup_parent"; do
        [ -d "$d" ] || continue
        local c
        for c in "$d"/*/; do
            [ -d "$c" ] && out+="cgroup: $c"$'\n'
        done
    done
    printf '%s' "$out"
}

stop_daemon() {
    [ -n "$daemon_pid" ] || return 0
    if kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"
        local _
        for _ in $(seq 1 300); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$daemon_pid" 2>/dev/null; then
            say "the daemon did not stop within 30 s of SIGTERM; killing it"
            kill -KILL "$daemon_pid" 2>/dev/null || true
            status=1
        fi
    fi
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=""
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    stop_daemon
    local l
    l=$(leaks)
    if [ -n "$l" ]; then
        sleep 2
        l=$(leaks)
    fi
    if [ -n "$l" ]; then
        say "LEAK after the daemon stopped:"
        printf '%s\n' "$l" >&2
        status=1
        # Do not leave them running on the CI machine.
        for p in $(printf '%s\n' "$l" | awk '/^process/ {sub(":", "", $2); print $2}'); do
            kill -KILL "$p" 2>/dev/null || true
        done
    fi
    # The daemon removes its parent cgroup on a clean stop; the shared
    # directory above it goes once no run uses it.
    for d in /sys/fs/cgroup/*/agentenv-e2b-suite /sys/fs/cgroup/agentenv-e2b-suite; do
        if [ -d "$d/$name" ]; then rmdir "$d/$name" 2>/dev/null || true; fi
        if [ -d "$d" ]; then rmdir "$d" 2>/dev/null || true; fi
    done
    if [ "$keep" = 1 ]; then
        say "run directory kept: $run"
    else
        rm -rf "$run"
    fi
}
trap 'cleanup; exit "${status:-1}"' EXIT
trap 'say "interrupted"; status=130; exit 130' INT TERM

api_port=$(free_port)
e2b_port=$(free_port)
while [ "$e2b_port" = "$api_port" ]; do e2b_port=$(free_port); done
key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf 'e2b-suite admin %s\n' "$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)" >"$run/tokens"
chmod 600 "$run/tokens"
mkdir -p "$run/sessions" "$run/s" "$run/snap"

cat >"$run/agentenv.toml" <<EOF
# tests/e2b/run.sh: one run of the E2B SDK suite
vmm = "qemu"
session_root = "$run/sessions"
socket_root = "$run/s"
snapshots_root = "$run/snap"
tmpfs_snapshot_root = "$run/snap/tmpfs"
hdfs_snapshot_root = "$run/snap/durable"
rootfs_root = "$(dirname "$base_image")"
kernel_root = "$artifacts/kernels"
initramfs_root = "$artifacts/initramfs"
default_kernel = "vmlinuz"
default_initrd = "initrd.img"
memory_mib_per_slot = 512
default_slots = 1
default_disk_size_gib = 4
startup_timeout_ms = 30000
request_timeout_ms = 30000
shutdown_timeout_s = 5
on_shutdown = "stop"

[auth]
tokens_file = "$run/tokens"

[network]
# The guests need no network for the suite; nothing is made on the host's.
enable = false

[cgroup]
parent = "$cgroup_parent"

[e2b]
listen = ["127.0.0.1:$e2b_port"]
default_timeout_s = 300

[e2b.templates.base]
image = "$(basename "$base_image")"
slots = 1
snapshot = true
EOF

say "daemon: $agentenv (run directory $run)"
"$agentenv" --config "$run/agentenv.toml" --listen "127.0.0.1:$api_port" \
    >"$run/daemon.log" 2>&1 </dev/null &
daemon_pid=$!

api="http://127.0.0.1:$api_port"
e2b="http://127.0.0.1:$e2b_port"
native() { curl -sf -H "Authorization: Bearer $key" "$api$1"; }

for _ in $(seq 1 300); do
    curl -sf "$api/v1/health" >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { say "the daemon exited at start:"; tail -20 "$run/daemon.log" >&2; status=1; exit 1; }
    sleep 0.1
done
curl -sf "$api/v1/health" >/dev/null || { say "the daemon did not answer /v1/health"; status=1; exit 1; }

# The base template is warm once its full snapshot exists (the templates
# module names them e2b-tpl-<template>-<fingerprint>): from then on a create is
# a restore, not a boot.
say "waiting for the base template's warm snapshot (a cold boot under TCG: up to a few minutes)"
t0=$(date +%s)
while :; do
    if native /v1/snapshots 2>/dev/null | python3 -c '
import json, sys
snaps = json.load(sys.stdin).get("snapshots", [])
sys.exit(0 if any(s["snapshot_id"].startswith("e2b-tpl-base") and s.get("status") == "ready"
                  for s in snaps) else 1)
' 2>/dev/null; then
        break
    fi
    kill -0 "$daemon_pid" 2>/dev/null || { say "the daemon died:"; tail -20 "$run/daemon.log" >&2; status=1; exit 1; }
    if [ $(($(date +%s) - t0)) -gt 600 ]; then
        say "the base template was not warm within 600 s; daemon log:"
        tail -30 "$run/daemon.log" >&2
        status=1
        exit 1
    fi
    sleep 1
done
say "base template warm after $(($(date +%s) - t0)) s"

export E2B_API_URL="$e2b" E2B_SANDBOX_URL="$e2b" E2B_API_KEY="$key"
unset E2B_DOMAIN E2B_DEBUG E2B_ACCESS_TOKEN
results=()
for py in "${pythons[@]}"; do
    ver=$("$py" -c 'import importlib.metadata as m; print(m.version("e2b"))')
    say "pytest under e2b $ver ($py)"
    junit="$run/junit-$ver.xml"
    rc=0
    (cd "$here" && E2B_SUITE_RUN_ID="v${ver//./}-$$" timeout -k 10 "$session_timeout" \
        "$py" -m pytest -p no:cacheprovider --junitxml="$junit" "${pytest_args[@]}") || rc=$?
    # Count from the JUnit report: passed = ran and neither failed nor errored;
    # xfail (a control-plane feature answering 501) and skips are reported apart.
    counts=$(python3 - "$junit" <<'PY' 2>/dev/null || echo "0 1 0 0"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
p = f = s = x = 0
for su in suites:
    for tc in su.iter("testcase"):
        kids = {c.tag for c in tc}
        sk = tc.find("skipped")
        if "failure" in kids or "error" in kids:
            f += 1
        elif sk is not None and (sk.get("type") == "pytest.xfail" or "xfail" in (sk.get("message") or "")):
            x += 1
        elif sk is not None:
            s += 1
        else:
            p += 1
print(p, f, s, x)
PY
)
    read -r passed failed skipped xfailed <<<"$counts"
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1  # pytest itself failed (usage error, timeout, crash)
        say "pytest under e2b $ver exited with $rc"
    fi
    results+=("$ver $passed $failed $skipped $xfailed")
    [ "$failed" -eq 0 ] || status=1
done

# Every sandbox the suite made is gone (each case kills its own).
left=$(curl -sf -H "X-API-KEY: $key" "$e2b/v2/sandboxes" |
    python3 -c 'import json,sys; print(" ".join(s["sandboxID"] for s in json.load(sys.stdin)))' ||
    echo "(GET /v2/sandboxes failed)")
if [ -n "$left" ]; then
    say "sandboxes left by the suite: $left"
    leftover_sandboxes=1
else
    leftover_sandboxes=0
fi
say "VMs at the end (the template's own may remain): $(native /v1/vm | python3 -c 'import json,sys; print(" ".join(v["vm_id"] for v in json.load(sys.stdin)["vms"]) or "none")' || echo "?")"

stop_daemon
leak_report=$(leaks)
[ -z "$leak_report" ] || { sleep 2; leak_report=$(leaks); }

for r in "${results[@]}"; do
    read -r ver passed failed skipped xfailed <<<"$r"
    # A skipped case fails in CI: nothing in the suite may skip there.
    if [ "$skipped" -gt 0 ] && [ "${AGENTENV_REQUIRE_ALL:-}" = 1 ]; then
        say "e2b $ver: $skipped cases skipped under AGENTENV_REQUIRE_ALL=1"
        failed=$((failed + skipped))
        status=1
    fi
    word=ok
    [ "$failed" -eq 0 ] || word=FAILED
    echo "test result: $word. $passed passed; $failed failed; $skipped ignored; 0 measured; 0 filtered out (e2b SDK $ver; $xfailed not served by the control plane: xfail)"
done
if [ "$leftover_sandboxes" = 1 ]; then
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (e2b SDK suite: sandboxes left: $left)"
    status=1
fi
if [ -n "$leak_report" ]; then
    say "LEAK after the daemon stopped:"
    printf '%s\n' "$leak_report" >&2
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (e2b SDK suite: leak check)"
    status=1
fi
exit "$status"
