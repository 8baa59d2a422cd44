#!/usr/bin/env bash
# Builds the guest initrd: a gzip'd newc cpio whose /init is the statically linked
# wisp-agent. Nothing else: containers bring their own root filesystems.
#   make-initrd.sh path/to/wisp-agent OUTPUT.img
set -euo pipefail
agent=${1:?usage: make-initrd.sh WISP_AGENT OUTPUT}
out=${2:?usage: make-initrd.sh WISP_AGENT OUTPUT}
if ! file -L "$agent" | grep -q "statically linked"; then
    echo "make-initrd: $agent is not statically linked; build it with 'make build'" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{dev,proc,sys,run,tmp,etc}
install -m 0755 "$agent" "$work/init"
strip --strip-all "$work/init"
# The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$work/dev/console" c 5 1
    mknod -m 666 "$work/dev/null" c 1 3
else
    echo "make-initrd: not root, so no /dev/console node (the agent opens /dev/null itself)" >&2
fi
(cd "$work" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible) | gzip -9n > "$out.tmp"
mv "$out.tmp" "$out"
echo "make-initrd: $out ($(stat -c %s "$out") bytes)"
