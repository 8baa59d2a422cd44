//! virtio-vsock (virtio 1.2 §5.10) with a Firecracker-compatible hybrid-vsock backend:
//! this is how the shim reaches the guest agent (ttrpc on guest port 1024, stdio on
//! 1025) without the host's vhost-vsock module.
//!
//! Host side, one Unix socket per VM (`uds_path`):
//! - host-initiated: a host process connects to `uds_path`, writes `CONNECT <port>\n`,
//!   and reads `OK <local_port>\n` once the guest accepted (or sees EOF if nobody
//!   listens on `<port>` in the guest); then the stream carries the connection's bytes.
//! - guest-initiated: a guest connect to host port P is a connect to `<uds_path>_<P>`.
//!
//! Layout: `device` (the virtio device model: queues, config space, activation),
//! `event_handler` (what wakes it on the VMM's device thread), `packet` (parsing guest
//! descriptor chains), `muxer` (routes packets between the guest and the host streams),
//! `connection` (one stream's state machine and credit-based flow control), `unix` (the
//! listening socket, the `CONNECT` handshake, outgoing Unix connects).
//!
//! Trust: the guest controls everything in its queues and may lie in any header field;
//! host clients of the Unix socket control the handshake line and their streams. Both are
//! bounded (packet sizes, line length, buffered bytes, connection count, timeouts) and
//! a misbehaving peer gets its connection reset, never a panic or a blocked thread.

mod connection;
mod device;
mod event_handler;
mod muxer;
mod packet;
mod unix;

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::{Vsock, VsockError};
pub use muxer::MuxerError;
pub use packet::PacketError;
pub use unix::UnixBackendError;
/// The host clients' handshake parser, public for the fuzz targets (`fuzz/`).
pub use unix::{ConnectLine, HandshakeProgress};

/// The CID of the host, as the guest sees it (`VMADDR_CID_HOST`).
pub const VSOCK_HOST_CID: u64 = 2;

/// How long the muxer waits for peers that have gone quiet. All of them end with the
/// connection closed (and the guest told with RST where it knows the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A host client must send its `CONNECT <port>\n` line within this time.
    pub handshake: Duration,
    /// The guest must answer a host-initiated REQUEST within this time.
    pub connect: Duration,
    /// Once either side closed completely, the other must finish (guest RST, or the
    /// host reading what is still buffered for it) within this time.
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            connect: Duration::from_secs(5),
            close: Duration::from_secs(5),
        }
    }
}
