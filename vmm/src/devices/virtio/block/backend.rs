//! The host side of virtio-blk: a raw disk image (regular file or block device), read and
//! written with positional I/O through a bounded bounce buffer.
//!
//! Trust: the image path and options come from the VMM's configuration. Requests come
//! from the guest through `request.rs`, which has checked directions, lengths and that
//! every segment lies in guest memory; this file checks the sector range against the
//! image and refuses writes to a read-only image.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::request::Segment;
use super::SECTOR_SIZE;

/// Length of the device ID string GET_ID returns (NUL-padded).
pub const DEVICE_ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the buffer data passes through between the image and guest memory.
const BOUNCE_SIZE: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot find the size of disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("block device ID {id:?} is {len} bytes long; virtio-blk IDs hold at most {DEVICE_ID_LEN}")]
    IdTooLong { id: String, len: usize },
}

/// Why one request failed; the guest sees VIRTIO_BLK_S_IOERR.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{len} bytes at sector {sector} reach past the end of the disk ({capacity} sectors)")]
    OutOfRange { sector: u64, len: u64, capacity: u64 },
    #[error("disk image I/O failed: {0}")]
    Disk(#[source] io::Error),
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// A raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: [u8; DEVICE_ID_LEN],
    bounce: Vec<u8>,
}

impl DiskImage {
    /// Opens the image. Its capacity is its size in whole 512-byte sectors; a trailing
    /// partial sector is not visible to the guest. `id` (at most 20 bytes) is what GET_ID
    /// returns; the default is derived from the image's device and inode numbers.
    pub fn open(path: &Path, read_only: bool, id: Option<String>) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
        // Seeking to the end also works for block devices, whose metadata length is 0.
        let size =
            (&file).seek(SeekFrom::End(0)).map_err(|source| DiskError::Size { path: path.to_owned(), source })?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id = match id {
            Some(id) => id,
            None => {
                let meta = file.metadata().map_err(|source| DiskError::Size { path: path.to_owned(), source })?;
                default_id(meta.dev(), meta.ino())
            }
        };
        if id.len() > DEVICE_ID_LEN {
            return Err(DiskError::IdTooLong { len: id.len(), id });
        }
        let mut id_bytes = [0u8; DEVICE_ID_LEN];
        id_bytes.iter_mut().zip(id.bytes()).for_each(|(dst, src)| *dst = src);
        Ok(Self {
            file,
            path: path.to_owned(),
            read_only,
            capacity: size / SECTOR_SIZE,
            id: id_bytes,
            bounce: vec![0; BOUNCE_SIZE],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID answer: the ID, NUL-padded to 20 bytes.
    pub fn id(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.id
    }

    /// Byte offset of `sector` if `len` bytes from there lie on the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, IoError> {
        let out_of_range = || IoError::OutOfRange { sector, len, capacity: self.capacity };
        let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
        let end = start.checked_add(len).ok_or_else(out_of_range)?;
        if sector > self.capacity || end > self.capacity * SECTOR_SIZE {
            return Err(out_of_range());
        }
        Ok(start)
    }

    /// Reads from the disk at `sector` into the guest buffers `data`.
    pub fn read(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &[Segment]) -> Result<(), IoError> {
        let total = data.iter().map(|s| u64::from(s.len)).sum();
        let mut offset = self.byte_range(sector, total)?;
        for seg in data {
            let mut done = 0;
            while done < seg.len {
                let n = (seg.len - done).min(BOUNCE_SIZE as u32);
                let buf = self
                    .bounce
                    .get_mut(..n as usize)
                    .ok_or_else(|| IoError::Disk(io::ErrorKind::InvalidInput.into()))?;
                self.file.read_exact_at(buf, offset).map_err(IoError::Disk)?;
                mem.write_slice(buf, seg.addr.unchecked_add(u64::from(done))).map_err(IoError::GuestMemory)?;
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    /// Writes the guest buffers `data` to the disk at `sector`.
    pub fn write(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &[Segment]) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let total = data.iter().map(|s| u64::from(s.len)).sum();
        let mut offset = self.byte_range(sector, total)?;
        for seg in data {
            let mut done = 0;
            while done < seg.len {
                let n = (seg.len - done).min(BOUNCE_SIZE as u32);
                let buf = self
                    .bounce
                    .get_mut(..n as usize)
                    .ok_or_else(|| IoError::Disk(io::ErrorKind::InvalidInput.into()))?;
                mem.read_slice(buf, seg.addr.unchecked_add(u64::from(done))).map_err(IoError::GuestMemory)?;
                self.file.write_all_at(buf, offset).map_err(IoError::Disk)?;
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    /// Makes completed writes durable (fdatasync). Nothing to do on a read-only disk.
    pub fn flush(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(IoError::Disk)
    }
}

/// A stable ID for an image without a configured one: its device and inode numbers, in
/// hex. If that exceeds 20 bytes, the end (where inode numbers differ) is kept.
fn default_id(dev: u64, ino: u64) -> String {
    let id = format!("{dev:x}-{ino:x}");
    let cut = id.len().saturating_sub(DEVICE_ID_LEN);
    id.get(cut..).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_id_fits_and_keeps_the_inode() {
        assert_eq!(default_id(0x803, 0x1234), "803-1234");
        let long = default_id(u64::MAX, 0xabcdef);
        assert_eq!(long.len(), DEVICE_ID_LEN);
        assert!(long.ends_with("-abcdef"));
    }

    #[test]
    fn capacity_truncates_a_partial_sector_and_ranges_are_checked() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4 * 512 + 100).unwrap();
        let disk = DiskImage::open(file.path(), true, Some("x".into())).unwrap();
        assert_eq!(disk.capacity(), 4);
        assert_eq!(&disk.id()[..2], b"x\0");
        assert!(disk.byte_range(3, 512).is_ok());
        assert!(disk.byte_range(4, 0).is_ok());
        assert!(matches!(disk.byte_range(3, 1024), Err(IoError::OutOfRange { .. })));
        assert!(matches!(disk.byte_range(5, 0), Err(IoError::OutOfRange { .. })));
        assert!(matches!(disk.byte_range(u64::MAX, 512), Err(IoError::OutOfRange { .. })));
        assert!(matches!(disk.byte_range(1, u64::MAX), Err(IoError::OutOfRange { .. })));
    }

    #[test]
    fn open_errors_name_the_problem() {
        let err = DiskImage::open(Path::new("/nonexistent/wisp.img"), true, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/wisp.img"), "{err}");
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = DiskImage::open(file.path(), false, Some("a".repeat(21))).unwrap_err();
        assert!(matches!(err, DiskError::IdTooLong { len: 21, .. }));
    }
}
