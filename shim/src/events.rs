//! Task events to containerd (TaskCreate, TaskStart, TaskExit, ...). Behind a trait so
//! the task logic is tested with an in-memory sink.

use std::sync::Mutex;

use containerd_shim::publisher::RemotePublisher;
use protobuf::MessageDyn;

pub trait EventSink: Send + Sync {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

pub struct RemoteEvents {
    publisher: Mutex<RemotePublisher>,
    namespace: String,
}

impl RemoteEvents {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self { publisher: Mutex::new(publisher), namespace: namespace.into() }
    }
}

impl EventSink for RemoteEvents {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = ttrpc::context::with_timeout(5_000_000_000);
        if let Err(e) = p.publish(ctx, topic, &self.namespace, event) {
            log::warn!("publishing {topic}: {e}");
        }
    }
}
