//! What wakes the network device on the VMM's device thread (event-manager 0.4): the RX
//! and TX queue eventfds, the control eventfd (`activate`/`reset` from the transport),
//! and the tap.
//!
//! The tap is in the event loop only while the device is active and the tap works, and
//! only for what the device can act on: readable unless a frame waits for guest buffers
//! (then the RX kick resumes), writable only while TX is blocked on a full tap. So a busy
//! tap never spins the loop. Each wakeup runs to completion without blocking and raises
//! at most one interrupt.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Net, RXQ, TXQ};

/// Consumes an eventfd's count; "nothing to read" is fine (non-blocking).
fn drain(event: &EventFd) {
    let _ = event.read();
}

impl Net {
    /// Handles one ready descriptor and what follows from it.
    pub(super) fn handle_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let (mut rx_used, mut tx_used) = (false, false);
        if fd == self.queue_events[RXQ].as_raw_fd() {
            // The guest posted RX buffers; it kicks only when asked to (a frame waits).
            drain(&self.queue_events[RXQ]);
            rx_used = self.process_rx();
        } else if fd == self.queue_events[TXQ].as_raw_fd() {
            drain(&self.queue_events[TXQ]);
            tx_used = self.process_tx();
        } else if fd == self.control_event.as_raw_fd() {
            drain(&self.control_event);
            // Activation: the driver may have queued frames before DRIVER_OK took effect.
            tx_used = self.process_tx();
            rx_used = self.process_rx();
        } else if fd == self.link.as_raw_fd() {
            if events.contains(EventSet::OUT) {
                self.tx.unblock();
                tx_used = self.process_tx();
            }
            if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                rx_used = self.process_rx();
            }
            if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                self.link_failed(&format!("the event loop reports {events:?}"));
            }
        } else {
            log::warn!("{}: event for unknown fd {fd}", self.name);
        }
        self.sync_tap_interest(ops);
        self.signal_used(rx_used, tx_used);
    }

    fn process_rx(&mut self) -> bool {
        if !self.link_up {
            return false;
        }
        let opts = self.rx_options();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let result =
            self.rx.process(&mut active.rx, &active.mem, self.link.as_raw_fd(), opts, &mut self.warnings, &self.name);
        if let Some(reason) = result.link_error {
            self.link_failed(&reason);
        }
        result.used
    }

    fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let result = self.tx.process(
            &mut active.tx,
            &active.mem,
            self.link.as_raw_fd(),
            self.link_up,
            &mut self.warnings,
            &mut self.link_warnings,
            &self.name,
        );
        if result.more {
            // Come back on the next turn of the event loop for the rest.
            if let Err(e) = self.queue_events[TXQ].write(1) {
                log::error!("{}: cannot re-arm the TX queue: {e}", self.name);
            }
        }
        result.used
    }

    /// Registers the tap for what the device can act on now (see the module comment).
    fn sync_tap_interest(&mut self, ops: &mut EventOps) {
        let want = (self.active.is_some() && self.link_up).then(|| {
            let mut set = EventSet::empty();
            if !self.rx.starved() {
                set |= EventSet::IN;
            }
            if self.tx.blocked() {
                set |= EventSet::OUT;
            }
            set
        });
        if want == self.tap_interest {
            return;
        }
        let fd = self.link.as_raw_fd();
        let result = match (self.tap_interest, want) {
            (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
            (Some(_), Some(set)) => ops.modify(Events::new_raw(fd, set)),
            (Some(_), None) => ops.remove(Events::empty_raw(fd)),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => self.tap_interest = want,
            Err(e) => log::error!("{}: cannot update the tap's events in the event loop: {e}", self.name),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = self
            .queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), "queue eventfd"))
            .chain([(self.control_event.as_raw_fd(), "control eventfd")]);
        for (fd, what) in fixed {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("{}: cannot watch the {what}: {e}", self.name);
            }
        }
        // The tap follows once the driver activated the device (the control eventfd
        // fires then, also if that happened before `init`).
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd(), events.event_set(), ops);
    }
}
