//! Test-only: drive a device model the way a guest driver would, without KVM.
//!
//! Guest memory is one anonymous mapping; a split virtqueue is laid out in it by
//! `virtio_queue::mock::MockSplitQueue`; tests add descriptor chains, kick the device and
//! read the used ring back. `RecordingInterrupt` stands in for the transport's irqfd.
//! Nothing here is hardened: tests may panic on their own mistakes.

use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Interrupt, InterruptKind, Queue};

/// Device-writable buffer flag, re-exported so tests read `(addr, len, WRITE)`.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Device-readable buffer: no flag.
pub const READ: u16 = 0;
/// Chain continues at the descriptor named in `next` (for hand-made chains).
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Size of the memory `guest_memory()` creates.
pub const MEM_SIZE: usize = 0x40_0000;
/// Where tests put their queues (descriptor table, then the rings).
pub const QUEUE_BASE: GuestAddress = GuestAddress(0);
/// First address tests use for data buffers, far above any queue.
pub const DATA_BASE: u64 = 0x10_0000;

/// Guest RAM from 0 to `MEM_SIZE`.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A split virtqueue as the guest driver sees it.
pub struct GuestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_free: u16,
}

impl<'a> GuestQueue<'a> {
    /// A queue of `size` entries at `QUEUE_BASE`.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, QUEUE_BASE, size)
    }

    /// A queue of `size` entries at `base` (several queues in one memory).
    pub fn at(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        Self { mem, mock: MockSplitQueue::create(mem, base, size), size, next_free: 0 }
    }

    /// The device side of this queue, set up and ready, as the transport hands it over.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    pub fn desc_table_addr(&self) -> GuestAddress {
        self.mock.desc_table_addr()
    }
    pub fn avail_addr(&self) -> GuestAddress {
        self.mock.avail_addr()
    }
    pub fn used_addr(&self) -> GuestAddress {
        self.mock.used_addr()
    }

    /// Writes a chain of `(addr, len, flags)` descriptors (flags: `READ`, `WRITE`, or any
    /// raw flags) into free table slots, linking them with NEXT, and offers its head in
    /// the avail ring. Returns the head index.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_free;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (self.next_free + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let flags = if i + 1 < descs.len() { flags | VRING_DESC_F_NEXT as u16 } else { flags };
            self.set_desc(index, addr, len, flags, next);
        }
        self.next_free = (self.next_free + descs.len() as u16) % self.size;
        self.offer(head);
        head
    }

    /// Writes descriptor `index` verbatim (for loops and other broken chains).
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mock.desc_table().store(index, desc).unwrap();
    }

    /// Puts `head` in the next avail ring slot and publishes it.
    pub fn offer(&self, head: u16) {
        let idx = self.mock.avail().idx().load();
        self.mock.avail().ring().ref_at(usize::from(idx % self.size)).unwrap().store(head);
        self.mock.avail().idx().store(idx.wrapping_add(1));
    }

    /// Overwrites the avail ring's idx, as a broken or hostile driver could.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    /// The used ring's idx: how many chains the device has returned so far.
    pub fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Used ring entry `n` (counting from 0 since creation): `(head index, written len)`.
    pub fn used(&self, n: u16) -> (u32, u32) {
        let elem = self.mock.used().ring().ref_at(usize::from(n % self.size)).unwrap().load();
        (elem.id(), elem.len())
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Writes `data` into guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// An `Interrupt` that records what the device raised.
#[derive(Default)]
pub struct RecordingInterrupt {
    raised: Mutex<Vec<InterruptKind>>,
}

impl RecordingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What was raised since the last call, oldest first.
    pub fn take(&self) -> Vec<InterruptKind> {
        std::mem::take(&mut *self.raised.lock().unwrap())
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(kind);
        Ok(())
    }
}
