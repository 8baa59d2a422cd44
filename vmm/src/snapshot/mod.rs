//! Snapshots of a micro-VM, the first part of VM templates (issue 18): the vCPUs'
//! registers, MSRs, FPU/XSAVE, LAPIC, pending events and MP state (`vcpu`), the
//! in-kernel PICs, IOAPIC, PIT and the kvmclock (`vm`), each virtio-mmio transport's
//! registers and queue positions (`transport`, saved and restored by
//! `devices::virtio::mmio`) and the serial console's UART (`legacy`), in a versioned,
//! checksummed file (`format`) whose header says what it may be restored on (`header`);
//! and guest memory in a file of its own, mapped back copy-on-write (`memory`).
//! What a virtio device model keeps beyond its queues (vsock connections, a mounted
//! share's inodes) is never carried: the snapshot is refused while a model holds any.
//! Pausing and resuming a running VM, and the wiring into the CLI, the control API and
//! the shim are not here yet.
//!
//! Trust: a snapshot file is read back by later VMMs, possibly after the VMM that wrote
//! it was compromised by its guest, and files get truncated or corrupted: parsing
//! (`Snapshot::decode`) treats the file as hostile input. A file that parses is then
//! refused unless its header matches this build, kernel, CPU and configuration. The
//! register values themselves are the guest's; KVM validates them when they are set.

pub mod codec;
pub mod format;
pub mod header;
pub mod kvm_structs;
pub mod legacy;
pub mod memory;
pub mod microvm;
pub mod transport;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use format::{FormatError, Snapshot, FORMAT_VERSION};
pub use header::{BuildIdentity, CpuIdentity, Header, Mismatch, VmIdentity};
pub use transport::{QueueState, TransportState};
pub use vcpu::{VcpuState, VcpuStateError, VcpuStateSupport};
pub use vm::{VmState, VmStateError};

/// The largest snapshot file read: 255 vCPUs and 32 devices at their largest and a full
/// header fit.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("reading snapshot {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing snapshot {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("snapshot {path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("snapshot {path} cannot be restored here: {source}")]
    Refused { path: PathBuf, source: Mismatch },
    #[error("memory file {path}: {source}")]
    Memory { path: PathBuf, source: memory::MemoryFileError },
}

impl Snapshot {
    /// Reads and parses `path` (at most `MAX_FILE_BYTES`), then checks that it may be
    /// restored where `here` describes.
    pub fn load(path: &Path, here: &Header) -> Result<Self, SnapshotError> {
        let snapshot = Self::read(path)?;
        snapshot
            .header
            .check_restorable(here)
            .map_err(|source| SnapshotError::Refused { path: path.to_path_buf(), source })?;
        Ok(snapshot)
    }

    /// Reads and parses `path` (at most `MAX_FILE_BYTES`) without asking whether it may
    /// be restored here: the caller checks its header once it can describe "here".
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let read = |source| SnapshotError::Read { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(read)?;
        let len = file.metadata().map_err(read)?.len();
        if len > MAX_FILE_BYTES {
            let source = FormatError::TooLarge { len, max: MAX_FILE_BYTES };
            return Err(SnapshotError::Format { path: path.to_path_buf(), source });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut bytes).map_err(read)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            let source = FormatError::TooLarge { len: bytes.len() as u64, max: MAX_FILE_BYTES };
            return Err(SnapshotError::Format { path: path.to_path_buf(), source });
        }
        Snapshot::decode(&bytes).map_err(|source| SnapshotError::Format { path: path.to_path_buf(), source })
    }

    /// Writes the snapshot to `path` whole or not at all: a temporary file beside it
    /// (created with O_EXCL, mode 0600: a symlink in its place is not followed), synced,
    /// then renamed over it.
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        let write = |source| SnapshotError::Write { path: path.to_path_buf(), source };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let result = (|| {
            // A stale temporary (or a symlink planted there) is unlinked, never followed:
            // the file is created anew with O_EXCL, readable by its owner only.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().write(true).create_new(true),
                0o600,
            )
            .open(&tmp)?;
            std::io::Write::write_all(&mut f, &self.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(write)
    }
}
