//! Port-I/O and MMIO dispatch: the vCPU threads turn each KVM exit into a call on the
//! device whose range holds the address. Ranges never overlap; an access to no device
//! reads as all ones and writes are dropped (as on real hardware), never an error that
//! stops the VM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable by port I/O or MMIO. `offset` is relative to the start of the
/// device's range. Both calls come from vCPU threads and must not block for long.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO) of the VM.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let end = base + len;
        // The range just below `end` is the only one that can overlap.
        if let Some((&other, r)) = self.ranges.range(..end).next_back() {
            if other + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        (addr - base < r.len).then_some((addr - base, &r.device))
    }

    /// Returns false if no device claims `addr` (the data is then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Returns false if no device claims `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device that panicked while holding its lock is broken, but the bus keeps serving
/// the others; the poisoned device sees its next access with the state it left.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        let mut buf = [0u8; 4];
        assert!(bus.read(0x1010, &mut buf));
        assert_eq!(buf, [0x10; 4]);
        assert!(bus.write(0x10ff, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![(0xff, vec![7])]);
        assert!(!bus.read(0x1100, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.write(0xfff, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Echo(vec![]))) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x1000, 0x100).unwrap();
        assert_eq!(bus.insert(d(), 0x10ff, 1), Err(BusError::Overlap { base: 0x10ff, len: 1 }));
        assert_eq!(bus.insert(d(), 0xf00, 0x101), Err(BusError::Overlap { base: 0xf00, len: 0x101 }));
        bus.insert(d(), 0xf00, 0x100).unwrap();
        bus.insert(d(), 0x1100, 0x100).unwrap();
        assert!(matches!(bus.insert(d(), u64::MAX, 2), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.insert(d(), 0, 0), Err(BusError::BadRange { .. })));
    }
}
