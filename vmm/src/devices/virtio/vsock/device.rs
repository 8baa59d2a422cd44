//! The virtio-vsock device model: three queues (RX, TX, event), a configuration space
//! holding the guest CID (le64), feature VERSION_1 only. It moves packets between the
//! guest's queues and the muxer and raises one interrupt per wakeup that used buffers.
//!
//! Trusts the transport for queue setup (sizes, addresses checked before `activate`) and
//! nothing in the queues: malformed chains are returned to the guest unused, never
//! stalling the queue. Runs on the VMM's device thread (see `event_handler`); `activate`
//! and `reset` come from a vCPU thread through the transport and only hand work over by
//! eventfd, so all sockets and epoll changes stay on the device thread.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{MuxerError, VsockMuxer};
use super::packet::{read_tx_packet, RxBuffer, MAX_PKT_DATA};
use super::{Timeouts, VSOCK_HOST_CID};
use crate::devices::virtio::{
    exact_queues, ignore_config_write, read_config_space, ActivateError, GuestWarnings, Interrupt, InterruptKind,
    Queue, QueuePosition, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;
const NUM_QUEUES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range: use 3..=4294967294")]
    InvalidCid(u64),
    #[error("vsock backend: {0}")]
    Muxer(#[from] MuxerError),
    #[error("cannot create the vsock device's {what}: {source}")]
    EventSource { what: &'static str, source: io::Error },
}

/// What the driver handed over at activation.
struct ActiveQueues {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    rx: Queue,
    tx: Queue,
    /// Holds no buffers we use: no transport events are ever sent (its position is
    /// saved in a snapshot all the same).
    event: Queue,
}

pub struct Vsock {
    guest_cid: u64,
    queue_sizes: [u16; NUM_QUEUES],
    pub(super) queue_events: [EventFd; NUM_QUEUES],
    /// Written by `activate` and `reset` to wake the device thread.
    pub(super) control_event: EventFd,
    pub(super) timer: TimerFd,
    /// What `timer` is armed for.
    pub(super) timer_deadline: Option<Instant>,
    pub(super) muxer: VsockMuxer,
    acked_features: u64,
    active: Option<ActiveQueues>,
    /// Set by `reset`: drop all connections on the device thread.
    pub(super) teardown_pending: bool,
    tx_data: Box<[u8; MAX_PKT_DATA]>,
    rx_data: Box<[u8; MAX_PKT_DATA]>,
    warnings: GuestWarnings,
}

fn event_source<T>(what: &'static str, result: io::Result<T>) -> Result<T, VsockError> {
    result.map_err(|source| VsockError::EventSource { what, source })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, no memory arguments; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Vsock {
    /// A vsock device for the guest `guest_cid`, listening for host clients on
    /// `uds_path` (a stale socket file there is replaced; anything else is an error).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        Self::with_timeouts(guest_cid, uds_path, Timeouts::default())
    }

    pub fn with_timeouts(guest_cid: u64, uds_path: PathBuf, timeouts: Timeouts) -> Result<Self, VsockError> {
        // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
        // Only the low 32 bits are used by drivers.
        if guest_cid <= VSOCK_HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let queue_event = || event_source("queue eventfd", EventFd::new(EFD_NONBLOCK));
        let queue_events = [queue_event()?, queue_event()?, queue_event()?];
        let timer = event_source("timer", TimerFd::new().map_err(io::Error::from))?;
        event_source("timer", set_nonblocking(timer.as_raw_fd()))?;
        Ok(Self {
            guest_cid,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_events,
            control_event: event_source("control eventfd", EventFd::new(EFD_NONBLOCK))?,
            timer,
            timer_deadline: None,
            muxer: VsockMuxer::new(guest_cid, &uds_path, timeouts)?,
            acked_features: 0,
            active: None,
            teardown_pending: false,
            tx_data: Box::new([0; MAX_PKT_DATA]),
            rx_data: Box::new([0; MAX_PKT_DATA]),
            warnings: GuestWarnings::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Hands every packet the guest queued on TX to the muxer. Returns true if buffers
    /// were used.
    pub(super) fn process_tx(&mut self, now: Instant) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = active.tx.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            match read_tx_packet(&active.mem, chain, &mut self.tx_data) {
                Ok(hdr) => {
                    let data = self.tx_data.get(..hdr.len as usize).unwrap_or_default();
                    self.muxer.on_guest_packet(&hdr, data, now);
                }
                Err(e) => self.warnings.warn(format_args!("vsock: dropping TX descriptor chain {head}: {e}")),
            }
            if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                self.warnings.warn(format_args!("vsock: cannot return TX descriptor chain {head}: {e}"));
            }
            used = true;
        }
        used
    }

    /// Fills the guest's RX buffers with what the muxer has for it. Returns true if
    /// buffers were used.
    pub(super) fn process_rx(&mut self, now: Instant) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = active.rx.pop_descriptor_chain(&active.mem) else {
                // The guest kicks RX when it adds buffers.
                break;
            };
            let head = chain.head_index();
            let written = match RxBuffer::new(&active.mem, chain) {
                Ok(buffer) => {
                    let max_data = buffer.data_capacity();
                    let Some((hdr, len)) = self.muxer.next_rx_packet(max_data, &mut self.rx_data[..], now) else {
                        // Nothing after all: keep the buffer for later.
                        active.rx.go_to_previous_position();
                        break;
                    };
                    let data = self.rx_data.get(..len).unwrap_or_default();
                    buffer.write(&hdr, data).unwrap_or_else(|e| {
                        self.warnings.warn(format_args!("vsock: cannot write RX descriptor chain {head}: {e}"));
                        0
                    })
                }
                Err(e) => {
                    self.warnings.warn(format_args!("vsock: skipping RX descriptor chain {head}: {e}"));
                    0
                }
            };
            if let Err(e) = active.rx.add_used(&active.mem, head, written) {
                self.warnings.warn(format_args!("vsock: cannot return RX descriptor chain {head}: {e}"));
            }
            used = true;
        }
        used
    }

    /// Raises the queue interrupt once if RX or TX buffers were used and the driver
    /// wants to hear about it.
    pub(super) fn signal_used(&mut self, rx_used: bool, tx_used: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut notify = false;
        if rx_used {
            notify |= active.rx.needs_notification(&active.mem).unwrap_or(true);
        }
        if tx_used {
            notify |= active.tx.needs_notification(&active.mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                log::error!("vsock: cannot interrupt the guest: {e}");
            }
        }
    }

    /// Arms the timer for the muxer's next deadline.
    pub(super) fn rearm_timer(&mut self, now: Instant) {
        let next = self.muxer.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        let result = match next {
            // A zero duration would disarm the timer.
            Some(deadline) => {
                self.timer.reset(deadline.saturating_duration_since(now).max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_deadline = next,
            Err(e) => log::error!("vsock: cannot arm the timer: {e}"),
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(&mut self.warnings, "vsock", offset, data.len());
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx, event] = exact_queues::<NUM_QUEUES>(queues)?;
        self.control_event
            .write(1)
            .map_err(|e| ActivateError::Device(format!("vsock: cannot wake the device thread: {e}")))?;
        self.active = Some(ActiveQueues { mem, interrupt, rx, tx, event });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.teardown_pending = true;
        if let Err(e) = self.control_event.write(1) {
            log::error!("vsock: cannot wake the device thread for reset: {e}");
            return false;
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// RX, TX and event queue: packets are moved whole on the device thread, so the
    /// queues are consistent while it is stopped; connections are not carried, so
    /// there must be none (`VsockMuxer::snapshot_blocker`).
    fn queue_positions(&self) -> Result<Vec<QueuePosition>, String> {
        if self.teardown_pending {
            return Err("a reset of the vsock device is still being carried out".into());
        }
        if let Some(why) = self.muxer.snapshot_blocker() {
            return Err(why);
        }
        Ok(self
            .active
            .as_ref()
            .map(|a| vec![QueuePosition::of(&a.rx), QueuePosition::of(&a.tx), QueuePosition::of(&a.event)])
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_the_guest_cid() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(0x1234_5678, dir.path().join("v.sock")).unwrap();
        assert_eq!(dev.device_type(), TYPE_VSOCK);
        assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert_eq!(dev.queue_events().len(), 3);
        let mut cid = [0xffu8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
        let mut tail = [0xffu8; 8];
        dev.read_config(2, &mut tail);
        assert_eq!(tail, [0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        let mut far = [0xffu8; 4];
        dev.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn reserved_cids_and_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert!(matches!(Vsock::new(cid, dir.path().join("v.sock")), Err(VsockError::InvalidCid(_))));
        }
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let err = Vsock::new(3, dir.path().join("file")).err().unwrap();
        assert!(err.to_string().contains("is not a socket"), "{err}");
    }

    #[test]
    fn activate_needs_three_queues() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(3, dir.path().join("v.sock")).unwrap();
        let mem = crate::devices::virtio::vsock::test_utils::leak_memory().clone();
        let interrupt = crate::devices::virtio::vsock::test_utils::RecordingInterrupt::new();
        let queues = vec![Queue::new(QUEUE_SIZE).unwrap()];
        assert!(matches!(dev.activate(mem, interrupt, queues), Err(ActivateError::QueueCount { got: 1, want: 3 })));
        assert!(!dev.is_activated());
    }
}
