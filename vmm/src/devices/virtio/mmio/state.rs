//! A transport's state for a snapshot (`save_state`) and a fresh transport made from it
//! (`restore`); the state and its encoding are `snapshot::transport`'s.
//!
//! Trust: the state comes from a snapshot file, which `snapshot` treats as hostile (a
//! guest may have owned the VMM that wrote it). `restore` checks it as the transport
//! checks a driver's writes: a status no driver can reach, interrupt bits that do not
//! exist, accepted features that are not offered, and queues outside guest memory or of
//! a bad size are refused with an error naming the device and the field. The device model is activated only with
//! queues that passed the same checks as at DRIVER_OK.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::{
    lock, MmioError, MmioTransport, ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::devices::virtio::{QueuePosition, QueueT, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::snapshot::{QueueState, TransportState};

#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("device type {device_type} cannot be snapshotted now: {reason}")]
    NotSnapshottable { device_type: u32, reason: String },
    #[error("device type {device_type} gave {got} queue positions for its {want} ready queues")]
    PositionCount { device_type: u32, got: usize, want: usize },
    #[error("the saved transport is of device type {saved}, this one is of device type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("device type {device_type}: the saved transport has {saved} queues, the device has {here}")]
    QueueCount { device_type: u32, saved: usize, here: usize },
    #[error("device type {device_type}: saved status {status:#x} is not one a driver can reach")]
    Status { device_type: u32, status: u32 },
    #[error("device type {device_type}: saved interrupt status {status:#x} has bits other than used-buffer (1) and configuration (2)")]
    InterruptStatus { device_type: u32, status: u32 },
    #[error("device type {device_type}: saved driver features {features:#x} were accepted, but {unknown:#x} of them are not offered here or VERSION_1 is missing")]
    Features { device_type: u32, features: u64, unknown: u64 },
    #[error("device type {device_type}: restoring the queues: {source}")]
    Queues { device_type: u32, source: MmioError },
    #[error("device type {device_type}: re-raising the saved interrupt: {source}")]
    Interrupt { device_type: u32, source: std::io::Error },
    #[error(transparent)]
    Transport(#[from] MmioError),
}

/// The status values a driver can leave: the bits of the initialisation sequence in order
/// (spec 3.1.1), FAILED on top of any of them, NEEDS_RESET (the transport's) only once
/// DRIVER_OK was set.
fn reachable(status: u32) -> bool {
    let base = status & !(FAILED | NEEDS_RESET);
    let chain = [0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK];
    let in_chain = chain.contains(&base) || base == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    in_chain && (status & NEEDS_RESET == 0 || base & DRIVER_OK != 0)
}

impl MmioTransport {
    /// The transport's registers and its queues, with the device model's place in each
    /// (read while the VM and its device thread are stopped).
    pub fn save_state(&self) -> Result<TransportState, TransportStateError> {
        let device_type = self.device_type;
        let ready = self.queues.iter().filter(|q| q.ready).count();
        let positions = {
            let device = lock(&self.device);
            if device.is_activated() {
                let positions = device
                    .queue_positions()
                    .map_err(|reason| TransportStateError::NotSnapshottable { device_type, reason })?;
                if positions.len() != ready {
                    return Err(TransportStateError::PositionCount { device_type, got: positions.len(), want: ready });
                }
                positions
            } else {
                Vec::new()
            }
        };
        // Activation needs the ready queues to be the first ones, so position i is queue i's.
        let mut positions = positions.into_iter();
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let at = q.ready.then(|| positions.next()).flatten();
                let at = at.unwrap_or(QueuePosition { next_avail: 0, next_used: 0 });
                QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: at.next_avail,
                    next_used: at.next_used,
                }
            })
            .collect();
        Ok(TransportState {
            device_type,
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            interrupt_status: self.interrupt.status(),
            reactivation_refused: self.reactivation_refused,
            queues,
        })
    }

    /// A transport for `device` in the state `state` saved: registers set, the accepted
    /// features acked, and, if the driver had the device running, the device model
    /// activated with its queues where they were. A pending interrupt is raised again
    /// (the guest may not have taken it before the snapshot).
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &TransportState,
    ) -> Result<Self, TransportStateError> {
        let mut t = Self::new(mem, device)?;
        let device_type = t.device_type;
        if state.device_type != device_type {
            return Err(TransportStateError::DeviceType { saved: state.device_type, here: device_type });
        }
        if state.queues.len() != t.queues.len() {
            let (saved, here) = (state.queues.len(), t.queues.len());
            return Err(TransportStateError::QueueCount { device_type, saved, here });
        }
        let status = state.device_status;
        if !reachable(status) {
            return Err(TransportStateError::Status { device_type, status });
        }
        if state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(TransportStateError::InterruptStatus { device_type, status: state.interrupt_status });
        }
        let features = state.driver_features;
        if status & FEATURES_OK != 0 {
            let unknown = features & !t.offered_features;
            if unknown != 0 || features & VIRTIO_F_VERSION_1 == 0 {
                return Err(TransportStateError::Features { device_type, features, unknown });
            }
        }

        t.device_status = status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = features;
        t.queue_sel = state.queue_sel;
        t.shm_sel = state.shm_sel;
        t.reactivation_refused = state.reactivation_refused;
        for (regs, saved) in t.queues.iter_mut().zip(&state.queues) {
            regs.size = saved.size;
            regs.ready = saved.ready;
            regs.desc_table = saved.desc_table;
            regs.avail_ring = saved.avail_ring;
            regs.used_ring = saved.used_ring;
        }
        if status & FEATURES_OK != 0 {
            lock(&t.device).set_acked_features(features);
        }
        let running = status & DRIVER_OK != 0 && status & NEEDS_RESET == 0 && !state.reactivation_refused;
        if running {
            let queues_err = |source| TransportStateError::Queues { device_type, source };
            let mut queues = t.build_queues().map_err(queues_err)?;
            // Any positions are accepted: a guest that corrupts its own ring can leave the
            // device with more entries taken than returned, and the queue code checks the
            // avail index against them on every pop, as it does before a snapshot.
            for (q, saved) in queues.iter_mut().zip(&state.queues) {
                q.set_next_avail(saved.next_avail);
                q.set_next_used(saved.next_used);
            }
            t.activate_with(queues).map_err(queues_err)?;
        }
        t.interrupt.status.store(state.interrupt_status, Ordering::SeqCst);
        if state.interrupt_status != 0 {
            t.interrupt.irq.write(1).map_err(|source| TransportStateError::Interrupt { device_type, source })?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_bindings::bindings::virtio_mmio::*;

    use super::super::tests::{rig, FakeDevice, Rig, FAKE_FEATURES};
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::test_utils::{guest_memory, GuestRing, DATA_BASE, WRITE};

    /// A rig with two queues (sizes 16 and 8 at 64 KiB and 128 KiB), running.
    fn running() -> Rig {
        let mut rig = rig(&[16, 8]);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.setup_good_queue(1, 8);
        rig.add_status(DRIVER_OK);
        assert_eq!(rig.fake.lock().unwrap().activated_with, Some(2));
        rig
    }

    fn restore_into(
        rig: &Rig,
        state: &TransportState,
    ) -> Result<(MmioTransport, Arc<Mutex<FakeDevice>>), TransportStateError> {
        let fake = Arc::new(Mutex::new(FakeDevice::new(&[16, 8])));
        let t = MmioTransport::restore(rig.mem.clone(), fake.clone(), state)?;
        Ok((t, fake))
    }

    #[test]
    fn a_running_transport_comes_back_running_where_its_queues_were() {
        let mut rig = running();
        // The device served three requests on queue 0 and took a fourth.
        {
            let mut fake = rig.fake.lock().unwrap();
            let q = &mut fake.queues[0];
            q.set_next_avail(4);
            q.set_next_used(3);
        }
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        crate::devices::virtio::Interrupt::trigger(
            &*rig.mmio.interrupt(),
            crate::devices::virtio::InterruptKind::Queue,
        )
        .unwrap();
        let state = rig.mmio.save_state().unwrap();
        assert_eq!(state.device_status, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(state.driver_features, FAKE_FEATURES);
        assert_eq!(state.queue_sel, 1);
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (4, 3));
        assert_eq!((state.queues[0].size, state.queues[1].size), (16, 8));

        let (mut t, fake) = restore_into(&rig, &state).unwrap();
        assert_eq!(t.save_state().unwrap(), state, "a restored transport saves the same state");
        let fake = fake.lock().unwrap();
        assert_eq!(fake.acked, Some(FAKE_FEATURES));
        assert_eq!(fake.activated_with, Some(2));
        assert_eq!((fake.queues[0].next_avail(), fake.queues[0].next_used()), (4, 3));
        assert_eq!(fake.queues[1].desc_table(), 0x1_0000);
        drop(fake);
        // The pending interrupt is raised again and still reads as pending.
        assert_eq!(t.irq_event().read().unwrap(), 1);
        let mut data = [0; 4];
        t.read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), &mut data);
        assert_eq!(u32::from_le_bytes(data), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn a_transport_the_driver_has_not_started_comes_back_not_started() {
        let mut rig = rig(&[16, 8]);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        let state = rig.mmio.save_state().unwrap();
        assert_eq!(state.device_status, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let (t, fake) = restore_into(&rig, &state).unwrap();
        assert_eq!(fake.lock().unwrap().activated_with, None);
        assert_eq!(t.irq_event().read().ok(), None, "no interrupt was pending");
        // The driver goes on from there: the second queue, then DRIVER_OK.
        let mut rig = Rig { mem: rig.mem.clone(), fake: fake.clone(), mmio: t };
        rig.setup_good_queue(1, 8);
        rig.add_status(DRIVER_OK);
        assert_eq!(fake.lock().unwrap().activated_with, Some(2));
    }

    #[test]
    fn a_device_that_cannot_be_snapshotted_while_running_says_so() {
        let rig = running();
        rig.fake.lock().unwrap().snapshottable = false;
        let err = rig.mmio.save_state().unwrap_err();
        assert!(matches!(err, TransportStateError::NotSnapshottable { device_type: 4, .. }), "{err}");
        assert_eq!(err.to_string(), "device type 4 cannot be snapshotted now: the fake holds a connection");
    }

    #[test]
    fn a_hostile_or_foreign_state_is_refused_naming_what_is_wrong() {
        let rig = running();
        let good = rig.mmio.save_state().unwrap();
        let refused = |edit: &dyn Fn(&mut TransportState)| {
            let mut s = good.clone();
            edit(&mut s);
            let err = restore_into(&rig, &s).map(|_| ()).unwrap_err();
            err.to_string()
        };
        assert!(refused(&|s| s.device_type = 19).contains("device type 19, this one is of device type 4"));
        assert!(refused(&|s| s.queues.truncate(1)).contains("has 1 queues, the device has 2"));
        for status in [DRIVER, ACKNOWLEDGE | FEATURES_OK, 0x10, NEEDS_RESET, ACKNOWLEDGE | DRIVER | NEEDS_RESET] {
            let msg = refused(&|s| s.device_status = status);
            assert!(msg.contains("is not one a driver can reach"), "{status:#x}: {msg}");
        }
        assert!(refused(&|s| s.interrupt_status = 4).contains("interrupt status 0x4"));
        assert!(refused(&|s| s.driver_features |= 0b10).contains("0x2 of them are not offered"));
        assert!(refused(&|s| s.driver_features &= !VIRTIO_F_VERSION_1).contains("VERSION_1 is missing"));
        // Queues are checked as at DRIVER_OK: memory, alignment, size.
        let mem_len = crate::devices::virtio::test_utils::MEM_SIZE as u64;
        let outside = refused(&|s| s.queues[1].used_ring = mem_len - 8);
        assert!(outside.contains("restoring the queues") && outside.contains("not in guest memory"), "{outside}");
        assert!(refused(&|s| s.queues[0].desc_table = 0x1_0001).contains("not aligned"));
        assert!(refused(&|s| s.queues[0].size = 32).contains("size 32 is not a power of two from 1 to 16"));
        assert!(refused(&|s| s.queues[0].ready = false).contains("queue 1 is ready but queue 0"));
        // Still good after all that: the checks looked at copies.
        restore_into(&rig, &good).unwrap();
    }

    #[test]
    fn a_failed_or_reset_needing_device_is_not_activated_on_restore() {
        let rig = running();
        let mut state = rig.mmio.save_state().unwrap();
        state.device_status |= NEEDS_RESET;
        let (_, fake) = restore_into(&rig, &state).unwrap();
        assert_eq!(fake.lock().unwrap().activated_with, None);
        state.device_status &= !NEEDS_RESET;
        state.reactivation_refused = true;
        let (_, fake) = restore_into(&rig, &state).unwrap();
        assert_eq!(fake.lock().unwrap().activated_with, None);
        // FAILED after DRIVER_OK leaves the device running, as it did before.
        state.reactivation_refused = false;
        state.device_status |= FAILED;
        let (_, fake) = restore_into(&rig, &state).unwrap();
        assert_eq!(fake.lock().unwrap().activated_with, Some(2));
    }

    #[test]
    fn a_real_device_goes_on_from_where_it_was_in_its_queue() {
        use crate::devices::virtio::rng::Rng;
        let mem = guest_memory();
        let mut ring = GuestRing::new(&mem, 0, 16);
        let (desc, avail, used) = ring.addresses();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
        let w = |t: &mut MmioTransport, reg: u32, value: u32| t.write(u64::from(reg), &value.to_le_bytes());
        for status in [ACKNOWLEDGE, ACKNOWLEDGE | DRIVER] {
            w(&mut t, VIRTIO_MMIO_STATUS, status);
        }
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used),
        ] {
            w(&mut t, low, addr as u32);
        }
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        // Two requests served before the snapshot.
        for i in 0..2 {
            ring.add_chain(&[(DATA_BASE + 0x100 * i, 32, WRITE)]);
            rng.lock().unwrap().handle_queue_event();
        }
        assert_eq!(ring.take_used().len(), 2);
        let state = t.save_state().unwrap();
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (2, 2));

        let served = |mem: &GuestMemoryMmap| {
            let mut bytes = [0u8; 0x120];
            vm_memory::Bytes::read_slice(mem, &mut bytes, vm_memory::GuestAddress(DATA_BASE)).unwrap();
            bytes
        };
        let before = served(&mem);

        // A fresh device restored from it serves only the third request. One restored at
        // the start of the ring would serve the first two again: new random bytes in
        // their buffers.
        let fresh = Arc::new(Mutex::new(Rng::new().unwrap()));
        let _restored = MmioTransport::restore(mem.clone(), fresh.clone(), &state).unwrap();
        ring.add_chain(&[(DATA_BASE + 0x200, 16, WRITE)]);
        fresh.lock().unwrap().handle_queue_event();
        assert_eq!(ring.take_used(), vec![(2, 16)]);
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(served(&mem), before, "requests served before the snapshot were served again");
    }
}
