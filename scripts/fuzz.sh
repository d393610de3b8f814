#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

ALL_TARGETS=(api_request agent_frames ext4_superblock)

usage() {
    cat <<EOF
Usage: $PROG [--seconds N] [--target NAME]... [-- LIBFUZZER_ARGS...]

Builds the cargo-fuzz targets of fuzz/ with the nightly toolchain and runs each
for N seconds (libFuzzer -max_total_time), then prints its number of executions:

  api_request    arbitrary bytes into the daemon's request parser
                 (agentenv::server::json::parse) for CreateVmRequest, ExecRequest
                 and CreateSnapshotRequest, plus the id grammar
  agent_frames   arbitrary bytes into the guest agent protocol's decoders
                 (take_frame, read_frame, find_hello_ok, every message type)
  ext4_superblock  arbitrary bytes, as an ext4 image in memory, into the
                 superblock UUID rewrite of the overlay templates
                 (agentenv_host::disk::rewrite_uuid)

Each target starts from fuzz/seeds/NAME and keeps what it finds in
fuzz/corpus/NAME (not versioned), so later runs start further. An input that
panics or takes over 10 s is written to fuzz/artifacts/NAME/ and the script
fails (exit 1), showing the panic; replay it with
  cargo +nightly fuzz run --fuzz-dir fuzz NAME fuzz/artifacts/NAME/FILE

Without a nightly toolchain or cargo-fuzz the script prints why and exits 0
(skipped). The same properties run on stable, over PRNG-made inputs, in
crates/agentenv/tests/fuzz_targets.rs (part of cargo test).

Options:
  --seconds N     time per target (default 60)
  --target NAME   run only this target (repeatable; default: all)
  -- ARGS         passed to libFuzzer, e.g. -- -max_len=65536 -jobs=2
  -h, --help      show this help

Needs: rustup's nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
EOF
}

seconds=60
targets=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --seconds) need_value "$1" $#; need_uint "$1" "$2"; seconds=$2; shift 2 ;;
        --seconds=*) seconds=${1#*=}; need_uint --seconds "$seconds"; shift ;;
        --target) need_value "$1" $#; targets+=("$2"); shift 2 ;;
        --target=*) targets+=("${1#*=}"); shift ;;
        --) shift; extra=("$@"); break ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
for t in "${targets[@]}"; do
    case " ${ALL_TARGETS[*]} " in
        *" $t "*) ;;
        *) usage_error "--target: no target '$t' (there are: ${ALL_TARGETS[*]})" ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

skip() {
    echo "$PROG: skipped: $*"
    exit 0
}

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || skip "cargo is not installed (https://rustup.rs)"
command -v rustup >/dev/null 2>&1 || skip "rustup is not installed, so no nightly toolchain (https://rustup.rs)"
rustup toolchain list 2>/dev/null | grep -q '^nightly' \
    || skip "no nightly toolchain (rustup toolchain install nightly); cargo-fuzz needs it"
cargo +nightly fuzz --version >/dev/null 2>&1 \
    || skip "cargo-fuzz is not installed (cargo install cargo-fuzz)"

fuzz_dir="$AGENTENV_REPO/fuzz"
step "building ${targets[*]} (cargo +nightly fuzz build, address sanitizer)"
for t in "${targets[@]}"; do
    cargo +nightly fuzz build --fuzz-dir "$fuzz_dir" "$t" \
        || die "cargo fuzz build $t failed"
done

failed=()
summary=()
for t in "${targets[@]}"; do
    step "fuzzing $t for $seconds s"
    corpus="$fuzz_dir/corpus/$t"
    mkdir -p "$corpus"
    log=$(mktemp)
    status=0
    cargo +nightly fuzz run --fuzz-dir "$fuzz_dir" "$t" "$corpus" "$fuzz_dir/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${extra[@]}" \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    inputs=$(find "$corpus" -type f | wc -l)
    if [ "$status" -ne 0 ]; then
        echo "    $t FAILED after ${execs:-?} executions (exit $status):"
        grep -E "panicked at|^(thread|Error|SUMMARY)|ERROR: libFuzzer|Test unit written|timeout" "$log" \
            | head -20 | sed 's/^/      /'
        echo "      (whole log: $log)"
        failed+=("$t")
        summary+=("$t: FAILED after ${execs:-?} executions")
    else
        rm -f "$log"
        echo "    $t: ${execs:-?} executions in $seconds s, corpus $inputs inputs, no crash"
        summary+=("$t: ${execs:-?} executions in $seconds s, no crash")
    fi
done
step_end

echo "==> summary"
for s in "${summary[@]}"; do
    echo "    $s"
done
[ ${#failed[@]} -eq 0 ] || die "${failed[*]} found a crash (inputs in $fuzz_dir/artifacts/)"
