//! `ExitCell`: where a process's exit (or any one-time outcome) is recorded once and any
//! number of threads wait for it. The agent records its children's statuses in it (the
//! reaper), the shim its tasks' exits and its own end.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A value set once (the first `set` wins) that threads can wait for.
#[derive(Debug)]
pub struct ExitCell<T> {
    value: Mutex<Option<T>>,
    changed: Condvar,
}

impl<T> Default for ExitCell<T> {
    fn default() -> Self {
        Self { value: Mutex::new(None), changed: Condvar::new() }
    }
}

impl<T: Copy> ExitCell<T> {
    /// Records `v` unless a value is already there, wakes every waiter, and returns the
    /// recorded value (the first one).
    pub fn set(&self, v: T) -> T {
        let mut slot = self.value.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = *slot.get_or_insert(v);
        self.changed.notify_all();
        recorded
    }

    pub fn get(&self) -> Option<T> {
        *self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }

    /// Waits for the value, however long it takes.
    pub fn wait(&self) -> T {
        let mut slot = self.value.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = *slot {
                return v;
            }
            slot = self.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits up to `timeout` for the value.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<T> {
        let slot = self.value.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, _) =
            self.changed.wait_timeout_while(slot, timeout, |v| v.is_none()).unwrap_or_else(|e| e.into_inner());
        *slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_value_wins_and_wakes_every_waiter() {
        let cell = Arc::new(ExitCell::default());
        assert_eq!(cell.wait_timeout(Duration::from_millis(10)), None);
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let c = cell.clone();
                std::thread::spawn(move || if i == 0 { Some(c.wait()) } else { c.wait_timeout(Duration::from_secs(60)) })
            })
            .collect();
        assert_eq!(cell.set(7), 7);
        assert_eq!(cell.set(9), 7, "a second value replaced the first");
        for w in waiters {
            assert_eq!(w.join().unwrap(), Some(7));
        }
        assert!(cell.is_set());
        assert_eq!(cell.get(), Some(7));
        assert!(!ExitCell::<u32>::default().is_set());
    }
}
