//! VM snapshots (`wisp_vmm::snapshot`) against the host's real /dev/kvm: a VM set up by
//! the VMM's own code (`Vm::new`, `Vcpu::configure`), given distinctive register, MSR,
//! FPU, LAPIC and debug register values and a page of guest memory, is captured,
//! written to a file (its memory to a memory file), loaded back through the header
//! checks, restored into a fresh VM on that memory file mapped copy-on-write, whose
//! vCPUs were never configured, and captured again: both captures must agree, field by field, but for
//! the values that move with time (listed in `compare_*`). No guest code runs, so this
//! works on PVM hosts too, as far as their KVM implements the state ioctls; a missing
//! one is reported as a skip with its reason.

use anyhow::{bail, Context};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use wisp_tests::harness::{need_kvm, CaseResult, Outcome, Suite};
use wisp_tests::skip_unless;
use wisp_vmm::arch::msr;
use wisp_vmm::arch::regs::EntryPoint;
use wisp_vmm::snapshot::legacy::LegacyState;
use wisp_vmm::snapshot::memory::{map_memory, save_memory};
use wisp_vmm::snapshot::{
    Header, Snapshot, VcpuState, VcpuStateError, VcpuStateSupport, VmIdentity, VmState, VmStateError,
};
use wisp_vmm::vstate::vcpu::Vcpu;
use wisp_vmm::vstate::vm::Vm;

const MEM_BYTES: u64 = 16 << 20;
const VCPUS: u8 = 2;
/// What the original VM's guest memory holds at `GUEST_PAGE_AT` when it is saved.
const GUEST_PAGE: &[u8] = b"written by the guest before its snapshot";
const GUEST_PAGE_AT: u64 = 0x20_0000;

/// Distinctive values, each one a boot never sets.
const RAX: u64 = 0x1111_2222_3333_4444;
const R15: u64 = 0x5555_6666_7777_8888;
const CR2: u64 = 0xdead_b000;
const LSTAR: u64 = 0xffff_ffff_8120_0000;
const STAR: u64 = 0x0023_0010_0000_0000;
const SYSCALL_MASK: u64 = 0x4_7700;
const KERNEL_GS_BASE: u64 = 0xffff_8880_0123_4000;
const SYSENTER_ESP: u64 = 0xffff_fe00_0000_1000;
const PAT: u64 = 0x0007_0106_0007_0106;
const XMM0: [u8; 16] = *b"wisp-snapshot-01";
const DR0: u64 = 0x0123_4000;
const DR7: u64 = 0x401;
const LAPIC_TPR: (usize, u32) = (0x80, 0x20);
const LAPIC_LVT_TIMER: (usize, u32) = (0x320, 0x0002_00ec); // periodic, vector 0xec, unmasked
const LAPIC_TIMER_INITIAL: (usize, u32) = (0x380, 0);

/// The skip reason when this host's KVM lacks what a snapshot needs (a capability
/// `probe` checks, or an ioctl it does not implement: ENOTTY, ENOSYS, EOPNOTSUPP).
/// Anything else KVM refuses is a failure.
fn unsupported(step: &str, e: &dyn std::fmt::Display) -> Outcome {
    Outcome::Skipped(format!("this host's KVM cannot {step}: {e}"))
}

fn not_implemented(e: &kvm_ioctls::Error) -> bool {
    [libc::ENOTTY, libc::ENOSYS, libc::EOPNOTSUPP].contains(&e.errno())
}

fn vcpu_unsupported(e: &VcpuStateError) -> bool {
    match e {
        VcpuStateError::Get { source, .. } | VcpuStateError::Set { source, .. } => not_implemented(source),
        _ => false,
    }
}

fn vm_unsupported(e: &VmStateError) -> bool {
    match e {
        VmStateError::Get { source, .. } | VmStateError::Set { source, .. } => not_implemented(source),
        VmStateError::MissingCap(_) => true,
    }
}

fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes([l.regs[off] as u8, l.regs[off + 1] as u8, l.regs[off + 2] as u8, l.regs[off + 3] as u8])
}

fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, (off, value): (usize, u32)) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// The test's values on one vCPU, set through KVM the way a running guest would leave them.
fn make_distinctive(vcpu: &VcpuFd, index: u8) -> anyhow::Result<()> {
    let mut regs = vcpu.get_regs()?;
    regs.rax = RAX + u64::from(index);
    regs.r15 = R15;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cr2 = CR2;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    // FPU and SSE state through XSAVE, with their XSTATE_BV bits set, as a guest's own
    // XSAVE leaves them (KVM_SET_FPU writes the legacy area but leaves XSTATE_BV: the
    // guest and KVM_GET_XSAVE would still see the initial state).
    let mut xsave = vcpu.get_xsave()?;
    xsave.region[0] = (xsave.region[0] & !0xffff) | 0x27f;
    for (i, w) in XMM0.chunks_exact(4).enumerate() {
        xsave.region[40 + i] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    xsave.region[128] |= 0b11; // XSTATE_BV (byte 512): x87 and SSE
                               // SAFETY: the 4096-byte struct KVM_GET_XSAVE just filled; VcpuStateSupport::probe
                               // checked KVM uses no more.
    unsafe { vcpu.set_xsave(&xsave) }.context("KVM_SET_XSAVE")?;
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(msr::MSR_LSTAR, LSTAR),
        entry(msr::MSR_STAR, STAR),
        entry(msr::MSR_SYSCALL_MASK, SYSCALL_MASK),
        entry(msr::MSR_KERNEL_GS_BASE, KERNEL_GS_BASE),
        entry(msr::MSR_IA32_SYSENTER_ESP, SYSENTER_ESP),
        entry(msr::MSR_IA32_CR_PAT, PAT),
    ];
    let set = vcpu.set_msrs(&Msrs::from_entries(&entries).unwrap()).context("KVM_SET_MSRS")?;
    if set != entries.len() {
        bail!("KVM_SET_MSRS took {set} of {} MSRs (MSR {:#x} refused)", entries.len(), entries[set].index);
    }
    let mut lapic = vcpu.get_lapic()?;
    for reg in [LAPIC_TPR, LAPIC_LVT_TIMER, LAPIC_TIMER_INITIAL] {
        set_lapic_reg(&mut lapic, reg);
    }
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    let mut dbg = vcpu.get_debug_regs()?;
    dbg.db[0] = DR0;
    dbg.dr7 = DR7;
    vcpu.set_debug_regs(&dbg).context("KVM_SET_DEBUGREGS")?;
    Ok(())
}

const CLOCK_NS: u64 = 3_600_000_000_000; // an hour of guest time
const PIT_COUNT: u32 = 0x1234;
const PIC_MASTER_IMR: u8 = 0xfa;
const IOAPIC_REDIR4: u64 = 0x0000_0000_0001_0034; // masked, vector 0x34

/// The PIC master's IMR (byte 2 of kvm_pic_state) and the IOAPIC's fifth redirection
/// entry (after base u64, ioregsel, id, irr, pad u32s: byte 24 + 4 * 8).
fn pic_imr(s: &VmState) -> u8 {
    // SAFETY: reading the byte view of the union KVM filled.
    unsafe { s.pic_master.chip.pic.imr }
}

fn ioapic_redir4(s: &VmState) -> u64 {
    // SAFETY: as above; `bits` covers the whole entry.
    unsafe { s.ioapic.chip.ioapic.redirtbl[4].bits }
}

/// The VM's distinctive values: the kvmclock, PIT channel 0, the master PIC's mask and
/// an IOAPIC route, as a guest's own programming would leave them.
fn make_vm_distinctive(vm: &Vm) -> anyhow::Result<()> {
    let clock = kvm_bindings::kvm_clock_data { clock: CLOCK_NS, ..Default::default() };
    vm.fd.set_clock(&clock).context("KVM_SET_CLOCK")?;
    let mut pit = vm.fd.get_pit2()?;
    pit.channels[0].count = PIT_COUNT;
    vm.fd.set_pit2(&pit).context("KVM_SET_PIT2")?;
    let mut chip = kvm_bindings::kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER, ..Default::default() };
    vm.fd.get_irqchip(&mut chip)?;
    chip.chip.pic.imr = PIC_MASTER_IMR; // the PIC view of the union KVM just filled
    vm.fd.set_irqchip(&chip).context("KVM_SET_IRQCHIP (PIC)")?;
    let mut chip = kvm_bindings::kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.fd.get_irqchip(&mut chip)?;
    // SAFETY: the IOAPIC view of the union KVM just filled for the IOAPIC.
    unsafe { chip.chip.ioapic.redirtbl[4].bits = IOAPIC_REDIR4 };
    vm.fd.set_irqchip(&chip).context("KVM_SET_IRQCHIP (IOAPIC)")?;
    Ok(())
}

fn check_vm_distinctive(s: &VmState) -> anyhow::Result<()> {
    anyhow::ensure!(s.pit.channels[0].count == PIT_COUNT, "PIT channel 0 count {:#x}", s.pit.channels[0].count);
    anyhow::ensure!(pic_imr(s) == PIC_MASTER_IMR, "master PIC IMR {:#x}", pic_imr(s));
    anyhow::ensure!(ioapic_redir4(s) == IOAPIC_REDIR4, "IOAPIC entry 4 {:#x}", ioapic_redir4(s));
    anyhow::ensure!(s.clock.clock >= CLOCK_NS, "kvmclock {} ns", s.clock.clock);
    Ok(())
}

fn msr_value(s: &VcpuState, index: u32) -> Option<u64> {
    s.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// The captured state holds what `make_distinctive` set: the capture reads what it claims.
fn check_distinctive(s: &VcpuState, index: u8) -> anyhow::Result<()> {
    anyhow::ensure!(s.regs.rax == RAX + u64::from(index) && s.regs.r15 == R15, "regs: {:x?}", s.regs);
    anyhow::ensure!(s.sregs.cr2 == CR2, "cr2 {:#x}", s.sregs.cr2);
    // XSAVE legacy area: FCW at byte 0, XMM0 at byte 160; the FPU view agrees.
    anyhow::ensure!(s.xsave[0] & 0xffff == 0x27f, "XSAVE FCW {:#x}", s.xsave[0] & 0xffff);
    anyhow::ensure!(s.fpu.fcw == 0x27f && s.fpu.xmm[0] == XMM0, "FPU fcw {:#x} xmm0 {:x?}", s.fpu.fcw, s.fpu.xmm[0]);
    let xmm0: Vec<u8> = s.xsave[40..44].iter().flat_map(|w| w.to_le_bytes()).collect();
    anyhow::ensure!(xmm0 == XMM0, "XSAVE XMM0 {xmm0:x?}");
    for (msr, want) in [
        (msr::MSR_LSTAR, LSTAR),
        (msr::MSR_STAR, STAR),
        (msr::MSR_SYSCALL_MASK, SYSCALL_MASK),
        (msr::MSR_KERNEL_GS_BASE, KERNEL_GS_BASE),
        (msr::MSR_IA32_SYSENTER_ESP, SYSENTER_ESP),
        (msr::MSR_IA32_CR_PAT, PAT),
    ] {
        anyhow::ensure!(msr_value(s, msr) == Some(want), "MSR {msr:#x} is {:x?}, want {want:#x}", msr_value(s, msr));
    }
    for (off, want) in [LAPIC_TPR, LAPIC_LVT_TIMER] {
        anyhow::ensure!(lapic_reg(&s.lapic, off) == want, "LAPIC {off:#x} is {:#x}", lapic_reg(&s.lapic, off));
    }
    anyhow::ensure!(s.debugregs.db[0] == DR0 && s.debugregs.dr7 & 0xff == DR7 & 0xff, "debug regs {:x?}", s.debugregs);
    Ok(())
}

/// `before` (captured from the original) against `after` (captured from the restored
/// vCPU): equal but for the TSC, which runs on between the two captures.
fn compare_vcpu(index: usize, before: &VcpuState, after: &VcpuState) -> anyhow::Result<()> {
    let what = |field: &str| format!("vCPU {index}: {field} differs after the restore");
    anyhow::ensure!(before.cpuid == after.cpuid, what("CPUID"));
    anyhow::ensure!(before.tsc_khz == after.tsc_khz, "{}: {} vs {}", what("TSC kHz"), before.tsc_khz, after.tsc_khz);
    anyhow::ensure!(
        before.mp_state == after.mp_state,
        "{}: {:?} vs {:?}",
        what("MP state"),
        before.mp_state,
        after.mp_state
    );
    anyhow::ensure!(before.regs == after.regs, "{}: {:x?} vs {:x?}", what("regs"), before.regs, after.regs);
    anyhow::ensure!(before.sregs == after.sregs, "{}: {:x?} vs {:x?}", what("sregs"), before.sregs, after.sregs);
    anyhow::ensure!(before.fpu == after.fpu, "{}: {:x?} vs {:x?}", what("FPU"), before.fpu, after.fpu);
    if before.xsave != after.xsave {
        let i = before.xsave.iter().zip(after.xsave.iter()).position(|(a, b)| a != b).unwrap_or(0);
        bail!("{}: first at word {i}: {:#x} vs {:#x}", what("XSAVE"), before.xsave[i], after.xsave[i]);
    }
    anyhow::ensure!(before.xcrs == after.xcrs, "{}: {:x?} vs {:x?}", what("XCRs"), before.xcrs, after.xcrs);
    let tsc = |s: &VcpuState| msr_value(s, msr::MSR_IA32_TSC).unwrap_or(0);
    let strip_tsc = |s: &VcpuState| -> Vec<(u32, u64)> {
        s.msrs.iter().filter(|m| m.index != msr::MSR_IA32_TSC).map(|m| (m.index, m.data)).collect()
    };
    let (b, a) = (strip_tsc(before), strip_tsc(after));
    if b != a {
        let diff: Vec<String> = b
            .iter()
            .zip(a.iter())
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("{:#x}: {:#x} vs {:#x}", x.0, x.1, y.1))
            .collect();
        bail!("{}: {} vs {} MSRs; {}", what("MSRs"), b.len(), a.len(), diff.join(", "));
    }
    // The TSC went on from the saved value: not backwards, and not by more than a minute
    // of a 10 GHz clock (a restore that left the fresh vCPU's TSC would be far off).
    let (t0, t1) = (tsc(before), tsc(after));
    anyhow::ensure!(t1 >= t0 && t1 - t0 < 600_000_000_000, "{}: {t0} then {t1}", what("TSC"));
    if before.lapic != after.lapic {
        let i = (0..1024).step_by(16).find(|&o| lapic_reg(&before.lapic, o) != lapic_reg(&after.lapic, o)).unwrap_or(0);
        bail!(
            "{}: register {i:#x}: {:#x} vs {:#x}",
            what("LAPIC"),
            lapic_reg(&before.lapic, i),
            lapic_reg(&after.lapic, i)
        );
    }
    anyhow::ensure!(
        before.debugregs == after.debugregs,
        "{}: {:x?} vs {:x?}",
        what("debug registers"),
        before.debugregs,
        after.debugregs
    );
    anyhow::ensure!(before.events == after.events, "{}: {:x?} vs {:x?}", what("events"), before.events, after.events);
    Ok(())
}

/// Irqchips and PIT equal but for the PIT's load timestamps (host time); the kvmclock
/// goes on from the saved value.
fn compare_vm(before: &VmState, after: &VmState) -> anyhow::Result<()> {
    let chip_bytes = |s: &VmState| {
        let mut s = *s;
        s.pit.channels.iter_mut().for_each(|c| c.count_load_time = 0);
        s.clock = Default::default();
        s.to_bytes()
    };
    anyhow::ensure!(chip_bytes(before) == chip_bytes(after), "the irqchips or the PIT differ after the restore");
    let (c0, c1) = (before.clock.clock, after.clock.clock);
    anyhow::ensure!(c1 >= c0 && c1 - c0 < 60_000_000_000, "kvmclock {c0} ns before, {c1} ns after the restore");
    Ok(())
}

fn config() -> VmIdentity {
    VmIdentity::new([("vcpus", VCPUS.to_string()), ("memory_mib", (MEM_BYTES >> 20).to_string())]).unwrap()
}

fn vcpu_and_vm_state_survive_a_restore_into_a_fresh_vm() -> CaseResult {
    skip_unless!(need_kvm());
    let kvm = Kvm::new()?;
    if let Err(e) = VmState::probe(&kvm) {
        return Ok(unsupported("save the VM state", &e));
    }
    // The original: set up as for a cold boot, then given distinctive values.
    let vm = Vm::new(MEM_BYTES).context("creating the VM")?;
    let entry = EntryPoint::Linux64 { entry: 0x100_0000, zero_page: 0x7000 };
    let mut vcpus = Vec::new();
    for i in 0..VCPUS {
        let vcpu = Vcpu::new(&vm.fd, i)?;
        vcpu.configure(&vm.mem, &vm.supported_cpuid, VCPUS, vm.tsc_deadline, (i == 0).then_some(entry))?;
        if let Err(e) = make_distinctive(vcpu.fd(), i) {
            return Ok(unsupported("set the test's vCPU values", &format!("{e:#}")));
        }
        vcpus.push(vcpu);
    }
    let support = match VcpuStateSupport::probe(&kvm, vcpus[0].fd()) {
        Ok(s) => s,
        Err(e @ (VcpuStateError::MissingCap(_) | VcpuStateError::XsaveTooLarge(_))) => {
            return Ok(unsupported("save vCPU state", &e))
        }
        Err(e) => return Err(e.into()),
    };
    println!("saving {} MSRs: {:x?}", support.msrs().len(), support.msrs());
    let mut states = Vec::new();
    for (i, vcpu) in vcpus.iter().enumerate() {
        let state = match VcpuState::capture(vcpu.fd(), &support) {
            Ok(s) => s,
            Err(e) if vcpu_unsupported(&e) => return Ok(unsupported(&format!("capture vCPU {i}"), &e)),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("capturing vCPU {i}"))),
        };
        check_distinctive(&state, i as u8).with_context(|| format!("vCPU {i} as captured"))?;
        states.push(state);
    }
    if let Err(e) = make_vm_distinctive(&vm) {
        return Ok(unsupported("set the test's VM values", &format!("{e:#}")));
    }
    let vm_state = match VmState::capture(&vm.fd) {
        Ok(s) => s,
        Err(e) if vm_unsupported(&e) => return Ok(unsupported("capture the VM state", &e)),
        Err(e) => return Err(anyhow::Error::new(e).context("capturing the VM state")),
    };
    check_vm_distinctive(&vm_state).context("the VM state as captured")?;

    // Through a file and the header checks.
    let here = Header::this_host(&vm.supported_cpuid, vm.tsc_deadline, config())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vm.snap");
    // Guest memory: a page the guest wrote, saved to its own file.
    vm.mem.write_slice(GUEST_PAGE, GuestAddress(GUEST_PAGE_AT))?;
    let mem_path = dir.path().join("vm.mem");
    let memory = save_memory(&vm.mem, &mem_path)?;
    let legacy = LegacyState::default();
    Snapshot { header: here.clone(), vm: vm_state, memory, vcpus: states, devices: Vec::new(), legacy }.save(&path)?;
    let loaded = Snapshot::load(&path, &here)?;
    println!("snapshot of {} vCPUs: {} bytes", loaded.vcpus.len(), std::fs::metadata(&path)?.len());

    // A fresh VM on the memory file mapped copy-on-write, its vCPUs created but never
    // configured: everything they end up with comes from the snapshot.
    let mapped = map_memory(&mem_path, &loaded.memory)?;
    let fresh = Vm::with_memory(MEM_BYTES, mapped).context("creating the second VM")?;
    let mut page = vec![0u8; GUEST_PAGE.len()];
    fresh.mem.read_slice(&mut page, GuestAddress(GUEST_PAGE_AT))?;
    anyhow::ensure!(page == GUEST_PAGE, "the restored guest memory lacks the page the original wrote");
    fresh.mem.write_slice(b"the restored VM's own", GuestAddress(GUEST_PAGE_AT))?;
    let on_disk = std::fs::read(&mem_path)?;
    let at = GUEST_PAGE_AT as usize;
    anyhow::ensure!(&on_disk[at..at + GUEST_PAGE.len()] == GUEST_PAGE, "a restored VM's write reached the memory file");
    match loaded.vm.restore(&fresh.fd) {
        Err(e) if vm_unsupported(&e) => return Ok(unsupported("restore the VM state", &e)),
        r => r.context("restoring the VM state")?,
    }
    let mut restored = Vec::new();
    for (i, state) in loaded.vcpus.iter().enumerate() {
        let vcpu = Vcpu::new(&fresh.fd, i as u8)?;
        match state.restore(vcpu.fd()) {
            Err(e) if vcpu_unsupported(&e) => return Ok(unsupported(&format!("restore vCPU {i}"), &e)),
            r => r.with_context(|| format!("restoring vCPU {i}"))?,
        }
        restored.push(vcpu);
    }

    for (i, vcpu) in restored.iter().enumerate() {
        let after = VcpuState::capture(vcpu.fd(), &support).with_context(|| format!("capturing restored vCPU {i}"))?;
        compare_vcpu(i, &loaded.vcpus[i], &after)?;
        check_distinctive(&after, i as u8).with_context(|| format!("restored vCPU {i}"))?;
    }
    let after = VmState::capture(&fresh.fd)?;
    compare_vm(&loaded.vm, &after)?;
    check_vm_distinctive(&after).context("the restored VM state")?;
    Ok(Outcome::Passed)
}

/// A snapshot's header made here is restorable here, and one claiming another kernel
/// is refused by `Snapshot::load` with both kernels named.
fn this_host_accepts_its_own_header_only() -> CaseResult {
    skip_unless!(need_kvm());
    let vm = Vm::new(MEM_BYTES).context("creating the VM")?;
    let here = Header::this_host(&vm.supported_cpuid, vm.tsc_deadline, config())?;
    here.check_restorable(&Header::this_host(&vm.supported_cpuid, vm.tsc_deadline, config())?)?;
    let mut other = here.clone();
    other.host_kernel = "0.0.1-elsewhere".into();
    let msg = other.check_restorable(&here).unwrap_err().to_string();
    let want = format!("snapshot made on kernel 0.0.1-elsewhere, this host runs {}", here.host_kernel);
    anyhow::ensure!(msg == want, "{msg}");
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("snapshot_kvm")
        .case(
            "vcpu_and_vm_state_survive_a_restore_into_a_fresh_vm",
            vcpu_and_vm_state_survive_a_restore_into_a_fresh_vm,
        )
        .case("this_host_accepts_its_own_header_only", this_host_accepts_its_own_header_only)
        .run()
}
