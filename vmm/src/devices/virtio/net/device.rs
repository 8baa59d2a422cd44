//! The virtio-net device model: two queues (receive, transmit; no control queue), the
//! configuration space (MAC, link status, MTU), feature negotiation and the tap's
//! offloads, activation and reset. The data paths are in `rx` and `tx`; the device
//! thread drives them from `event_handler`.
//!
//! Trusts the transport for queue setup (sizes and addresses are checked before
//! `activate`) and nothing in the queues. `activate` and `reset` come from a vCPU thread
//! through the transport; they only change state and wake the device thread through the
//! control eventfd, which brings the tap's registration in the event loop in line.

use std::io;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rx::{RxOptions, RxPath};
use super::tap::TapLink;
use super::tx::TxPath;
use super::{MacAddr, MIN_MTU};
use crate::devices::virtio::{
    exact_queues, ignore_config_write, read_config_space, ActivateError, GuestWarnings, Interrupt, InterruptKind,
    Queue, QueuePosition, QueueT, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most frames moved per direction and wakeup of the device thread; the rest wait for
/// the next turn of the event loop, so other devices are served in between.
pub const MAX_FRAMES_PER_WAKEUP: usize = 256;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_MAX_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// mac (6 bytes), status (le16), max_virtqueue_pairs (le16), mtu (le16).
const CONFIG_SIZE: usize = 12;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// What the device offers whatever its configuration.
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net: MTU {0} is too small: use {MIN_MTU} to 65535")]
    Mtu(u16),
    #[error("virtio-net: MAC {0}: {1}")]
    Mac(MacAddr, &'static str),
    #[error("virtio-net ({link}): cannot create the {what}: {source}")]
    EventFd { link: String, what: &'static str, source: io::Error },
}

/// The TUN_F_* offloads the tap may use towards a guest that accepted `acked`: partial
/// checksums need GUEST_CSUM, TCP segmentation offload needs GUEST_CSUM and GUEST_TSO4/6.
pub(super) fn tap_offloads(acked: u64) -> u32 {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// What the driver handed over at activation.
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub rx: Queue,
    pub tx: Queue,
}

/// The virtio-net device model.
pub struct Net {
    pub(super) link: Box<dyn TapLink>,
    /// "virtio-net (tap wtap0)", for log messages.
    pub(super) name: String,
    mac: MacAddr,
    mtu: Option<u16>,
    avail_features: u64,
    pub(super) acked_features: u64,
    /// Cleared for good when the tap fails (the guest sees the link go down).
    pub(super) link_up: bool,
    pub(super) queue_events: [EventFd; NUM_QUEUES],
    /// Written by `activate` and `reset` to wake the device thread.
    pub(super) control_event: EventFd,
    pub(super) active: Option<Active>,
    pub(super) rx: RxPath,
    pub(super) tx: TxPath,
    /// What the tap is registered for in the event loop (`None`: not registered).
    pub(super) tap_interest: Option<event_manager::EventSet>,
    /// Malformed chains and other guest mistakes.
    pub(super) warnings: GuestWarnings,
    /// Failed tap writes (the host side), rate-limited the same way.
    pub(super) link_warnings: GuestWarnings,
}

impl Net {
    /// A network device on `link`, giving the guest `mac` and, if set, `mtu`.
    pub fn new(link: Box<dyn TapLink>, mac: [u8; 6], mtu: Option<u16>) -> Result<Self, NetError> {
        let mac = MacAddr(mac);
        if mac.0[0] & 1 != 0 {
            return Err(NetError::Mac(mac, "a multicast address cannot be a NIC's address"));
        }
        if let Some(mtu) = mtu.filter(|&m| m < MIN_MTU) {
            return Err(NetError::Mtu(mtu));
        }
        let name = format!("virtio-net ({})", link.label());
        let event = |what| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::EventFd { link: link.label().into(), what, source })
        };
        let queue_events = [event("RX queue eventfd")?, event("TX queue eventfd")?];
        let control_event = event("control eventfd")?;
        let mut avail_features = BASE_FEATURES;
        if mtu.is_some() {
            avail_features |= bit(VIRTIO_NET_F_MTU);
        }
        Ok(Self {
            link,
            name,
            mac,
            mtu,
            avail_features,
            acked_features: 0,
            link_up: true,
            queue_events,
            control_event,
            active: None,
            rx: RxPath::new(),
            tx: TxPath::new(),
            tap_interest: None,
            warnings: GuestWarnings::new(),
            link_warnings: GuestWarnings::new(),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// "virtio-net (tap NAME)".
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn rx_options(&self) -> RxOptions {
        let has = |feature| self.acked_features & bit(feature) != 0;
        RxOptions {
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: has(VIRTIO_NET_F_GUEST_TSO6),
        }
    }

    /// The configuration space as the driver reads it.
    fn config(&self) -> [u8; CONFIG_SIZE] {
        let status = if self.link_up { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs: only meaningful with MQ, which is not offered.
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    /// The tap failed (deleted interface, closed peer): stop using it and tell the guest
    /// the link is down. The device thread drops the tap from the event loop.
    pub(super) fn link_failed(&mut self, reason: &str) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.rx.reset();
        log::error!("{}: the tap failed ({reason}); the guest's link is down", self.name);
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                log::error!("{}: cannot interrupt the guest: {e}", self.name);
            }
        }
    }

    /// Raises the queue interrupt once if RX or TX buffers were used and the driver wants
    /// to hear about it (EVENT_IDX: its used_event).
    pub(super) fn signal_used(&mut self, rx_used: bool, tx_used: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut notify = false;
        for (used, queue) in [(rx_used, &mut active.rx), (tx_used, &mut active.tx)] {
            if used {
                notify |= queue.needs_notification(&active.mem).unwrap_or_else(|e| {
                    log::error!("{}: cannot read the avail ring's used_event: {e}", self.name);
                    true
                });
            }
        }
        if notify {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                log::error!("{}: cannot interrupt the guest: {e}", self.name);
            }
        }
    }

    fn wake_device_thread(&self) -> io::Result<()> {
        self.control_event.write(1)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(&mut self.warnings, &self.name, offset, data.len());
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Device(format!("{} is already active", self.name)));
        }
        let [rx, tx] = exact_queues::<NUM_QUEUES>(queues)?;
        let offloads = tap_offloads(self.acked_features);
        self.link.set_offload(offloads).map_err(|e| {
            ActivateError::Device(format!(
                "{}: cannot set the tap's offloads (TUNSETOFFLOAD {offloads:#x}): {e}",
                self.name
            ))
        })?;
        self.rx.reset();
        self.tx.reset();
        self.active = Some(Active { mem, interrupt, rx, tx });
        self.wake_device_thread()
            .map_err(|e| ActivateError::Device(format!("{}: cannot wake the device thread: {e}", self.name)))?;
        log::debug!("{}: active, features {:#x}, tap offloads {offloads:#x}", self.name, self.acked_features);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.rx.reset();
        self.tx.reset();
        if let Err(e) = self.wake_device_thread() {
            log::error!("{}: cannot wake the device thread for reset: {e}", self.name);
            return false;
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Receive and transmit queue. Frames move whole on the device thread, but one
    /// received frame may wait for enough guest buffers with some chains already taken
    /// for it: the snapshot's receive queue resumes at the first of those chains (so
    /// the guest gets them back) and the frame itself is not carried, as if lost on the
    /// wire. A restored device reads a new tap.
    fn queue_positions(&self) -> Result<Vec<QueuePosition>, String> {
        let Some(active) = &self.active else { return Ok(Vec::new()) };
        let mut rx = QueuePosition::of(&active.rx);
        rx.next_avail = rx.next_avail.wrapping_sub(self.rx.reserved_chains());
        Ok(vec![rx, QueuePosition::of(&active.tx)])
    }
}
