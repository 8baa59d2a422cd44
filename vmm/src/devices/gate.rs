//! Stopping the device thread between two turns of its event loop, so nothing moves in
//! the virtio queues or guest memory while a snapshot reads them: the VMM asks
//! (`DeviceGate::stop`), an eventfd in the event loop wakes the thread if it waits for
//! events, and the thread parks at the end of that turn (`park_if_stopped`) until
//! `go`. Every device serves a request whole within a turn, so a parked thread leaves
//! no request half done.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Default)]
struct GateState {
    stop: bool,
    parked: bool,
}

/// The VMM's handle on the device thread's gate (cheap to clone).
#[derive(Clone)]
pub struct DeviceGate {
    state: Arc<(Mutex<GateState>, Condvar)>,
    wake: Arc<EventFd>,
}

/// The gate's eventfd in the device thread's event loop: reading it is all it does,
/// the parking happens after the turn in `park_if_stopped`.
pub struct GateWaker {
    wake: Arc<EventFd>,
}

impl DeviceGate {
    pub fn new() -> std::io::Result<(Self, GateWaker)> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let gate = Self { state: Arc::new((Mutex::new(GateState::default()), Condvar::new())), wake: wake.clone() };
        Ok((gate, GateWaker { wake }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the device thread to park and waits until it has, at most `timeout`. On a
    /// timeout the request is withdrawn (the thread goes on) and false is returned.
    pub fn stop(&self, timeout: Duration) -> bool {
        self.lock().stop = true;
        if self.wake.write(1).is_err() {
            self.go();
            return false;
        }
        let guard = self.lock();
        let (guard, _) =
            self.state.1.wait_timeout_while(guard, timeout, |s| !s.parked).unwrap_or_else(|e| e.into_inner());
        let parked = guard.parked;
        drop(guard);
        if !parked {
            self.go();
        }
        parked
    }

    /// Lets the device thread go on.
    pub fn go(&self) {
        self.lock().stop = false;
        self.state.1.notify_all();
    }

    /// Called by the device thread after each turn of its event loop: parks while a
    /// stop is asked for.
    pub fn park_if_stopped(&self) {
        let mut s = self.lock();
        if !s.stop {
            return;
        }
        s.parked = true;
        self.state.1.notify_all();
        while s.stop {
            s = self.state.1.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = false;
    }
}

impl MutEventSubscriber for GateWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Nonblocking: a spurious wakeup reads EAGAIN, which changes nothing.
        let _ = self.wake.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.wake.as_raw_fd(), EventSet::IN)) {
            log::error!("device gate: cannot watch its eventfd: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    /// A device thread with only the gate in its loop, counting its turns.
    fn device_thread() -> (DeviceGate, Arc<AtomicUsize>, std::thread::JoinHandle<()>, Arc<Mutex<bool>>) {
        let (gate, waker) = DeviceGate::new().unwrap();
        let turns = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Mutex::new(false));
        let (g, t, d) = (gate.clone(), turns.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new().unwrap();
            events.add_subscriber(Arc::new(Mutex::new(waker)));
            while !*d.lock().unwrap() {
                events.run_with_timeout(50).unwrap();
                t.fetch_add(1, Ordering::SeqCst);
                g.park_if_stopped();
            }
        });
        (gate, turns, thread, done)
    }

    #[test]
    fn a_stopped_device_thread_takes_no_turn_until_it_may_go() {
        let (gate, turns, thread, done) = device_thread();
        assert!(gate.stop(Duration::from_secs(5)), "the thread parks");
        let at_stop = turns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(turns.load(Ordering::SeqCst), at_stop, "no turn while stopped");
        gate.go();
        std::thread::sleep(Duration::from_millis(200));
        assert!(turns.load(Ordering::SeqCst) > at_stop, "turns again after go");
        // Stopped again, then the thread ends.
        assert!(gate.stop(Duration::from_secs(5)));
        *done.lock().unwrap() = true;
        gate.go();
        thread.join().unwrap();
    }

    #[test]
    fn a_stop_that_is_not_answered_in_time_is_withdrawn() {
        // No device thread at all: nobody parks.
        let (gate, _waker) = DeviceGate::new().unwrap();
        assert!(!gate.stop(Duration::from_millis(50)));
        assert!(!gate.lock().stop, "the request is withdrawn, a later thread would not park");
    }
}
