# wisp: build, guest assets, install, tests, benchmarks, demo.
# `make deps` once on a fresh Debian 12 machine, then `make test` runs everything CI runs.

PREFIX      ?= /usr/local
DESTDIR     ?=
CARGO       ?= cargo
TRIPLE      := x86_64-unknown-linux-gnu
RELEASE     := target/release
GUEST       := target/guest
SHAREDIR    := /usr/share/wisp
CONFDIR     := /etc/wisp

# Debian packages the project needs (build, guest kernel, emulated KVM host, tests).
DEB_PACKAGES := containerd runc containernetworking-plugins busybox-static cpio kmod \
	protobuf-compiler libseccomp-dev flex bison bc libelf-dev libssl-dev \
	linux-source-6.12 iproute2 file gzip xz-utils util-linux python3 gcc libc6-dev make

# cargo-fuzz, for `make fuzz` (fuzz/README.md).
CARGO_FUZZ_VERSION := 0.13.2

# relocation-model=static: a plain static executable, not static-pie.
STATIC_RUSTFLAGS := -C target-feature=+crt-static -C relocation-model=static
AGENT_ENV := RUSTFLAGS='$(STATIC_RUSTFLAGS)' LIBSECCOMP_LINK_TYPE=static \
	LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu

.PHONY: all deps build agent guest kernel initrd tools install uninstall test unit e2e soak conformance conformance-smoke bench demo fuzz clean

all: build guest

# The emulated KVM host's QEMU: Debian 12's own (7.2) emulates SVM with bugs that crashed
# the emulated host's kernel during nested boots (a kernel stack overflow in a KVM vCPU
# thread); on Debian 12 it comes from bookworm-backports (10.0).
BACKPORTS_SOURCES := /etc/apt/sources.list.d/wisp-bookworm-backports.sources
IS_BOOKWORM := $(shell grep -qx 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null && echo yes)

deps:
ifeq ($(IS_BOOKWORM),yes)
	@[ -f $(BACKPORTS_SOURCES) ] || printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
		'Suites: bookworm-backports' 'Components: main' \
		'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >$(BACKPORTS_SOURCES)
endif
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEB_PACKAGES)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		$(if $(IS_BOOKWORM),-t bookworm-backports) qemu-system-x86
	@# Without hardware KVM the tests and the demo run in the emulated host, on a QEMU built
	@# from that source with tests/kvmhost/qemu's fix of a race that crashed it (cached by
	@# its inputs; about 10 minutes the first time). The probe is tests/e2e.sh's.
	@if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then \
		echo "deps: hardware KVM: the emulated host's QEMU is not needed"; \
	else tests/kvmhost/qemu/build.sh >/dev/null; fi
	@command -v $(CARGO) >/dev/null || { echo "deps: cargo not found: install Rust >= 1.85 (rustup)" >&2; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked

build: agent
	$(CARGO) build --release -p wisp-vmm -p wisp-shim

# The agent runs as PID 1 in a guest with no libraries: link it statically. Its profile
# (Cargo.toml) favours size: each pod's guest RAM holds the unpacked binary.
agent:
	$(AGENT_ENV) $(CARGO) build --profile agent --target $(TRIPLE) -p wisp-agent
	@mkdir -p $(RELEASE)
	install -m 0755 target/$(TRIPLE)/agent/wisp-agent $(RELEASE)/wisp-agent
	@file $(RELEASE)/wisp-agent | grep -q "statically linked" || \
		{ echo "build: $(RELEASE)/wisp-agent is not statically linked (see DEPENDENCIES: LIBSECCOMP_* variables)" >&2; exit 1; }

guest: kernel initrd

# Cached under $$HOME/.cache/wisp/kernel/<hash of config + source version>.
kernel:
	guest/build-kernel.sh $(GUEST)/vmlinux

initrd: agent
	guest/make-initrd.sh $(RELEASE)/wisp-agent $(GUEST)/initrd.img
	RUSTFLAGS='$(STATIC_RUSTFLAGS)' $(CARGO) build --release --target $(TRIPLE) -p vsock-probe
	guest/make-test-initrd.sh $(GUEST)/test-initrd.img target/$(TRIPLE)/release/vsock-probe

# containerd 2.4, crictl, critest and nerdctl for the tests, built from their published Go
# modules (pinned in tests/tools/go-tools.lock), cached under $$HOME/.cache/wisp/go-tools.
# Only the sets CI uses: tests/e2e.sh builds containerd 2.3 when a SUITE@2.3 is named.
CI_GO_TOOLS := containerd-2.4 cri-tools nerdctl
tools:
	tests/tools/go-tools.sh build $(CI_GO_TOOLS)

install:
	install -D -m 0755 $(RELEASE)/containerd-shim-wisp-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-wisp-v2
	install -D -m 0755 $(RELEASE)/wisp-vmm $(DESTDIR)$(PREFIX)/bin/wisp-vmm
	install -D -m 0755 $(RELEASE)/wisp-agent $(DESTDIR)$(PREFIX)/bin/wisp-agent
	install -D -m 0644 $(GUEST)/vmlinux $(DESTDIR)$(SHAREDIR)/vmlinux
	install -D -m 0644 $(GUEST)/initrd.img $(DESTDIR)$(SHAREDIR)/initrd.img
	@if [ -e $(DESTDIR)$(CONFDIR)/config.toml ]; then \
		echo "install: keeping existing $(DESTDIR)$(CONFDIR)/config.toml"; \
	else \
		mkdir -p $(DESTDIR)$(CONFDIR); \
		sed 's#/usr/local/bin/wisp-vmm#$(PREFIX)/bin/wisp-vmm#' config/config.toml > $(DESTDIR)$(CONFDIR)/config.toml; \
		chmod 0644 $(DESTDIR)$(CONFDIR)/config.toml; \
	fi

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/containerd-shim-wisp-v2 $(DESTDIR)$(PREFIX)/bin/wisp-vmm $(DESTDIR)$(PREFIX)/bin/wisp-agent
	rm -f $(DESTDIR)$(SHAREDIR)/vmlinux $(DESTDIR)$(SHAREDIR)/initrd.img
	-rmdir $(DESTDIR)$(SHAREDIR) 2>/dev/null
	@echo "uninstall: left $(DESTDIR)$(CONFDIR)/config.toml in place (remove it by hand if unwanted)"

# Everything CI runs: unit tests, host integration tests, every fuzz target for
# FUZZ_SECONDS (default 10), the end-to-end suites in the emulated KVM host (containerd
# 1.6 and 2.4, and the soak on 1.6 with reduced counts), and critest's smoke subset (runc
# and wisp). The full critest run (make conformance), long fuzz runs, the soak's full
# counts and on 2.4, and the containerd 2.3 suites are on demand: see README, Testing.
test: build guest unit fuzz e2e conformance-smoke

# Tests that need root are #[ignore]d (libtest cannot report a skip); as root they run.
unit:
	$(CARGO) test --workspace
	@if [ "$$(id -u)" = 0 ]; then $(CARGO) test --workspace --lib --bins -- --ignored; \
	else echo "unit: not root: the root-only unit tests were not run (listed as ignored above)"; fi

e2e: build guest tools
	tests/kvmhost/selftest.sh
	tests/e2e.sh

# Many container and pod lifecycles in one containerd (1.6, then 2.4), then no leaks and
# no lost output; in the emulated KVM host (~45 minutes per containerd at the default
# counts; `make e2e` runs it on 1.6 with 10, 5 and 20). Counts: WISP_SOAK_CTR (default
# 100), WISP_SOAK_CRI (50), WISP_SOAK_SHORT (200).
soak: build guest
	tests/e2e.sh soak soak@2.4

# critest (cri-tools) against containerd 2.x with handler runc, then wisp, in the emulated
# KVM host; the table goes to target/conformance/table.md.
conformance: build guest tools
	tests/conformance.sh

conformance-smoke: build guest tools
	tests/conformance.sh --smoke

# wisp vs a peer in the same run (median of WISP_BENCH_N runs, default 5, interleaved), in the
# emulated KVM host; the table goes to target/bench/report.md and report.json.
bench: build guest
	tests/bench.sh

# libFuzzer targets (fuzz/README.md): FUZZ_SECONDS per target, default 10 (what CI runs).
fuzz:
	fuzz/run.sh

# The README's first command: install, then a container in a wisp micro-VM.
demo: build guest install
	tests/demo.sh

clean:
	$(CARGO) clean
