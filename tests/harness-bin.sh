#!/usr/bin/env bash
# Builds one of the tests crate's programs (src/bin/NAME.rs) and prints its executable:
# what bench.sh (wisp-bench) and conformance.sh (wisp-conformance) run. The dev profile:
# these programs only drive processes (what they measure is the release build), and they
# reuse what `cargo test` already compiled instead of a second, LTO, build of the tests
# crate and its dependencies.
#
#   tests/harness-bin.sh NAME
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: tests/harness-bin.sh NAME}
bin=$(cargo build -p wisp-tests --bin "$name" --message-format=json-render-diagnostics |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$name")
[ -n "$bin" ] || { echo "harness-bin: cargo built no $name binary" >&2; exit 1; }
echo "$bin"
