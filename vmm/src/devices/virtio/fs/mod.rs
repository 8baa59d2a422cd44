//! virtio-fs (virtio 1.2, section 5.11), in process: one device per shared host
//! directory, served by fuse-backend-rs's FUSE server and passthrough file system on the
//! VMM's device thread, Dragonball-style (no external virtiofsd, no vhost-user socket).
//! This is how container root file systems and volumes reach the guest.
//!
//! Layout: `config` (tag, path, cache mode and options, checked), `backend` (the
//! passthrough plus wisp's guards: read-only, no device nodes, lookup guards, INIT
//! options), `request` (one FUSE request from a chain to the server and back, with the
//! error replies the library leaves to the transport), `device` (the virtio device model:
//! config space, queues, activation), `event_handler` (what wakes it).
//!
//! Trust: the guest is untrusted. Everything it sends is a FUSE request parsed by
//! fuse-backend-rs; malformed requests get error replies, never a panic of the VMM (the
//! server runs under `catch_unwind`). The guest reaches nothing outside the shared
//! directory: names are resolved one component at a time relative to file descriptors,
//! with O_NOFOLLOW, so symlinks (absolute or pointing outside) are only ever resolved by
//! the guest, in its own namespace. Host processes that walk the share must not follow
//! symlinks the guest created there either.
//!
//! Bounds: the distinct inodes and the open handles the passthrough holds for the guest
//! (each a host descriptor) are capped per share (`SharedDirConfig::max_inodes`,
//! `max_handles`); past a cap the request fails with ENFILE (`backend::Holdings`).
//!
//! Limits: no DAX window; no file locks (the guest keeps them locally); one thread
//! serves every queue, so extra request queues add no parallelism. When the guest
//! mounts a share, fuse-backend-rs sets this process's umask to 0 (so the guest's own
//! modes apply exactly), and files are created with the guest caller's uid/gid when the
//! VMM runs as root (otherwise only a guest root may create files). A directory the host
//! moves out of the share while the guest uses it stays reachable through its handle.

mod backend;
mod config;
mod device;
mod event_handler;
mod request;

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use backend::BackendError;
pub use config::{
    validate_tag, CacheMode, ConfigError, SharedDirConfig, DEFAULT_MAX_HANDLES, DEFAULT_MAX_INODES, MAX_REQUEST_QUEUES,
    TAG_MAX_LEN,
};
pub use device::{FsError, SharedDir, HIPRIO_QUEUE_SIZE, MAX_REQUESTS_PER_WAKEUP, QUEUE_SIZE};
pub use request::BadRequest;
