//! virtio-net (virtio 1.2, section 5.1): the pod's network interface, backed by a Linux
//! tap device on the host. The containerd shim opens the tap (`/dev/net/tun`, IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR) in the pod's network namespace and passes the descriptor to
//! wisp-vmm (`--net fd=N,mac=...`); standalone users name a tap instead (`--net tap=NAME`).
//!
//! Layout: `tap` (the host end: opening and checking the tap, its ioctls, and `TapLink`,
//! the seam unit tests replace with a socketpair), `device` (the virtio device model:
//! features, configuration space, activation, reset), `rx` and `tx` (moving frames
//! between the tap and the guest's queues), `event_handler` (what wakes it).
//!
//! The frame format on both sides is the same: the 12-byte `virtio_net_hdr_v1` (the tap's
//! vnet header size is set to 12) followed by the Ethernet frame. The guest's checksum and
//! segmentation offloads therefore pass through the tap untouched: frames the guest sends
//! with NEEDS_CSUM or a GSO type are finished by the host kernel, and the tap hands the
//! guest partially checksummed or GSO frames (up to 64 KiB) only as far as the driver
//! accepted GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6 (TUNSETOFFLOAD at activation).
//!
//! Features offered: VERSION_1, CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6, MAC, STATUS,
//! MRG_RXBUF, EVENT_IDX, and MTU when one is configured. Not offered: UFO (the Linux
//! guest no longer produces it), ECN variants, the control queue (so no MQ, promiscuous
//! or VLAN filtering: the tap sees every frame anyway) and indirect descriptors.
//!
//! RX with MRG_RXBUF: a frame read from the tap is copied into as many of the guest's
//! receive buffers as it needs and `num_buffers` in the first one says how many, so the
//! guest can post small (page-sized) buffers and still take 64 KiB GSO frames. Without
//! MRG_RXBUF each frame must fit one buffer (the driver then posts big buffers). When the
//! guest has no buffers, the one frame already read waits (it is never dropped for that
//! reason) and the tap is not read until the guest kicks the RX queue.
//!
//! TX: each chain is written to the tap with one writev straight from guest memory. When
//! the tap cannot take more (EAGAIN), the chain stays in the queue and TX resumes when
//! the tap becomes writable.
//!
//! Trust: the guest controls its queues. A chain with a buffer outside guest memory, a
//! descriptor of the wrong direction, no proper end (a loop or a bad `next`), or a TX
//! frame longer than `MAX_TX_CHAIN_LEN` is dropped and returned unused, with a
//! rate-limited warning; nothing a guest writes can panic the VMM or stall another queue.
//! The vnet header of a TX frame goes to the host kernel as is: the tap validates it, as
//! it does for any unprivileged tap user. The host side of the tap (frames arriving from
//! the pod's network) is trusted to be Ethernet frames with the offloads we enabled.

mod device;
mod event_handler;
mod rx;
mod tap;
mod tx;

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

use std::fmt;

pub use device::{Net, NetError, MAX_FRAMES_PER_WAKEUP, QUEUE_SIZE};
pub use tap::{valid_ifname, Tap, TapError, TapLink, MAX_IFNAME_LEN};

/// Length of `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): always 12 with VIRTIO_F_VERSION_1, also the tap's vnet
/// header size.
pub const VNET_HDR_LEN: usize = 12;
/// Longest Ethernet frame either side may send: a 64 KiB GSO packet with its Ethernet
/// and VLAN headers (the limit Linux and other VMMs use).
pub const MAX_FRAME_LEN: usize = 65562;
/// Longest TX chain the device accepts: the header plus the longest frame.
pub const MAX_TX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame worth sending: an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// MTU range the guest driver accepts (it ignores a smaller one).
pub const MIN_MTU: u16 = 68;

/// Most memory pieces one TX frame may be gathered from (the writev limit).
pub const MAX_TX_SEGMENTS: usize = 1024;

/// Why a descriptor chain was refused: it goes back to the guest unused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain has no descriptors (bad head index)")]
    Empty,
    #[error("the chain does not end: a loop, a bad next index, or more descriptors than the queue has")]
    Unterminated,
    #[error("descriptor {index} is device-readable; receive buffers must be device-writable")]
    ReadOnlyRxBuffer { index: usize },
    #[error("descriptor {index} is device-writable; transmit buffers must be device-readable")]
    WritableTxBuffer { index: usize },
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: usize },
    #[error("{len} bytes of receive buffer cannot hold the {VNET_HDR_LEN}-byte virtio-net header")]
    RxTooSmall { len: usize },
    #[error("the frame is longer than {MAX_TX_CHAIN_LEN} bytes (virtio-net header included)")]
    TxTooLong,
    #[error("{len} bytes is shorter than a virtio-net header and an Ethernet header")]
    TxTooShort { len: usize },
    #[error("the frame is scattered over more than {MAX_TX_SEGMENTS} pieces of memory")]
    TooManySegments,
}

/// A MAC address as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `AA:BB:CC:DD:EE:FF` (hex digits, either case: `wisp_protocols::mac`). The
    /// address must be usable as a NIC's own: not multicast (lowest bit of the first
    /// byte) and not all zeros.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mac = wisp_protocols::mac::parse_mac(s)?;
        if mac[0] & 1 != 0 {
            return Err(format!("{s:?} is a multicast address; a NIC needs a unicast one (even first byte)"));
        }
        if mac == [0; 6] {
            return Err(format!("{s:?} is the all-zero address"));
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}
