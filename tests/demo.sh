#!/usr/bin/env bash
# `make demo`: with wisp installed, run a container in a wisp micro-VM and print its
# kernel. Without hardware KVM on this machine, it runs inside the emulated KVM host.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p wisp-tests --bin wisp-demo
demo=target/release/wisp-demo
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
    exec "$demo"
fi
echo "demo: no hardware KVM here; running inside the emulated KVM host (tests/kvmhost/run)"
exec tests/kvmhost/run --timeout 900 -- "$demo"
