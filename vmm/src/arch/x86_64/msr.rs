//! Model-specific registers a vCPU starts with: syscall and sysenter MSRs cleared,
//! the TSC at zero, fast string operations enabled.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

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
