#!/usr/bin/env bash
# Builds the wisp guest kernel (uncompressed vmlinux) from Debian's linux-source-6.12
# with guest/kernel.config merged on top of tinyconfig, and copies it to $1.
#
# The build is cached under ${WISP_CACHE:-$HOME/.cache/wisp}/kernel/<key>/, where <key>
# hashes the config fragment, this script and the source package version: a second run
# with the same inputs only copies the cached vmlinux.
set -euo pipefail

out=${1:?usage: build-kernel.sh OUTPUT_VMLINUX}
here=$(cd "$(dirname "$0")" && pwd)
fragment=$here/kernel.config
tarball=/usr/src/linux-source-6.12.tar.xz
cache=${WISP_CACHE:-$HOME/.cache/wisp}

if [ ! -f "$tarball" ]; then
    echo "build-kernel: $tarball is missing; run 'make deps' (Debian package linux-source-6.12)" >&2
    exit 1
fi
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( { echo "$srcver"; cat "$fragment" "$0"; } | sha256sum | cut -c1-16)
dir=$cache/kernel/$key

if [ -f "$dir/vmlinux" ]; then
    echo "build-kernel: cached $dir/vmlinux (linux-source $srcver)"
else
    echo "build-kernel: building linux-source $srcver into $dir (several minutes on 2 cores)"
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    tar -C "$dir.tmp" -xf "$tarball"
    src=$(echo "$dir.tmp"/linux-source-*)
    jobs=$(nproc)
    make -C "$src" -s tinyconfig
    (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null)
    make -C "$src" -s olddefconfig
    # Kconfig drops options whose dependencies are unmet without a word: refuse that.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=n) opt=${line%=n}
                        if grep -q "^$opt=[ym]" "$src/.config"; then echo "build-kernel: $opt is set, wanted off" >&2; missing=1; fi ;;
            CONFIG_*=*) grep -qx "$line" "$src/.config" || { echo "build-kernel: $line did not survive olddefconfig" >&2; missing=1; } ;;
        esac
    done < "$fragment"
    [ "$missing" = 0 ] || { echo "build-kernel: fix guest/kernel.config" >&2; exit 1; }
    make -C "$src" -s -j"$jobs" vmlinux
    cp "$src/vmlinux" "$dir.tmp/vmlinux"
    strip --strip-debug "$dir.tmp/vmlinux" 2>/dev/null || true
    cp "$src/.config" "$dir.tmp/config"
    rm -rf "$src"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
fi
mkdir -p "$(dirname "$out")"
cp "$dir/vmlinux" "$out"
cp "$dir/config" "$(dirname "$out")/vmlinux.config"
