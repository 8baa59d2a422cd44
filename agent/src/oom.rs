//! OOM kill events for GetOomEvent.
//!
//! A monitor thread polls every container's OOM kill counter (cgroup v2
//! `memory.events` oom_kill, v1 `memory.oom_control` oom_kill) every 100 ms and queues
//! the container's id when it grows. Polling is used rather than inotify because it
//! works the same on both cgroup versions and cannot miss an event across a watch
//! being set up; the container's counter is also checked once more before its cgroup
//! is removed, so a kill right before RemoveContainer is still reported.
//!
//! Trusts: the kernel's counters.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::container::Container;

const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Events kept when nobody asks for them.
const MAX_QUEUED: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OomError {
    #[error("the caller went away while waiting for an OOM event")]
    Cancelled,
}

#[derive(Default)]
pub struct OomEvents {
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
}

impl OomEvents {
    pub fn push(&self, container_id: &str) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_QUEUED {
            q.pop_front();
        }
        q.push_back(container_id.to_string());
        self.ready.notify_one();
    }

    /// Long-polls for the next event; `cancelled` is asked every second.
    pub fn next(&self, cancelled: &dyn Fn() -> bool) -> Result<String, OomError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return Ok(id);
            }
            if cancelled() {
                return Err(OomError::Cancelled);
            }
            q = self.ready.wait_timeout(q, Duration::from_secs(1)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Checks one container now.
    pub fn check(&self, c: &Container) {
        if c.poll_oom() {
            log::info!("container {} had a process killed by the OOM killer", c.id);
            self.push(&c.id);
        }
    }
}

/// What the monitor watches.
pub trait ContainerSource: Send + Sync {
    fn containers(&self) -> Vec<Arc<Container>>;
}

/// Polls until the source is dropped.
pub fn start_monitor(events: Arc<OomEvents>, source: Weak<dyn ContainerSource>) -> std::io::Result<()> {
    std::thread::Builder::new().name("oom-monitor".into()).spawn(move || loop {
        std::thread::sleep(POLL_INTERVAL);
        let Some(src) = source.upgrade() else { return };
        for c in src.containers() {
            events.check(&c);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_queue_in_order_and_waiters_can_give_up() {
        let ev = Arc::new(OomEvents::default());
        ev.push("a");
        ev.push("b");
        assert_eq!(ev.next(&|| false).unwrap(), "a");
        assert_eq!(ev.next(&|| false).unwrap(), "b");
        assert!(matches!(ev.next(&|| true), Err(OomError::Cancelled)));
        let e2 = ev.clone();
        let t = std::thread::spawn(move || e2.next(&|| false).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        ev.push("c");
        assert_eq!(t.join().unwrap(), "c");
        for i in 0..MAX_QUEUED + 5 {
            ev.push(&i.to_string());
        }
        assert_eq!(ev.next(&|| false).unwrap(), "5", "oldest dropped beyond the bound");
    }
}
