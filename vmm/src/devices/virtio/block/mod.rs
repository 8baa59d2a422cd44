//! virtio-blk (virtio 1.2, section 5.2): an optional disk for the guest, backed by a raw
//! image file on the host.
//!
//! `request.rs` parses the guest's requests (untrusted), `backend.rs` is the image file,
//! `device.rs` the device model tying them to the queue, `event_handler.rs` what wakes it.
//! I/O is synchronous on the VMM's device thread: fine for the small, optional disks wisp
//! gives pods; a busy disk delays the other devices of the same VM.

mod backend;
mod device;
mod event_handler;
pub mod request;

pub use backend::{DiskError, DiskImage, IoError, DEVICE_ID_LEN};
pub use device::{Block, BlockError, MAX_REQUESTS_PER_WAKEUP, QUEUE_SIZE};

/// virtio-blk addresses the disk in 512-byte sectors, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments per request, offered to the driver (VIRTIO_BLK_F_SEG_MAX): the
/// queue size minus the header and status descriptors, as Linux expects.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
