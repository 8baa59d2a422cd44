//! Helpers shared by wisp's fuzz targets: a reader over the fuzzer's bytes, process setup,
//! and a hostile "guest driver" that fills split virtqueues from those bytes. The queues
//! are the devices' unit tests' own (`wisp_vmm::devices::virtio::test_utils::GuestRing`,
//! built with wisp-vmm's `test-utils` feature: descriptor table, avail ring, used ring,
//! nothing overlapping), with every descriptor field under the fuzzer's control.
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

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
pub use wisp_vmm::devices::virtio::test_utils::{seqpacket_pair, GuestRing};

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

/// Queue `index` of `size` entries (a power of two) at `index * QUEUE_STRIDE`, laid out
/// as the devices' unit tests lay it out (`GuestRing`).
pub fn ring(mem: &GuestMemoryMmap, index: usize, size: u16) -> GuestRing {
    GuestRing::new(mem, index as u64 * QUEUE_STRIDE, size)
}

/// Reads one fuzzer-encoded queue (see the module documentation) into `ring`.
pub fn load_ring(ring: &GuestRing, input: &mut Input<'_>) {
    let n_desc = u16::from(input.u8()).min(ring.size());
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
        ring.set_desc(index, addr, len, u16::from(flags & 0x7), u16::from(next));
    }
    let n_avail = input.u8();
    for _ in 0..n_avail {
        let head = input.u8();
        ring.offer(u16::from(head));
    }
    let bump = input.u8();
    ring.set_avail_idx(ring.avail_idx().wrapping_add(u16::from(bump)));
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
