//! Initial vCPU register state for the two boot protocols, the boot GDT and the
//! identity page tables the 64-bit protocol needs.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment_from_gdt, GDT_LONG_MODE, GDT_PVH};
use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("setting vCPU registers: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// How the guest kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `rbx` = start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode with identity paging, `rsi` = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu)?;
    Ok(())
}

pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let regs = match entry {
        EntryPoint::Pvh { entry, start_info } => kvm_regs { rflags: 0x2, rip: entry, rbx: start_info, ..Default::default() },
        EntryPoint::Linux64 { entry, zero_page } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Writes the GDT (and an empty IDT) for `entry`'s protocol and loads the segment
/// and control registers. Only the boot vCPU needs this; the others start through
/// INIT/SIPI from the guest.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    let gdt = match entry {
        EntryPoint::Pvh { .. } => &GDT_PVH,
        EntryPoint::Linux64 { .. } => &GDT_LONG_MODE,
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i * 8) as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64 { .. } => {
            setup_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs)?;
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the 64-bit entry code,
/// which builds its own page tables right away.
fn setup_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}
