//! Task events to containerd (TaskCreate, TaskStart, TaskExit, ...). Behind a trait so
//! the task logic is tested with an in-memory sink.

use std::sync::Mutex;
use std::time::SystemTime;

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

/// A time as the task API's timestamp.
pub fn timestamp(t: SystemTime) -> protobuf::well_known_types::timestamp::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    protobuf::well_known_types::timestamp::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}
