//! What wakes the vsock device on the VMM's device thread (event-manager 0.4): its three
//! queue eventfds, the control eventfd (`activate`/`reset` from the transport), the
//! deadline timer, the listening socket, and every host stream, which are added,
//! changed and removed as connections come and go.
//!
//! Each wakeup runs to completion without blocking: handle the event, fill the guest's
//! RX buffers, bring the epoll set in line, re-arm the timer, and raise at most one
//! interrupt. Trusts the event loop to report only descriptors registered here.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{Vsock, EVQ, RXQ, TXQ};
use super::muxer::FdRegistry;
use crate::devices::virtio::VirtioDevice;

/// The event loop's epoll set, as the muxer sees it.
struct EventOpsRegistry<'a, 'b>(&'a mut EventOps<'b>);

fn to_io(e: event_manager::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl FdRegistry for EventOpsRegistry<'_, '_> {
    fn add(&mut self, fd: RawFd, events: EventSet) -> io::Result<()> {
        self.0.add(Events::new_raw(fd, events)).map_err(to_io)
    }

    fn modify(&mut self, fd: RawFd, events: EventSet) -> io::Result<()> {
        self.0.modify(Events::new_raw(fd, events)).map_err(to_io)
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.0.remove(Events::empty_raw(fd)).map_err(to_io)
    }
}

/// Consumes an eventfd's count; "nothing to read" is fine (non-blocking).
fn drain(event: &EventFd) {
    let _ = event.read();
}

impl Vsock {
    /// Handles one ready descriptor, then everything that follows from it.
    pub(super) fn handle_event(&mut self, fd: RawFd, events: EventSet, registry: &mut dyn FdRegistry) {
        let now = Instant::now();
        if std::mem::take(&mut self.teardown_pending) {
            self.muxer.close_all();
        }
        let (mut rx_used, mut tx_used) = (false, false);
        if fd == self.queue_events[RXQ].as_raw_fd() {
            // The guest added RX buffers: filled below.
            drain(&self.queue_events[RXQ]);
        } else if fd == self.queue_events[TXQ].as_raw_fd() {
            drain(&self.queue_events[TXQ]);
            tx_used = self.process_tx(now);
        } else if fd == self.queue_events[EVQ].as_raw_fd() {
            // Event buffers are only used for transport resets, which never happen.
            drain(&self.queue_events[EVQ]);
        } else if fd == self.control_event.as_raw_fd() {
            drain(&self.control_event);
            if self.is_activated() {
                self.muxer.set_accepting(true);
                // The driver may have queued packets before DRIVER_OK took effect.
                tx_used = self.process_tx(now);
            }
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: fails harmlessly if re-arming already consumed the expiry.
            let _ = self.timer.wait();
            self.timer_deadline = None;
            self.muxer.on_timer(now);
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept_host_connections(now);
        } else {
            self.muxer.on_fd_event(fd, events, now);
        }

        rx_used |= self.process_rx(now);
        self.muxer.sync_fds(registry);
        // Registration failures may have queued RSTs.
        rx_used |= self.process_rx(now);
        self.rearm_timer(now);
        self.signal_used(rx_used, tx_used);
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = self
            .queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), "queue eventfd"))
            .chain([(self.control_event.as_raw_fd(), "control eventfd"), (self.timer.as_raw_fd(), "timer")]);
        for (fd, what) in fixed {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("vsock: cannot watch the {what}: {e}");
            }
        }
        // The listener and the host streams follow once the driver activated the device
        // (the control eventfd fires then, also if that happened before `init`).
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd(), events.event_set(), &mut EventOpsRegistry(ops));
    }
}
