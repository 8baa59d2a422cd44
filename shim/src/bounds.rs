//! Bounds on what the shim takes from the guest. The agent and the guest console are
//! the guest's: whatever they send may be hostile. Text that reaches containerd (error
//! messages) or the shim's log (console tails) is capped and stripped of control
//! characters (a forged newline would forge a log entry); events are rate-limited. The
//! VMM's stderr is the guest's too, in part (what the guest makes the VMM log), and is
//! forwarded to the shim's log under a rate limit (`vm.rs`).

use std::time::Instant;

/// The most bytes of a guest-provided error message the shim passes on.
pub const MAX_GUEST_ERROR: usize = 2048;

/// `s` with control characters other than newline and tab replaced by `?` (newlines
/// too unless `multiline`), cut to at most `max` bytes on a character boundary, saying
/// how much was cut.
pub fn guest_text(s: &str, max: usize, multiline: bool) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (i, c) in s.char_indices() {
        if out.len() + c.len_utf8() > max {
            out.push_str(&format!(" [... {} more bytes from the guest cut]", s.len() - i));
            break;
        }
        let keep = c == '\t' || (multiline && c == '\n') || !c.is_control();
        out.push(if keep { c } else { '?' });
    }
    out
}

/// A token bucket: `burst` events at once, refilled at `per_sec`.
pub struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Events refused in all.
    pub dropped: u64,
}

impl RateLimit {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// True if an event may go now.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    pub(crate) fn allow_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn guest_text_is_capped_and_has_no_forged_lines() {
        assert_eq!(guest_text("plain", 100, false), "plain");
        assert_eq!(guest_text("a\nb\r\x1b[2Jc\td", 100, false), "a?b??[2Jc\td");
        assert_eq!(guest_text("a\nb", 100, true), "a\nb");
        let long = "é".repeat(100);
        let cut = guest_text(&long, 11, false);
        assert!(cut.starts_with("ééééé ") && cut.contains("190 more bytes"), "{cut}");
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let mut r = RateLimit::new(10, 3);
        let t0 = r.last;
        assert!((0..3).all(|_| r.allow_at(t0)));
        assert!(!r.allow_at(t0));
        assert!(!r.allow_at(t0 + Duration::from_millis(50)));
        assert!(r.allow_at(t0 + Duration::from_millis(160)));
        assert_eq!(r.dropped, 2);
        assert!((0..3).all(|_| r.allow_at(t0 + Duration::from_secs(10))));
    }
}
