//! What wakes the block device: a kick on its request queue, delivered by the VMM's
//! event manager on the device thread.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.queue_event(), EventSet::IN)) {
            log::error!("virtio-blk {}: cannot watch the request queue eventfd: {e:?}", self.disk().path().display());
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue_event().as_raw_fd() {
            log::warn!("virtio-blk {}: event for unknown fd {}", self.disk().path().display(), events.fd());
            return;
        }
        if !events.event_set().contains(EventSet::IN) {
            log::warn!(
                "virtio-blk {}: unexpected event set {:?} on the request queue eventfd",
                self.disk().path().display(),
                events.event_set()
            );
            return;
        }
        self.handle_queue_event();
    }
}
