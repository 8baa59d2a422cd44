//! virtio-rng, the entropy device (virtio 1.2, section 5.4): the guest posts
//! device-writable buffers on its one queue and the device fills them from the host
//! kernel's random pool (getrandom(2)), so the guest's own pool is seeded at boot.
//!
//! Trust: descriptor chains are guest-controlled; buffers outside guest memory or
//! device-readable ones are skipped, each request is capped at `MAX_BYTES_PER_REQUEST`
//! and each wakeup at `MAX_BYTES_PER_WAKEUP`, so a guest cannot keep the device thread
//! busy for long.

mod device;
mod event_handler;

pub use device::{Rng, RngError, MAX_BYTES_PER_REQUEST, MAX_BYTES_PER_WAKEUP, QUEUE_SIZE};
