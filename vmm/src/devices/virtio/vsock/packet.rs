//! The vsock packet header (virtio 1.2 §5.10.6) and moving packets between guest
//! descriptor chains and host memory.
//!
//! Trusts nothing in a chain: descriptors must lie in guest memory and have the
//! direction the queue requires, the header may straddle descriptors, the payload may be
//! in the header's descriptor (Linux >= 6.2 puts both in one) or spread over any number
//! of descriptors after it, and its declared length must fit in what the chain carries
//! and in `MAX_PKT_DATA`. Anything else is a typed error; the caller returns the chain to
//! the guest and carries on.
//!
//! Why not `virtio_vsock::packet::VsockPacket` (0.11): it handles header+data in one
//! descriptor and header and data in exactly one descriptor each, but rejects payloads
//! spread over several descriptors (Linux zerocopy TX), headers split across descriptors,
//! and buffers that cross a guest memory region. `virtio_queue::{Reader, Writer}` handle
//! all of these, so the packets are parsed on top of them.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Stream sockets, the only type the device offers (`VIRTIO_VSOCK_TYPE_STREAM`).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Largest payload the device accepts or produces in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: usize = 64 * 1024;

type DescChain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain is unusable (address outside guest memory or length overflow): {0}")]
    Chain(virtio_queue::Error),
    #[error("{queue} queue descriptor chain has a descriptor of the wrong direction")]
    WrongDirection { queue: &'static str },
    #[error("descriptor chain carries {0} bytes, less than a {hdr}-byte packet header", hdr = PacketHeader::SIZE)]
    ShortHeader(usize),
    #[error("packet header declares {0} payload bytes, more than the {max} allowed", max = MAX_PKT_DATA)]
    DataTooLong(u32),
    #[error("packet header declares {declared} payload bytes but the chain carries {available}")]
    Truncated { declared: u32, available: usize },
    #[error("copying the packet to or from guest memory failed: {0}")]
    Copy(std::io::Error),
}

/// `struct virtio_vsock_hdr`, decoded. Values are host-endian; the wire format is
/// little-endian and packed (44 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub const SIZE: usize = 44;

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        let mut field = FieldReader(bytes.as_slice());
        Self {
            src_cid: u64::from_le_bytes(field.take()),
            dst_cid: u64::from_le_bytes(field.take()),
            src_port: u32::from_le_bytes(field.take()),
            dst_port: u32::from_le_bytes(field.take()),
            len: u32::from_le_bytes(field.take()),
            type_: u16::from_le_bytes(field.take()),
            op: u16::from_le_bytes(field.take()),
            flags: u32::from_le_bytes(field.take()),
            buf_alloc: u32::from_le_bytes(field.take()),
            fwd_cnt: u32::from_le_bytes(field.take()),
        }
    }

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut rest = out.as_mut_slice();
        for field in fields {
            let (head, tail) = rest.split_at_mut(field.len());
            head.copy_from_slice(field);
            rest = tail;
        }
        out
    }

    /// The RST that answers `self` (a packet nobody can take): addresses swapped.
    pub fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: self.type_,
            op: OP_RST,
            ..Self::default()
        }
    }
}

/// Consumes fixed-size little-endian fields from the front of a 44-byte header; the
/// field sizes add up to the header size, so `take` never runs short.
struct FieldReader<'a>(&'a [u8]);

impl FieldReader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((field, rest)) => {
                self.0 = rest;
                *field
            }
            None => [0; N],
        }
    }
}

/// Fails unless every descriptor of `chain` has the direction `writable`.
fn check_direction(chain: &DescChain<'_>, writable: bool, queue: &'static str) -> Result<(), PacketError> {
    if chain.clone().all(|desc| desc.is_write_only() == writable) {
        Ok(())
    } else {
        Err(PacketError::WrongDirection { queue })
    }
}

/// Reads the packet a guest put on the TX queue: returns its header and copies its
/// payload (`header.len` bytes) to the front of `data`.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescChain<'_>,
    data: &mut [u8; MAX_PKT_DATA],
) -> Result<PacketHeader, PacketError> {
    check_direction(&chain, false, "TX")?;
    let mut reader = Reader::new(mem, chain).map_err(PacketError::Chain)?;
    let available = reader.available_bytes();
    let mut raw = [0u8; PacketHeader::SIZE];
    if available < raw.len() {
        return Err(PacketError::ShortHeader(available));
    }
    reader.read_exact(&mut raw).map_err(PacketError::Copy)?;
    let header = PacketHeader::from_bytes(&raw);

    let declared = header.len;
    let len = usize::try_from(declared).map_err(|_| PacketError::DataTooLong(declared))?;
    if len > MAX_PKT_DATA {
        return Err(PacketError::DataTooLong(declared));
    }
    let available = reader.available_bytes();
    let payload = data
        .get_mut(..len)
        .filter(|_| len <= available)
        .ok_or(PacketError::Truncated { declared, available })?;
    reader.read_exact(payload).map_err(PacketError::Copy)?;
    Ok(header)
}

/// A guest RX buffer (one descriptor chain of device-writable memory) that receives one
/// packet: the header, then the payload, in whatever descriptors the guest provided.
pub struct RxBuffer<'m> {
    writer: Writer<'m>,
}

impl<'m> RxBuffer<'m> {
    pub fn new(mem: &'m GuestMemoryMmap, chain: DescChain<'m>) -> Result<Self, PacketError> {
        check_direction(&chain, true, "RX")?;
        let writer = Writer::new(mem, chain).map_err(PacketError::Chain)?;
        let available = writer.available_bytes();
        if available < PacketHeader::SIZE {
            return Err(PacketError::ShortHeader(available));
        }
        Ok(Self { writer })
    }

    /// How many payload bytes fit after the header (capped at `MAX_PKT_DATA`).
    pub fn data_capacity(&self) -> usize {
        self.writer
            .available_bytes()
            .saturating_sub(PacketHeader::SIZE)
            .min(MAX_PKT_DATA)
    }

    /// Writes the packet; `header.len` must equal `data.len()`. Returns the number of
    /// bytes written, for the used ring.
    pub fn write(mut self, header: &PacketHeader, data: &[u8]) -> Result<u32, PacketError> {
        if data.len() > self.data_capacity() {
            return Err(PacketError::Truncated {
                declared: header.len,
                available: self.data_capacity(),
            });
        }
        self.writer.write_all(&header.to_bytes()).map_err(PacketError::Copy)?;
        self.writer.write_all(data).map_err(PacketError::Copy)?;
        // At most 44 + 64 KiB.
        Ok(u32::try_from(self.writer.bytes_written()).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_utils::{guest_chain, leak_memory, READ, WRITE};
    use vm_memory::{Bytes, GuestAddress};

    fn sample_header(len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn header_round_trips_and_matches_the_wire_layout() {
        let hdr = sample_header(5);
        let bytes = hdr.to_bytes();
        assert_eq!(PacketHeader::from_bytes(&bytes), hdr);
        // Field offsets from the spec: len at 24, op at 30, fwd_cnt at 40.
        assert_eq!(&bytes[24..28], &5u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&bytes[40..44], &77u32.to_le_bytes());
    }

    #[test]
    fn reset_reply_swaps_addresses() {
        let rst = sample_header(9).reset_reply();
        assert_eq!((rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port), (2, 3, 1024, 0x1122_3344));
        assert_eq!((rst.op, rst.len, rst.type_), (OP_RST, 0, TYPE_STREAM));
    }

    /// Writes `hdr` + `data` contiguously at `addr`.
    fn put_packet(mem: &GuestMemoryMmap, addr: u64, hdr: &PacketHeader, data: &[u8]) {
        mem.write_slice(&hdr.to_bytes(), GuestAddress(addr)).unwrap();
        mem.write_slice(data, GuestAddress(addr + PacketHeader::SIZE as u64)).unwrap();
    }

    fn parse(mem: &'static GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Result<(PacketHeader, Vec<u8>), PacketError> {
        let chain = guest_chain(mem, descs);
        let mut buf = Box::new([0u8; MAX_PKT_DATA]);
        let hdr = read_tx_packet(mem, chain, &mut buf)?;
        Ok((hdr, buf[..hdr.len as usize].to_vec()))
    }

    #[test]
    fn tx_header_and_data_in_one_descriptor() {
        let mem = leak_memory();
        let data = b"hello, agent";
        put_packet(mem, 0x10_0000, &sample_header(data.len() as u32), data);
        let (hdr, got) = parse(mem, &[(0x10_0000, 44 + data.len() as u32, READ)]).unwrap();
        assert_eq!(hdr, sample_header(data.len() as u32));
        assert_eq!(got, data);
    }

    #[test]
    fn tx_header_and_data_in_separate_descriptors() {
        let mem = leak_memory();
        let data = b"split layout";
        mem.write_slice(&sample_header(data.len() as u32).to_bytes(), GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(data, GuestAddress(0x20_0000)).unwrap();
        let (_, got) = parse(mem, &[(0x10_0000, 44, READ), (0x20_0000, 64, READ)]).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn tx_header_straddling_descriptors_and_scattered_payload() {
        let mem = leak_memory();
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut wire = sample_header(data.len() as u32).to_bytes().to_vec();
        wire.extend_from_slice(&data);
        // 10 header bytes, 40 bytes (rest of header + 6 of payload), 100, rest.
        let cuts = [(0x10_0000u64, 0..10), (0x11_0000, 10..50), (0x12_0000, 50..150), (0x13_0000, 150..wire.len())];
        let mut descs = Vec::new();
        for (addr, range) in cuts {
            mem.write_slice(&wire[range.clone()], GuestAddress(addr)).unwrap();
            descs.push((addr, range.len() as u32, READ));
        }
        let (hdr, got) = parse(mem, &descs).unwrap();
        assert_eq!(hdr.len, 300);
        assert_eq!(got, data);
    }

    #[test]
    fn tx_header_only_packet() {
        let mem = leak_memory();
        let mut hdr = sample_header(0);
        hdr.op = OP_CREDIT_REQUEST;
        put_packet(mem, 0x10_0000, &hdr, &[]);
        let (got, data) = parse(mem, &[(0x10_0000, 44, READ)]).unwrap();
        assert_eq!(got, hdr);
        assert!(data.is_empty());
    }

    #[test]
    fn tx_malformed_chains_are_errors() {
        let mem = leak_memory();
        put_packet(mem, 0x10_0000, &sample_header(100), &[7; 100]);
        // Header shorter than 44 bytes.
        assert!(matches!(parse(mem, &[(0x10_0000, 43, READ)]), Err(PacketError::ShortHeader(43))));
        // Payload shorter than declared.
        assert!(matches!(
            parse(mem, &[(0x10_0000, 44 + 99, READ)]),
            Err(PacketError::Truncated { declared: 100, available: 99 })
        ));
        // Declared length beyond the maximum.
        put_packet(mem, 0x11_0000, &sample_header(MAX_PKT_DATA as u32 + 1), &[]);
        assert!(matches!(
            parse(mem, &[(0x11_0000, 44, READ), (0x20_0000, 0x2_0000, READ)]),
            Err(PacketError::DataTooLong(_))
        ));
        put_packet(mem, 0x11_0000, &sample_header(u32::MAX), &[]);
        assert!(matches!(parse(mem, &[(0x11_0000, 44, READ)]), Err(PacketError::DataTooLong(u32::MAX))));
        // Buffers outside guest memory, or running off its end.
        assert!(matches!(parse(mem, &[(0xdead_0000_0000, 44 + 100, READ)]), Err(PacketError::Chain(_))));
        let end = mem_end(mem);
        assert!(matches!(parse(mem, &[(end - 10, 44 + 100, READ)]), Err(PacketError::Chain(_))));
        assert!(matches!(parse(mem, &[(u64::MAX - 8, 44, READ)]), Err(PacketError::Chain(_))));
        // A device-writable descriptor on the TX queue.
        assert!(matches!(
            parse(mem, &[(0x10_0000, 44, READ), (0x10_002c, 100, WRITE)]),
            Err(PacketError::WrongDirection { .. })
        ));
    }

    fn mem_end(mem: &GuestMemoryMmap) -> u64 {
        use vm_memory::{Address, GuestMemory};
        mem.last_addr().raw_value() + 1
    }

    fn rx_buffer(mem: &'static GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Result<RxBuffer<'static>, PacketError> {
        RxBuffer::new(mem, guest_chain(mem, descs))
    }

    #[test]
    fn rx_single_descriptor_and_split_layouts() {
        let mem = leak_memory();
        let data = [0xabu8; 100];
        let hdr = sample_header(100);

        let buf = rx_buffer(mem, &[(0x10_0000, 44 + 4096, WRITE)]).unwrap();
        assert_eq!(buf.data_capacity(), 4096);
        assert_eq!(buf.write(&hdr, &data).unwrap(), 144);
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(PacketHeader::from_bytes(&raw), hdr);
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x10_002c)).unwrap();
        assert_eq!(got, data);

        let buf = rx_buffer(mem, &[(0x20_0000, 44, WRITE), (0x30_0000, 50, WRITE), (0x31_0000, 50, WRITE)]).unwrap();
        assert_eq!(buf.data_capacity(), 100);
        assert_eq!(buf.write(&hdr, &data).unwrap(), 144);
        mem.read_slice(&mut got[..50], GuestAddress(0x30_0000)).unwrap();
        mem.read_slice(&mut got[50..], GuestAddress(0x31_0000)).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn rx_capacity_is_capped_and_bad_buffers_rejected() {
        let mem = leak_memory();
        let big = rx_buffer(mem, &[(0x10_0000, 44 + 0x2_0000, WRITE)]).unwrap();
        assert_eq!(big.data_capacity(), MAX_PKT_DATA);
        assert!(matches!(rx_buffer(mem, &[(0x10_0000, 20, WRITE)]), Err(PacketError::ShortHeader(20))));
        assert!(matches!(rx_buffer(mem, &[(0x10_0000, 100, READ)]), Err(PacketError::WrongDirection { .. })));
        assert!(matches!(rx_buffer(mem, &[(0xdead_0000_0000, 100, WRITE)]), Err(PacketError::Chain(_))));
        let small = rx_buffer(mem, &[(0x10_0000, 50, WRITE)]).unwrap();
        assert!(matches!(small.write(&sample_header(10), &[0; 10]), Err(PacketError::Truncated { .. })));
    }
}
