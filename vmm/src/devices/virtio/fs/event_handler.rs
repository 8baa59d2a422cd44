//! What wakes a virtio-fs device: a kick on one of its queues (hiprio or a request
//! queue), delivered by the VMM's event manager on the device thread.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::SharedDir;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for SharedDir {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events().iter().enumerate() {
            if let Err(e) = ops.add(Events::new(event, EventSet::IN)) {
                log::error!("virtio-fs {}: cannot watch the eventfd of queue {index}: {e:?}", self.tag());
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = self.queue_events().iter().position(|event| event.as_raw_fd() == events.fd());
        let Some(index) = index else {
            log::warn!("virtio-fs {}: event for unknown fd {}", self.tag(), events.fd());
            return;
        };
        if !events.event_set().contains(EventSet::IN) {
            log::warn!(
                "virtio-fs {}: unexpected event set {:?} on the eventfd of queue {index}",
                self.tag(),
                events.event_set()
            );
            return;
        }
        self.handle_queue_event(index);
    }
}
