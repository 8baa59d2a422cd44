#!/usr/bin/env bash
# Builds the emulated KVM host's QEMU from Debian's source of the version `make deps`
# installs (10.0.2, bookworm-backports) with this directory's patches, for the tests
# only: `tests/kvmhost/run` uses it unless WISP_KVMHOST_QEMU says otherwise, and
# `make deps` builds it. tests/kvmhost/README.md says what the patches fix.
#
#   tests/kvmhost/qemu/build.sh [PATCH...]   default: every *.patch here (not diag/), in name order
#
# Prints the built qemu-system-x86_64's path. Cached in ~/.cache/wisp/qemu/<key>, the key
# a hash of the source's checksum, the patches, the configure flags and this script, so
# a changed input builds anew and an unchanged one costs nothing. The source tarball is
# fetched from Debian's archive and checked against the checksum pinned here. Only the
# x86_64 system emulator with TCG and virtfs is built (about 10 minutes on 2 cores).
# Debian's "+ds" source has no prebuilt firmware: the build finds its ROMs in Debian's
# qemu-system-data (`-L /usr/share/qemu`, which tests/kvmhost/run passes).
# The build dependencies (Debian packages) are installed if missing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
VERSION=10.0.2
ORIG=qemu_${VERSION}+ds.orig.tar.xz
ORIG_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
ORIG_URL=http://deb.debian.org/debian/pool/main/q/qemu/$ORIG
BUILD_DEPS=(build-essential ninja-build pkg-config python3-venv libglib2.0-dev libpixman-1-dev
	libcap-ng-dev libattr1-dev zlib1g-dev libfdt-dev)
CONFIGURE=(--target-list=x86_64-softmmu --disable-download --disable-install-blobs --enable-tcg --disable-kvm --enable-virtfs --enable-attr
	--enable-cap-ng --disable-docs --disable-user --disable-tools --disable-guest-agent
	--disable-werror --disable-gtk --disable-sdl --disable-vnc --disable-opengl --disable-spice
	--disable-curses --disable-slirp --disable-gnutls --disable-nettle --disable-gcrypt
	--disable-libusb --disable-usb-redir --disable-vhost-user --disable-xen --disable-debug-info)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/wisp/qemu

die() { echo "qemu/build.sh: $*" >&2; exit 1; }

if [ $# -gt 0 ]; then
	patches=()
	for p in "$@"; do
		[ -f "$p" ] || p=$here/$p
		[ -f "$p" ] || die "no patch $p"
		patches+=("$(cd "$(dirname "$p")" && pwd)/$(basename "$p")")
	done
else
	mapfile -t patches < <(find "$here" -maxdepth 1 -name '*.patch' | sort)
fi

key=$( {
	echo "$ORIG_SHA256"
	printf '%s\n' "${CONFIGURE[@]}"
	cat "$0" "$here/build-fixes.diff"
	for p in "${patches[@]}"; do basename "$p"; cat "$p"; done
} | sha256sum | cut -c1-16)
out=$CACHE/$VERSION-$key
# PATCHES is written last: its presence means the build is complete.
if [ -f "$out/PATCHES" ]; then
	echo "$out/bin/qemu-system-x86_64"
	exit 0
fi

missing=()
for p in "${BUILD_DEPS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "qemu/build.sh: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
# QEMU 10's configure wants meson >= 1.5 and pycotap (its "meson" group, never fetched
# from PyPI); Debian's "+ds" source lacks the wheels QEMU would use instead. Debian 12
# has meson 1.0; its backports (which `make deps` adds for QEMU) have meson 1.7 and
# pycotap. The build uses Debian's own Python (/usr/bin/python3), where those are.
meson_ok() {
	/usr/bin/python3 -c 'import pycotap, mesonbuild.coredata as c, sys; sys.exit(tuple(int(x) for x in c.version.split(".")[:2]) < (1, 5))' 2>/dev/null
}
if ! meson_ok; then
	echo "qemu/build.sh: installing meson and pycotap from bookworm-backports (QEMU needs meson >= 1.5)" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -t bookworm-backports \
		meson python3-pycotap >&2
	meson_ok || die "meson >= 1.5 and pycotap are needed and could not be installed"
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
# Another build may have finished it while this one waited.
if [ -f "$out/PATCHES" ]; then
	echo "$out/bin/qemu-system-x86_64"
	exit 0
fi

tarball=$CACHE/$ORIG
if ! echo "$ORIG_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
	echo "qemu/build.sh: fetching $ORIG_URL" >&2
	curl -fsSL -o "$tarball.part" "$ORIG_URL" || die "cannot fetch $ORIG_URL"
	echo "$ORIG_SHA256  $tarball.part" | sha256sum -c --status || die "$ORIG: checksum mismatch"
	mv "$tarball.part" "$tarball"
fi

work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xJf "$tarball" -C "$work"
src=$work/qemu-$VERSION
[ -d "$src" ] || die "the tarball has no qemu-$VERSION directory"
# What Debian's source needs to build this way (build-fixes.diff), then the patches.
patch -d "$src" -p1 --forward --batch <"$here/build-fixes.diff" >&2 || die "build-fixes.diff does not apply to $VERSION"
for p in "${patches[@]}"; do
	echo "qemu/build.sh: applying $(basename "$p")" >&2
	patch -d "$src" -p1 --forward --batch <"$p" >&2 || die "$(basename "$p") does not apply to $VERSION"
done
echo "qemu/build.sh: building QEMU $VERSION with ${#patches[@]} patch(es) into $out" >&2
(
	cd "$src"
	mkdir build && cd build
	# Debian's Python, which sees Debian's meson (not a python3 earlier on PATH).
	../configure --prefix="$out" --python=/usr/bin/python3 "${CONFIGURE[@]}" >&2
	# Only the emulator: the full default target (tests, tools) takes three times as long.
	ninja -j"$(nproc)" qemu-system-x86_64 >&2
	rm -rf "$out"
	install -D -m 0755 qemu-system-x86_64 "$out/bin/qemu-system-x86_64"
)
printf '%s\n' "${patches[@]##*/}" >"$out/PATCHES"
echo "$out/bin/qemu-system-x86_64"
