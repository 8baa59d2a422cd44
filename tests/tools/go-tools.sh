#!/usr/bin/env bash
# Builds the Go tools the tests run against (containerd 2.x and its ctr and runc shim,
# crictl, critest, nerdctl) from their published modules on the Go module proxy, as
# pinned in go-tools.lock, and caches them outside the checkout.
#
#   go-tools.sh build [NAME...]   build the named sets (all when none is named)
#   go-tools.sh bin NAME          print the directory holding NAME's binaries (built)
#
# Each set is built as the main module (not `go install`, which refuses modules whose
# go.mod has replace or exclude lines): the module zip is downloaded, its checksum
# compared with the pin, its source copied out of the read-only module cache and built
# with the module's own go.sum (so every dependency is checked too).
#
# The cache is ${WISP_CACHE:-$HOME/.cache/wisp}/go-tools/<name>-<version>-<key>/bin, where
# <key> hashes the lock line, this script and the Go version: changing any of them
# builds anew; an unchanged set costs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
lock=$here/go-tools.lock
cache=${WISP_CACHE:-$HOME/.cache/wisp}/go-tools
export PATH=$PATH:/usr/local/go/bin
# Build with this machine's Go; never fetch another toolchain behind our back.
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

die() { echo "go-tools: $*" >&2; exit 1; }
command -v go >/dev/null || die "go not found (Go 1.26 is expected at /usr/local/go/bin)"

# lock_line NAME: the pinned line of NAME.
lock_line() {
    local line
    line=$(grep -v '^#' "$lock" | awk -v n="$1" '$1 == n' || true)
    [ -n "$line" ] || die "no tool set named '$1' in $lock (known: $(names | tr '\n' ' '))"
    echo "$line"
}
names() { grep -v '^#' "$lock" | awk 'NF { print $1 }'; }

# set_dir NAME: the cache directory of NAME's current pin.
set_dir() {
    local line key
    line=$(lock_line "$1")
    key=$( { echo "$line"; cat "$0"; go env GOVERSION; } | sha256sum | cut -c1-12)
    set -- $line
    echo "$cache/$1-$3-$key"
}

build_one() {
    local name=$1 line dir module version sum pkgs info src got tmp pkg ldflags tags
    line=$(lock_line "$name")
    dir=$(set_dir "$name")
    read -r _ module version sum pkgs <<<"$line"
    if [ -f "$dir/done" ]; then
        echo "go-tools: cached $name ($module@$version) in $dir/bin"
        return
    fi
    echo "go-tools: building $name ($module@$version) into $dir/bin"
    info=$(go mod download -json "$module@$version") || die "$module@$version: download failed"
    got=$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("Sum", ""))' <<<"$info")
    [ "$got" = "$sum" ] || die "$module@$version: checksum $got is not the pinned $sum"
    src=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$info")
    rm -rf "$dir"
    mkdir -p "$dir/bin"
    tmp=$dir/src
    cp -r "$src" "$tmp"
    chmod -R u+w "$tmp"
    if [ "$module" = github.com/containerd/nerdctl/v2 ]; then
        # nerdctl's go.mod replaces its test framework (mod/tigron) with a directory
        # that the published module zip does not carry. Only a test helper file under
        # cmd/ imports it (through pkg/testutil); without that file nothing built
        # here needs tigron.
        rm -f "$tmp/cmd/nerdctl/helpers/testing_linux.go"
        (cd "$tmp" && go mod edit -droprequire=github.com/containerd/nerdctl/mod/tigron \
            -dropreplace=github.com/containerd/nerdctl/mod/tigron)
    fi
    # The version each tool reports, as its own Makefile sets it.
    case $module in
        github.com/containerd/containerd/v2)
            ldflags="-X $module/version.Version=$version -X $module/version.Package=$module"
            tags="urfave_cli_no_docs no_btrfs" ;;
        sigs.k8s.io/cri-tools)
            ldflags="-X $module/pkg/version.Version=$version"; tags="" ;;
        github.com/containerd/nerdctl/v2)
            ldflags="-X $module/pkg/version.Version=$version"; tags="" ;;
        *) ldflags=""; tags="" ;;
    esac
    for pkg in $pkgs; do
        case $pkg in
            test:*)
                pkg=${pkg#test:}
                (cd "$tmp" && CGO_ENABLED=0 go test -c -trimpath -ldflags "$ldflags" \
                    -o "$dir/bin/$(basename "$pkg")" "$pkg") ;;
            *containerd-shim-*)
                # containerd builds its shims static, without cgo and without grpc.
                (cd "$tmp" && CGO_ENABLED=0 go build -trimpath -tags "$tags no_grpc" \
                    -ldflags "$ldflags" -o "$dir/bin/" "$pkg") ;;
            *)
                (cd "$tmp" && go build -trimpath -tags "$tags" -ldflags "$ldflags" \
                    -o "$dir/bin/" "$pkg") ;;
        esac || die "$module@$version: building $pkg failed"
    done
    rm -rf "$tmp"
    echo "$module $version $sum" >"$dir/done"
    # Older builds of this set are not used again.
    for old in "$cache/$name"-*; do
        [ "$old" = "$dir" ] || rm -rf "$old"
    done
    ls "$dir/bin"
}

case ${1:-} in
    build)
        shift
        [ $# -gt 0 ] || set -- $(names)
        for n in "$@"; do build_one "$n"; done ;;
    bin)
        [ $# -eq 2 ] || die "usage: go-tools.sh bin NAME"
        dir=$(set_dir "$2")
        [ -f "$dir/done" ] || die "$2 is not built: run tests/tools/go-tools.sh build $2"
        echo "$dir/bin" ;;
    *) die "usage: go-tools.sh build [NAME...] | bin NAME" ;;
esac
