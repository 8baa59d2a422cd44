#!/usr/bin/env bash
# Builds a tiny busybox initrd for VMM tests and benchmarks: its /init mounts proc,
# prints a marker to the console, runs the command given on the kernel command line
# after `--` (if any), and reboots (which ends the VM). Extra static binaries given
# after the output path are put into /bin.
#   make-test-initrd.sh OUTPUT.img [STATIC_BINARY...]
set -euo pipefail
out=${1:?usage: make-test-initrd.sh OUTPUT [STATIC_BINARY...]}
shift
busybox=/bin/busybox
[ -x "$busybox" ] && file -L "$busybox" | grep -q "statically linked" || {
    echo "make-test-initrd: need a static busybox at $busybox (Debian package busybox-static)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,tmp,mnt}
cp "$busybox" "$work/bin/busybox"
for a in sh echo cat mount reboot poweroff sleep ls dd sha256sum md5sum head wc uname sync mkdir grep stty nc seq cmp; do
    ln -s busybox "$work/bin/$a"
done
for bin in "$@"; do
    file -L "$bin" | grep -q "statically linked" || { echo "make-test-initrd: $bin is not statically linked" >&2; exit 1; }
    install -m 0755 "$bin" "$work/bin/$(basename "$bin")"
done
cat > "$work/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "WISP-TEST-INIT-STARTED"
# Arguments after `--` on the kernel command line are the test's command.
if [ "$#" -gt 0 ]; then
    "$@"
    echo "WISP-TEST-EXIT=$?"
fi
sync
reboot -f
INIT
chmod +x "$work/init"
(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible 2>/dev/null || (cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet)) | gzip -9n > "$out.tmp"
mv "$out.tmp" "$out"
