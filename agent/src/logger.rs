//! A minimal `log` backend: one line per record on stderr (the serial console in the
//! guest, the test's output on the host). It formats into a buffer and issues a single
//! `write(2)` without taking locks, so it is safe to use in the forked spawn helper,
//! whose parent's other threads may have held Rust's stderr lock at fork time.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let lvl = match r.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let line = format!("wisp-agent[{}] {lvl} {}\n", std::process::id(), r.args());
        // SAFETY: writes a valid buffer to fd 2; a failed write is ignored on purpose.
        unsafe {
            libc::write(2, line.as_ptr().cast(), line.len());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. `WISP_AGENT_LOG` = error|warn|info|debug|trace (default info).
pub fn init() {
    let level = match std::env::var("WISP_AGENT_LOG").unwrap_or_default().as_str() {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => LevelFilter::Info,
    };
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
