//! Test-only: a FUSE driver for a real `SharedDir`, driven the way the guest kernel
//! drives it (requests on a split virtqueue, a kick, the reply in the used ring) without
//! KVM. The rings are laid out here as a driver would (descriptor table, avail ring, used
//! ring, nothing overlapping: `MockSplitQueue` overlaps avail and used rings on large
//! queues); requests go in one buffer, replies come back in another. Nothing here is
//! hardened: tests panic on their own mistakes.

use std::ffi::CString;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, GetattrIn, InHeader, InitIn, InitOut, MkdirIn, MknodIn, Opcode, OpenIn, OpenOut,
    OutHeader, ReadIn, ReleaseIn, SetattrIn, WriteIn, WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::FsOptions;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{SharedDir, SharedDirConfig};
pub use crate::devices::virtio::test_utils::GuestRing;
use crate::devices::virtio::test_utils::{guest_memory, RecordingInterrupt};
use crate::devices::virtio::VirtioDevice;

pub const READ: u16 = 0;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Where the rings live (hiprio, then request queues, 16 KiB apart).
const RING_BASE: u64 = 0;
const RING_STRIDE: u64 = 0x4000;
/// Ring sizes the test driver sets up (at most the device's maximum).
pub const TEST_HIPRIO_SIZE: u16 = 16;
pub const TEST_QUEUE_SIZE: u16 = 128;
/// The request buffer (device-readable) and the reply buffer (device-writable).
pub const REQ: u64 = 0x10_0000;
pub const REPLY: u64 = 0x20_0000;
/// Room for the largest reply: a 1 MiB READ plus its header.
pub const REPLY_CAP: u32 = 0x10_1000;
/// The queue requests go to.
pub const REQUEST_QUEUE: usize = 1;

/// A FUSE reply: `Err(errno)` for an error header, else the bytes after the header.
pub type Reply = Result<Vec<u8>, i32>;

/// Parses the start of a reply payload as a FUSE out struct.
pub fn out<T: ByteValued + Default>(data: &[u8]) -> T {
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(&data[..std::mem::size_of::<T>()]);
    value
}

/// A guest with one virtio-fs device and its FUSE driver.
pub struct FuseDriver {
    pub mem: GuestMemoryMmap,
    pub rings: Vec<GuestRing>,
    pub dev: SharedDir,
    pub irq: Arc<RecordingInterrupt>,
    next_unique: u64,
}

impl FuseDriver {
    /// The device for `config`, activated with the hiprio queue and one request queue.
    pub fn new(config: &SharedDirConfig) -> Self {
        let mem = guest_memory();
        let mut dev = SharedDir::new(config).unwrap();
        let rings = vec![
            GuestRing::new(&mem, RING_BASE, TEST_HIPRIO_SIZE),
            GuestRing::new(&mem, RING_BASE + RING_STRIDE, TEST_QUEUE_SIZE),
        ];
        let irq = RecordingInterrupt::new();
        dev.activate(mem.clone(), irq.clone(), rings.iter().map(GuestRing::queue).collect()).unwrap();
        // Consume the activation kicks.
        for q in 0..rings.len() {
            dev.handle_queue_event(q);
        }
        Self { mem, rings, dev, irq, next_unique: 1 }
    }

    /// A writable share of `dir` with the defaults, FUSE INIT done.
    pub fn mounted(config: &SharedDirConfig) -> Self {
        let mut d = Self::new(config);
        d.init().unwrap();
        d
    }

    /// Offers `descs` as one chain on `queue`, kicks the device, and returns the used
    /// length of the chain.
    pub fn submit(&mut self, queue: usize, descs: &[(u64, u32, u16)]) -> u32 {
        let ring = &self.rings[queue];
        let before = ring.used_idx();
        ring.add_chain_at(0, descs);
        self.dev.handle_queue_event(queue);
        let ring = &self.rings[queue];
        assert_eq!(ring.used_idx(), before.wrapping_add(1), "the device did not return the chain");
        let (head, len) = ring.used_elem(before);
        assert_eq!(head, 0);
        len
    }

    /// Writes `bytes` as the request and offers it with a `reply_cap`-byte reply buffer.
    /// Returns the used length.
    pub fn submit_raw(&mut self, queue: usize, bytes: &[u8], reply_cap: u32) -> u32 {
        self.mem.write_slice(bytes, GuestAddress(REQ)).unwrap();
        self.mem.write_slice(&[0xee; 16], GuestAddress(REPLY)).unwrap();
        let mut descs = vec![(REQ, bytes.len() as u32, READ)];
        if reply_cap > 0 {
            descs.push((REPLY, reply_cap, WRITE));
        }
        self.submit(queue, &descs)
    }

    /// The reply header and payload the device wrote (`used_len` bytes).
    pub fn reply(&self, used_len: u32) -> (OutHeader, Vec<u8>) {
        assert!(used_len >= 16, "no reply header (used length {used_len})");
        let header: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(header.len, used_len, "header length and used length differ");
        let mut data = vec![0; used_len as usize - 16];
        self.mem.read_slice(&mut data, GuestAddress(REPLY + 16)).unwrap();
        (header, data)
    }

    /// Sends one request (header filled in here) and returns the reply.
    pub fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) -> Reply {
        let unique = self.next_unique;
        self.next_unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + args.len()) as u32,
            opcode: opcode as u32,
            unique,
            nodeid,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(args);
        let used = self.submit_raw(REQUEST_QUEUE, &bytes, REPLY_CAP);
        let (out, data) = self.reply(used);
        assert_eq!(out.unique, unique, "reply to another request");
        if out.error != 0 {
            assert_eq!(used, 16, "an error reply is a bare header");
            Err(-out.error)
        } else {
            Ok(data)
        }
    }

    pub fn init(&mut self) -> Result<InitOut, i32> {
        let flags = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::WRITEBACK_CACHE
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::PARALLEL_DIROPS;
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 * 1024,
            flags: flags.bits() as u32,
        };
        self.call(Opcode::Init, 0, init.as_slice()).map(|d| out(&d))
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.call(Opcode::Lookup, parent, &cstr(name)).map(|d| out(&d))
    }

    pub fn getattr(&mut self, ino: u64) -> Result<AttrOut, i32> {
        self.call(Opcode::Getattr, ino, GetattrIn::default().as_slice()).map(|d| out(&d))
    }

    pub fn open(&mut self, ino: u64, flags: i32) -> Result<OpenOut, i32> {
        let open = OpenIn { flags: flags as u32, fuse_flags: 0 };
        self.call(Opcode::Open, ino, open.as_slice()).map(|d| out(&d))
    }

    pub fn read(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Reply {
        let read = ReadIn { fh, offset, size, ..Default::default() };
        self.call(Opcode::Read, ino, read.as_slice())
    }

    pub fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let write = WriteIn { fh, offset, size: data.len() as u32, ..Default::default() };
        let mut args = write.as_slice().to_vec();
        args.extend_from_slice(data);
        self.call(Opcode::Write, ino, &args).map(|d| out::<WriteOut>(&d).size)
    }

    pub fn release(&mut self, ino: u64, fh: u64) -> Reply {
        self.call(Opcode::Release, ino, ReleaseIn { fh, ..Default::default() }.as_slice())
    }

    pub fn opendir(&mut self, ino: u64) -> Result<OpenOut, i32> {
        let open = OpenIn { flags: libc::O_RDONLY as u32, fuse_flags: 0 };
        self.call(Opcode::Opendir, ino, open.as_slice()).map(|d| out(&d))
    }

    pub fn releasedir(&mut self, ino: u64, fh: u64) -> Reply {
        self.call(Opcode::Releasedir, ino, ReleaseIn { fh, ..Default::default() }.as_slice())
    }

    /// READDIRPLUS from the start of the directory: (name, node id) per entry listed.
    pub fn readdirplus(&mut self, ino: u64, fh: u64) -> Result<Vec<(String, u64)>, i32> {
        let read = ReadIn { fh, offset: 0, size: 64 * 1024, ..Default::default() };
        let data = self.call(Opcode::Readdirplus, ino, read.as_slice())?;
        let mut entries = Vec::new();
        let mut rest = &data[..];
        let entry_len = std::mem::size_of::<EntryOut>();
        // fuse_direntplus: entry_out, then the dirent (ino, off, namelen, type), the
        // name, padding to 8 bytes.
        while rest.len() >= entry_len + 24 {
            let entry: EntryOut = out(rest);
            let namelen = u32::from_le_bytes(rest[entry_len + 16..entry_len + 20].try_into().unwrap()) as usize;
            let name = String::from_utf8_lossy(&rest[entry_len + 24..entry_len + 24 + namelen]).into_owned();
            entries.push((name, entry.nodeid));
            let len = (entry_len + 24 + namelen + 7) & !7;
            rest = &rest[len.min(rest.len())..];
        }
        Ok(entries)
    }

    /// FORGET on the hiprio queue (no reply).
    pub fn forget(&mut self, ino: u64, count: u64) {
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + 8) as u32,
            opcode: Opcode::Forget as u32,
            unique: 0,
            nodeid: ino,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(&count.to_le_bytes());
        assert_eq!(self.submit_raw(0, &bytes, 0), 0, "FORGET has no reply");
    }

    /// CREATE: the new entry and the open handle.
    pub fn create(&mut self, parent: u64, name: &str, flags: i32, mode: u32) -> Result<(EntryOut, OpenOut), i32> {
        let create = CreateIn { flags: flags as u32, mode, umask: 0, fuse_flags: 0 };
        let mut args = create.as_slice().to_vec();
        args.extend_from_slice(&cstr(name));
        self.call(Opcode::Create, parent, &args).map(|d| {
            let entry: EntryOut = out(&d);
            (entry, out(&d[std::mem::size_of::<EntryOut>()..]))
        })
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let mut args = MkdirIn { mode, umask: 0 }.as_slice().to_vec();
        args.extend_from_slice(&cstr(name));
        self.call(Opcode::Mkdir, parent, &args).map(|d| out(&d))
    }

    pub fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let mut args = MknodIn { mode, rdev, umask: 0, padding: 0 }.as_slice().to_vec();
        args.extend_from_slice(&cstr(name));
        self.call(Opcode::Mknod, parent, &args).map(|d| out(&d))
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Reply {
        self.call(Opcode::Unlink, parent, &cstr(name))
    }

    pub fn setattr(&mut self, ino: u64, attr: SetattrIn) -> Result<AttrOut, i32> {
        self.call(Opcode::Setattr, ino, attr.as_slice()).map(|d| out(&d))
    }

    pub fn readlink(&mut self, ino: u64) -> Reply {
        self.call(Opcode::Readlink, ino, &[])
    }

    pub fn root_attr(&mut self) -> AttrOut {
        self.getattr(ROOT_ID).unwrap()
    }
}

/// `name` as FUSE sends it: NUL terminated.
pub fn cstr(name: &str) -> Vec<u8> {
    CString::new(name).unwrap().into_bytes_with_nul()
}
