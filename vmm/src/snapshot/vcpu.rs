//! The KVM state of one vCPU: captured from a `VcpuFd` that is not running (its
//! thread parked, every vCPU of the VM paused), restored into a fresh one of a VM set
//! up the same way, and encoded for the snapshot file.
//!
//! Capture order (KVM's side effects): MP state first, because KVM_GET_MP_STATE lets
//! the LAPIC accept pending INIT/SIPI events, which changes the vCPU and LAPIC state
//! read after it; vcpu events last, because the other reads can change what is
//! pending.
//!
//! Restore order: TSC frequency and CPUID first (MSR writes are checked against the
//! CPUID; KVM fixes CPUID at the first KVM_RUN); registers; special registers before
//! anything that depends on the mode, APIC base or EFER they set; FPU then XSAVE (the
//! XSAVE area is the complete FPU/SSE/AVX state and wins); XCRs; the MSRs but the
//! TSC deadline; the LAPIC (after the APIC base is set); the TSC deadline only then,
//! because KVM ignores it unless the LAPIC timer is in TSC-deadline mode; debug
//! registers; MP state; vcpu events last, so pending exceptions, interrupts and NMIs
//! are not overwritten by the restores before them.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::codec::{FieldError, Reader, Writer};
use super::kvm_structs::*;
use crate::arch::msr::{guest_state_msrs, MSR_IA32_TSC_DEADLINE};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM lacks {0}, which saving and restoring vCPU state needs")]
    MissingCap(&'static str),
    #[error(
        "this host's KVM needs {0} bytes for a vCPU's XSAVE state (dynamically enabled features such as AMX); \
         wisp snapshots hold the 4096-byte legacy area"
    )]
    XsaveTooLarge(i32),
    #[error("listing the MSRs KVM saves (KVM_GET_MSR_INDEX_LIST): {0}")]
    MsrList(kvm_ioctls::Error),
    #[error("reading the vCPU's {what}: {source}")]
    Get { what: &'static str, source: kvm_ioctls::Error },
    #[error("restoring the vCPU's {what}: {source}")]
    Set { what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM {verb} {done} of {want} MSRs; MSR {failed:#x} failed")]
    PartialMsrs { verb: &'static str, done: usize, want: usize, failed: u32 },
    #[error("building a KVM list of {what}: {reason}")]
    Build { what: &'static str, reason: String },
    #[error("the snapshot's vCPU ran at {saved} kHz, this vCPU runs at {here} kHz and KVM cannot change it: {source}")]
    TscKhz { saved: u32, here: u32, source: kvm_ioctls::Error },
}

/// What this host's KVM lets a snapshot save, probed once per VMM.
#[derive(Debug, Clone)]
pub struct VcpuStateSupport {
    msrs: Vec<u32>,
    tsc_khz: bool,
}

const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
];

impl VcpuStateSupport {
    /// Probes `kvm`, and `vcpu` (one with its CPUID set, as `Vcpu::configure` does,
    /// that has not run) for the MSRs KVM does not list: KVM_GET_MSR_INDEX_LIST leaves
    /// out some it emulates for every guest (the MTRRs, EFER, the APIC base), so an MSR
    /// of `guest_state_msrs` is saved when KVM lists it, or reads it on `vcpu` and takes
    /// the value back (some read but refuse any write from the VMM, e.g. IA32_XSS on
    /// hosts without supervisor XSAVE states: a restore could not write them).
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, VcpuStateError> {
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VcpuStateError::MissingCap(name));
            }
        }
        // KVM_CAP_XSAVE2 gives the XSAVE size KVM_GET/SET_XSAVE use (0 before Linux
        // 5.17: 4096). More than the legacy struct would make KVM_SET_XSAVE read past it.
        let xsave = kvm.check_extension_int(Cap::Xsave2);
        if xsave > (XSAVE_WORDS * 4) as i32 {
            return Err(VcpuStateError::XsaveTooLarge(xsave));
        }
        let listed = kvm.get_msr_index_list().map_err(VcpuStateError::MsrList)?;
        let listed = listed.as_slice();
        let round_trips = |index: u32| -> Result<bool, VcpuStateError> {
            let mut one = msr_list(&[kvm_msr_entry { index, ..Default::default() }])?;
            Ok(vcpu.get_msrs(&mut one).is_ok_and(|n| n == 1) && vcpu.set_msrs(&one).is_ok_and(|n| n == 1))
        };
        let mut msrs = Vec::new();
        for index in guest_state_msrs() {
            if listed.contains(&index) || round_trips(index)? {
                msrs.push(index);
            }
        }
        Ok(Self { msrs, tsc_khz: kvm.check_extension(Cap::GetTscKhz) })
    }

    /// The MSRs saved for each vCPU on this host.
    pub fn msrs(&self) -> &[u32] {
        &self.msrs
    }
}

/// One vCPU's state, as KVM reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuState {
    /// The CPUID table the guest saw on this vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency, 0 where KVM cannot report it.
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub xsave: Box<[u32; XSAVE_WORDS]>,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
}

fn get<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Get { what, source })
}

fn set<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Set { what, source })
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(entries).map_err(|e| VcpuStateError::Build { what: "MSRs", reason: format!("{e:?}") })
}

/// Writes `entries`; KVM stops at the first it refuses.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    if entries.is_empty() {
        return Ok(());
    }
    let done = set("MSRs", vcpu.set_msrs(&msr_list(entries)?))?;
    if done < entries.len() {
        let (want, failed) = (entries.len(), entries[done].index);
        return Err(VcpuStateError::PartialMsrs { verb: "wrote", done, want, failed });
    }
    Ok(())
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must not be running.
    pub fn capture(vcpu: &VcpuFd, support: &VcpuStateSupport) -> Result<Self, VcpuStateError> {
        let mp_state = get("MP state", vcpu.get_mp_state())?;
        let cpuid = get("CPUID", vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?.as_slice().to_vec();
        let tsc_khz = if support.tsc_khz { get("TSC frequency", vcpu.get_tsc_khz())? } else { 0 };
        let regs = get("registers", vcpu.get_regs())?;
        let sregs = get("special registers", vcpu.get_sregs())?;
        let fpu = get("FPU", vcpu.get_fpu())?;
        let xsave = Box::new(get("XSAVE area", vcpu.get_xsave())?.region);
        let xcrs = get("XCRs", vcpu.get_xcrs())?;
        let lapic = get("LAPIC", vcpu.get_lapic())?;
        let debugregs = get("debug registers", vcpu.get_debug_regs())?;
        let wanted: Vec<kvm_msr_entry> =
            support.msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut list = msr_list(&wanted)?;
        let done = get("MSRs", vcpu.get_msrs(&mut list))?;
        if done < wanted.len() {
            let (want, failed) = (wanted.len(), wanted[done].index);
            return Err(VcpuStateError::PartialMsrs { verb: "read", done, want, failed });
        }
        let msrs = list.as_slice().iter().map(|m| kvm_msr_entry { reserved: 0, ..*m }).collect();
        let events = get("pending events", vcpu.get_vcpu_events())?;
        Ok(Self { cpuid, tsc_khz, mp_state, regs, sregs, fpu, xsave, xcrs, msrs, lapic, debugregs, events })
    }

    /// Loads this state into `vcpu`, a vCPU of a VM set up as the snapshot's was (same
    /// memory layout, in-kernel irqchip and PIT) that has not run, or not since.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        if self.tsc_khz != 0 {
            // Where KVM cannot report the frequency it cannot set it either.
            if let Ok(here) = vcpu.get_tsc_khz() {
                if here != self.tsc_khz {
                    vcpu.set_tsc_khz(self.tsc_khz).map_err(|source| VcpuStateError::TscKhz {
                        saved: self.tsc_khz,
                        here,
                        source,
                    })?;
                }
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| VcpuStateError::Build { what: "CPUID entries", reason: format!("{e:?}") })?;
        set("CPUID", vcpu.set_cpuid2(&cpuid))?;
        set("registers", vcpu.set_regs(&self.regs))?;
        set("special registers", vcpu.set_sregs(&self.sregs))?;
        set("FPU", vcpu.set_fpu(&self.fpu))?;
        let xsave = kvm_xsave { region: *self.xsave, extra: Default::default() };
        // SAFETY: KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says, and
        // `VcpuStateSupport::probe` refused hosts where that exceeds this 4096-byte struct
        // (wisp-vmm never enables dynamic XSAVE features for its guests).
        set("XSAVE area", unsafe { vcpu.set_xsave(&xsave) })?;
        set("XCRs", vcpu.set_xcrs(&self.xcrs))?;
        let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
            self.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        set_msrs(vcpu, &others)?;
        set("LAPIC", vcpu.set_lapic(&self.lapic))?;
        set_msrs(vcpu, &deadline)?;
        set("debug registers", vcpu.set_debug_regs(&self.debugregs))?;
        set("MP state", vcpu.set_mp_state(self.mp_state))?;
        set("pending events", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }

    /// The section payload: the fields in declaration order (`kvm_structs` layouts).
    pub fn encode(&self, w: &mut Writer) {
        put_cpuid(w, &self.cpuid);
        w.u32(self.tsc_khz);
        put_mp_state(w, &self.mp_state);
        put_regs(w, &self.regs);
        put_sregs(w, &self.sregs);
        put_fpu(w, &self.fpu);
        put_xsave(w, &self.xsave);
        put_xcrs(w, &self.xcrs);
        put_msrs(w, &self.msrs);
        put_lapic(w, &self.lapic);
        put_debugregs(w, &self.debugregs);
        put_events(w, &self.events);
    }

    pub fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        Ok(Self {
            cpuid: get_cpuid(r, "vCPU CPUID")?,
            tsc_khz: r.u32("TSC frequency")?,
            mp_state: get_mp_state(r)?,
            regs: get_regs(r)?,
            sregs: get_sregs(r)?,
            fpu: get_fpu(r)?,
            xsave: get_xsave(r)?,
            xcrs: get_xcrs(r)?,
            msrs: get_msrs(r)?,
            lapic: get_lapic(r)?,
            debugregs: get_debugregs(r)?,
            events: get_events(r)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot::kvm_structs::tests::{random, random_sregs, Rand};

    /// A state with random values everywhere the encoding stores something.
    pub fn sample(seed: u64) -> VcpuState {
        let mut rand = Rand::new(seed);
        let sregs = random_sregs(&mut rand);
        let mut xcrs: kvm_xcrs = random(&mut rand);
        xcrs.nr_xcrs = 1;
        xcrs.padding = [0; 16];
        xcrs.xcrs.iter_mut().for_each(|x| x.reserved = 0);
        let mut xsave = Box::new([0u32; XSAVE_WORDS]);
        xsave.iter_mut().for_each(|w| *w = rand.next() as u32);
        VcpuState {
            cpuid: (0..20u32)
                .map(|function| kvm_cpuid_entry2 { function, padding: [0; 3], ..random(&mut rand) })
                .collect(),
            tsc_khz: 2_000_000,
            mp_state: kvm_mp_state { mp_state: 0 },
            regs: random(&mut rand),
            sregs,
            fpu: kvm_fpu { pad1: 0, pad2: 0, ..random(&mut rand) },
            xsave,
            xcrs,
            msrs: guest_state_msrs().map(|index| kvm_msr_entry { index, reserved: 0, data: rand.next() }).collect(),
            lapic: random(&mut rand),
            debugregs: kvm_debugregs { reserved: [0; 9], ..random(&mut rand) },
            events: {
                let mut e: kvm_vcpu_events = random(&mut rand);
                e.nmi.pad = 0;
                e.reserved = [0; 26];
                e
            },
        }
    }

    #[test]
    fn vcpu_state_round_trips_byte_for_byte() {
        for seed in 1..20 {
            let state = sample(seed);
            let mut w = Writer::new();
            state.encode(&mut w);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            let back = VcpuState::decode(&mut r).unwrap();
            r.finish().unwrap();
            assert_eq!(back, state);
            let mut w = Writer::new();
            back.encode(&mut w);
            assert_eq!(w.into_bytes(), bytes);
        }
    }

    #[test]
    fn a_truncated_vcpu_state_names_what_is_missing() {
        let mut w = Writer::new();
        sample(3).encode(&mut w);
        let bytes = w.into_bytes();
        for cut in [0, 1, 100, bytes.len() / 2, bytes.len() - 1] {
            let e = VcpuState::decode(&mut Reader::new(&bytes[..cut])).unwrap_err();
            assert!(matches!(e, FieldError::Truncated { .. }), "cut at {cut}: {e}");
        }
    }
}
