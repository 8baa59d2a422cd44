#!/usr/bin/env bash
# `make conformance`: critest (cri-tools v1.37) against containerd 2.x's CRI plugin with
# handler runc, then wisp, in one containerd, inside the emulated KVM host (or directly
# on a machine with hardware KVM); writes target/conformance/{table.md,summary.txt} and
# both runs' ginkgo reports and logs (tests/src/bin/wisp-conformance.rs).
#
#   tests/conformance.sh [--containerd 2.3|2.4] [--focus REGEX] [--parallel N]
set -euo pipefail
cd "$(dirname "$0")/.."
ver=2.4
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --containerd) ver=${2:?--containerd needs a version}; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
export WISP_CONTAINERD_BIN
WISP_CONTAINERD_BIN=$(tests/tools/go-tools.sh bin "containerd-$ver")
tests/tools/go-tools.sh bin cri-tools >/dev/null
bin=$(cargo build --release -p wisp-tests --bin wisp-conformance --message-format=json-render-diagnostics |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "wisp-conformance":
        print(m["executable"])')
[ -n "$bin" ] || { echo "conformance: cargo built no wisp-conformance binary" >&2; exit 1; }
out=target/conformance
rm -rf "$out"
mkdir -p "$out"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
    "$bin" --out "$out" "${args[@]}"
else
    tests/kvmhost/run --timeout "${WISP_CONFORMANCE_TIMEOUT:-14400}" --rw "$out" -- "$bin" --out "$out" "${args[@]}"
fi
cat "$out/summary.txt"
