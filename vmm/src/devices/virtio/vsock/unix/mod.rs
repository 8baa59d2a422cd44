//! The host side of the hybrid vsock: the Unix socket host processes connect to, the
//! `CONNECT <port>\n` handshake they start with, and the Unix connects the device makes
//! for guest-initiated connections (`<uds_path>_<port>`).
//!
//! Trusts the host's filesystem layout (the directory of `uds_path` belongs to this
//! sandbox) but not the processes that connect: their handshake is bounded and parsed
//! strictly enough to never over-read payload bytes. Every socket here is non-blocking.

mod handshake;
mod listener;
mod stream;

use std::io;
use std::path::PathBuf;

pub use handshake::{ConnectLine, HandshakeProgress};
pub use listener::HostListener;
pub use stream::{connect_nonblocking, peer_hung_up, send_nosignal};

#[derive(Debug, thiserror::Error)]
pub enum UnixBackendError {
    #[error("vsock socket path {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("vsock socket {0} is in use by a live listener (another VMM?); stop it or choose another path")]
    InUse(PathBuf),
    #[error("cannot inspect vsock socket path {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot remove stale vsock socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}
