//! CPUID for each vCPU: what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`),
//! with the topology fields the guest reads its APIC ID and CPU count from filled in
//! per vCPU, and the hypervisor bit set so the guest uses kvmclock and PV features.

use kvm_bindings::CpuId;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (a copy of the supported set) for vCPU `index` of `count`.
/// `tsc_deadline`: KVM emulates the LAPIC TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER);
/// KVM_GET_SUPPORTED_CPUID does not report it, so it is set here. Without it the guest
/// calibrates the LAPIC timer against the PIT, which is slow and fails under nesting.
pub fn filter_for_vcpu(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x1 => {
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Extended topology: the x2APIC ID of this vCPU in EDX of every sub-leaf.
            0xb | 0x1f => e.edx = u32::from(index),
            // AMD extended APIC ID.
            0x8000_001e => e.eax = u32::from(index),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_count_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, edx: 7, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_001e, eax: 9, ..Default::default() },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_for_vcpu(&mut cpuid, 3, 4, true);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx, (3 << 24) | (4 << 16) | 0x0800);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].eax, 3);
    }
}
