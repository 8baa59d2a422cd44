#!/usr/bin/env bash
# Checks tests/kvmhost/run end to end: each check boots the emulated KVM host.
# Prints one line per check and, last, "N passed, N failed"; exits non-zero on
# any failure. Takes about a minute with a warm cache (the first run of run
# builds the cache: kernel download and initramfs).
# The whole script is one brace group: bash parses it completely before running
# it, so editing this file cannot derail a run that is in progress.
{
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
RUN=$HERE/run
passed=0 failed=0

WORK=$(mktemp -d /var/tmp/kvmhost-selftest.XXXXXX) || exit 1
trap 'rm -rf "$WORK"' EXIT

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# check NAME: runs the shell function named by $2 and records the result.
check() {
	local name=$1 fn=$2 t0 why
	t0=$(now)
	if why=$($fn 2>&1); then
		passed=$((passed + 1))
		printf 'ok   %-60s %5ss\n' "$name" "$(elapsed "$t0")"
		[[ -z $why ]] || printf '%s\n' "$why" | sed 's/^/     | /'
	else
		failed=$((failed + 1))
		printf 'FAIL %-60s %5ss\n' "$name" "$(elapsed "$t0")"
		printf '%s\n' "$why" | sed 's/^/     | /'
	fi
}

# 1. /dev/kvm exists and the CPU has SVM.
t_kvm() {
	"$RUN" -- sh -c 'test -c /dev/kvm && grep -qw svm /proc/cpuinfo'
	local st=$?
	((st == 0)) || { echo "exit status $st"; return 1; }
}

# 2. stdout and stderr stay apart; CMD's exit status comes back.
t_streams() {
	"$RUN" -- sh -c 'echo out; echo err >&2; exit 7' >"$WORK/2.out" 2>"$WORK/2.err"
	local st=$?
	((st == 7)) || { echo "exit status $st, want 7"; cat "$WORK/2.err"; return 1; }
	[[ $(cat "$WORK/2.out") == out ]] || { echo "stdout: '$(cat "$WORK/2.out")', want 'out'"; return 1; }
	[[ $(cat "$WORK/2.err") == err ]] || { echo "stderr: '$(cat "$WORK/2.err")', want 'err'"; return 1; }
}

# 3. --timeout kills the host and exits 124, well before the command ends.
t_timeout() {
	local t0 took st
	t0=$(now)
	"$RUN" --timeout 5 -- sleep 60 >"$WORK/3.out" 2>"$WORK/3.err"
	st=$?
	took=$(elapsed "$t0")
	echo "took $took s"
	((st == 124)) || { echo "exit status $st, want 124"; cat "$WORK/3.err"; return 1; }
	grep -qx 'kvmhost: timed out after 5 s' "$WORK/3.err" || { echo "no timeout message:"; cat "$WORK/3.err"; return 1; }
	awk -v t="$took" 'BEGIN { exit !(t < 20) }' || { echo "took $took s, want < 20"; return 1; }
}

# 4. Large output arrives complete, on both streams.
t_volume() {
	"$RUN" -- sh -c 'seq 200000; seq 100000 >&2' >"$WORK/4.out" 2>"$WORK/4.err"
	local st=$?
	((st == 0)) || { echo "exit status $st"; tail -5 "$WORK/4.err"; return 1; }
	[[ $(cksum <"$WORK/4.out") == $(seq 200000 | cksum) ]] ||
		{ echo "stdout differs: $(wc -lc <"$WORK/4.out") lines/bytes"; return 1; }
	[[ $(cksum <"$WORK/4.err") == $(seq 100000 | cksum) ]] ||
		{ echo "stderr differs: $(wc -lc <"$WORK/4.err") lines/bytes"; return 1; }
}

# 5. Working directory and environment come along; only --rw reaches the host.
t_cwd_env_rw() {
	mkdir -p "$WORK/5/scratch" "$WORK/5/results"
	local want_var=$'a b \'c\' "d" $e \\f\nline2' got st
	got=$(cd "$WORK/5" && KVMHOST_SELFTEST_VAR=$want_var "$RUN" --rw "$WORK/5/results" -- sh -c '
		pwd
		printf "%s" "$KVMHOST_SELFTEST_VAR" >results/var
		echo inside >scratch/file
		echo inside >results/file
		test "$(cat scratch/file)" = inside || echo "cannot write to the overlay"')
	st=$?
	((st == 0)) || { echo "exit status $st"; return 1; }
	[[ $got == "$WORK/5" ]] || { echo "cwd inside: '$got', want '$WORK/5'"; return 1; }
	[[ $(cat "$WORK/5/results/var" 2>/dev/null) == "$want_var" ]] ||
		{ echo "env var inside: '$(cat "$WORK/5/results/var" 2>/dev/null)', want '$want_var'"; return 1; }
	[[ ! -e $WORK/5/scratch/file ]] || { echo "a write outside --rw reached the host"; return 1; }
	[[ $(cat "$WORK/5/results/file" 2>/dev/null) == inside ]] || { echo "a write to --rw did not reach the host"; return 1; }
}

# 6. The host is set up: cgroup2, devpts with ptmx, lo, modules, mounts.
t_setup() {
	"$RUN" -- sh -c '
		fail() { echo "$*"; bad=1; }
		bad=
		[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || fail "no cgroup2 at /sys/fs/cgroup"
		grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || fail "memory controller not enabled"
		grep -q "^devpts /dev/pts devpts" /proc/mounts || fail "no devpts at /dev/pts"
		exec 3<>/dev/ptmx && test -c /dev/pts/0 || fail "opening /dev/ptmx made no /dev/pts/0"
		exec 3>&-
		[ $(($(cat /sys/class/net/lo/flags) & 1)) = 1 ] || fail "lo is down"
		[ "$(hostname)" = kvmhost ] || fail "hostname is $(hostname)"
		for m in kvm_amd tun bridge veth overlay virtio_console; do
			grep -q "^$m " /proc/modules || fail "module $m not loaded"
		done
		for d in /tmp /run /dev/shm; do
			[ "$(stat -fc %T $d)" = tmpfs ] || fail "$d is not a tmpfs"
		done
		[ -z "$(ls -A /tmp)" ] || fail "/tmp is not empty"
		modprobe vhost_vsock || fail "modprobe vhost_vsock failed"
		[ -z "$bad" ]'
}

check "1 /dev/kvm present, CPU has svm" t_kvm
check "2 stdout/stderr separate, exit status 7 comes back" t_streams
check "3 --timeout 5 of sleep 60 exits 124 quickly" t_timeout
check "4 seq 200000 (stdout) + seq 100000 (stderr) arrive complete" t_volume
check "5 cwd + env preserved, only --rw writes reach the host" t_cwd_env_rw
check "6 cgroup2, /dev/pts, lo, hostname, modules, tmpfs mounts" t_setup

echo "$passed passed, $failed failed"
((failed == 0))
exit
}
