#!/usr/bin/env bash
# Runs wisp's benchmarks (`make bench`). The runner (wisp-bench, in the tests crate) is
# built here, on the host; it runs inside the emulated KVM host (tests/kvmhost/run)
# unless this machine has hardware-style KVM (vmx/svm), where it runs directly.
#
#   tests/bench.sh [--runs N] [FILTER...]     (all options: tests/bench.sh --help)
#
# Needs target/release/wisp-vmm, target/guest/{vmlinux,test-initrd.img} (make build
# guest) and qemu-system-x86_64. Prints the table and writes target/bench/report.md
# and target/bench/report.json. WISP_BENCH_N sets the runs per side (default 5). In the
# emulated host only target/bench is writable: keep wisp-bench's --out under it.
# WISP_BENCH_TIMEOUT (seconds, default 1800) bounds each emulated host; the report is
# rewritten after each experiment, so a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
missing=()
for f in release/wisp-vmm guest/vmlinux guest/test-initrd.img; do
    [ -f "$target/$f" ] || missing+=("$target/$f (make build guest)")
done
command -v "${WISP_BENCH_QEMU:-qemu-system-x86_64}" >/dev/null ||
    missing+=("qemu-system-x86_64 (apt-get install qemu-system-x86)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: missing prerequisites:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 2
fi

bin=$(tests/harness-bin.sh wisp-bench)

out=$target/bench
mkdir -p "$out"
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
    exec "$bin" "$@"
fi
# The emulated host's kernel sometimes dies under nested load (an emulator fault; see
# tests/kvmhost/README.md): kvmhost exits 123. The benchmark then goes on in a fresh host from
# what it had finished (--resume), and says so. An experiment that two hosts died in is
# given up (wisp-bench), so two such experiments take at most five hosts.
args=("$@")
max_attempts=5
for attempt in $(seq 1 $max_attempts); do
    rc=0
    tests/kvmhost/run --timeout "${WISP_BENCH_TIMEOUT:-1800}" --rw "$out" -- "$bin" "${args[@]}" || rc=$?
    [ "$rc" -eq 123 ] && [ "$attempt" -lt $max_attempts ] || exit "$rc"
    echo "bench: the emulated host died (attempt $attempt); going on in a fresh one from $out/progress.json" >&2
    [[ " ${args[*]} " == *" --resume "* ]] || args=(--resume "${args[@]}")
done
