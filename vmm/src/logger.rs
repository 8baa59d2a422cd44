//! A minimal stderr logger for the `log` facade: one line per record with the time
//! since start, level and thread. The level comes from `--log-level` or `WISP_LOG`.

use std::io::Write;
use std::time::Instant;

struct StderrLogger {
    start: Instant,
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let t = self.start.elapsed().as_secs_f64();
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("?");
            let _ = writeln!(std::io::stderr(), "[{t:10.6} {:5} {name}] {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init(level: log::LevelFilter, start: Instant) {
    if log::set_boxed_logger(Box::new(StderrLogger { start, level })).is_ok() {
        log::set_max_level(level);
    }
}
