//! Helpers shared by wisp's fuzz targets: a reader over the fuzzer's bytes, process setup,
//! and a hostile "guest driver" that lays out split virtqueues in guest memory from those
//! bytes, the way the devices' unit tests do (descriptor table, avail ring, used ring,
//! nothing overlapping) but with every descriptor field under the fuzzer's control.
//!
//! Queue encoding (one per queue a target drives; see README.md and corpus/seeds.py):
//!
//! ```text
//! n_desc u8, then n_desc descriptors of 6 bytes, written to table slots 0..n_desc:
//!   addr u16   < 0xff00: DATA_BASE + 16 * addr (the data blob); else a special address
//!              (0, the rings, the last bytes of memory, past its end, u64::MAX - 15, ...)
//!   len u16    scaled by flag bit 3 (* 256) or made huge by flag bit 4 (0xffff_0000 | len)
//!   flags u8   bits 0-2: VRING_DESC_F_NEXT, _WRITE, _INDIRECT as the guest writes them
//!   next u8    the NEXT index (may name a slot outside the table)
//! n_avail u8, then n_avail heads (u8) in the avail ring
//! bump u8    added to the avail index beyond n_avail (a lying driver)
//! ```
//!
//! After the queues comes the data blob, copied to `DATA_BASE`.

use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wisp_vmm::devices::virtio::{Queue, QueueT};

/// Guest RAM of every device target.
pub const MEM_SIZE: usize = 4 << 20;
/// Where the data blob goes (descriptors point into it).
pub const DATA_BASE: u64 = 0x10_0000;
/// At most this much of the blob is copied (the rest of memory stays zero).
pub const DATA_MAX: usize = 0x10_0000;
/// Queue `i` is laid out at `i * QUEUE_STRIDE` (room for a 1024-entry split queue).
pub const QUEUE_STRIDE: u64 = 0x1_0000;

/// Addresses a descriptor's `addr >= 0xff00` selects: the edges a hostile guest tries.
const SPECIAL_ADDRS: [u64; 12] = [
    0,
    0x100,
    QUEUE_STRIDE,
    DATA_BASE - 1,
    MEM_SIZE as u64 - 1,
    MEM_SIZE as u64 - 8,
    MEM_SIZE as u64 - 16,
    MEM_SIZE as u64,
    MEM_SIZE as u64 + 0x1000,
    1 << 32,
    u64::MAX - 15,
    u64::MAX,
];

/// Reads the fuzzer's bytes front to back; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Once per process: a peer closing a socket must be an error, not SIGPIPE (libFuzzer's
/// main does not ignore it as Rust's does), and a file the fuzzer grows through a share is
/// capped at 64 MiB (EFBIG instead of SIGXFSZ), so no target can fill the disk.
pub fn init_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting signal dispositions and a resource limit; no memory is passed
        // but the rlimit struct, which lives for the call.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 64 << 20, rlim_max: 64 << 20 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
        }
    });
}

/// Fresh, zeroed guest RAM from 0 to `MEM_SIZE`.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// Copies the data blob to `DATA_BASE`.
pub fn write_data(mem: &GuestMemoryMmap, data: &[u8]) {
    let data = &data[..data.len().min(DATA_MAX)];
    mem.write_slice(data, GuestAddress(DATA_BASE)).expect("data blob fits");
}

/// A split virtqueue as a driver lays it out: descriptor table, avail ring, used ring.
pub struct Ring {
    mem: GuestMemoryMmap,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl Ring {
    /// Queue `index` of `size` entries (a power of two) at `index * QUEUE_STRIDE`.
    pub fn new(mem: &GuestMemoryMmap, index: usize, size: u16) -> Self {
        let desc = index as u64 * QUEUE_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self { mem: mem.clone(), desc, avail, used, size }
    }

    /// The device side, set up and ready, as the transport hands it over.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).expect("power-of-two size");
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        queue.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor table in memory");
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).expect("avail ring in memory")
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(self.avail + 2)).expect("avail ring in memory");
    }

    /// Puts `head` in the next avail ring slot and publishes it.
    pub fn offer(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail ring in memory");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).expect("used ring in memory")
    }

    /// Reads one fuzzer-encoded queue (see the module documentation) into this ring.
    pub fn load(&self, input: &mut Input<'_>) {
        let n_desc = u16::from(input.u8()).min(self.size);
        for index in 0..n_desc {
            let code = input.u16();
            let len = input.u16();
            let flags = input.u8();
            let next = input.u8();
            let addr = if code < 0xff00 {
                DATA_BASE + 16 * u64::from(code)
            } else {
                SPECIAL_ADDRS[usize::from(code & 0xff) % SPECIAL_ADDRS.len()]
            };
            let len = if flags & 0x10 != 0 {
                0xffff_0000 | u32::from(len)
            } else if flags & 0x08 != 0 {
                u32::from(len) << 8
            } else {
                u32::from(len)
            };
            self.set_desc(index, addr, len, u16::from(flags & 0x7), u16::from(next));
        }
        let n_avail = input.u8();
        for _ in 0..n_avail {
            let head = input.u8();
            self.offer(u16::from(head));
        }
        let bump = input.u8();
        self.set_avail_idx(self.avail_idx().wrapping_add(u16::from(bump)));
    }
}

/// A connected, non-blocking SOCK_SEQPACKET pair (a fake tap's two ends).
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

/// An `Interrupt` that only counts.
#[derive(Default)]
pub struct CountingInterrupt(pub std::sync::atomic::AtomicUsize);

impl wisp_vmm::devices::virtio::Interrupt for CountingInterrupt {
    fn trigger(&self, _: wisp_vmm::devices::virtio::InterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Runs an event loop until nothing is ready. A device that keeps it busy with nothing
/// to do would spin the VMM's device thread at 100%: that is a finding, so this panics.
pub fn pump<S: event_manager::MutEventSubscriber>(events: &mut event_manager::EventManager<S>) {
    for _ in 0..1000 {
        if events.run_with_timeout(0).expect("event loop") == 0 {
            return;
        }
    }
    panic!("the device's event loop never went idle");
}

/// A directory for scratch files: /dev/shm when there is one (no disk I/O per input).
pub fn scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempfile_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The queue size a selector byte picks: a power of two from 1 to `max`.
pub fn queue_size(sel: u8, max: u16) -> u16 {
    (1u16 << (sel % 11)).min(max)
}
