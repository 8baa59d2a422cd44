#!/usr/bin/env bash
# Collects the system calls each kind of wisp-vmm thread makes, to review the allow-lists
# in x86_64.json against: runs end-to-end suites in the emulated KVM host with every VMM
# under `strace -f -Y` (thread names shown) and seccomp off, then prints, per thread kind
# (vcpu, devices, control), each system call seen and whether x86_64.json allows it.
#
#   vmm/seccomp/collect.sh [SUITE...]     default: ctr hostile cri
#
# Needs `make build guest` and strace. Writes target/seccomp-trace/. A run exercises
# only what the suites do: a call missing here may still be needed (error paths, net
# devices outside CI); the lists hold such calls with a comment saying why.
set -euo pipefail
cd "$(dirname "$0")/../.."
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(ctr hostile cri)
out=$PWD/target/seccomp-trace
rm -rf "$out" && mkdir -p "$out"
command -v strace >/dev/null || { echo "collect: needs strace (apt-get install strace)" >&2; exit 1; }
wrapper=$out/vmm-traced
cat >"$wrapper" <<WRAP
#!/bin/sh
# Started as PID 1 of its own namespace, so \$\$ is 1 for every VMM: name traces uniquely.
exec strace -f -Y -qq -o "$out/trace.\$(cat /proc/sys/kernel/random/uuid)" "$PWD/target/release/wisp-vmm" --no-seccomp "\$@"
WRAP
chmod 0755 "$wrapper"
bins=$(tests/test-bins.sh "${suites[@]}")
for bin in $bins; do
    tests/kvmhost/run --rw "$out" --timeout 2400 -- env WISP_TEST_VMM="$wrapper" "$bin" || true
done
python3 - "$out" vmm/seccomp/x86_64.json <<'PY'
import collections, glob, json, re, sys
out, lists = sys.argv[1], json.load(open(sys.argv[2]))
seen = collections.defaultdict(set)
line_re = re.compile(r'^\d+<([^>]*)> (?:<\.\.\. )?([a-z0-9_]+)[( ]')
for f in glob.glob(out + "/trace.*"):
    for line in open(f, errors="replace"):
        m = line_re.match(line)
        if not m or m.group(2) in ("exited", "killed", "resumed"):
            continue
        comm = m.group(1)
        kind = "vcpu" if comm.startswith("vcpu") else "devices" if comm == "devices" else "control"
        seen[kind].add(m.group(2))
for kind in ("vcpu", "devices", "control"):
    allowed = {r["syscall"] for r in lists.get(kind, {}).get("filter", [])}
    print(f"{kind}: {len(seen[kind])} seen, {len(allowed)} allowed")
    for s in sorted(seen[kind] | allowed):
        mark = "ok" if s in seen[kind] and s in allowed else "MISSING" if s in seen[kind] else "unseen"
        print(f"  {mark:8} {s}")
PY
