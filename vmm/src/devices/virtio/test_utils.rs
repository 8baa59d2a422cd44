//! Test-only: drive a device model the way a guest driver would, without KVM.
//!
//! Guest memory is one anonymous mapping. A split virtqueue is laid out in it either by
//! `GuestRing` (a driver's layout, any size; what the device tests and the fuzz targets
//! use) or by `virtio_queue::mock::MockSplitQueue` (`GuestQueue`: small queues only, see
//! `GuestRing`); tests add descriptor chains, kick the device and read the used ring
//! back. `RecordingInterrupt` stands in for the transport's irqfd. Built for this
//! crate's unit tests and, with the `test-utils` feature, for `fuzz/`. Nothing here is
//! hardened: tests may panic on their own mistakes.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Interrupt, InterruptKind, Queue, QueueT};

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

/// A split virtqueue as a guest driver lays it out: the descriptor table at `base`, then
/// the avail ring (with `used_event`), then the used ring (with `avail_event`) 4-byte
/// aligned, nothing overlapping. (`MockSplitQueue::create` puts the used ring inside the
/// avail ring of large queues, as `SplitQueueRing::end` adds the entry count rather than
/// bytes, which corrupts both once the avail index passes half the queue size.)
pub struct GuestRing {
    mem: GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    /// The next free descriptor for `add_chain`.
    next_desc: u16,
    /// How many used entries `take_used` has returned.
    used_seen: u16,
}

impl GuestRing {
    /// A ring of `size` entries (a power of two) at `base`; both rings' flags, indexes
    /// and event fields start at zero.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        mem.write_slice(&vec![0u8; 6 + 2 * usize::from(size)], GuestAddress(avail)).unwrap();
        mem.write_slice(&vec![0u8; 6 + 8 * usize::from(size)], GuestAddress(used)).unwrap();
        Self { mem: mem.clone(), desc: base, avail, used, size, next_desc: 0, used_seen: 0 }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the descriptor table, the avail ring and the used ring are.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The device side, set up and ready, as the transport hands it over.
    pub fn queue(&self) -> Queue {
        self.queue_with_event_idx(false)
    }

    /// `queue`, with VIRTIO_RING_F_EVENT_IDX negotiated or not.
    pub fn queue_with_event_idx(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// Writes descriptor `index` verbatim (for loops and other broken chains).
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mem.write_obj(desc, GuestAddress(self.desc + 16 * u64::from(index))).unwrap();
    }

    /// Writes `descs` as one chain into the next free table slots (linked with NEXT,
    /// wrapping around the table) and offers it. Returns the head index.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        self.write_chain(head, descs);
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.offer(head);
        head
    }

    /// Writes `descs` as one chain starting at descriptor `first` and offers it.
    pub fn add_chain_at(&self, first: u16, descs: &[(u64, u32, u16)]) {
        self.write_chain(first, descs);
        self.offer(first);
    }

    fn write_chain(&self, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (first + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let flags = if i + 1 < descs.len() { flags | NEXT } else { flags };
            self.set_desc(index, addr, len, flags, next);
        }
    }

    /// Puts `head` in the next avail ring slot and publishes it.
    pub fn offer(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Overwrites the avail ring's idx, as a broken or hostile driver could.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The used ring's idx: how many chains the device has returned so far.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }

    /// Used ring entry number `n` (counting since creation): (head index, length).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    /// Used ring entries added since the last call: (head index, length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.used_seen != self.used_idx() {
            let (id, len) = self.used_elem(self.used_seen);
            out.push((u16::try_from(id).unwrap(), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// EVENT_IDX: the driver wants an interrupt once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.avail + 4 + 2 * u64::from(self.size))).unwrap();
    }

    /// EVENT_IDX: the device wants a kick once the avail index passes this.
    pub fn avail_event(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size))).unwrap()
    }
}

/// A connected SOCK_SEQPACKET pair, both ends non-blocking (a fake tap and its host end).
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
