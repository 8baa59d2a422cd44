//! Test-only: a guest virtio-net driver and a fake tap around a real `Net`, driven the
//! way the VMM drives it (event-manager loop), without KVM or root.
//!
//! The fake tap is one end of an AF_UNIX SOCK_SEQPACKET socketpair: each message is one
//! frame, as on a tap; the test holds the other end as "the host". `FakeTap` records the
//! offloads the device asks for instead of calling TUNSETOFFLOAD. The rings are laid out
//! as a driver would (descriptor table, avail ring with used_event, used ring with
//! avail_event, nothing overlapping). Nothing here is hardened: tests panic on their own
//! mistakes.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{RXQ, TXQ};
use super::{Net, TapLink, VNET_HDR_LEN};
use crate::devices::virtio::test_utils::RecordingInterrupt;
pub use crate::devices::virtio::test_utils::{seqpacket_pair, GuestRing};
use crate::devices::virtio::VirtioDevice;

/// Descriptor flags: device-readable (TX) and device-writable (RX) buffers.
pub const READ: u16 = 0;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

pub const MEM_SIZE: usize = 16 << 20;
/// Buffers the harness hands out start here (far above the rings).
pub const BUF_BASE: u64 = 0x10_0000;
pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];
pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const RING_BASES: [u64; 2] = [0x0, 0x8000];

/// One end of a SOCK_SEQPACKET socketpair standing in for a tap.
pub struct FakeTap {
    fd: OwnedFd,
    offloads: Arc<Mutex<Vec<u32>>>,
    refuse_offloads: bool,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapLink for FakeTap {
    fn label(&self) -> &str {
        "fake tap"
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if self.refuse_offloads {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// A frame the guest received: its header and the frame after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFrame {
    pub hdr: [u8; VNET_HDR_LEN],
    pub data: Vec<u8>,
    /// The used lengths of the buffers it took.
    pub lens: Vec<u32>,
}

impl RxFrame {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

pub struct Options {
    /// Features the driver accepts (masked with the offer).
    pub features: u64,
    pub mtu: Option<u16>,
    pub queue_size: u16,
    pub activate: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { features: !EVENT_IDX, mtu: None, queue_size: 256, activate: true }
    }
}

/// A guest with a virtio-net device on a fake tap, and the device's event loop.
pub struct TestNet {
    pub mem: GuestMemoryMmap,
    pub device: Arc<Mutex<Net>>,
    pub events: EventManager<Arc<Mutex<Net>>>,
    pub interrupt: Arc<RecordingInterrupt>,
    pub rx: GuestRing,
    pub tx: GuestRing,
    /// The host end of the fake tap.
    pub host: OwnedFd,
    pub offloads: Arc<Mutex<Vec<u32>>>,
    pub event_idx: bool,
    next_buf: u64,
    /// Buffers of each posted RX chain, by head index.
    rx_posted: HashMap<u16, Vec<(u64, u32)>>,
}

impl TestNet {
    pub fn new() -> Self {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (dev_end, host) = seqpacket_pair();
        let offloads = Arc::new(Mutex::new(Vec::new()));
        let tap = FakeTap { fd: dev_end, offloads: offloads.clone(), refuse_offloads: false };
        let net = Net::new(Box::new(tap), GUEST_MAC, options.mtu).unwrap();
        let features = options.features & net.avail_features();
        let device = Arc::new(Mutex::new(net));
        device.lock().unwrap().set_acked_features(features);
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(device.clone());
        let mut t = Self {
            rx: GuestRing::new(&mem, RING_BASES[RXQ], options.queue_size),
            tx: GuestRing::new(&mem, RING_BASES[TXQ], options.queue_size),
            mem,
            device,
            events,
            interrupt: RecordingInterrupt::new(),
            host,
            offloads,
            event_idx: features & EVENT_IDX != 0,
            next_buf: BUF_BASE,
            rx_posted: HashMap::new(),
        };
        if options.activate {
            t.activate();
        }
        t
    }

    /// Activates the device with the current rings, as the transport would.
    pub fn activate(&mut self) {
        let queues = vec![self.rx.queue_with_event_idx(self.event_idx), self.tx.queue_with_event_idx(self.event_idx)];
        self.device.lock().unwrap().activate(self.mem.clone(), self.interrupt.clone(), queues).unwrap();
        self.pump();
    }

    /// Driver reset, then re-initialisation with fresh, empty rings.
    pub fn reset_and_reactivate(&mut self) {
        assert!(self.device.lock().unwrap().reset());
        self.pump();
        let size = self.rx.size();
        self.rx = GuestRing::new(&self.mem, RING_BASES[RXQ], size);
        self.tx = GuestRing::new(&self.mem, RING_BASES[TXQ], size);
        self.rx_posted.clear();
        self.activate();
    }

    pub fn kick(&self, queue: usize) {
        self.device.lock().unwrap().queue_events()[queue].write(1).unwrap();
    }

    /// Runs the event loop until nothing is ready.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.events.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Events that are ready although nothing happened (a busy loop if not zero).
    pub fn spurious_events(&mut self) -> usize {
        self.events.run_with_timeout(20).unwrap()
    }

    /// A fresh guest buffer of `len` bytes.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + u64::from(len) + 0x3f) & !0x3f;
        assert!(self.next_buf <= MEM_SIZE as u64, "test buffers exhausted");
        addr
    }

    /// Posts `count` one-descriptor RX buffers of `len` bytes and kicks RX.
    pub fn post_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            let addr = self.alloc(len);
            self.post_rx_chain(&[(addr, len, WRITE)]);
        }
        self.kick(RXQ);
    }

    /// Posts one RX chain as given (no kick). Returns its head.
    pub fn post_rx_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.rx.add_chain(descs);
        self.rx_posted.insert(head, descs.iter().map(|&(a, l, _)| (a, l)).collect());
        head
    }

    /// The frames the device put in RX buffers since the last call, reassembled by
    /// `num_buffers`, and how many chains came back empty (refused).
    pub fn rx_frames(&mut self) -> (Vec<RxFrame>, usize) {
        let mut used = self.rx.take_used().into_iter();
        let (mut frames, mut empty) = (Vec::new(), 0);
        while let Some((head, len)) = used.next() {
            if len == 0 {
                empty += 1;
                continue;
            }
            let mut bytes = self.read_chain(head, len);
            let hdr: [u8; VNET_HDR_LEN] = bytes[..VNET_HDR_LEN].try_into().unwrap();
            let mut frame = RxFrame { hdr, data: bytes.split_off(VNET_HDR_LEN), lens: vec![len] };
            for _ in 1..frame.num_buffers() {
                let (head, len) = used.next().expect("num_buffers larger than the used entries");
                frame.data.extend(self.read_chain(head, len));
                frame.lens.push(len);
            }
            frames.push(frame);
        }
        (frames, empty)
    }

    fn read_chain(&self, head: u16, len: u32) -> Vec<u8> {
        let mut left = len as usize;
        let mut out = Vec::new();
        for &(addr, seg) in &self.rx_posted[&head] {
            let take = left.min(seg as usize);
            let mut buf = vec![0u8; take];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            out.extend(buf);
            left -= take;
        }
        assert_eq!(left, 0, "used length {len} larger than chain {head}");
        out
    }

    /// Queues a TX chain with one descriptor per piece (device-readable) and kicks TX.
    pub fn send(&mut self, pieces: &[&[u8]]) -> u16 {
        let descs: Vec<(u64, u32, u16)> = pieces
            .iter()
            .map(|piece| {
                let addr = self.alloc(piece.len() as u32);
                self.mem.write_slice(piece, GuestAddress(addr)).unwrap();
                (addr, piece.len() as u32, READ)
            })
            .collect();
        self.send_raw(&descs)
    }

    /// Queues a raw TX chain and kicks TX.
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.tx.add_chain(descs);
        self.kick(TXQ);
        head
    }

    /// The host writes one frame (header included) into the tap.
    pub fn host_send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(self.host.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "host send: {}", io::Error::last_os_error());
    }

    /// The frames the device wrote to the tap since the last call.
    pub fn host_recv(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(self.host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                assert_eq!(io::Error::last_os_error().kind(), io::ErrorKind::WouldBlock);
                return out;
            }
            out.push(buf[..n as usize].to_vec());
        }
    }

    /// Reads a config space range the way a driver does.
    pub fn config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xa5; len];
        self.device.lock().unwrap().read_config(offset, &mut data);
        data
    }
}

/// A frame as the tap or the driver writes it: a zero virtio-net header (plus the given
/// first bytes) and `len` bytes of Ethernet frame from a pattern seeded with `seed`.
pub fn frame(len: usize, seed: u32) -> Vec<u8> {
    let mut out = vec![0u8; VNET_HDR_LEN];
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    out.extend((0..len).map(|_| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as u8
    }));
    out
}

/// A fake tap whose TUNSETOFFLOAD fails, for activation errors.
pub fn refusing_tap() -> (Box<FakeTap>, OwnedFd) {
    let (dev_end, host) = seqpacket_pair();
    (Box::new(FakeTap { fd: dev_end, offloads: Arc::default(), refuse_offloads: true }), host)
}
