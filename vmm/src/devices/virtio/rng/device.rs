//! The entropy device model: fills guest buffers with bytes from getrandom(2).
//!
//! Trust: the chains on the request queue are guest-controlled. Only device-writable
//! descriptors inside guest memory are filled, at most `MAX_BYTES_PER_REQUEST` bytes per
//! chain; every chain goes back to the used ring with the number of bytes written, even
//! when that is 0, so the queue never stalls.

use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::{
    exact_queues, ignore_config_write, kick_queues, ActivateError, GuestWarnings, Interrupt, InterruptKind, Queue,
    QueuePosition, QueueT, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes written into one request; a larger buffer gets this many (the spec lets
/// the device fill only part of it).
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// Most bytes handed out per wakeup of the device thread; the rest waits for the next
/// turn of the event loop, so other devices are served in between.
pub const MAX_BYTES_PER_WAKEUP: usize = 1024 * 1024;

const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("virtio-rng: cannot create the request queue eventfd: {0}")]
    QueueEventFd(#[source] io::Error),
}

/// What the device needs once the driver has set it up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: Queue,
}

/// The virtio-rng device model.
pub struct Rng {
    queue_events: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
    /// Holds one request's random bytes on their way to guest memory.
    bounce: Vec<u8>,
    warnings: GuestWarnings,
}

impl Rng {
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(RngError::QueueEventFd)?],
            acked_features: 0,
            active: None,
            bounce: vec![0; MAX_BYTES_PER_REQUEST as usize],
            warnings: GuestWarnings::new(),
        })
    }

    /// The request queue's notification eventfd (also in `queue_events()`).
    pub fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// The guest kicked the request queue: consume the kick and, once activated, serve
    /// the queue. Before activation the kick is only drained.
    pub fn handle_queue_event(&mut self) {
        match self.queue_events[0].read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::error!("virtio-rng: cannot read the request queue eventfd: {e}"),
        }
        if self.active.is_some() {
            self.process_queue();
        }
    }

    /// Serves the request queue until it is empty or this wakeup's budget is spent, then
    /// interrupts the guest if anything was returned.
    fn process_queue(&mut self) {
        let Self { active: Some(active), bounce, warnings, queue_events, .. } = self else {
            return;
        };
        let mem = &active.mem;
        let mut budget = MAX_BYTES_PER_WAKEUP;
        let mut chains_left = usize::from(QUEUE_SIZE);
        let mut returned = false;
        let mut out_of_budget = false;

        'serve: loop {
            if let Err(e) = active.queue.disable_notification(mem) {
                log::error!("virtio-rng: cannot update the used ring flags: {e}");
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let written = fill_request(mem, chain, bounce, warnings);
                match active.queue.add_used(mem, head, written) {
                    Ok(()) => returned = true,
                    Err(e) => warnings.warn(format_args!("virtio-rng: cannot return request {head}: {e}")),
                }
                budget = budget.saturating_sub(written as usize);
                chains_left -= 1;
                if budget == 0 || chains_left == 0 {
                    out_of_budget = true;
                    break 'serve;
                }
            }
            match active.queue.enable_notification(mem) {
                Ok(true) if popped > 0 => continue,
                // The avail index claims requests that cannot be popped (a corrupt
                // ring): stop instead of spinning; the next kick tries again.
                Ok(true) => {
                    warnings.warn(format_args!("virtio-rng: the avail ring index is inconsistent; waiting for a kick"));
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::error!("virtio-rng: cannot re-enable queue notifications: {e}");
                    break;
                }
            }
        }

        if returned {
            match active.queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                        log::error!("virtio-rng: cannot interrupt the guest: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => log::error!("virtio-rng: cannot read the avail ring's event index: {e}"),
            }
        }
        if out_of_budget {
            // Come back on the next turn of the event loop for the rest.
            if let Err(e) = queue_events[0].write(1) {
                log::error!("virtio-rng: cannot re-arm the request queue: {e}");
            }
        }
    }
}

/// Fills the device-writable descriptors of one request; returns the bytes written.
fn fill_request<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    bounce: &mut [u8],
    warnings: &mut GuestWarnings,
) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut written: u32 = 0;
    for desc in chain {
        if !desc.is_write_only() {
            warnings.warn(format_args!("virtio-rng: request {head} has a device-readable descriptor, skipped"));
            continue;
        }
        let room = MAX_BYTES_PER_REQUEST.saturating_sub(written);
        if room == 0 {
            break;
        }
        let len = desc.len().min(room) as usize;
        let Some(buf) = bounce.get_mut(..len) else {
            break;
        };
        if let Err(e) = fill_random(buf) {
            log::error!("virtio-rng: getrandom failed: {e}");
            break;
        }
        if let Err(e) = mem.write_slice(buf, desc.addr()) {
            warnings.warn(format_args!(
                "virtio-rng: request {head}: buffer {:#x}+{len:#x} is not in guest memory: {e}",
                desc.addr().0
            ));
            break;
        }
        // `len` <= `room`, so this stays <= MAX_BYTES_PER_REQUEST.
        written += len as u32;
    }
    written
}

/// Fills `buf` from the kernel's random pool (the same source as /dev/urandom, but
/// without a file descriptor to keep open).
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes for the whole call, and
        // getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match n {
            n if n > 0 => filled += n as usize,
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "getrandom returned no bytes")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(&mut self.warnings, "virtio-rng", offset, data.len());
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Device("virtio-rng is already active".into()));
        }
        let [queue] = exact_queues(queues)?;
        self.active = Some(Active { mem, interrupt, queue });
        kick_queues("virtio-rng", &self.queue_events);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Only the queue: requests are served whole on the device thread, so none is
    /// half-done while it is stopped.
    fn queue_positions(&self) -> Result<Vec<QueuePosition>, String> {
        Ok(self.active.as_ref().map(|a| QueuePosition::of(&a.queue)).into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::devices::virtio::test_utils::{
        guest_memory, GuestQueue, RecordingInterrupt, DATA_BASE, MEM_SIZE, NEXT, READ, WRITE,
    };

    const D: u64 = DATA_BASE;

    fn active_rng(gq: &GuestQueue, mem: &GuestMemoryMmap) -> (Rng, Arc<RecordingInterrupt>) {
        let mut rng = Rng::new().unwrap();
        let irq = RecordingInterrupt::new();
        rng.activate(mem.clone(), irq.clone(), vec![gq.queue()]).unwrap();
        (rng, irq)
    }

    #[test]
    fn fills_every_writable_buffer_and_interrupts() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let (mut rng, irq) = active_rng(&gq, &mem);
        gq.add_chain(&[(D, 64, WRITE), (D + 0x100, 32, WRITE)]);
        rng.handle_queue_event();
        assert_eq!(gq.used_idx(), 1);
        assert_eq!(gq.used(0), (0, 96));
        assert_ne!(gq.read(D, 64), vec![0; 64]);
        assert_ne!(gq.read(D + 0x100, 32), vec![0; 32]);
        assert_eq!(irq.take(), vec![InterruptKind::Queue]);
        // Nothing new: no interrupt.
        rng.handle_queue_event();
        assert_eq!(irq.take(), vec![]);
    }

    #[test]
    fn a_corrupt_avail_index_does_not_spin_the_device() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = guest_memory();
            let gq = GuestQueue::new(&mem, QUEUE_SIZE);
            let (mut rng, _irq) = active_rng(&gq, &mem);
            gq.set_avail_idx(1000);
            rng.handle_queue_event();
            let _ = tx.send(gq.used_idx());
        });
        let used = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the device spins on a corrupt ring");
        assert_eq!(used, 0);
    }

    #[test]
    fn caps_each_request() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let (mut rng, _irq) = active_rng(&gq, &mem);
        let cap = MAX_BYTES_PER_REQUEST as usize;
        gq.write(D, &vec![0xaa; 2 * cap]);
        gq.add_chain(&[(D, 2 * cap as u32, WRITE), (D + 3 * cap as u64, 16, WRITE)]);
        rng.handle_queue_event();
        assert_eq!(gq.used(0), (0, MAX_BYTES_PER_REQUEST));
        assert_eq!(gq.read(D + cap as u64, cap), vec![0xaa; cap], "nothing past the cap");
    }

    #[test]
    fn skips_readable_and_stops_at_buffers_outside_memory() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let (mut rng, _irq) = active_rng(&gq, &mem);
        gq.add_chain(&[
            (D, 16, READ),
            (D + 0x100, 16, WRITE),
            (MEM_SIZE as u64 - 8, 16, WRITE),
            (D + 0x200, 16, WRITE),
        ]);
        gq.add_chain(&[(u64::MAX - 4, 16, WRITE)]);
        gq.add_chain(&[(D + 0x300, 8, WRITE)]);
        rng.handle_queue_event();
        assert_eq!(gq.used_idx(), 3);
        assert_eq!(gq.used(0).1, 16);
        assert_eq!(gq.used(1).1, 0);
        assert_eq!(gq.used(2).1, 8, "the queue keeps working");
        assert_eq!(gq.read(D, 16), vec![0; 16], "device-readable buffer untouched");
    }

    #[test]
    fn looping_chain_ends_at_the_queue_size() {
        let mem = guest_memory();
        let gq = GuestQueue::new(&mem, 16);
        let (mut rng, _irq) = active_rng(&gq, &mem);
        gq.set_desc(3, D, 100, WRITE | NEXT, 4);
        gq.set_desc(4, D + 0x100, 100, WRITE | NEXT, 3);
        gq.offer(3);
        rng.handle_queue_event();
        assert_eq!(gq.used(0), (3, 16 * 100));
    }

    #[test]
    fn each_wakeup_has_a_budget_and_rearms_itself() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let (mut rng, _irq) = active_rng(&gq, &mem);
        rng.queue_event().read().unwrap(); // the kick activation arms
        let per_wakeup = MAX_BYTES_PER_WAKEUP / MAX_BYTES_PER_REQUEST as usize;
        for _ in 0..per_wakeup + 4 {
            gq.add_chain(&[(D, MAX_BYTES_PER_REQUEST, WRITE)]);
        }
        rng.handle_queue_event();
        assert_eq!(usize::from(gq.used_idx()), per_wakeup);
        assert_eq!(rng.queue_event().read().unwrap(), 1, "re-armed for the rest");
        rng.handle_queue_event();
        assert_eq!(usize::from(gq.used_idx()), per_wakeup + 4);
    }

    #[test]
    fn kicks_before_activation_are_drained_and_activation_serves_pending_buffers() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let mut rng = Rng::new().unwrap();
        gq.add_chain(&[(D, 32, WRITE)]);
        rng.queue_event().write(1).unwrap();
        rng.handle_queue_event();
        assert!(rng.queue_event().read().is_err(), "drained");
        assert_eq!(gq.used_idx(), 0);
        rng.activate(mem.clone(), RecordingInterrupt::new(), vec![gq.queue()]).unwrap();
        rng.handle_queue_event();
        assert_eq!(gq.used(0), (0, 32));
    }

    #[test]
    fn activation_needs_one_queue_and_reset_allows_another() {
        let mem = guest_memory();
        let gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let mut rng = Rng::new().unwrap();
        let err = rng.activate(mem.clone(), RecordingInterrupt::new(), vec![]).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { got: 0, want: 1 }));
        rng.activate(mem.clone(), RecordingInterrupt::new(), vec![gq.queue()]).unwrap();
        assert!(rng.activate(mem.clone(), RecordingInterrupt::new(), vec![gq.queue()]).is_err());
        assert!(rng.reset());
        assert!(!rng.is_activated());
        rng.activate(mem.clone(), RecordingInterrupt::new(), vec![gq.queue()]).unwrap();
        assert!(rng.is_activated());
        let mut config = [0xff; 4];
        rng.read_config(0, &mut config);
        assert_eq!(config, [0; 4]);
    }

    #[test]
    fn served_from_the_event_manager() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut events = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        events.add_subscriber(rng.clone());
        rng.lock().unwrap().activate(mem.clone(), RecordingInterrupt::new(), vec![gq.queue()]).unwrap();
        gq.add_chain(&[(D, 8, WRITE)]);
        rng.lock().unwrap().queue_event().write(1).unwrap();
        assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(gq.used(0), (0, 8));
    }
}
