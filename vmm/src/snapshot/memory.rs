//! Guest memory in a snapshot: a file of its own beside the state file, mapped back
//! `MAP_PRIVATE` at restore, so pages a restored guest only reads stay one copy in the
//! host's page cache however many VMs are restored from it, and a page one guest writes
//! becomes that guest's own (copy-on-write).
//!
//! Layout: the RAM regions back to back at page-aligned offsets (region i at the sum of
//! the lengths before it, so each maps straight from the file), then one page of
//! trailer:
//!
//! ```text
//! "WISPMEM\0"   8 bytes, the magic
//! version       u32, MEMORY_VERSION
//! id            16 bytes: random, made when the file is written
//! regions       u16 count, then per region guest address u64 and length u64
//! crc32         u32 of everything above
//! ```
//!
//! The state file names the memory file it belongs to by the same id and region list
//! (its `memory` section, `MemoryIdentity`): a restore refuses a memory file from
//! another save, even of the same VM, or one whose layout differs, before it maps it.
//! Pages that were zero are holes in the file (nothing is written for them), so a guest
//! that touched 30 MiB of its 256 costs about 30 MiB of disk.
//!
//! Trust: the trailer is parsed as hostile input, like the state file. What the pages
//! hold is the guest's, as it was in the guest. The file must not change while VMs are
//! restored from it: pages a VM has not written yet come from the file, and a file cut
//! short would fault them (wisp writes a memory file once, to a new name, and renames
//! it into place; it never rewrites one in place).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::codec::{crc32, FieldError, Reader, Writer};

pub const MEMORY_MAGIC: [u8; 8] = *b"WISPMEM\0";
/// The layout above; a change gets a new version, and a file of another is refused.
pub const MEMORY_VERSION: u32 = 1;
/// The trailer's size: one page, so the regions before it stay page-aligned.
pub const TRAILER_BYTES: u64 = 4096;
/// The most RAM regions a VM has (wisp-vmm's layout has at most 2).
pub const MAX_REGIONS: usize = 8;
/// The page size regions are aligned to and zero pages are found at.
const PAGE: usize = 4096;
/// How much guest memory is copied out per step when saving.
const CHUNK: usize = 1 << 20;

/// Which memory file a state file belongs to: the file's random id and its regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryIdentity {
    pub id: [u8; 16],
    /// (guest address, length) per region, in guest address order.
    pub regions: Vec<(u64, u64)>,
}

impl MemoryIdentity {
    pub fn encode(&self, w: &mut Writer) {
        debug_assert!(self.regions.len() <= MAX_REGIONS);
        w.bytes(&self.id);
        w.count(self.regions.len());
        for (addr, len) in &self.regions {
            w.u64(*addr);
            w.u64(*len);
        }
    }

    /// Reads an identity and checks its regions: page-aligned, non-empty, in order and
    /// not overlapping, within the address space.
    pub fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        let mut id = [0u8; 16];
        r.fill(&mut id, "memory file id")?;
        let n = r.count(MAX_REGIONS, 16, "memory regions")?;
        let mut regions: Vec<(u64, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = r.u64("region address")?;
            let len = r.u64("region length")?;
            let page = PAGE as u64;
            if addr % page != 0 {
                return Err(FieldError::Invalid { what: "region address (not page-aligned)", value: addr });
            }
            if len == 0 || len % page != 0 {
                return Err(FieldError::Invalid { what: "region length (zero or not whole pages)", value: len });
            }
            if addr.checked_add(len).is_none() {
                return Err(FieldError::Invalid { what: "region end (past the address space)", value: addr });
            }
            if regions.last().is_some_and(|(a, l)| addr < a + l) {
                return Err(FieldError::Invalid {
                    what: "region address (overlaps or precedes the last)",
                    value: addr,
                });
            }
            regions.push((addr, len));
        }
        Ok(Self { id, regions })
    }

    /// The bytes of guest memory the file holds, before its trailer.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|(_, len)| len).sum()
    }

    /// The memory file's last page: this identity, checksummed, zero-padded.
    pub fn trailer(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(&MEMORY_MAGIC);
        w.u32(MEMORY_VERSION);
        self.encode(&mut w);
        let mut bytes = w.into_bytes();
        let crc = crc32(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.resize(TRAILER_BYTES as usize, 0);
        bytes
    }

    /// Parses a memory file's last page (`TRAILER_BYTES`), any bytes: what parses is
    /// exactly what `trailer` writes (the padding after the checksum must be zeros).
    pub fn from_trailer(page: &[u8]) -> Result<Self, MemoryFileError> {
        if page.len() as u64 != TRAILER_BYTES {
            return Err(MemoryFileError::TrailerSize { found: page.len() });
        }
        let mut r = Reader::new(page);
        let field = MemoryFileError::Trailer;
        let mut magic = [0u8; 8];
        r.fill(&mut magic, "magic").map_err(field)?;
        if magic != MEMORY_MAGIC {
            return Err(MemoryFileError::BadMagic { found: magic.to_vec() });
        }
        let version = r.u32("version").map_err(field)?;
        if version != MEMORY_VERSION {
            return Err(MemoryFileError::Version { found: version, expected: MEMORY_VERSION });
        }
        let identity = Self::decode(&mut r).map_err(field)?;
        let end = r.position();
        let stored = r.u32("checksum").map_err(field)?;
        let computed = crc32(&page[..end]);
        if stored != computed {
            return Err(MemoryFileError::Checksum { stored, computed });
        }
        let padding = &page[r.position()..];
        if let Some(i) = padding.iter().position(|b| *b != 0) {
            let what = "the trailer's padding (not zero)";
            return Err(MemoryFileError::Trailer(FieldError::Invalid { what, value: (r.position() + i) as u64 }));
        }
        Ok(identity)
    }
}

/// What is wrong with a memory file, or with saving or mapping one.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("not a wisp-vmm memory file: its trailer starts with {found:02x?}, not \"WISPMEM\"")]
    BadMagic { found: Vec<u8> },
    #[error("memory file format version {found}, this wisp-vmm reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("the memory file's trailer is corrupted: its checksum is {stored:#010x}, its bytes give {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("the memory file's trailer: {0}")]
    Trailer(FieldError),
    #[error("a memory file's trailer is {TRAILER_BYTES} bytes, not {found}")]
    TrailerSize { found: usize },
    #[error("the memory file is {found} bytes, less than its {TRAILER_BYTES}-byte trailer")]
    TooShort { found: u64 },
    #[error("the memory file is {found} bytes; its trailer's regions need {expected}")]
    Size { found: u64, expected: u64 },
    #[error("the memory file is not a regular file")]
    NotAFile,
    #[error("the memory file belongs to another snapshot (its id is {found}, the state file's is {expected})")]
    OtherSnapshot { found: String, expected: String },
    #[error("the memory file's regions {found:x?} are not the state file's {expected:x?}")]
    Layout { found: Vec<(u64, u64)>, expected: Vec<(u64, u64)> },
    #[error("guest memory has {count} regions, more than the {max} a memory file holds")]
    TooManyRegions { count: usize, max: usize },
    #[error("a guest memory region at {addr:#x} of {len:#x} bytes is not whole pages")]
    Unaligned { addr: u64, len: u64 },
    #[error("reading guest memory at {addr:#x}: {reason}")]
    ReadGuest { addr: u64, reason: String },
    #[error("mapping the memory file's region at {addr:#x}: {reason}")]
    Map { addr: u64, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

/// An I/O error on `path` while doing `what`.
fn io_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError::Io { what, path: path.to_path_buf(), source }
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// 16 random bytes from the kernel.
fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    let mut got = 0;
    while got < id.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `id`.
        let n = unsafe { libc::getrandom(id[got..].as_mut_ptr().cast(), id.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(id)
}

/// Writes `mem` to `path` whole or not at all (a temporary beside it, created with
/// O_EXCL and mode 0600, synced, renamed over it) and returns the identity the state
/// file records. Zero pages are left as holes. The VM must be paused: the guest's
/// pages are copied as they are while this runs.
pub fn save_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryIdentity, MemoryFileError> {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
    if regions.len() > MAX_REGIONS {
        return Err(MemoryFileError::TooManyRegions { count: regions.len(), max: MAX_REGIONS });
    }
    if let Some((addr, len)) = regions.iter().find(|(a, l)| a % PAGE as u64 != 0 || l % PAGE as u64 != 0) {
        return Err(MemoryFileError::Unaligned { addr: *addr, len: *len });
    }
    let id = random_id().map_err(io_err("getting random bytes for", path))?;
    let identity = MemoryIdentity { id, regions };

    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        // A stale temporary (or a symlink planted there) is unlinked, never followed.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("removing", &tmp)(e)),
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        let total = identity.memory_bytes();
        file.set_len(total + TRAILER_BYTES).map_err(io_err("sizing", &tmp))?;
        let mut buf = vec![0u8; CHUNK];
        let mut file_offset = 0u64;
        for (addr, len) in &identity.regions {
            let mut done = 0u64;
            while done < *len {
                let n = (*len - done).min(CHUNK as u64) as usize;
                let at = GuestAddress(addr + done);
                mem.read_slice(&mut buf[..n], at)
                    .map_err(|e| MemoryFileError::ReadGuest { addr: at.raw_value(), reason: e.to_string() })?;
                write_nonzero_pages(&file, &buf[..n], file_offset + done).map_err(io_err("writing", &tmp))?;
                done += n as u64;
            }
            file_offset += len;
        }
        file.write_all_at(&identity.trailer(), total).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| identity)
}

/// Writes the pages of `data` that are not all zeros at `offset` on, a run of them per
/// write; zero pages stay holes (the file was sized, so they read as zeros).
fn write_nonzero_pages(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (i, page) in data.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|b| *b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE),
            (true, Some(start)) => {
                file.write_all_at(&data[start..i * PAGE], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Opens the memory file at `path` (not following a symlink), checks its trailer
/// against `expected` (the state file's record of it), and maps each region
/// `MAP_PRIVATE`: the guest's writes go to its own copies of the pages, never to the
/// file. The result is guest memory for `vstate::vm::Vm::with_memory`.
pub fn map_memory(path: &Path, expected: &MemoryIdentity) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    let meta = file.metadata().map_err(io_err("reading the size of", path))?;
    if !meta.file_type().is_file() {
        return Err(MemoryFileError::NotAFile);
    }
    if meta.len() < TRAILER_BYTES {
        return Err(MemoryFileError::TooShort { found: meta.len() });
    }
    let mut page = vec![0u8; TRAILER_BYTES as usize];
    file.read_exact_at(&mut page, meta.len() - TRAILER_BYTES).map_err(io_err("reading the trailer of", path))?;
    let found = MemoryIdentity::from_trailer(&page)?;
    let expected_len = found.memory_bytes() + TRAILER_BYTES;
    if meta.len() != expected_len {
        return Err(MemoryFileError::Size { found: meta.len(), expected: expected_len });
    }
    if found.id != expected.id {
        return Err(MemoryFileError::OtherSnapshot { found: hex(&found.id), expected: hex(&expected.id) });
    }
    if found.regions != expected.regions {
        return Err(MemoryFileError::Layout { found: found.regions, expected: expected.regions.clone() });
    }
    let mut regions = Vec::with_capacity(found.regions.len());
    let mut offset = 0u64;
    for (addr, len) in &found.regions {
        let map_err = |reason: String| MemoryFileError::Map { addr: *addr, reason };
        let fd = file.try_clone().map_err(io_err("duplicating the descriptor of", path))?;
        let mapping = MmapRegion::<()>::build(
            Some(FileOffset::new(fd, offset)),
            *len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(*addr))
            .ok_or_else(|| map_err("the region ends past the address space".into()))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Map { addr: 0, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// Two regions with a gap, like the layout above 3 GiB but small; a few pages written.
    fn guest() -> GuestMemoryMmap {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * MIB as usize), (GuestAddress(8 * MIB), MIB as usize)])
                .unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress(MIB + 5 * PAGE as u64)).unwrap();
        mem.write_slice(b"high", GuestAddress(8 * MIB + MIB - 4)).unwrap();
        mem
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn memory_round_trips_and_zero_pages_take_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let identity = save_memory(&guest(), &path).unwrap();
        assert_eq!(identity.regions, vec![(0, 2 * MIB), (8 * MIB, MIB)]);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 3 * MIB + TRAILER_BYTES);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Five pages hold data (one, three, one) and one the trailer: far less than 3 MiB.
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} bytes on disk", meta.blocks() * 512);

        let restored = map_memory(&path, &identity).unwrap();
        let original = guest();
        for (addr, len) in [(0, 2 * MIB), (8 * MIB, MIB)] {
            assert!(read(&restored, addr, len as usize) == read(&original, addr, len as usize), "region at {addr:#x}");
        }
    }

    #[test]
    fn a_restored_guests_writes_stay_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let identity = save_memory(&guest(), &path).unwrap();
        let before = std::fs::read(&path).unwrap();
        let a = map_memory(&path, &identity).unwrap();
        let b = map_memory(&path, &identity).unwrap();
        a.write_slice(b"a's own", GuestAddress(0)).unwrap();
        a.write_slice(b"and here", GuestAddress(MIB)).unwrap();
        assert_eq!(read(&a, 0, 7), b"a's own");
        assert_eq!(read(&b, 0, 10), b"first page", "another VM restored from the file sees the saved page");
        assert_eq!(read(&b, MIB, 8), vec![0; 8]);
        drop((a, b));
        assert!(std::fs::read(&path).unwrap() == before, "the file is unchanged");
    }

    #[test]
    fn a_memory_file_that_does_not_match_its_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let identity = save_memory(&guest(), &path).unwrap();
        let err = |p: &Path, id: &MemoryIdentity| map_memory(p, id).unwrap_err().to_string();

        let mut other = identity.clone();
        other.id[0] ^= 1;
        assert!(err(&path, &other).contains("belongs to another snapshot"), "{}", err(&path, &other));
        let mut other = identity.clone();
        other.regions[1].1 = 2 * MIB;
        assert!(err(&path, &other).contains("are not the state file's"), "{}", err(&path, &other));

        // Another save of the same memory is another file.
        let second = dir.path().join("mem2");
        save_memory(&guest(), &second).unwrap();
        assert!(err(&second, &identity).contains("belongs to another snapshot"));
    }

    #[test]
    fn a_damaged_memory_file_is_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let identity = save_memory(&guest(), &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let trailer = good.len() - TRAILER_BYTES as usize;
        let try_bytes = |bytes: &[u8]| {
            let p = dir.path().join("damaged");
            std::fs::write(&p, bytes).unwrap();
            map_memory(&p, &identity).unwrap_err().to_string()
        };
        // Cut short: the trailer is not where it belongs.
        let e = try_bytes(&good[..good.len() - PAGE]);
        assert!(e.contains("not a wisp-vmm memory file"), "{e}");
        let e = try_bytes(&good[..100]);
        assert!(e.contains("100 bytes"), "{e}");
        // One page more in front: the trailer parses, the size does not match it.
        let mut longer = vec![0; PAGE];
        longer.extend_from_slice(&good);
        let e = try_bytes(&longer);
        assert!(e.contains("its trailer's regions need"), "{e}");
        // Every byte of the trailer's fields flipped.
        for i in 0..(8 + 4 + 16 + 2 + 2 * 16 + 4) {
            let mut bad = good.clone();
            bad[trailer + i] ^= 0x40;
            let e = try_bytes(&bad);
            assert!(
                ["not a wisp-vmm memory file", "version", "checksum", "trailer"].iter().any(|w| e.contains(w)),
                "byte {i}: {e}"
            );
        }
    }

    #[test]
    fn a_hand_made_trailer_with_bad_regions_is_refused() {
        let cases: [(&[(u64, u64)], &str); 4] = [
            (&[(1, 4096)], "not page-aligned"),
            (&[(0, 0)], "zero or not whole pages"),
            (&[(0, 8192), (4096, 4096)], "overlaps"),
            (&[(u64::MAX - 4095, 8192)], "past the address space"),
        ];
        for (regions, want) in cases {
            let identity = MemoryIdentity { id: [7; 16], regions: regions.to_vec() };
            let e = MemoryIdentity::from_trailer(&identity.trailer()).unwrap_err().to_string();
            assert!(e.contains(want), "{regions:x?}: {e}");
        }
        let mut w = Writer::new();
        w.bytes(&MEMORY_MAGIC);
        w.u32(MEMORY_VERSION);
        w.bytes(&[0; 16]);
        w.u16(u16::MAX);
        let mut page = w.into_bytes();
        page.resize(TRAILER_BYTES as usize, 0);
        let e = MemoryIdentity::from_trailer(&page).unwrap_err().to_string();
        assert!(e.contains("memory regions"), "{e}");
        let mut page = MemoryIdentity { id: [7; 16], regions: vec![(0, 4096)] }.trailer();
        page[4000] = 1;
        let e = MemoryIdentity::from_trailer(&page).unwrap_err().to_string();
        assert!(e.contains("padding (not zero) is 4000"), "{e}");
    }

    #[test]
    fn neither_save_nor_map_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"host file").unwrap();
        let path = dir.path().join("mem");
        std::os::unix::fs::symlink(&victim, dir.path().join("mem.tmp")).unwrap();
        let identity = save_memory(&guest(), &path).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"host file");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = map_memory(&link, &identity).unwrap_err().to_string();
        assert!(e.contains("opening") && e.contains("link"), "{e}");
        let e = map_memory(dir.path(), &identity).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
