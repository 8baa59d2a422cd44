//! The VM-wide KVM state: the in-kernel interrupt controllers (both PICs and the
//! IOAPIC), the PIT, and the kvmclock. Captured while every vCPU is paused, restored
//! into a fresh VM that `vstate::vm::Vm::new` set up (irqchip and PIT created) before
//! any of its vCPUs runs.
//!
//! The clock: KVM_GET_CLOCK reports the guest's kvmclock (nanoseconds since the VM
//! began) with flags and host timestamps. A restore sets the saved value with no flags,
//! so the guest's monotonic clock goes on from where it was saved and does not jump by
//! the time the snapshot waited (KVM_CLOCK_REALTIME would add it); the guest's wall
//! clock is then stale until someone sets it (the agent does after a restore).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::codec::{FieldError, Reader, Writer};
use super::kvm_structs::{get_clock, get_irqchip, get_pit, put_clock, put_irqchip, put_pit};

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("KVM lacks {0}, which saving and restoring the VM's clock needs")]
    MissingCap(&'static str),
    #[error("reading the VM's {what}: {source}")]
    Get { what: &'static str, source: kvm_ioctls::Error },
    #[error("restoring the VM's {what}: {source}")]
    Set { what: &'static str, source: kvm_ioctls::Error },
}

/// The in-kernel devices' state and the clock.
#[derive(Clone, Copy)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip is a union without Debug: the PIT and clock say enough.
        f.debug_struct("VmState").field("pit", &self.pit).field("clock", &self.clock).finish_non_exhaustive()
    }
}

/// The irqchip ids in the order the section stores them.
const CHIPS: [(u32, &str); 3] =
    [(KVM_IRQCHIP_PIC_MASTER, "master PIC"), (KVM_IRQCHIP_PIC_SLAVE, "slave PIC"), (KVM_IRQCHIP_IOAPIC, "IOAPIC")];

fn get<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmStateError> {
    r.map_err(|source| VmStateError::Get { what, source })
}

fn set<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmStateError> {
    r.map_err(|source| VmStateError::Set { what, source })
}

impl VmState {
    /// Whether this host's KVM can save and restore the clock (the irqchip and PIT
    /// ioctls come with the capabilities `Vm::new` requires).
    pub fn probe(kvm: &Kvm) -> Result<(), VmStateError> {
        if !kvm.check_extension(Cap::AdjustClock) {
            return Err(VmStateError::MissingCap("KVM_CAP_ADJUST_CLOCK"));
        }
        Ok(())
    }

    /// Reads the state of `vm`, whose vCPUs must all be paused.
    pub fn capture(vm: &VmFd) -> Result<Self, VmStateError> {
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, (id, what)) in chips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            get(what, vm.get_irqchip(chip))?;
        }
        let [pic_master, pic_slave, ioapic] = chips;
        let pit = get("PIT", vm.get_pit2())?;
        let clock = get("kvmclock", vm.get_clock())?;
        Ok(Self { pic_master, pic_slave, ioapic, pit, clock })
    }

    /// Loads this state into `vm`, a VM with the in-kernel irqchip and PIT whose vCPUs
    /// have not run yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        set("PIT", vm.set_pit2(&self.pit))?;
        for (chip, (_, what)) in [&self.pic_master, &self.pic_slave, &self.ioapic].into_iter().zip(CHIPS) {
            set(what, vm.set_irqchip(chip))?;
        }
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        set("kvmclock", vm.set_clock(&clock))?;
        Ok(())
    }

    pub fn encode(&self, w: &mut Writer) {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            put_irqchip(w, chip);
        }
        put_pit(w, &self.pit);
        put_clock(w, &self.clock);
    }

    pub fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, (id, _)) in chips.iter_mut().zip(CHIPS) {
            *chip = get_irqchip(r)?;
            if chip.chip_id != id {
                return Err(FieldError::Invalid { what: "irqchip id", value: u64::from(chip.chip_id) });
            }
        }
        let [pic_master, pic_slave, ioapic] = chips;
        Ok(Self { pic_master, pic_slave, ioapic, pit: get_pit(r)?, clock: get_clock(r)? })
    }

    /// The encoded form, for comparisons (kvm_irqchip has no PartialEq).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode(&mut w);
        w.into_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot::kvm_structs::tests::{random, Rand};

    pub fn sample(seed: u64) -> VmState {
        let mut rand = Rand::new(seed);
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, (id, _)) in chips.iter_mut().zip(CHIPS) {
            *chip = random(&mut rand);
            chip.chip_id = id;
            chip.pad = 0;
        }
        let [pic_master, pic_slave, ioapic] = chips;
        let mut pit: kvm_pit_state2 = random(&mut rand);
        pit.reserved = [0; 9];
        let mut clock: kvm_clock_data = random(&mut rand);
        clock.pad0 = 0;
        clock.pad = [0; 4];
        VmState { pic_master, pic_slave, ioapic, pit, clock }
    }

    #[test]
    fn vm_state_round_trips_byte_for_byte() {
        let state = sample(9);
        let bytes = state.to_bytes();
        let mut r = Reader::new(&bytes);
        let back = VmState::decode(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!((back.pit, back.clock), (state.pit, state.clock));
    }

    #[test]
    fn chips_out_of_order_are_refused() {
        let mut state = sample(9);
        std::mem::swap(&mut state.pic_master, &mut state.ioapic);
        let bytes = state.to_bytes();
        let e = VmState::decode(&mut Reader::new(&bytes)).unwrap_err();
        assert_eq!(e, FieldError::Invalid { what: "irqchip id", value: u64::from(KVM_IRQCHIP_IOAPIC) });
    }
}
