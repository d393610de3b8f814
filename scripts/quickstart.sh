#!/usr/bin/env bash
# agentenv quickstart: installs what it needs, builds agentenv and the guest
# artifacts, starts the daemon, creates a VM and shows it running.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/quickstart.sh [--listen ADDR] [--vm NAME] [--e2b ADDR] [--no-install] [--help]

Sets everything up on a fresh Debian machine and runs the main job:
  1. installs the Debian packages agentenv needs (apt-get; needs root),
  2. builds agentenv (cargo build --release),
  3. builds the guest artifacts (kernel, initramfs, minimal rootfs) into artifacts/,
  4. starts the daemon with config/hypervisor.artifacts.toml (log: data/agentenv.log);
     its API needs a token: the first start creates an admin one in data/admin.token,
     which the CLI then uses (AGENTENV_TOKEN),
  5. creates a VM and waits for its console's ready line,
  6. shows the VM running.

Options:
  --listen ADDR   daemon address (default 127.0.0.1:8080)
  --vm NAME       id of the VM to create (default demo)
  --e2b ADDR      also serve the E2B-compatible API on ADDR (e.g. 127.0.0.1:3000):
                  builds the E2B base template image too (artifacts/rootfs/e2b-base.ext4,
                  debootstrap from the Debian mirror) and prints the SDK's three variables
  --no-install    skip apt-get (packages already present)
USAGE
}

listen=127.0.0.1:8080
vm=demo
install=1
e2b=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --listen) listen=${2:?--listen needs an address}; shift 2 ;;
    --vm) vm=${2:?--vm needs a name}; shift 2 ;;
    --e2b) e2b=${2:?--e2b needs an address}; shift 2 ;;
    --no-install) install=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
root=$(pwd)
step() { printf '==> %s\n' "$*"; }

if [[ $install -eq 1 ]]; then
  step "installing Debian packages"
  if [[ $(id -u) -ne 0 ]]; then
    echo "quickstart: installing packages needs root: run it as root, or pass --no-install" >&2
    exit 1
  fi
  # shellcheck source=scripts/packages.sh
  . scripts/packages.sh
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${AGENTENV_PACKAGES[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "quickstart: cargo not found: install a Rust toolchain (https://rustup.rs), version 1.80 or newer" >&2
  exit 1
fi

step "building agentenv (cargo build --release)"
cargo build --release -q -p agentenv
bin=$root/target/release/agentenv

step "building guest artifacts into artifacts/"
if [[ -n $e2b ]]; then
  scripts/build-artifacts.sh --output artifacts --e2b
else
  scripts/build-artifacts.sh --output artifacts
fi

config=config/hypervisor.artifacts.toml
server="http://$listen"
mkdir -p data
pidfile=data/agentenv.pid
if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  step "stopping the daemon left by an earlier run (pid $(cat "$pidfile"))"
  kill "$(cat "$pidfile")"
  for _ in $(seq 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
fi

# The API needs a token. The daemon's first start creates the tokens file
# (data/tokens) with an admin token saved in data/admin.token; an earlier run's
# tokens file without that copy gets a new admin token here.
token_file=data/admin.token
if [[ -f data/tokens && ! -s $token_file ]]; then
  step "adding an admin token to data/tokens (saved in $token_file)"
  (umask 077 && "$bin" token create "quickstart-$(date +%s)" --scope admin --config "$config" >"$token_file")
fi

step "starting the daemon on $listen (log: data/agentenv.log)"
e2b_args=()
[[ -n $e2b ]] && e2b_args=(--e2b-listen "$e2b")
nohup "$bin" --config "$config" --listen "$listen" "${e2b_args[@]}" >data/agentenv.log 2>&1 &
echo $! >"$pidfile"
for i in $(seq 100); do
  curl -fsS "$server/v1/health" >/dev/null 2>&1 && break
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "quickstart: the daemon exited; its log:" >&2
    cat data/agentenv.log >&2
    exit 1
  fi
  [[ $i -eq 100 ]] && { echo "quickstart: the daemon did not answer on $server" >&2; exit 1; }
  sleep 0.1
done
grep -m1 "vmm backend" data/agentenv.log || true
AGENTENV_TOKEN=$(cat "$token_file")
export AGENTENV_TOKEN

if "$bin" vm show "$vm" --server "$server" >/dev/null 2>&1; then
  step "removing the VM $vm left by an earlier run"
  "$bin" vm rm "$vm" --server "$server" >/dev/null
fi

step "creating VM $vm from rootfs minimal.ext4"
"$bin" vm create "$vm" --rootfs minimal.ext4 --slots 1 --server "$server"

console=$("$bin" vm show "$vm" --server "$server" --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
step "waiting for the guest's ready line in $console"
ready=
for _ in $(seq 600); do
  ready=$(grep -a -m1 AGENTENV_READY "$console" 2>/dev/null || true)
  [[ -n $ready ]] && break
  sleep 0.1
done
if [[ -z $ready ]]; then
  echo "quickstart: no ready line after 60 s; console tail:" >&2
  tail -n 20 "$console" >&2
  exit 1
fi

step "waiting for the guest agent"
for _ in $(seq 300); do
  "$bin" vm show "$vm" --server "$server" --json | grep -q '"ready": *true' && break
  sleep 0.1
done
step "running a command in the VM through its agent"
"$bin" vm exec "$vm" --server "$server" -- uname -sr || {
  echo "quickstart: exec through the guest agent failed" >&2
  exit 1
}

step "the VM is running"
"$bin" vm ls --server "$server"
echo
echo "console: $ready"
echo
echo "The daemon keeps running (pid $(cat "$pidfile")). Its admin token is in $token_file:"
echo "  export AGENTENV_TOKEN=\$(cat $token_file)"
echo "Then try:"
echo "  $bin vm exec $vm -- sh -c 'cat /etc/os-release'; $bin vm cp ./file $vm:/root/file"
echo "  $bin vm pause $vm; $bin vm resume $vm; $bin vm shutdown $vm; $bin vm rm $vm"
echo "Stop the daemon with: kill \$(cat data/agentenv.pid)"

if [[ -n $e2b ]]; then
  step "the E2B API answers on $e2b"
  curl -fsS -H "X-API-KEY: $AGENTENV_TOKEN" "http://$e2b/v2/sandboxes" >/dev/null || {
    echo "quickstart: the E2B API on $e2b did not answer; daemon log: data/agentenv.log" >&2
    exit 1
  }
  echo "Point the E2B SDK at it (template \"base\" is warmed in the background; see docs/e2b.md):"
  echo "  export E2B_API_URL=http://$e2b E2B_SANDBOX_URL=http://$e2b E2B_API_KEY=\$(cat data/admin.token)"
fi
