#!/usr/bin/env bash
# `make conformance`: critest (cri-tools v1.37) against containerd 2.x's CRI plugin with
# handler runc, then wisp, in one containerd, inside the emulated KVM host (or directly
# on a machine with hardware KVM); writes target/conformance/{table.md,summary.txt} and
# both runs' ginkgo reports and logs (tests/src/bin/wisp-conformance.rs).
#
#   tests/conformance.sh [--containerd 2.3|2.4] [--smoke] [--focus REGEX] [--parallel N]
#
# --smoke: the subset CI runs (pod sandboxes, networking, exec and attach streaming, the
# basic container operations, read-only volumes with a host submount): about 40 specs per
# runtime, 9 minutes. Without it, every spec (about 22 minutes for both runtimes in the
# emulated host).
set -euo pipefail
cd "$(dirname "$0")/.."
ver=2.4
args=()
SMOKE='PodSandbox|Networking|Runtime info|Streaming runtime should support streaming interfaces runtime should support (exec|attach)|Container runtime should support basic operations|runtime should support readonly mounts'

while [ $# -gt 0 ]; do
    case $1 in
        --containerd) ver=${2:?--containerd needs a version}; shift 2 ;;
        --smoke) args+=(--focus "$SMOKE"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
export WISP_CONTAINERD_BIN
WISP_CONTAINERD_BIN=$(tests/tools/go-tools.sh bin "containerd-$ver")
tests/tools/go-tools.sh bin cri-tools >/dev/null
bin=$(tests/harness-bin.sh wisp-conformance)
out=target/conformance
rm -rf "$out"
mkdir -p "$out"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
    "$bin" --out "$out" "${args[@]}"
else
    # The emulated host's own kernel dies now and then under nested load (kvmhost exit
    # status 123, see tests/kvmhost/README.md): the run starts again in a fresh one, at
    # most twice, and says so.
    for attempt in 1 2 3; do
        rc=0
        tests/kvmhost/run --timeout "${WISP_CONFORMANCE_TIMEOUT:-14400}" --rw "$out" -- "$bin" --out "$out" "${args[@]}" || rc=$?
        if [ "$rc" = 123 ] && [ "$attempt" -lt 3 ]; then
            echo "conformance: the emulated host died (its console is above); running again in a fresh one" >&2
            continue
        fi
        [ "$rc" = 0 ] || { echo "conformance: failed ($rc)" >&2; exit "$rc"; }
        break
    done
fi
cat "$out/summary.txt"
