//! The snapshot file: what is in it, in which order, and how a damaged or foreign file
//! is told apart from a good one.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! "WISPSNAP"            8 bytes, the magic
//! version               u32, FORMAT_VERSION
//! section*              header, vm, memory, vcpu0 .. vcpuN-1, device0 .. deviceM-1,
//!                       legacy, end: exactly this order (N >= 1, M >= 0)
//!   kind                u16: 1 header, 2 vm, 3 vcpu, 4 end, 5 device, 6 memory,
//!                       7 legacy
//!   index               u16: the vCPU's or device's index, 0 for the others
//!   length              u32: payload bytes, at most the kind's maximum
//!   payload             `length` bytes (header.rs, vm.rs, memory.rs, vcpu.rs,
//!                       transport.rs, legacy.rs; end: u16 vCPU count, u16 device count)
//!   crc32               u32: CRC-32 (zlib's) of kind, index, length and payload
//! ```
//!
//! Devices are the VM's virtio-mmio transports in the order the VM configuration lists
//! them (the header's configuration identity says which configuration that is).
//!
//! Nothing may follow the end section. Guest memory is not in this file but in a memory
//! file of its own (`memory`), which the memory section names by its random id.
//!
//! Trust: `Snapshot::decode` takes any bytes: a truncated, corrupted or hand-made file
//! gets a `FormatError` saying where and what, never a panic, and no length read from
//! the file is trusted before it is checked against the kind's maximum and the bytes
//! that are there. A file that decodes is self-consistent; whether it may be restored
//! here is `Header::check_restorable`'s question.

use std::fmt;

use super::codec::{crc32, FieldError, Reader, Writer};
use super::header::Header;
use super::legacy::LegacyState;
use super::memory::MemoryIdentity;
use super::transport::TransportState;
use super::vcpu::VcpuState;
use super::vm::VmState;

pub const MAGIC: [u8; 8] = *b"WISPSNAP";
/// The layout of this file and of every struct in it (`kvm_structs`); a change to
/// either gets a new version, and a file of another version is refused. Version 2 added
/// the device sections, version 3 the memory and legacy sections.
pub const FORMAT_VERSION: u32 = 3;
/// The most vCPUs a snapshot holds (vCPU indexes are u8 in wisp-vmm).
pub const MAX_VCPUS: usize = 255;
/// The most devices a snapshot holds (wisp-vmm's MMIO device window has room for 32).
pub const MAX_DEVICES: usize = 32;

const PRELUDE_BYTES: usize = 12;
const SECTION_HEADER_BYTES: usize = 8;
const CRC_BYTES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Header = 1,
    Vm = 2,
    Vcpu = 3,
    End = 4,
    Device = 5,
    Memory = 6,
    Legacy = 7,
}

impl SectionKind {
    fn from_tag(tag: u16) -> Option<Self> {
        Some(match tag {
            1 => Self::Header,
            2 => Self::Vm,
            3 => Self::Vcpu,
            4 => Self::End,
            5 => Self::Device,
            6 => Self::Memory,
            7 => Self::Legacy,
            _ => return None,
        })
    }

    /// The largest payload a section of this kind can have; generous against what
    /// this version writes (a vCPU is about 9 KiB, the VM 1.6 KiB, a device at most
    /// 0.7 KiB).
    pub fn max_len(self) -> usize {
        match self {
            Self::Header => 256 << 10,
            Self::Vm => 8 << 10,
            Self::Vcpu => 64 << 10,
            Self::End => 4,
            Self::Device => 4 << 10,
            Self::Memory => 1 << 10,
            Self::Legacy => 1 << 10,
        }
    }
}

/// A section as errors name it: `header`, `vm`, `vcpu3`, `end` (`header#2` for a
/// non-vCPU section with an index, `kind 9` for an unknown one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionId {
    pub tag: u16,
    pub index: u16,
}

impl SectionId {
    fn of(kind: SectionKind, index: u16) -> Self {
        Self { tag: kind as u16, index }
    }
}

impl fmt::Display for SectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match SectionKind::from_tag(self.tag) {
            Some(SectionKind::Vcpu) => return write!(f, "vcpu{}", self.index),
            Some(SectionKind::Device) => return write!(f, "device{}", self.index),
            Some(SectionKind::Header) => "header",
            Some(SectionKind::Vm) => "vm",
            Some(SectionKind::End) => "end",
            Some(SectionKind::Memory) => "memory",
            Some(SectionKind::Legacy) => "legacy",
            None => return write!(f, "kind {}", self.tag),
        };
        match self.index {
            0 => f.write_str(name),
            i => write!(f, "{name}#{i}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a wisp-vmm snapshot: it starts with {found:02x?}, not \"WISPSNAP\"")]
    BadMagic { found: Vec<u8> },
    #[error("snapshot format version {found}, this wisp-vmm reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("the snapshot is {len} bytes, more than the {max} a snapshot can have")]
    TooLarge { len: u64, max: u64 },
    #[error("snapshot truncated: {what} at byte {offset} needs {need} bytes, {have} are left")]
    Truncated { what: &'static str, offset: usize, need: usize, have: usize },
    #[error("section {section} at byte {offset} claims {len} bytes, more than the {max} such a section can have")]
    SectionTooLarge { section: SectionId, offset: usize, len: usize, max: usize },
    #[error(
        "section {section} truncated: at byte {offset} it claims {len} bytes and a checksum, {have} bytes are left"
    )]
    SectionTruncated { section: SectionId, offset: usize, len: usize, have: usize },
    #[error("section {section} at byte {offset} is corrupted: its checksum is {stored:#010x}, its bytes give {computed:#010x}")]
    Checksum { section: SectionId, offset: usize, stored: u32, computed: u32 },
    #[error("section {section} at byte {offset} is of a kind this wisp-vmm does not know")]
    UnknownSection { section: SectionId, offset: usize },
    #[error("section {found} at byte {offset} where section {expected} belongs")]
    OutOfOrder { found: SectionId, expected: String, offset: usize },
    #[error("the snapshot ends at byte {offset} without section {expected}")]
    Missing { expected: String, offset: usize },
    #[error("the end section says {declared} vCPUs, the snapshot has {found}")]
    VcpuCount { declared: usize, found: usize },
    #[error("the end section says {declared} devices, the snapshot has {found}")]
    DeviceCount { declared: usize, found: usize },
    #[error("{len} bytes follow the end section at byte {offset}")]
    TrailingData { offset: usize, len: usize },
    #[error("section {section}: {source}")]
    Content { section: SectionId, source: FieldError },
}

/// Everything in a snapshot file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub header: Header,
    pub vm: VmState,
    /// Which memory file holds the guest's memory.
    pub memory: MemoryIdentity,
    /// One per vCPU, by index; at least one, at most `MAX_VCPUS`.
    pub vcpus: Vec<VcpuState>,
    /// One per virtio-mmio device, in configuration order; at most `MAX_DEVICES`.
    pub devices: Vec<TransportState>,
    pub legacy: LegacyState,
}

fn put_section(out: &mut Vec<u8>, kind: SectionKind, index: u16, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// One section as read: its id, payload and where it started.
struct RawSection<'a> {
    id: SectionId,
    kind: SectionKind,
    payload: &'a [u8],
    offset: usize,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads the section at `offset`: bounds, then checksum, then kind.
fn read_section(bytes: &[u8], offset: usize) -> Result<RawSection<'_>, FormatError> {
    let rest = &bytes[offset..];
    if rest.len() < SECTION_HEADER_BYTES {
        let (need, have) = (SECTION_HEADER_BYTES, rest.len());
        return Err(FormatError::Truncated { what: "a section header", offset, need, have });
    }
    let id = SectionId { tag: le_u16(&rest[0..2]), index: le_u16(&rest[2..4]) };
    let len = le_u32(&rest[4..8]) as usize;
    let kind = SectionKind::from_tag(id.tag);
    let max = kind.map_or(SectionKind::Header.max_len(), SectionKind::max_len);
    if len > max {
        return Err(FormatError::SectionTooLarge { section: id, offset, len, max });
    }
    let body = SECTION_HEADER_BYTES + len;
    if rest.len() < body + CRC_BYTES {
        let have = rest.len() - SECTION_HEADER_BYTES;
        return Err(FormatError::SectionTruncated { section: id, offset, len, have });
    }
    let stored = le_u32(&rest[body..body + CRC_BYTES]);
    let computed = crc32(&rest[..body]);
    if stored != computed {
        return Err(FormatError::Checksum { section: id, offset, stored, computed });
    }
    let kind = kind.ok_or(FormatError::UnknownSection { section: id, offset })?;
    Ok(RawSection { id, kind, payload: &rest[SECTION_HEADER_BYTES..body], offset })
}

impl RawSection<'_> {
    fn expect(&self, kind: SectionKind, index: u16, also: &str) -> Result<(), FormatError> {
        let expected = SectionId::of(kind, index);
        if self.id != expected {
            return Err(FormatError::OutOfOrder {
                found: self.id,
                expected: format!("{expected}{also}"),
                offset: self.offset,
            });
        }
        Ok(())
    }

    fn decode<T>(&self, f: impl FnOnce(&mut Reader) -> Result<T, FieldError>) -> Result<T, FormatError> {
        let content = |source| FormatError::Content { section: self.id, source };
        let mut r = Reader::new(self.payload);
        let value = f(&mut r).map_err(content)?;
        r.finish().map_err(content)?;
        Ok(value)
    }
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(!self.vcpus.is_empty() && self.vcpus.len() <= MAX_VCPUS);
        debug_assert!(self.devices.len() <= MAX_DEVICES);
        let mut out = Vec::with_capacity(16 << 10);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let section = |out: &mut Vec<u8>, kind, index, encode: &dyn Fn(&mut Writer)| {
            let mut w = Writer::new();
            encode(&mut w);
            put_section(out, kind, index, &w.into_bytes());
        };
        section(&mut out, SectionKind::Header, 0, &|w| self.header.encode(w));
        section(&mut out, SectionKind::Vm, 0, &|w| self.vm.encode(w));
        section(&mut out, SectionKind::Memory, 0, &|w| self.memory.encode(w));
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            section(&mut out, SectionKind::Vcpu, i as u16, &|w| vcpu.encode(w));
        }
        for (i, device) in self.devices.iter().enumerate() {
            section(&mut out, SectionKind::Device, i as u16, &|w| device.encode(w));
        }
        section(&mut out, SectionKind::Legacy, 0, &|w| self.legacy.encode(w));
        section(&mut out, SectionKind::End, 0, &|w| {
            w.count(self.vcpus.len());
            w.count(self.devices.len());
        });
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < PRELUDE_BYTES {
            if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
                return Err(FormatError::BadMagic { found: bytes[..bytes.len().min(MAGIC.len())].to_vec() });
            }
            let (need, have) = (PRELUDE_BYTES, bytes.len());
            return Err(FormatError::Truncated { what: "the magic and version", offset: 0, need, have });
        }
        if bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic { found: bytes[..8].to_vec() });
        }
        let version = le_u32(&bytes[8..12]);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version { found: version, expected: FORMAT_VERSION });
        }
        let mut offset = PRELUDE_BYTES;
        let next = |offset: &mut usize, expected: &str| {
            if *offset == bytes.len() {
                return Err(FormatError::Missing { expected: expected.to_string(), offset: *offset });
            }
            let s = read_section(bytes, *offset)?;
            *offset += SECTION_HEADER_BYTES + s.payload.len() + CRC_BYTES;
            Ok(s)
        };

        let s = next(&mut offset, "header")?;
        s.expect(SectionKind::Header, 0, "")?;
        let header = s.decode(Header::decode)?;
        let s = next(&mut offset, "vm")?;
        s.expect(SectionKind::Vm, 0, "")?;
        let vm = s.decode(VmState::decode)?;
        let s = next(&mut offset, "memory")?;
        s.expect(SectionKind::Memory, 0, "")?;
        let memory = s.decode(MemoryIdentity::decode)?;

        let mut vcpus: Vec<VcpuState> = Vec::new();
        let mut devices: Vec<TransportState> = Vec::new();
        let legacy = loop {
            // What may come next: the next vCPU (always while there is none, and until
            // the first device), the next device (once there is a vCPU), or the legacy
            // devices (once there is a vCPU), which the end follows.
            let (vcpu_index, device_index) = (vcpus.len() as u16, devices.len() as u16);
            let expected = match (vcpus.is_empty(), devices.is_empty()) {
                (true, _) => "vcpu0".to_string(),
                (false, true) => format!("vcpu{vcpu_index}, device0 or legacy"),
                (false, false) => format!("device{device_index} or legacy"),
            };
            let s = next(&mut offset, &expected)?;
            let out_of_order = || FormatError::OutOfOrder { found: s.id, expected: expected.clone(), offset: s.offset };
            match s.kind {
                SectionKind::Legacy if !vcpus.is_empty() => {
                    s.expect(SectionKind::Legacy, 0, "")?;
                    break s.decode(LegacyState::decode)?;
                }
                SectionKind::Vcpu if devices.is_empty() && s.id.index == vcpu_index => {
                    if vcpus.len() == MAX_VCPUS {
                        return Err(out_of_order());
                    }
                    vcpus.push(s.decode(VcpuState::decode)?);
                }
                SectionKind::Device if !vcpus.is_empty() && s.id.index == device_index => {
                    if devices.len() == MAX_DEVICES {
                        return Err(out_of_order());
                    }
                    devices.push(s.decode(TransportState::decode)?);
                }
                _ => return Err(out_of_order()),
            }
        };
        let s = next(&mut offset, "end")?;
        s.expect(SectionKind::End, 0, "")?;
        let (declared_vcpus, declared_devices) = s.decode(|r| Ok((r.u16("vCPU count")?, r.u16("device count")?)))?;
        if usize::from(declared_vcpus) != vcpus.len() {
            return Err(FormatError::VcpuCount { declared: declared_vcpus.into(), found: vcpus.len() });
        }
        if usize::from(declared_devices) != devices.len() {
            let (declared, found) = (declared_devices.into(), devices.len());
            return Err(FormatError::DeviceCount { declared, found });
        }
        if offset != bytes.len() {
            return Err(FormatError::TrailingData { offset, len: bytes.len() - offset });
        }
        Ok(Self { header, vm, memory, vcpus, devices, legacy })
    }
}
