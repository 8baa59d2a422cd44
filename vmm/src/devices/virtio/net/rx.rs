//! The receive path: frames from the tap into the guest's RX buffers.
//!
//! A frame is read from the tap into a bounce buffer (header and frame, at most
//! `VNET_HDR_LEN + MAX_FRAME_LEN` bytes), then copied into guest buffers. Chains are
//! popped and checked ahead of the copy and kept as `reserved` until a frame fills them,
//! so nothing is written into guest memory before the whole frame has room, and a chain
//! is never handed back to the ring once popped: valid ones wait for the next frame,
//! malformed ones are returned unused (length 0) right away.
//!
//! With MRG_RXBUF a frame takes as many chains as it needs and `num_buffers` in its
//! header says how many; without it a frame must fit the next chain. A frame that can
//! never fit (every descriptor of the queue is already reserved, or without MRG_RXBUF
//! the next chain is too small) is dropped with a warning. A frame that merely waits for
//! the guest to post buffers stays `pending`; the event handler then stops reading the
//! tap until the guest kicks the RX queue.
//!
//! Trust: chains are the guest's (checked in `parse_rx_chain`); frames are the host's,
//! but a frame whose offload type the guest did not accept is dropped rather than passed
//! on (possible only for frames queued in the tap before a renegotiation).

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::device::MAX_FRAMES_PER_WAKEUP;
use super::tap::read_frame;
use super::{ChainError, ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::{GuestWarnings, Queue, QueueT};

/// Byte offsets in `virtio_net_hdr_v1`.
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: usize = 10;

/// What the driver accepted that matters for receiving.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RxOptions {
    pub mergeable: bool,
    pub guest_csum: bool,
    pub guest_tso4: bool,
    pub guest_tso6: bool,
}

/// One receive chain, checked: device-writable buffers inside guest memory.
#[derive(Debug)]
pub(super) struct RxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
    descriptors: usize,
}

/// Checks a receive chain: every descriptor device-writable and inside guest memory, the
/// chain properly ended, room for at least the header.
pub(super) fn parse_rx_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> Result<RxChain, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut parsed = RxChain { head, segments: Vec::new(), capacity: 0, descriptors: 0 };
    let mut ended = false;
    for desc in chain {
        let index = parsed.descriptors;
        parsed.descriptors += 1;
        if !desc.is_write_only() {
            return Err(ChainError::ReadOnlyRxBuffer { index });
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len) {
            return Err(ChainError::OutsideMemory { addr: desc.addr().0, len });
        }
        if len > 0 {
            parsed.segments.push((desc.addr(), len));
            // The chain iterator stops before the total passes u32::MAX.
            parsed.capacity += len;
        }
        ended = !desc.has_next();
    }
    if parsed.descriptors == 0 {
        return Err(ChainError::Empty);
    }
    if !ended {
        return Err(ChainError::Unterminated);
    }
    if parsed.capacity < VNET_HDR_LEN {
        return Err(ChainError::RxTooSmall { len: parsed.capacity });
    }
    Ok(parsed)
}

/// What became of one frame.
enum Delivery {
    Placed,
    Dropped,
    /// Waits for the guest to post buffers.
    Starved,
}

/// What one pass over the RX path did.
#[derive(Debug, Default)]
pub(super) struct RxResult {
    /// RX chains went to the used ring.
    pub used: bool,
    /// The tap failed: why.
    pub link_error: Option<String>,
}

pub(super) struct RxPath {
    /// One frame from the tap, header first.
    frame: Box<[u8]>,
    /// Length of the frame in `frame` that still has to reach the guest.
    pending: Option<usize>,
    /// The pending frame waits for the guest to post buffers.
    starved: bool,
    /// Chains popped and checked, not yet used (in ring order).
    reserved: VecDeque<RxChain>,
}

impl RxPath {
    pub fn new() -> Self {
        Self {
            frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            pending: None,
            starved: false,
            reserved: VecDeque::new(),
        }
    }

    /// Forgets the pending frame and the reserved chains (device reset or failed tap).
    pub fn reset(&mut self) {
        self.pending = None;
        self.starved = false;
        self.reserved.clear();
    }

    /// A frame waits for guest buffers: do not read the tap until the guest kicks RX.
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// Chains taken from the avail ring for the pending frame and not yet used: the
    /// last ones taken (every chain before them was used).
    pub fn reserved_chains(&self) -> u16 {
        // At most a queue's worth (256).
        self.reserved.len() as u16
    }

    #[cfg(test)]
    pub fn pending(&self) -> Option<usize> {
        self.pending
    }

    /// Moves frames from the tap `fd` into the guest's buffers until the tap is empty, the
    /// guest runs out of buffers or `MAX_FRAMES_PER_WAKEUP` frames have been handled.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        fd: RawFd,
        opts: RxOptions,
        warnings: &mut GuestWarnings,
        name: &str,
    ) -> RxResult {
        let mut result = RxResult::default();
        self.starved = false;
        // Buffers the guest adds from now on need no kick unless we run out (then
        // `deliver` asks for one); without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY.
        if let Err(e) = queue.disable_notification(mem) {
            log::error!("{name}: cannot update the RX used ring flags: {e}");
        }
        for _ in 0..MAX_FRAMES_PER_WAKEUP {
            let len = match self.pending {
                Some(len) => len,
                None => match read_frame(fd, &mut self.frame) {
                    Ok(0) => {
                        result.link_error = Some("end of file on the tap".into());
                        break;
                    }
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        log::debug!("{name}: dropping a {n}-byte frame from the tap (shorter than its headers)");
                        continue;
                    }
                    Ok(n) => {
                        self.pending = Some(n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        result.link_error = Some(format!("read failed: {e}"));
                        break;
                    }
                },
            };
            match self.deliver(len, queue, mem, opts, warnings, name, &mut result.used) {
                Delivery::Placed | Delivery::Dropped => self.pending = None,
                Delivery::Starved => {
                    self.starved = true;
                    break;
                }
            }
        }
        result
    }

    /// Puts the pending frame of `len` bytes into guest buffers, popping chains as needed.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        len: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        opts: RxOptions,
        warnings: &mut GuestWarnings,
        name: &str,
        used: &mut bool,
    ) -> Delivery {
        if let Err(why) = fix_header(&mut self.frame[..len], opts) {
            log::debug!("{name}: dropping a {len}-byte frame from the tap: {why}");
            return Delivery::Dropped;
        }
        // Set once notifications were re-enabled and the ring said more buffers came.
        let mut rearmed = false;
        loop {
            if let Some(count) = self.chains_for(len, opts.mergeable) {
                self.place(count, len, queue, mem, warnings, name, used);
                return Delivery::Placed;
            }
            if self.never_fits(opts.mergeable, queue.size()) {
                let offered: usize = self.reserved.iter().map(|c| c.capacity).sum();
                warnings.warn(format_args!(
                    "{name}: dropping a {len}-byte frame: the guest's receive buffers ({offered} bytes in {} chains{}) cannot hold it",
                    self.reserved.len(),
                    if opts.mergeable { "" } else { ", and MRG_RXBUF is off" }
                ));
                return Delivery::Dropped;
            }
            match queue.pop_descriptor_chain(mem) {
                Some(chain) => {
                    rearmed = false;
                    let head = chain.head_index();
                    match parse_rx_chain(mem, chain) {
                        Ok(chain) => self.reserved.push_back(chain),
                        Err(e) => {
                            warnings.warn(format_args!("{name}: RX descriptor chain {head} returned unused: {e}"));
                            match queue.add_used(mem, head, 0) {
                                Ok(()) => *used = true,
                                Err(e) => warnings.warn(format_args!("{name}: cannot return RX chain {head}: {e}")),
                            }
                        }
                    }
                }
                // The ring claims buffers that cannot be popped (a corrupt avail index):
                // wait for a kick rather than spin.
                None if rearmed => return Delivery::Starved,
                None => match queue.enable_notification(mem) {
                    // Buffers came in while notifications were off: look again.
                    Ok(true) => rearmed = true,
                    Ok(false) => return Delivery::Starved,
                    Err(e) => {
                        log::error!("{name}: cannot re-enable RX queue notifications: {e}");
                        return Delivery::Starved;
                    }
                },
            }
        }
    }

    /// How many reserved chains a frame of `len` bytes takes, if they suffice.
    fn chains_for(&self, len: usize, mergeable: bool) -> Option<usize> {
        if !mergeable {
            return self.reserved.front().filter(|c| c.capacity >= len).map(|_| 1);
        }
        let mut capacity = 0;
        for (i, chain) in self.reserved.iter().enumerate() {
            capacity += chain.capacity;
            if capacity >= len {
                return Some(i + 1);
            }
        }
        None
    }

    /// Whether waiting for more buffers cannot help: without MRG_RXBUF the next chain
    /// is too small; with it, every descriptor of the queue is already reserved.
    fn never_fits(&self, mergeable: bool, queue_size: u16) -> bool {
        if !mergeable {
            return !self.reserved.is_empty();
        }
        self.reserved.iter().map(|c| c.descriptors).sum::<usize>() >= usize::from(queue_size)
    }

    /// Copies the frame (`len` bytes) into the first `count` reserved chains and returns
    /// them to the guest.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        count: usize,
        len: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        warnings: &mut GuestWarnings,
        name: &str,
        used: &mut bool,
    ) {
        // `count` is at most the queue size.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.frame[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&num_buffers.to_le_bytes());
        let frame = &self.frame[..len];
        let mut offset = 0;
        for chain in self.reserved.drain(..count) {
            let mut written = 0usize;
            for &(addr, seg_len) in &chain.segments {
                let take = seg_len.min(len - offset);
                if take == 0 {
                    break;
                }
                if let Err(e) = mem.write_slice(&frame[offset..offset + take], addr) {
                    warnings.warn(format_args!("{name}: cannot write RX buffer {:#x}+{take:#x}: {e}", addr.0));
                }
                offset += take;
                written += take;
            }
            // `written` <= the chain's capacity, which the chain iterator keeps in a u32.
            let written = u32::try_from(written).unwrap_or(u32::MAX);
            match queue.add_used(mem, chain.head, written) {
                Ok(()) => *used = true,
                Err(e) => warnings.warn(format_args!("{name}: cannot return RX chain {}: {e}", chain.head)),
            }
        }
    }
}

/// Makes the tap's header what the guest may see: no checksum flags unless it accepted
/// GUEST_CSUM, and no GSO type it did not accept (such a frame is refused).
fn fix_header(frame: &mut [u8], opts: RxOptions) -> Result<(), &'static str> {
    let gso_type = u32::from(frame[HDR_GSO_TYPE]);
    let accepted = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => opts.guest_csum && opts.guest_tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => opts.guest_csum && opts.guest_tso6,
        _ => false,
    };
    if !accepted {
        return Err("its GSO type is one the guest did not accept");
    }
    if !opts.guest_csum {
        frame[HDR_FLAGS] = 0;
    }
    Ok(())
}
