#!/usr/bin/env bash
# The emulated KVM host's fault reproducer (issue 17), without containerd or the shim:
# rounds of N wisp-vmm VMs booted at once, each running a short command in its guest and
# powering off, inside one emulated host per attempt; several attempts, each in a fresh
# host. Prints one line per attempt and a summary: attempts, host deaths and freezes,
# rounds done, nested VMs that faulted (triple fault, no clean exit).
#
#   tests/kvmhost/stress.sh [--attempts A] [--rounds R] [--vms N] [--vcpus V] [--timeout S]
#
# Defaults: 5 attempts, 20 rounds, 10 VMs of 1 vCPU, 900 s per attempt. Uses
# target/release/wisp-vmm, target/guest/vmlinux and target/guest/test-initrd.img
# (`make build guest`). WISP_KVMHOST_QEMU and KVMHOST_* pass through to tests/kvmhost/run,
# so the same load compares QEMU builds and emulated-host settings; KVMHOST_KEEP=1
# keeps each attempt's console. Exit status 0 when every attempt ran every round with no
# fault, 1 otherwise, 2 on bad usage.
# One brace group: bash parses it whole, so editing the file cannot derail a run.
{
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$HERE/../.." && pwd -P)
attempts=5 rounds=20 vms=10 vcpus=1 timeout=900
# A VM that has not ended this long after its round began counts as stalled and is killed.
vm_timeout=120

usage() { echo "usage: $0 [--attempts A] [--rounds R] [--vms N] [--vcpus V] [--timeout S]" >&2; exit 2; }
while [ $# -gt 0 ]; do
	case $1 in
	--attempts) attempts=${2:?}; shift 2 ;;
	--rounds) rounds=${2:?}; shift 2 ;;
	--vms) vms=${2:?}; shift 2 ;;
	--vcpus) vcpus=${2:?}; shift 2 ;;
	--timeout) timeout=${2:?}; shift 2 ;;
	--inside) shift; inside=1 ;;
	*) usage ;;
	esac
done
for n in "$attempts" "$rounds" "$vms" "$vcpus" "$timeout"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "stress.sh: '$n' is not a positive number" >&2; usage; }
done
VMM=$ROOT/target/release/wisp-vmm KERNEL=$ROOT/target/guest/vmlinux INITRD=$ROOT/target/guest/test-initrd.img

if [ -n "${inside:-}" ]; then
	# In the emulated host: the rounds. One line per round; "round R: ..." lines are parsed.
	work=$(mktemp -d /tmp/stress.XXXXXX)
	# The guest's work: read its busybox a few times (page faults, virtio-free guest
	# memory traffic) and fork a few processes (IPIs are not needed: one vCPU).
	gcmd='for i in 1 2 3 4 5; do cat /bin/busybox > /dev/null; done; echo WISP-STRESS-DONE'
	for r in $(seq 1 "$rounds"); do
		t0=$EPOCHREALTIME
		pids=()
		for v in $(seq 1 "$vms"); do
			timeout -s KILL "$vm_timeout" "$VMM" --kernel "$KERNEL" --initrd "$INITRD" --vcpus "$vcpus" --memory-mib 128 \
				--console "$work/$v.console" --no-rng \
				--cmdline "-- /bin/sh -c \"$gcmd\"" >"$work/$v.out" 2>"$work/$v.err" &
			pids+=($!)
		done
		ok=0 faults=0 stalls=0 other=0 why=
		for v in $(seq 1 "$vms"); do
			wait "${pids[v-1]}"; st=$?
			if [ $st -eq 0 ] && grep -q WISP-STRESS-DONE "$work/$v.console" && ! grep -q GuestTripleFault "$work/$v.err"; then
				ok=$((ok + 1))
			elif [ $st -eq 137 ]; then
				stalls=$((stalls + 1)); why+=" vm$v: no end within $vm_timeout s, console tail: $(tail -c 120 "$work/$v.console" | tr '\n' '|')"
			elif grep -q GuestTripleFault "$work/$v.err"; then
				faults=$((faults + 1)); why+=" vm$v: $(grep -o 'GuestTripleFault([^)]*)' "$work/$v.err" | head -1)"
			else
				other=$((other + 1)); why+=" vm$v: exit $st, console tail: $(tail -c 200 "$work/$v.console" | tr '\n' '|')"
			fi
		done
		echo "round $r: ok $ok triple_faults $faults stalls $stalls other $other in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s${why}"
		rm -f "$work"/*
	done
	exit 0
fi

for f in "$VMM" "$KERNEL" "$INITRD"; do
	[ -e "$f" ] || { echo "stress.sh: missing $f (run: make build guest)" >&2; exit 2; }
done
log=$(mktemp -d /var/tmp/kvmhost-stress.XXXXXX)
echo "stress: $attempts attempts of $rounds rounds of $vms VMs (${vcpus} vCPU each), QEMU ${WISP_KVMHOST_QEMU:-patched (the default)}; logs in $log"
deaths=0 freezes=0 timeouts=0 rounds_done=0 vm_faults=0 vm_stalls=0 vm_other=0 clean=0
for a in $(seq 1 "$attempts"); do
	t0=$EPOCHSECONDS
	"$HERE/run" --timeout "$timeout" --idle-timeout 300 -- "$HERE/stress.sh" --inside --rounds "$rounds" \
		--vms "$vms" --vcpus "$vcpus" --attempts 1 --timeout "$timeout" >"$log/$a.out" 2>"$log/$a.err"
	st=$?
	done_r=$(grep -c '^round ' "$log/$a.out")
	f=$(awk '/^round /{s+=$6} END{print s+0}' "$log/$a.out")
	sl=$(awk '/^round /{s+=$8} END{print s+0}' "$log/$a.out")
	o=$(awk '/^round /{s+=$10} END{print s+0}' "$log/$a.out")
	rounds_done=$((rounds_done + done_r)) vm_faults=$((vm_faults + f)) vm_stalls=$((vm_stalls + sl)) vm_other=$((vm_other + o))
	case $st in
	0) what="ran"; [ "$done_r" -eq "$rounds" ] && [ "$f" -eq 0 ] && [ "$sl" -eq 0 ] && [ "$o" -eq 0 ] && clean=$((clean + 1)) ;;
	123) if grep -q "printed nothing" "$log/$a.err"; then what="host froze"; freezes=$((freezes + 1)); else
		what="host died: $(grep -m1 -o 'BUG: [^(]*\|Kernel panic[^|]*\|general protection[^|]*' "$log/$a.err" | head -1)"; deaths=$((deaths + 1)); fi ;;
	124) what="timed out"; timeouts=$((timeouts + 1)) ;;
	*) what="exit $st: $(tail -3 "$log/$a.err" | tr '\n' ' ')" ;;
	esac
	echo "attempt $a: $what after $((EPOCHSECONDS - t0)) s; rounds $done_r/$rounds, VM triple faults $f, stalls $sl, other VM failures $o"
done
echo "stress: attempts $attempts, clean $clean, host deaths $deaths, host freezes $freezes, timeouts $timeouts; rounds done $rounds_done of $((attempts * rounds)); VMs booted $((rounds_done * vms)), triple faults $vm_faults, stalls $vm_stalls, other failures $vm_other"
[ "$clean" -eq "$attempts" ]
exit
}
