#!/usr/bin/env bash
# Builds wisp's fuzz targets and runs each for FUZZ_SECONDS (default 10) seconds;
# fails if any target finds a crash. Usage: fuzz/run.sh [target...] (default: all).
#
# cargo-fuzz needs nightly compiler flags (sanitizers, coverage instrumentation); wisp
# builds on stable, so this sets RUSTC_BOOTSTRAP=1 for the fuzz build only. Builds are
# cached in CARGO_TARGET_DIR (default ~/.cache/wisp/fuzz-target), the corpus each run
# grows in FUZZ_CORPUS (default ~/.cache/wisp/fuzz-corpus/<target>; the hand-made seeds
# in fuzz/corpus/<target> are read, never written), crashes in fuzz/artifacts/<target>/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
seconds=${FUZZ_SECONDS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/wisp/fuzz-target}
corpus_root=${FUZZ_CORPUS:-$HOME/.cache/wisp/fuzz-corpus}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz/run.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
	exit 2
fi

cd "$root"
if [ $# -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <(cargo fuzz list)
fi

# -O with -a: optimised, with debug assertions and overflow checks (what the unit tests
# check); AddressSanitizer is cargo-fuzz's default.
build=(cargo fuzz build -O -a --target-dir "$CARGO_TARGET_DIR")
if [ $# -gt 0 ]; then
	for t in "${targets[@]}"; do "${build[@]}" "$t"; done
else
	"${build[@]}"
fi

failed=()
summary=()
for t in "${targets[@]}"; do
	work="$corpus_root/$t"
	mkdir -p "$work" "$here/artifacts/$t"
	log="$work.log"
	echo "== $t: ${seconds}s"
	set +e
	cargo fuzz run -O -a --target-dir "$CARGO_TARGET_DIR" "$t" "$work" "$here/corpus/$t" -- \
		-max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
		-artifact_prefix="$here/artifacts/$t/" >"$log" 2>&1
	rc=$?
	set -e
	done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
	execs=$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}' | tail -n 1 || true)
	cov=$(sed -nE 's/.*[[:space:]]cov: ([0-9]+) ft: ([0-9]+).*/cov \1 ft \2/p' <<<"$done_line")
	if [ "$rc" -ne 0 ]; then
		failed+=("$t")
		summary+=("$(printf '%-22s FAILED (exit %s): see %s and %s' "$t" "$rc" "$log" "$here/artifacts/$t/")")
		grep -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)|Test unit written to' "$log" | head -n 5 >&2 || true
	else
		summary+=("$(printf '%-22s %10s execs  %s' "$t" "${execs:-?}" "${cov:-cov ?}")")
	fi
	echo "${summary[-1]}"
done

echo
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz/run.sh: crashes in: ${failed[*]}" >&2
	exit 1
fi
