//! The transmit path: the guest's TX chains to the tap, one writev per frame straight
//! from guest memory (the chain's vnet header and frame, as the tap expects them).
//!
//! When the tap cannot take a frame now (EAGAIN), the chain goes back to the ring
//! unconsumed and the path is `blocked` until the tap is writable again; the guest's
//! later frames queue behind it. Other write errors drop the frame (rate-limited warning).
//!
//! Trust: chains are the guest's. `gather` refuses device-writable descriptors, buffers
//! outside guest memory, chains that do not end, and frames longer than
//! `MAX_TX_CHAIN_LEN` or shorter than the headers; such a chain is returned unused.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::device::MAX_FRAMES_PER_WAKEUP;
use super::tap::write_frame;
use super::{ChainError, ETH_HLEN, MAX_TX_CHAIN_LEN, MAX_TX_SEGMENTS, VNET_HDR_LEN};
use crate::devices::virtio::{GuestWarnings, Queue, QueueT};

/// Host addresses of the pieces of one frame, between `gather` and the writev.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the raw pointers are only filled by `gather` and used by the writev right after
// it, within one call on one thread, and cleared before that call returns; no pointer is
// ever kept across calls, so moving the (empty) vector between threads is harmless.
unsafe impl Send for IoVecs {}

/// Collects the host addresses of a TX chain into `iov`; returns the frame's length
/// (vnet header included).
fn gather<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>, iov: &mut Vec<libc::iovec>) -> Result<usize, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut total = 0usize;
    let mut descriptors = 0usize;
    let mut ended = false;
    for desc in chain {
        let index = descriptors;
        descriptors += 1;
        if desc.is_write_only() {
            return Err(ChainError::WritableTxBuffer { index });
        }
        let len = desc.len() as usize;
        total += len;
        if total > MAX_TX_CHAIN_LEN {
            return Err(ChainError::TxTooLong);
        }
        for slice in mem.get_slices(desc.addr(), len) {
            let slice = slice.map_err(|_| ChainError::OutsideMemory { addr: desc.addr().0, len })?;
            if iov.len() == MAX_TX_SEGMENTS {
                return Err(ChainError::TooManySegments);
            }
            iov.push(libc::iovec { iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void, iov_len: slice.len() });
        }
        ended = !desc.has_next();
    }
    if descriptors == 0 {
        return Err(ChainError::Empty);
    }
    if !ended {
        return Err(ChainError::Unterminated);
    }
    if total < VNET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::TxTooShort { len: total });
    }
    Ok(total)
}

/// What one pass over the TX path did.
#[derive(Debug, Default)]
pub(super) struct TxResult {
    /// TX chains went to the used ring.
    pub used: bool,
    /// The wakeup's budget ran out with chains left: come back on the next turn.
    pub more: bool,
}

pub(super) struct TxPath {
    /// The tap said EAGAIN: wait until it is writable.
    blocked: bool,
    iov: IoVecs,
}

impl TxPath {
    pub fn new() -> Self {
        Self { blocked: false, iov: IoVecs(Vec::with_capacity(64)) }
    }

    pub fn reset(&mut self) {
        self.blocked = false;
    }

    /// Waiting for the tap to become writable.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// The tap is writable again.
    pub fn unblock(&mut self) {
        self.blocked = false;
    }

    /// Sends the guest's TX chains to the tap `fd` until the ring is empty, the tap is
    /// full or the budget is spent. With `link_up` false the frames are dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        fd: RawFd,
        link_up: bool,
        warnings: &mut GuestWarnings,
        link_warnings: &mut GuestWarnings,
        name: &str,
    ) -> TxResult {
        let mut result = TxResult::default();
        if self.blocked {
            return result;
        }
        let mut budget = MAX_FRAMES_PER_WAKEUP;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                log::error!("{name}: cannot update the TX used ring flags: {e}");
            }
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let sent = self.send(mem, chain, fd, link_up, warnings, link_warnings, name);
                if sent == Outcome::Blocked {
                    // Leave the chain in the ring; notifications stay off until the tap
                    // is writable and the ring is drained.
                    queue.go_to_previous_position();
                    self.blocked = true;
                    return result;
                }
                match queue.add_used(mem, head, 0) {
                    Ok(()) => result.used = true,
                    Err(e) => warnings.warn(format_args!("{name}: cannot return TX chain {head}: {e}")),
                }
                budget -= 1;
                if budget == 0 {
                    result.more = true;
                    return result;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) if popped > 0 => continue,
                // The avail index claims chains that cannot be popped (corrupt ring):
                // stop rather than spin; the next kick tries again.
                Ok(true) => {
                    warnings.warn(format_args!("{name}: the TX avail ring index is inconsistent; waiting for a kick"));
                    return result;
                }
                Ok(false) => return result,
                Err(e) => {
                    log::error!("{name}: cannot re-enable TX queue notifications: {e}");
                    return result;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        fd: RawFd,
        link_up: bool,
        warnings: &mut GuestWarnings,
        link_warnings: &mut GuestWarnings,
        name: &str,
    ) -> Outcome
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let iov = &mut self.iov.0;
        iov.clear();
        let sent = match gather(mem, chain, iov) {
            Err(e) => {
                warnings.warn(format_args!("{name}: TX descriptor chain {head} dropped: {e}"));
                Outcome::Dropped
            }
            Ok(_) if !link_up => Outcome::Dropped,
            // SAFETY: every entry points into guest memory `mem` maps (checked by
            // `get_slices`), which stays mapped while `mem` is borrowed, i.e. past this
            // call. The guest may change the bytes meanwhile: that only changes its frame.
            Ok(len) => match unsafe { write_frame(fd, iov) } {
                Ok(n) if n == len => Outcome::Written,
                Ok(n) => {
                    link_warnings.warn(format_args!("{name}: the tap took {n} of a {len}-byte frame"));
                    Outcome::Written
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Outcome::Blocked,
                Err(e) => {
                    link_warnings.warn(format_args!("{name}: a {len}-byte frame was dropped: tap write failed: {e}"));
                    Outcome::Dropped
                }
            },
        };
        iov.clear();
        sent
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Written,
    Dropped,
    Blocked,
}
