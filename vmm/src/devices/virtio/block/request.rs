//! Parsing one virtio-blk request (virtio 1.2, section 5.2.6) out of a descriptor chain.
//!
//! Trust: none. The chain, the header and every address and length come from the guest.
//! Parsing checks directions, lengths and that every buffer lies in guest memory, and
//! returns typed errors. A rejected request still says where its status byte is when the
//! chain has a usable one, so the device can answer VIRTIO_BLK_S_IOERR instead of leaving
//! the driver waiting.
//!
//! Layout: the device-readable descriptors come first and carry the 16-byte header and,
//! for writes, the data; the device-writable ones follow and carry, for reads and GET_ID,
//! the data and then the one status byte, which is the last byte of the chain. Linux puts
//! the header, each data segment and the status in descriptors of their own; any other
//! split (VIRTIO_F_ANY_LAYOUT, implied by VERSION_1) parses the same way. Zero-length
//! descriptors carry nothing and are skipped.

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::{SECTOR_SIZE, SEG_MAX};

/// type (le32), reserved (le32), sector (le64).
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Most descriptors one request may use: header, `SEG_MAX` data segments, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk into device-writable buffers.
    In,
    /// Write device-readable buffers to the disk.
    Out,
    Flush,
    /// Read the 20-byte device ID.
    GetId,
    /// Anything else: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// A stretch of guest memory, known to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request that passed every check.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    /// First sector, in 512-byte units (whatever the guest's block size).
    pub sector: u64,
    /// The data buffers in order: device-readable for `Out`, device-writable for `In` and
    /// `GetId`, empty for the others.
    pub data: Vec<Segment>,
    /// Total length of `data`; a multiple of 512 for `In` and `Out`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the chain does not end with a device-writable status byte in guest memory")]
    NoStatus,
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the header needs {REQUEST_HEADER_SIZE} device-readable bytes, the chain has {0}")]
    HeaderTooShort(u64),
    #[error("cannot read the header from guest memory")]
    HeaderUnreadable,
    #[error("a {request_type:?} request carries {readable} device-readable and {writable} device-writable data bytes")]
    DataDirection { request_type: RequestType, readable: u64, writable: u64 },
    #[error("data length {0} is not a multiple of {SECTOR_SIZE} bytes")]
    UnalignedLength(u64),
}

/// Why a chain was rejected, and where to report it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{error}")]
pub struct BadRequest {
    pub error: RequestError,
    /// The chain's status byte, if it has a usable one: answer VIRTIO_BLK_S_IOERR there.
    pub status: Option<GuestAddress>,
}

/// One descriptor of the chain, after the zero-length ones were dropped.
#[derive(Debug, Clone, Copy)]
struct Piece {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

impl Request {
    /// Parses the chain. `mem` is the memory the chain's buffers live in.
    pub fn parse<M, G>(chain: DescriptorChain<M>, mem: &G) -> Result<Self, BadRequest>
    where
        M: Deref,
        M::Target: GuestMemory,
        G: GuestMemory,
    {
        let no_status = |error| BadRequest { error, status: None };
        let mut pieces = Vec::new();
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            if pieces.len() == MAX_DESCRIPTORS {
                return Err(no_status(RequestError::TooManyDescriptors));
            }
            pieces.push(Piece { addr: desc.addr(), len: desc.len(), writable: desc.is_write_only() });
        }

        // The status byte first: every later error is reported through it.
        let status = match pieces.last() {
            Some(last) if last.writable => last
                .addr
                .checked_add(u64::from(last.len) - 1)
                .filter(|&addr| mem.check_range(addr, 1))
                .ok_or(no_status(RequestError::NoStatus))?,
            _ => return Err(no_status(RequestError::NoStatus)),
        };
        let bad = |error| BadRequest { error, status: Some(status) };

        let split = pieces.iter().position(|p| p.writable).unwrap_or(pieces.len());
        let (readable, writable) = pieces.split_at(split);
        if writable.iter().any(|p| !p.writable) {
            return Err(bad(RequestError::ReadableAfterWritable));
        }
        if let Some(p) = pieces.iter().find(|p| !mem.check_range(p.addr, p.len as usize)) {
            return Err(bad(RequestError::OutsideGuestMemory { addr: p.addr.raw_value(), len: p.len }));
        }
        // At most MAX_DESCRIPTORS lengths of at most 4 GiB each: no overflow in u64.
        let readable_len: u64 = readable.iter().map(|p| u64::from(p.len)).sum();
        let writable_len: u64 = writable.iter().map(|p| u64::from(p.len)).sum();

        if readable_len < REQUEST_HEADER_SIZE as u64 {
            return Err(bad(RequestError::HeaderTooShort(readable_len)));
        }
        let mut header = [0u8; REQUEST_HEADER_SIZE];
        let mut filled = 0;
        for seg in byte_range(readable, 0, REQUEST_HEADER_SIZE as u64) {
            let dst = header.get_mut(filled..filled + seg.len as usize).ok_or(bad(RequestError::HeaderUnreadable))?;
            mem.read_slice(dst, seg.addr).map_err(|_| bad(RequestError::HeaderUnreadable))?;
            filled += seg.len as usize;
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let request_type = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

        let out_len = readable_len - REQUEST_HEADER_SIZE as u64;
        let in_len = writable_len - 1;
        let direction = || bad(RequestError::DataDirection { request_type, readable: out_len, writable: in_len });
        let (data, data_len) = match request_type {
            RequestType::In | RequestType::GetId if out_len != 0 => return Err(direction()),
            RequestType::In | RequestType::GetId => (byte_range(writable, 0, in_len), in_len),
            RequestType::Out if in_len != 0 => return Err(direction()),
            RequestType::Out => (byte_range(readable, REQUEST_HEADER_SIZE as u64, out_len), out_len),
            RequestType::Flush if out_len != 0 || in_len != 0 => return Err(direction()),
            RequestType::Flush | RequestType::Unsupported(_) => (Vec::new(), 0),
        };
        if matches!(request_type, RequestType::In | RequestType::Out) && data_len % SECTOR_SIZE != 0 {
            return Err(bad(RequestError::UnalignedLength(data_len)));
        }
        Ok(Self { request_type, sector, data, data_len, status })
    }
}

/// The bytes `[skip, skip + len)` of the concatenation of `pieces`, as segments.
fn byte_range(pieces: &[Piece], skip: u64, len: u64) -> Vec<Segment> {
    let mut segments = Vec::new();
    let (mut skip, mut left) = (skip, len);
    for p in pieces {
        if left == 0 {
            break;
        }
        let plen = u64::from(p.len);
        if skip >= plen {
            skip -= plen;
            continue;
        }
        // `take` <= p.len, and addr + p.len is in guest memory, so neither can overflow.
        let take = (plen - skip).min(left);
        segments.push(Segment { addr: p.addr.unchecked_add(skip), len: take as u32 });
        left -= take;
        skip = 0;
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, DATA_BASE, MEM_SIZE, READ, WRITE};
    use crate::devices::virtio::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    fn header(request_type: u32, sector: u64) -> Vec<u8> {
        let mut h = request_type.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Offers `descs` on a fresh queue and parses the chain the device pops.
    fn parse(mem: &GuestMemoryMmap, gq: &mut GuestQueue, descs: &[(u64, u32, u16)]) -> Result<Request, BadRequest> {
        gq.add_chain(descs);
        let mut queue: Queue = gq.queue();
        let chain = queue.pop_descriptor_chain(mem).unwrap();
        Request::parse(chain, mem)
    }

    const H: u64 = DATA_BASE;
    const D: u64 = DATA_BASE + 0x1000;
    const S: u64 = DATA_BASE + 0x10_0000;

    #[test]
    fn linux_layouts_parse() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.write(H, &header(VIRTIO_BLK_T_IN, 7));
        let req = parse(&mem, &mut gq, &[(H, 16, READ), (D, 512, WRITE), (D + 0x800, 1024, WRITE), (S, 1, WRITE)]);
        assert_eq!(
            req,
            Ok(Request {
                request_type: RequestType::In,
                sector: 7,
                data: vec![
                    Segment { addr: GuestAddress(D), len: 512 },
                    Segment { addr: GuestAddress(D + 0x800), len: 1024 }
                ],
                data_len: 1536,
                status: GuestAddress(S),
            })
        );

        let mut gq = GuestQueue::new(&mem, 16);
        gq.write(H, &header(VIRTIO_BLK_T_OUT, 1));
        let req = parse(&mem, &mut gq, &[(H, 16, READ), (D, 4096, READ), (S, 1, WRITE)]).unwrap();
        assert_eq!((req.request_type, req.data_len, req.data.len()), (RequestType::Out, 4096, 1));

        let mut gq = GuestQueue::new(&mem, 16);
        gq.write(H, &header(VIRTIO_BLK_T_FLUSH, 0));
        let req = parse(&mem, &mut gq, &[(H, 16, READ), (S, 1, WRITE)]).unwrap();
        assert_eq!((req.request_type, req.data_len), (RequestType::Flush, 0));
    }

    #[test]
    fn any_layout_header_with_data_and_data_with_status() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        // Header split over two descriptors, the second one also carrying data.
        gq.write(H, &header(VIRTIO_BLK_T_OUT, 3)[..10]);
        gq.write(D, &header(VIRTIO_BLK_T_OUT, 3)[10..]);
        let req = parse(&mem, &mut gq, &[(H, 10, READ), (D, 6 + 512, READ), (S, 0, WRITE), (S, 1, WRITE)]).unwrap();
        assert_eq!(req.sector, 3);
        assert_eq!(req.data, vec![Segment { addr: GuestAddress(D + 6), len: 512 }]);
        assert_eq!(req.status, GuestAddress(S));

        // Data and status in one device-writable descriptor.
        let mut gq = GuestQueue::new(&mem, 16);
        gq.write(H, &header(VIRTIO_BLK_T_IN, 0));
        let req = parse(&mem, &mut gq, &[(H, 16, READ), (D, 513, WRITE)]).unwrap();
        assert_eq!(req.data, vec![Segment { addr: GuestAddress(D), len: 512 }]);
        assert_eq!(req.status, GuestAddress(D + 512));
    }

    #[test]
    fn malformed_chains_are_rejected_with_or_without_a_status_byte() {
        let mem = guest_memory();
        let outside = MEM_SIZE as u64 + 0x1000;
        // (what, request type, chain, expected error, whether a status byte was found)
        type Case = (&'static str, u32, Vec<(u64, u32, u16)>, RequestError, bool);
        let cases: Vec<Case> = vec![
            ("nothing writable", VIRTIO_BLK_T_OUT, vec![(H, 16, READ), (D, 512, READ)], RequestError::NoStatus, false),
            ("status read-only", VIRTIO_BLK_T_OUT, vec![(H, 16, READ), (S, 1, READ)], RequestError::NoStatus, false),
            (
                "status outside memory",
                VIRTIO_BLK_T_FLUSH,
                vec![(H, 16, READ), (outside, 1, WRITE)],
                RequestError::NoStatus,
                false,
            ),
            (
                "status wraps",
                VIRTIO_BLK_T_FLUSH,
                vec![(H, 16, READ), (u64::MAX, 2, WRITE)],
                RequestError::NoStatus,
                false,
            ),
            (
                "header too short",
                VIRTIO_BLK_T_IN,
                vec![(H, 8, READ), (S, 1, WRITE)],
                RequestError::HeaderTooShort(8),
                true,
            ),
            ("only a status", VIRTIO_BLK_T_IN, vec![(S, 1, WRITE)], RequestError::HeaderTooShort(0), true),
            (
                "header outside memory",
                VIRTIO_BLK_T_IN,
                vec![(outside, 16, READ), (S, 1, WRITE)],
                RequestError::OutsideGuestMemory { addr: outside, len: 16 },
                true,
            ),
            (
                "data straddles the end of memory",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (MEM_SIZE as u64 - 512, 1024, WRITE), (S, 1, WRITE)],
                RequestError::OutsideGuestMemory { addr: MEM_SIZE as u64 - 512, len: 1024 },
                true,
            ),
            (
                "absurd length",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (D, 0x8000_0000, WRITE), (S, 1, WRITE)],
                RequestError::OutsideGuestMemory { addr: D, len: 0x8000_0000 },
                true,
            ),
            // The chain iterator stops before the 4 GiB total overflows u32, so the status
            // descriptor is never seen and the last one seen is not a status byte.
            (
                "lengths summing past 4 GiB",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (D, u32::MAX - 16, WRITE), (S, 1, WRITE)],
                RequestError::NoStatus,
                false,
            ),
            (
                "data and status in one buffer, data unaligned",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (D, 512, WRITE)],
                RequestError::UnalignedLength(511),
                true,
            ),
            (
                "readable after writable",
                VIRTIO_BLK_T_OUT,
                vec![(H, 16, READ), (D, 512, WRITE), (D, 512, READ), (S, 1, WRITE)],
                RequestError::ReadableAfterWritable,
                true,
            ),
            (
                "read with device-readable data",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (D, 512, READ), (S, 1, WRITE)],
                RequestError::DataDirection { request_type: RequestType::In, readable: 512, writable: 0 },
                true,
            ),
            (
                "write with device-writable data",
                VIRTIO_BLK_T_OUT,
                vec![(H, 16, READ), (D, 512, WRITE), (S, 1, WRITE)],
                RequestError::DataDirection { request_type: RequestType::Out, readable: 0, writable: 512 },
                true,
            ),
            (
                "flush with data",
                VIRTIO_BLK_T_FLUSH,
                vec![(H, 16, READ), (D, 512, WRITE), (S, 1, WRITE)],
                RequestError::DataDirection { request_type: RequestType::Flush, readable: 0, writable: 512 },
                true,
            ),
            (
                "unaligned read",
                VIRTIO_BLK_T_IN,
                vec![(H, 16, READ), (D, 100, WRITE), (S, 1, WRITE)],
                RequestError::UnalignedLength(100),
                true,
            ),
        ];
        for (what, request_type, descs, error, has_status) in cases {
            let mut gq = GuestQueue::new(&mem, 16);
            gq.write(H, &header(request_type, 0));
            let err = parse(&mem, &mut gq, &descs).expect_err(what);
            assert_eq!(err.error, error, "{what}");
            assert_eq!(err.status.is_some(), has_status, "{what}");
        }
    }

    #[test]
    fn too_many_descriptors() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 512);
        gq.write(H, &header(VIRTIO_BLK_T_IN, 0));
        let mut descs = vec![(H, 16, READ)];
        descs.extend((0..MAX_DESCRIPTORS as u64).map(|i| (D + 512 * i, 512, WRITE)));
        let err = parse(&mem, &mut gq, &descs).unwrap_err();
        assert_eq!(err, BadRequest { error: RequestError::TooManyDescriptors, status: None });
    }

    #[test]
    fn unsupported_types_parse_and_carry_their_status() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 16);
        gq.write(H, &header(11, 0)); // DISCARD, not offered
        let req = parse(&mem, &mut gq, &[(H, 16, READ), (D, 16, READ), (S, 1, WRITE)]).unwrap();
        assert_eq!(req.request_type, RequestType::Unsupported(11));
        assert_eq!(req.status, GuestAddress(S));
    }
}
