//! A virtio-mmio transport's state in a snapshot: the registers its driver wrote (status,
//! feature selectors, the accepted features, the queue and shared-memory selectors, the
//! pending interrupt bits) and, per queue, its setup and the device's place in it (the
//! next avail entry it will take, the next used entry it will write). Taken from a
//! paused VM by `MmioTransport::save_state`, put back into a fresh transport by
//! `MmioTransport::restore` (`devices::virtio::mmio::state`), which also checks it.
//!
//! What a device model keeps beyond its queues (a vsock's connections, virtio-fs's
//! inodes) is not here: a model holding such state refuses to give its queue
//! positions, saying why (`VirtioDevice::queue_positions`), and the snapshot is refused
//! until it no longer does (the connections closed, the share not mounted).
//!
//! Trust: `decode` bounds every count; the values themselves are whatever a guest could
//! have written to the registers, and `restore` checks them as it would a driver's.

use super::codec::{FieldError, Reader, Writer};

/// The most queues a transport's state holds (wisp's devices have at most 3).
pub const MAX_QUEUES: usize = 16;
/// Bytes per queue entry in the encoding: size u32, ready u8, three u64 addresses,
/// next_avail u16, next_used u16.
const QUEUE_BYTES: usize = 4 + 1 + 3 * 8 + 2 + 2;

/// One queue as the driver set it up and as far as the device got in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueState {
    /// QueueNum as the driver wrote it (checked at restore, as at DRIVER_OK).
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next avail ring entry the device takes (0 before activation).
    pub next_avail: u16,
    /// The next used ring entry the device writes (0 before activation).
    pub next_used: u16,
}

/// A virtio-mmio transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportState {
    /// The device behind it (`TYPE_*`): a restore into another kind of device is refused.
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub shm_sel: u32,
    /// InterruptStatus: the bits raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// Set when the device model refused a reset and may not be activated again.
    pub reactivation_refused: bool,
    pub queues: Vec<QueueState>,
}

impl TransportState {
    pub fn encode(&self, w: &mut Writer) {
        debug_assert!(self.queues.len() <= MAX_QUEUES);
        w.u32(self.device_type);
        w.u32(self.device_status);
        w.u32(self.device_features_sel);
        w.u32(self.driver_features_sel);
        w.u64(self.driver_features);
        w.u32(self.queue_sel);
        w.u32(self.shm_sel);
        w.u32(self.interrupt_status);
        w.flag(self.reactivation_refused);
        w.count(self.queues.len());
        for q in &self.queues {
            w.u32(q.size);
            w.flag(q.ready);
            w.u64(q.desc_table);
            w.u64(q.avail_ring);
            w.u64(q.used_ring);
            w.u16(q.next_avail);
            w.u16(q.next_used);
        }
    }

    pub fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        let mut s = Self {
            device_type: r.u32("device type")?,
            device_status: r.u32("device status")?,
            device_features_sel: r.u32("device features selector")?,
            driver_features_sel: r.u32("driver features selector")?,
            driver_features: r.u64("driver features")?,
            queue_sel: r.u32("queue selector")?,
            shm_sel: r.u32("shared memory selector")?,
            interrupt_status: r.u32("interrupt status")?,
            reactivation_refused: r.flag("reactivation refused")?,
            queues: Vec::new(),
        };
        let n = r.count(MAX_QUEUES, QUEUE_BYTES, "queues")?;
        for _ in 0..n {
            s.queues.push(QueueState {
                size: r.u32("queue size")?,
                ready: r.flag("queue ready")?,
                desc_table: r.u64("descriptor table address")?,
                avail_ring: r.u64("available ring address")?,
                used_ring: r.u64("used ring address")?,
                next_avail: r.u16("next available index")?,
                next_used: r.u16("next used index")?,
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes before the queue count: seven u32 registers, the u64 features, one flag.
    const FIXED: usize = 7 * 4 + 8 + 1;

    pub fn sample() -> TransportState {
        TransportState {
            device_type: 19,
            device_status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: (1 << 32) | (1 << 29),
            queue_sel: 2,
            shm_sel: 0,
            interrupt_status: 1,
            reactivation_refused: false,
            queues: (0..3)
                .map(|i| QueueState {
                    size: 256,
                    ready: true,
                    desc_table: 0x1000 * (i + 1),
                    avail_ring: 0x1000 * (i + 1) + 0x1000,
                    used_ring: 0x1000 * (i + 1) + 0x2000,
                    next_avail: 0xfff0 + i as u16,
                    next_used: 7,
                })
                .collect(),
        }
    }

    fn encoded(s: &TransportState) -> Vec<u8> {
        let mut w = Writer::new();
        s.encode(&mut w);
        w.into_bytes()
    }

    fn decoded(bytes: &[u8]) -> Result<TransportState, FieldError> {
        let mut r = Reader::new(bytes);
        let s = TransportState::decode(&mut r)?;
        r.finish()?;
        Ok(s)
    }

    #[test]
    fn every_field_round_trips() {
        let s = sample();
        let bytes = encoded(&s);
        assert_eq!(bytes.len(), FIXED + 2 + 3 * QUEUE_BYTES);
        assert_eq!(decoded(&bytes).unwrap(), s);
        let empty = TransportState::default();
        assert_eq!(decoded(&encoded(&empty)).unwrap(), empty);
    }

    #[test]
    fn a_damaged_state_is_refused_naming_the_field() {
        let bytes = encoded(&sample());
        // Cut anywhere: truncated, never a panic.
        for len in 0..bytes.len() {
            assert!(matches!(decoded(&bytes[..len]), Err(FieldError::Truncated { .. })), "cut at {len}");
        }
        // A boolean that is neither 0 nor 1.
        let mut bad = bytes.clone();
        bad[FIXED - 1] = 2;
        assert_eq!(decoded(&bad).unwrap_err(), FieldError::Invalid { what: "reactivation refused", value: 2 });
        // More queues than a transport can have, claimed by a short input.
        let mut many = bytes[..FIXED].to_vec();
        many.extend_from_slice(&(MAX_QUEUES as u16 + 1).to_le_bytes());
        assert!(matches!(decoded(&many), Err(FieldError::TooMany { what: "queues", .. })));
        let mut claims = bytes[..FIXED].to_vec();
        claims.extend_from_slice(&3u16.to_le_bytes());
        assert!(matches!(decoded(&claims), Err(FieldError::Truncated { what: "queues", .. })));
    }
}
