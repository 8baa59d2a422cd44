#!/usr/bin/env bash
# Builds the named end-to-end suites of the tests crate (`--test` targets) and prints
# their executables, one a line: what e2e.sh and vmm/seccomp/collect.sh run.
#
#   tests/test-bins.sh SUITE...
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for s in "$@"; do args+=(--test "$s"); done
cargo test -p wisp-tests --no-run --message-format=json "${args[@]}" \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["executable"])'
