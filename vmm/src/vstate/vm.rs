//! Opening KVM, creating the VM, registering guest memory and the in-kernel irqchip
//! (PIC + IOAPIC + LAPICs) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability wisp needs: {0}")]
    MissingCap(&'static str),
    #[error("creating the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("guest memory of {mib} MiB must have the regions {want:x?}, this has {have:x?}")]
    MemoryLayout { mib: u64, want: Vec<(u64, u64)>, have: Vec<(u64, u64)> },
    #[error("registering guest memory with KVM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("setting up the in-kernel interrupt controllers: {0}")]
    Irqchip(kvm_ioctls::Error),
    #[error("reading the CPUID KVM supports: {0}")]
    Cpuid(kvm_ioctls::Error),
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
    pub mem_bytes: u64,
    pub supported_cpuid: CpuId,
    pub tsc_deadline: bool,
}

const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

impl Vm {
    /// Creates a VM with `mem_bytes` of lazily allocated guest memory (nothing is
    /// touched until the guest uses it) and the in-kernel irqchip and PIT.
    pub fn new(mem_bytes: u64) -> Result<Self, VmError> {
        let ranges: Vec<(GuestAddress, usize)> =
            layout::ram_regions(mem_bytes).into_iter().map(|(a, l)| (GuestAddress(a), l as usize)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| VmError::Memory { mib: mem_bytes >> 20, reason: e.to_string() })?;
        Self::with_memory(mem_bytes, mem)
    }

    /// Creates a VM on guest memory made elsewhere (a snapshot's memory file mapped by
    /// `snapshot::memory::map_memory`), which must have exactly the RAM regions the
    /// layout gives `mem_bytes`.
    pub fn with_memory(mem_bytes: u64, mem: GuestMemoryMmap) -> Result<Self, VmError> {
        let have: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
        let want = layout::ram_regions(mem_bytes);
        if have != want {
            return Err(VmError::MemoryLayout { mib: mem_bytes >> 20, want, have });
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VmError::Cpuid)?;

        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps
            // for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(VmError::SetMemory)?;
        }

        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize).map_err(VmError::Irqchip)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS).map_err(VmError::Irqchip)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(VmError::Irqchip)?;

        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self { kvm, fd, mem, mem_bytes, supported_cpuid, tsc_deadline })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_laid_out_otherwise_than_the_layout_is_refused_before_kvm_is_opened() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let e = Vm::with_memory(16 << 20, mem).err().expect("refused").to_string();
        assert_eq!(e, "guest memory of 16 MiB must have the regions [(0, 1000000)], this has [(0, 800000)]");
    }
}
