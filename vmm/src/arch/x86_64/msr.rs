//! Model-specific registers a vCPU starts with: syscall and sysenter MSRs cleared,
//! the TSC at zero, fast string operations enabled; and the MSRs that make up a
//! vCPU's state in a snapshot (`guest_state_msrs`).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
pub const MSR_IA32_APICBASE: u32 = 0x1b;
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
pub const MSR_IA32_SPEC_CTRL: u32 = 0x48;
pub const MSR_IA32_CR_PAT: u32 = 0x277;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_IA32_XSS: u32 = 0xda0;
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
pub const MSR_KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

/// The MTRRs: the variable ranges' base/mask pairs, the fixed ranges, the default type.
const MTRR_VARIABLE: std::ops::Range<u32> = 0x200..0x210;
const MTRR_FIXED: [u32; 11] = [0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];

/// The MSRs a snapshot saves for each vCPU: those `setup_msrs` sets, and those a Linux
/// guest sets while it runs (syscall entry, PAT, MTRRs, the TSC-deadline timer, the
/// kvmclock and other paravirtual MSRs). FS/GS base live in the segment registers.
/// A snapshot keeps only those KVM lists (KVM_GET_MSR_INDEX_LIST) on the host.
pub fn guest_state_msrs() -> impl Iterator<Item = u32> {
    let named = [
        MSR_IA32_TSC,
        MSR_IA32_APICBASE,
        MSR_IA32_TSC_ADJUST,
        MSR_IA32_SPEC_CTRL,
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_IA32_MISC_ENABLE,
        MSR_MTRR_DEF_TYPE,
        MSR_IA32_CR_PAT,
        MSR_IA32_TSC_DEADLINE,
        MSR_IA32_XSS,
        MSR_EFER,
        MSR_STAR,
        MSR_LSTAR,
        MSR_CSTAR,
        MSR_SYSCALL_MASK,
        MSR_KERNEL_GS_BASE,
        MSR_TSC_AUX,
        MSR_KVM_WALL_CLOCK,
        MSR_KVM_SYSTEM_TIME,
        MSR_KVM_WALL_CLOCK_NEW,
        MSR_KVM_SYSTEM_TIME_NEW,
        MSR_KVM_ASYNC_PF_EN,
        MSR_KVM_STEAL_TIME,
        MSR_KVM_PV_EOI_EN,
        MSR_KVM_POLL_CONTROL,
        MSR_KVM_ASYNC_PF_INT,
    ];
    named.into_iter().chain(MTRR_VARIABLE).chain(MTRR_FIXED)
}

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("building the MSR list: {0}")]
    Build(String),
    #[error("setting boot MSRs: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {want} boot MSRs")]
    Partial { set: usize, want: usize },
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| MsrError::Build(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs)?;
    if set != entries.len() {
        return Err(MsrError::Partial { set, want: entries.len() });
    }
    Ok(())
}
