//! What wakes the entropy device: a kick on its request queue, delivered by the VMM's
//! event manager on the device thread.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Rng;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.queue_event(), EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the request queue eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue_event().as_raw_fd() {
            log::warn!("virtio-rng: event for unknown fd {}", events.fd());
            return;
        }
        if !events.event_set().contains(EventSet::IN) {
            log::warn!("virtio-rng: unexpected event set {:?} on the request queue eventfd", events.event_set());
            return;
        }
        self.handle_queue_event();
    }
}
