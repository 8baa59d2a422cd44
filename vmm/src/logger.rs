//! A minimal stderr logger for the `log` facade: one line per record with the time
//! since start, level and thread. The level comes from `--log-level` or `WISP_LOG`.
//!
//! Libraries that serve the guest log what the guest asked for at warn/error level: the
//! FUSE server of virtio-fs (`fuse_backend_rs`), and `virtio_queue` (logged under
//! `virtio_queue::queue`: an avail index that runs ahead of the ring, a used-ring entry
//! out of range, a queue set up with bad sizes or addresses). A guest could flood the
//! VMM's log (and through it the shim's) that way. Their records share a fixed budget,
//! after which they are dropped with one notice. wisp's own guest-caused messages go
//! through each device's `GuestWarnings` budget instead.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Log targets whose messages the guest can cause.
const GUEST_DRIVEN_TARGETS: &[&str] = &["fuse_backend_rs", "virtio_queue"];
/// How many of their records are written in the life of the VMM.
pub const GUEST_DRIVEN_BUDGET: u32 = 64;

struct StderrLogger {
    start: Instant,
    level: log::LevelFilter,
    guest_driven_left: AtomicU32,
}

impl StderrLogger {
    /// False once the guest-driven budget is spent (the last allowed record says so).
    fn within_budget(&self, record: &log::Record) -> Option<&'static str> {
        if !GUEST_DRIVEN_TARGETS.iter().any(|t| record.target().starts_with(t)) {
            return Some("");
        }
        match self.guest_driven_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
            Ok(1) => Some(" (further messages of this kind are dropped)"),
            Ok(_) => Some(""),
            Err(_) => None,
        }
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Some(suffix) = self.within_budget(record) else { return };
        let t = self.start.elapsed().as_secs_f64();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        let _ = writeln!(std::io::stderr(), "[{t:10.6} {:5} {name}] {}{suffix}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init(level: log::LevelFilter, start: Instant) {
    if log::set_boxed_logger(Box::new(StderrLogger { start, level, guest_driven_left: AtomicU32::new(GUEST_DRIVEN_BUDGET) })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: &str) -> log::Record<'_> {
        log::Record::builder().target(target).level(log::Level::Error).build()
    }

    #[test]
    fn guest_driven_messages_stop_at_the_budget() {
        let l = StderrLogger { start: Instant::now(), level: log::LevelFilter::Info, guest_driven_left: AtomicU32::new(3) };
        let fuse = record("fuse_backend_rs::api::server");
        assert_eq!(l.within_budget(&fuse), Some(""));
        assert_eq!(l.within_budget(&fuse), Some(""));
        assert_eq!(l.within_budget(&fuse), Some(" (further messages of this kind are dropped)"));
        assert_eq!(l.within_budget(&fuse), None);
        // The VMM's own messages are never dropped.
        assert_eq!(l.within_budget(&record("wisp_vmm::builder")), Some(""));
    }

    /// virtio-queue logs bogus avail indices and queue setups under its module path; the
    /// guest can repeat those at will, so they count against the same budget.
    #[test]
    fn virtio_queue_messages_share_the_budget() {
        let left = AtomicU32::new(2);
        let l = StderrLogger { start: Instant::now(), level: log::LevelFilter::Info, guest_driven_left: left };
        let queue = record("virtio_queue::queue");
        assert_eq!(l.within_budget(&queue), Some(""));
        let last = l.within_budget(&record("fuse_backend_rs::passthrough"));
        assert_eq!(last, Some(" (further messages of this kind are dropped)"));
        for _ in 0..100 {
            assert_eq!(l.within_budget(&queue), None);
        }
    }
}
