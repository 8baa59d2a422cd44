//! The two VMMs a benchmark compares, started the same way: wisp-vmm and the peer,
//! QEMU's `microvm` machine, both with 1 vCPU, 128 MiB, KVM, a serial console on
//! stdout, and the same kernel (`target/guest/vmlinux`, a PVH ELF both can load) and
//! test initrd (its /init prints `WISP-TEST-INIT-STARTED`, then runs the command given
//! after `--` on the kernel command line, then reboots).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use crate::artifact;
use crate::harness::need_full_kvm;

/// What the test initrd's /init prints first.
pub const USERSPACE_MARKER: &str = "WISP-TEST-INIT-STARTED";
pub const MEMORY_MIB: u64 = 128;
pub const PEER_NAME: &str = "QEMU microvm";
/// What wisp-vmm puts on the kernel command line when its console is on; the peer
/// gets the same.
const PEER_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Wisp,
    Peer,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Wisp => "wisp-vmm",
            Side::Peer => PEER_NAME,
        }
    }
}

/// The binaries and guest images, found and checked once.
#[derive(Debug, Clone)]
pub struct Setup {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The product initrd: wisp-agent as /init.
    pub agent_initrd: PathBuf,
    pub qemu: PathBuf,
}

impl Setup {
    /// Finds everything the VM benchmarks need, or says what is missing and how to get it.
    pub fn find() -> anyhow::Result<Self> {
        let mut missing = Vec::new();
        let vmm = artifact("release/wisp-vmm");
        let kernel = artifact("guest/vmlinux");
        let initrd = artifact("guest/test-initrd.img");
        let agent_initrd = artifact("guest/initrd.img");
        for (p, how) in [
            (&vmm, "cargo build --release -p wisp-vmm (or make build)"),
            (&kernel, "make kernel"),
            (&initrd, "make initrd"),
            (&agent_initrd, "make initrd"),
        ] {
            if !p.is_file() {
                missing.push(format!("{} is missing: run `{how}`", p.display()));
            }
        }
        let qemu = match std::env::var_os("WISP_BENCH_QEMU") {
            Some(q) => Some(PathBuf::from(q)).filter(|q| is_executable(q)),
            None => find_in_path("qemu-system-x86_64"),
        };
        if qemu.is_none() {
            missing.push(
                "qemu-system-x86_64 (the peer VMM): not on PATH, or WISP_BENCH_QEMU is not executable; \
                 apt-get install qemu-system-x86"
                    .into(),
            );
        }
        if let Some(why) = need_full_kvm() {
            missing.push(format!("{why} (tests/bench.sh does that)"));
        }
        if !missing.is_empty() {
            bail!("cannot run the VM benchmarks:\n  {}", missing.join("\n  "));
        }
        Ok(Self { vmm, kernel, initrd, agent_initrd, qemu: qemu.unwrap_or_default() })
    }

    /// The VMM of `side` booting the test guest; `guest_cmd` (words) runs after the
    /// marker, otherwise the guest reboots right away.
    pub fn command(&self, side: Side, guest_cmd: &[&str]) -> Command {
        match side {
            Side::Wisp => self.wisp(guest_cmd),
            Side::Peer => self.peer(guest_cmd),
        }
    }

    fn wisp(&self, guest_cmd: &[&str]) -> Command {
        let mut c = Command::new(&self.vmm);
        c.arg("--kernel").arg(&self.kernel).arg("--initrd").arg(&self.initrd);
        c.args(["--console", "stdout", "--vcpus", "1", "--memory-mib"]).arg(MEMORY_MIB.to_string());
        if !guest_cmd.is_empty() {
            c.arg("--cmdline").arg(format!("-- {}", guest_cmd.join(" ")));
        }
        c
    }

    /// wisp-vmm booting the product initrd (the agent as /init) with its vsock device
    /// on `vsock_uds` and the control API on `api_sock`: a pod's VM without the shim.
    pub fn wisp_with_agent(&self, vsock_uds: &Path, api_sock: &Path) -> Command {
        let mut c = Command::new(&self.vmm);
        c.arg("--kernel").arg(&self.kernel).arg("--initrd").arg(&self.agent_initrd);
        c.args(["--console", "stdout", "--vcpus", "1", "--memory-mib"]).arg(MEMORY_MIB.to_string());
        c.arg("--vsock-uds").arg(vsock_uds).args(["--vsock-cid", "3"]);
        c.arg("--api-sock").arg(api_sock).args(["--log-level", "info"]);
        c
    }

    fn peer(&self, guest_cmd: &[&str]) -> Command {
        let mut append = PEER_CMDLINE.to_string();
        if !guest_cmd.is_empty() {
            append = format!("{append} -- {}", guest_cmd.join(" "));
        }
        let mut c = Command::new(&self.qemu);
        // acpi=off: the guest kernel has no ACPI; microvm then gives it an MP table,
        // as wisp-vmm does. No RTC and no option ROMs, like wisp-vmm.
        c.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-enable-kvm", "-cpu", "host"]);
        c.args(["-m", &MEMORY_MIB.to_string(), "-smp", "1"]);
        c.args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"]);
        c.arg("-kernel").arg(&self.kernel).arg("-initrd").arg(&self.initrd).arg("-append").arg(append);
        c
    }
}

impl Setup {
    /// Where the VMM of `side` put known bytes into guest RAM, for finding that RAM in
    /// the VMM's address space (see `smaps`): wisp-vmm writes the kernel command line,
    /// which starts with its base part, at `CMDLINE_START`. QEMU keeps its guest RAM in
    /// a mapping of its own and needs none.
    pub fn ram_anchor(&self, side: Side) -> Option<(u64, Vec<u8>)> {
        match side {
            Side::Wisp => {
                let base = wisp_vmm::arch::x86_64::boot::base_cmdline(true).ok()?;
                Some((wisp_vmm::arch::layout::CMDLINE_START, base.as_cstring().ok()?.to_bytes().to_vec()))
            }
            Side::Peer => None,
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            vmm: "/w/wisp-vmm".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            agent_initrd: "/a".into(),
            qemu: "/q".into(),
        }
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn both_vmms_get_the_same_guest_and_command() {
        let s = setup();
        let w = args(&s.command(Side::Wisp, &["sleep", "600"]));
        assert!(w.windows(2).any(|p| p == ["--cmdline", "-- sleep 600"]), "{w:?}");
        assert!(w.windows(2).any(|p| p == ["--memory-mib", "128"]), "{w:?}");
        let q = args(&s.command(Side::Peer, &["sleep", "600"]));
        assert!(q.windows(2).any(|p| p == ["-append", "console=ttyS0 reboot=k panic=-1 -- sleep 600"]), "{q:?}");
        assert!(q.windows(2).any(|p| p == ["-kernel", "/k"]) && q.windows(2).any(|p| p == ["-initrd", "/i"]));
        let q = args(&s.command(Side::Peer, &[]));
        assert!(q.windows(2).any(|p| p == ["-append", "console=ttyS0 reboot=k panic=-1"]), "{q:?}");
        assert!(!args(&s.command(Side::Wisp, &[])).contains(&"--cmdline".to_string()));
    }
}
