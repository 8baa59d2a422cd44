//! Test-only: a guest vsock driver and host clients around a real `Vsock`, driven the
//! way the VMM drives it (event-manager loop) without KVM: guest memory is an anonymous
//! mapping (leaked, so chains can borrow it for `'static`), the device's split queues are
//! laid out by `GuestRing` (single chains for parsing tests by
//! `virtio_queue::mock::MockSplitQueue`), and the host side is real Unix sockets in a
//! tempdir. Nothing here is hardened: tests panic on their own mistakes.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{Vsock, RXQ, TXQ};
use super::packet::{PacketHeader, TYPE_STREAM};
use super::{Timeouts, VSOCK_HOST_CID};
use crate::devices::virtio::test_utils::GuestRing;
use crate::devices::virtio::{Interrupt, InterruptKind, Queue, QueueT, VirtioDevice};

pub const GUEST_CID: u64 = 3;
/// Descriptor flags: device-readable (TX) and device-writable (RX) buffers.
pub const READ: u16 = 0;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// The receive buffer the test guest advertises by default.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

const MEM_SIZE: usize = 32 << 20;
/// Where `guest_chain` builds its throwaway queue.
const SCRATCH_QUEUE: u64 = 0x1f0_0000;
const QUEUE_SIZE: u16 = 256;
const QUEUE_ADDRS: [u64; 3] = [0x0, 0x8000, 0x1_0000];
/// RX buffer slot `i` uses descriptors `2i` and `2i + 1`.
const RX_SLOTS: u16 = QUEUE_SIZE / 2;
const RX_BUF_BASE: u64 = 0x10_0000;
/// TX slot `i` uses descriptors `4i` to `4i + 3`.
const TX_SLOTS: u16 = QUEUE_SIZE / 4;
const TX_BUF_BASE: u64 = 0x100_0000;
/// Room for a header, 64 KiB of payload and the gaps of a scattered layout.
const BUF_STRIDE: u64 = 0x1_1000;

/// Guest RAM, leaked so queues and chains can borrow it for `'static`.
pub fn leak_memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()))
}

/// A descriptor chain of `(addr, len, flags)` descriptors, as a device pops it.
pub fn guest_chain(
    mem: &'static GuestMemoryMmap,
    descs: &[(u64, u32, u16)],
) -> DescriptorChain<&'static GuestMemoryMmap> {
    let mock = MockSplitQueue::create(mem, GuestAddress(SCRATCH_QUEUE), 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let flags = if i + 1 < descs.len() { flags | NEXT } else { flags };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
        })
        .collect();
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.pop_descriptor_chain(mem).unwrap()
}

/// Counts interrupts.
#[derive(Default)]
pub struct RecordingInterrupt {
    raised: AtomicUsize,
}

impl RecordingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn count(&self) -> usize {
        self.raised.load(Ordering::SeqCst)
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        assert_eq!(kind, InterruptKind::Queue);
        self.raised.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// How the guest lays out an RX buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxLayout {
    /// Header and payload room in one descriptor (Linux >= 6.2).
    OneDescriptor,
    /// A 44-byte header descriptor, then the payload descriptor.
    HeaderThenData,
}

/// How the guest lays out a TX packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxLayout {
    OneDescriptor,
    HeaderThenData,
    /// Four descriptors with gaps between them, the header split across the first two.
    Scattered,
}

/// A guest packet header from `src_port` to host port `dst_port`.
pub fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

pub struct Options {
    pub timeouts: Timeouts,
    /// RX buffers posted at start.
    pub rx_buffers: u16,
    /// Payload bytes per RX buffer.
    pub rx_capacity: u32,
    pub rx_layout: RxLayout,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            rx_buffers: RX_SLOTS,
            rx_capacity: 4096,
            rx_layout: RxLayout::OneDescriptor,
        }
    }
}

/// A packet the device put in an RX buffer.
#[derive(Debug, Clone)]
pub struct RxPacket {
    pub hdr: PacketHeader,
    pub data: Vec<u8>,
}

/// A guest with a vsock device, its event loop and the device's Unix socket.
pub struct TestVm {
    pub mem: &'static GuestMemoryMmap,
    pub device: Arc<Mutex<Vsock>>,
    pub events: EventManager<Arc<Mutex<Vsock>>>,
    pub interrupt: Arc<RecordingInterrupt>,
    queues: [GuestRing; 3],
    rx_seen: u16,
    rx_free: Vec<u16>,
    rx_slot_layout: HashMap<u16, RxLayout>,
    pub rx_layout: RxLayout,
    pub rx_capacity: u32,
    /// Re-post RX buffers as soon as `recv` took their packets.
    pub auto_refill: bool,
    /// RX buffers the device returned without a packet.
    pub rx_empty_returns: usize,
    tx_sent: u16,
    pub uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestVm {
    pub fn new() -> Self {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = leak_memory();
        let device = Arc::new(Mutex::new(Vsock::with_timeouts(GUEST_CID, uds.clone(), options.timeouts).unwrap()));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(device.clone());
        let mut vm = Self {
            mem,
            device,
            events,
            interrupt: RecordingInterrupt::new(),
            queues: QUEUE_ADDRS.map(|addr| GuestRing::new(mem, addr, QUEUE_SIZE)),
            rx_seen: 0,
            rx_free: (0..RX_SLOTS).rev().collect(),
            rx_slot_layout: HashMap::new(),
            rx_layout: options.rx_layout,
            rx_capacity: options.rx_capacity,
            auto_refill: true,
            rx_empty_returns: 0,
            tx_sent: 0,
            uds,
            _dir: dir,
        };
        vm.activate();
        vm.post_rx(options.rx_buffers);
        vm.pump();
        vm
    }

    /// Activates the device with the (freshly laid out) queues, as the transport would.
    fn activate(&mut self) {
        let queues = self.queues.iter().map(GuestRing::queue).collect();
        self.device.lock().unwrap().activate(self.mem.clone(), self.interrupt.clone(), queues).unwrap();
        self.pump();
    }

    /// Driver reset then re-initialisation with new, empty queues.
    pub fn reset_and_reactivate(&mut self) {
        assert!(self.device.lock().unwrap().reset());
        self.pump();
        let mem = self.mem;
        self.queues = QUEUE_ADDRS.map(|addr| GuestRing::new(mem, addr, QUEUE_SIZE));
        self.rx_seen = 0;
        self.tx_sent = 0;
        self.rx_free = (0..RX_SLOTS).rev().collect();
        self.activate();
        self.post_rx(RX_SLOTS);
        self.pump();
    }

    pub fn kick(&self, queue: usize) {
        self.device.lock().unwrap().queue_events()[queue].write(1).unwrap();
    }

    /// Runs the event loop until nothing is ready.
    pub fn pump(&mut self) {
        for _ in 0..100_000 {
            if self.events.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Runs the event loop for `duration` (timers fire in it).
    pub fn pump_for(&mut self, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            self.events.run_with_timeout(5).unwrap();
        }
        self.pump();
    }

    /// Events that are ready although nothing happened (a busy loop if not zero).
    pub fn spurious_events(&mut self) -> usize {
        self.events.run_with_timeout(20).unwrap()
    }

    fn offer(&self, queue: usize, head: u16) {
        self.queues[queue].offer(head);
    }

    fn set_desc(&self, queue: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.queues[queue].set_desc(index, addr, len, flags, next);
    }

    fn rx_buf(slot: u16) -> u64 {
        RX_BUF_BASE + u64::from(slot) * BUF_STRIDE
    }

    /// Posts up to `count` RX buffers and kicks the RX queue.
    pub fn post_rx(&mut self, count: u16) {
        for _ in 0..count {
            let Some(slot) = self.rx_free.pop() else { break };
            let (head, buf) = (slot * 2, Self::rx_buf(slot));
            match self.rx_layout {
                RxLayout::OneDescriptor => self.set_desc(RXQ, head, buf, 44 + self.rx_capacity, WRITE, 0),
                RxLayout::HeaderThenData => {
                    self.set_desc(RXQ, head, buf, 44, WRITE | NEXT, head + 1);
                    self.set_desc(RXQ, head + 1, buf + 0x100, self.rx_capacity, WRITE, 0);
                }
            }
            self.rx_slot_layout.insert(slot, self.rx_layout);
            self.offer(RXQ, head);
        }
        self.kick(RXQ);
    }

    /// Posts one RX chain of a single raw descriptor (for malformed buffers).
    pub fn post_rx_raw(&mut self, addr: u64, len: u32, flags: u16) {
        let slot = self.rx_free.pop().expect("no free RX slot");
        self.set_desc(RXQ, slot * 2, addr, len, flags, 0);
        self.rx_slot_layout.insert(slot, RxLayout::OneDescriptor);
        self.offer(RXQ, slot * 2);
        self.kick(RXQ);
    }

    /// Takes the packets the device put in RX buffers (re-posting them if `auto_refill`).
    pub fn recv(&mut self) -> Vec<RxPacket> {
        let mut packets = Vec::new();
        while self.rx_seen != self.queues[RXQ].used_idx() {
            let (id, len) = self.queues[RXQ].used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let slot = u16::try_from(id).unwrap() / 2;
            let buf = Self::rx_buf(slot);
            self.rx_free.push(slot);
            let len = len as usize;
            if len == 0 {
                self.rx_empty_returns += 1;
                continue;
            }
            assert!(len >= 44, "used length {len} shorter than a header");
            let mut raw = [0u8; 44];
            self.mem.read_slice(&mut raw, GuestAddress(buf)).unwrap();
            let hdr = PacketHeader::from_bytes(&raw);
            let data_addr = match self.rx_slot_layout[&slot] {
                RxLayout::OneDescriptor => buf + 44,
                RxLayout::HeaderThenData => buf + 0x100,
            };
            let mut data = vec![0u8; len - 44];
            self.mem.read_slice(&mut data, GuestAddress(data_addr)).unwrap();
            assert_eq!(hdr.len as usize, data.len(), "header len and used length disagree");
            packets.push(RxPacket { hdr, data });
        }
        if self.auto_refill && !packets.is_empty() {
            self.post_rx(RX_SLOTS);
        }
        packets
    }

    pub fn mem_write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// TX chains the device returned so far.
    pub fn tx_used(&self) -> u16 {
        self.queues[TXQ].used_idx()
    }

    fn next_tx_slot(&mut self) -> u16 {
        let in_flight = self.tx_sent.wrapping_sub(self.tx_used());
        assert!(in_flight < TX_SLOTS, "the device is not consuming TX: pump between sends");
        let slot = self.tx_sent % TX_SLOTS;
        self.tx_sent = self.tx_sent.wrapping_add(1);
        slot
    }

    /// Queues a raw TX chain of `(addr, len, flags)` and kicks the TX queue.
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        assert!((1..=4).contains(&descs.len()));
        let head = self.next_tx_slot() * 4;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = head + i as u16;
            let more = i + 1 < descs.len();
            self.set_desc(TXQ, index, addr, len, if more { flags | NEXT } else { flags }, index + 1);
        }
        self.offer(TXQ, head);
        self.kick(TXQ);
    }

    /// Queues a packet (header `len` set from `data`) and kicks the TX queue.
    pub fn send_with(&mut self, hdr: &PacketHeader, data: &[u8], layout: TxLayout) {
        let mut hdr = *hdr;
        hdr.len = data.len() as u32;
        let mut wire = hdr.to_bytes().to_vec();
        wire.extend_from_slice(data);
        let slot = self.next_tx_slot();
        let base = TX_BUF_BASE + u64::from(slot) * BUF_STRIDE;
        // (start, end) of each descriptor's piece of `wire`.
        let pieces: Vec<(usize, usize)> = match layout {
            TxLayout::OneDescriptor => vec![(0, wire.len())],
            TxLayout::HeaderThenData if data.is_empty() => vec![(0, 44)],
            TxLayout::HeaderThenData => vec![(0, 44), (44, wire.len())],
            TxLayout::Scattered => {
                let (a, b) = (44 + data.len() / 3, 44 + 2 * (data.len() / 3));
                vec![(0, 20), (20, a), (a, b), (b, wire.len())]
            }
        };
        let head = slot * 4;
        let mut addr = base;
        for (i, &(start, end)) in pieces.iter().enumerate() {
            self.mem.write_slice(&wire[start..end], GuestAddress(addr)).unwrap();
            let index = head + i as u16;
            let flags = if i + 1 < pieces.len() { NEXT } else { 0 };
            self.set_desc(TXQ, index, addr, (end - start) as u32, flags, index + 1);
            // Leave a gap: the pieces are not contiguous in guest memory.
            addr += (end - start) as u64 + 0x40;
        }
        self.offer(TXQ, head);
        self.kick(TXQ);
    }

    pub fn send(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.send_with(hdr, data, TxLayout::HeaderThenData);
    }

    /// `send` then `pump`.
    pub fn send_now(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.send(hdr, data);
        self.pump();
    }

    pub fn connection_count(&self) -> usize {
        self.device.lock().unwrap().muxer.connection_count()
    }

    /// A host client that sent `CONNECT <port>\n` (non-blocking from then on).
    pub fn host_connect(&self, port: u32) -> UnixStream {
        let mut stream = UnixStream::connect(&self.uds).unwrap();
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        stream.set_nonblocking(true).unwrap();
        stream
    }
}

/// What a non-blocking stream has now, and whether it reached EOF.
pub fn read_available(stream: &mut UnixStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (out, false),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, true),
            Err(e) => panic!("host read failed: {e}"),
        }
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}
