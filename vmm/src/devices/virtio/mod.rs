//! The contract between a virtio device model and the virtio-mmio transport.
//!
//! A device model owns its queue notification eventfds (the VMM registers them as KVM
//! ioeventfds, so a guest kick never exits to userspace) and is driven from the VMM's
//! single device thread through `event_manager::MutEventSubscriber`. The transport
//! (`mmio`) owns the register block, the driver's feature negotiation and queue setup,
//! and calls `activate` once the driver sets DRIVER_OK.
//!
//! Everything a device reads from guest memory is untrusted: descriptor chains may be
//! malformed, addresses out of range, lengths absurd. A device answers that with an
//! error status or by dropping the request, never with a panic.

pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::io;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueT};

/// Feature bit every wisp device offers: "modern" (virtio 1.x) only, no legacy layout.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device IDs (virtio spec 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Why the device raises its interrupt; the transport reflects it in InterruptStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers were added to a queue (bit 0).
    Queue,
    /// The device configuration changed (bit 1).
    Config,
}

/// How a device notifies the guest. Implemented by the transport (status register +
/// irqfd); unit tests use a recording fake.
pub trait Interrupt: Send + Sync {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("driver set up {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("device activation failed: {0}")]
    Device(String),
}

/// Where a device model is in one of its queues: what a snapshot carries to resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    /// The next avail ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will write.
    pub next_used: u16,
}

impl QueuePosition {
    pub fn of(queue: &Queue) -> Self {
        Self { next_avail: queue.next_avail(), next_used: queue.next_used() }
    }
}

/// A virtio device model, independent of transport and of KVM.
pub trait VirtioDevice: Send {
    /// One of the `TYPE_*` IDs.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length of the slice is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One notification eventfd per queue, in queue order.
    fn queue_events(&self) -> &[EventFd];
    /// Feature bits offered to the driver (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// The subset of `avail_features` the driver accepted (called before activation).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads of the device-specific configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space; devices ignore what they do not support.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues` (already validated by the
    /// transport: sizes, alignment and ranges) and signal through `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device. Returns true if the device can be activated again;
    /// false makes the transport mark it DEVICE_NEEDS_RESET-style failed.
    fn reset(&mut self) -> bool {
        false
    }
    fn is_activated(&self) -> bool;
    /// For a snapshot of an active device: its place in each queue, in queue order, read
    /// while the device thread is stopped. An error (the default) says why not: the
    /// model holds state beyond its queues that a snapshot does not carry (open
    /// connections, a mounted share's open files); such a device is not snapshotted
    /// while it does.
    fn queue_positions(&self) -> Result<Vec<QueuePosition>, String> {
        Err("its model keeps state a snapshot does not carry".into())
    }
}
pub mod block;
pub mod fs;
pub mod net;
pub mod rng;
pub mod vsock;

/// Reads of a read-only configuration space `space` at `offset`: the bytes past its end
/// (or at an offset that overflows) read as 0, as the transport promises the driver.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok());
        *byte = at.and_then(|o| space.get(o)).copied().unwrap_or(0);
    }
}

/// The driver wrote to a configuration space that has nothing writable (VERSION_1 with
/// none of the features that make a field writable): logged against the guest's budget.
pub fn ignore_config_write(warnings: &mut GuestWarnings, device: &str, offset: u64, len: usize) {
    warnings.warn(format_args!(
        "{device}: ignoring guest write of {len} bytes at configuration offset {offset:#x} (read-only)"
    ));
}

/// The queues of an activation as the fixed number `N` a device serves.
pub fn exact_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    queues.try_into().map_err(|queues: Vec<Queue>| ActivateError::QueueCount { got: queues.len(), want: N })
}

/// Kicks the device thread once per queue, so it serves whatever the driver queued
/// before DRIVER_OK without waiting for the guest's next notification.
pub fn kick_queues(device: &str, events: &[EventFd]) {
    for (index, event) in events.iter().enumerate() {
        if let Err(e) = event.write(1) {
            log::error!("{device}: cannot arm queue {index}: {e}");
        }
    }
}

/// Warnings and errors caused by the guest (bad register accesses, malformed requests,
/// activations that fail on what the driver set up). The first few are logged at their
/// own level (`warn` or `error`) and the rest at `debug`, so a misbehaving guest cannot
/// flood the VMM's log. One per device or transport, shared by both levels; the budget
/// is never refilled, so a guest cannot reset its way to more messages.
#[derive(Debug)]
pub struct GuestWarnings {
    left: u32,
}

impl GuestWarnings {
    /// How many messages each device or transport logs above `debug` level.
    pub const BUDGET: u32 = 16;

    pub const fn new() -> Self {
        Self { left: Self::BUDGET }
    }

    /// Logs `args` at `warn` while the budget lasts, then at `debug`.
    pub fn warn(&mut self, args: std::fmt::Arguments<'_>) {
        self.log(log::Level::Warn, args);
    }

    /// Logs `args` at `error` while the budget lasts, then at `debug`: for failures the
    /// guest can cause again and again (an activation it set up wrong, and what follows).
    pub fn error(&mut self, args: std::fmt::Arguments<'_>) {
        self.log(log::Level::Error, args);
    }

    /// How many messages may still go out above `debug`.
    pub fn left(&self) -> u32 {
        self.left
    }

    fn log(&mut self, level: log::Level, args: std::fmt::Arguments<'_>) {
        let (level, suffix) = self.take(level);
        log::log!(level, "{args}{suffix}");
    }

    /// The level the next message goes out at, and what to append to it.
    fn take(&mut self, level: log::Level) -> (log::Level, &'static str) {
        match self.left {
            0 => (log::Level::Debug, ""),
            1 => {
                self.left = 0;
                (level, " (further guest errors of this device are logged at debug level)")
            }
            _ => {
                self.left -= 1;
                (level, "")
            }
        }
    }
}

impl Default for GuestWarnings {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_or_overflowing_read_zero() {
        let space = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_space(&space, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_space(&space, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn guest_messages_drop_to_debug_after_the_budget() {
        let mut w = GuestWarnings::new();
        for _ in 1..GuestWarnings::BUDGET {
            assert_eq!(w.take(log::Level::Error), (log::Level::Error, ""));
        }
        let (level, suffix) = w.take(log::Level::Warn);
        assert_eq!(level, log::Level::Warn);
        assert!(suffix.contains("debug level"), "{suffix}");
        assert_eq!(w.left(), 0);
        for level in [log::Level::Error, log::Level::Warn] {
            assert_eq!(w.take(level), (log::Level::Debug, ""));
        }
    }

    #[test]
    fn exact_queues_names_the_count_it_wanted() {
        let two = || vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()];
        assert!(exact_queues::<2>(two()).is_ok());
        match exact_queues::<3>(two()) {
            Err(ActivateError::QueueCount { got: 2, want: 3 }) => {}
            other => panic!("unexpected: {:?}", other.map(|_| ())),
        }
    }
}
