//! The virtio-fs device model: config space (tag, number of request queues), one hiprio
//! queue plus up to `MAX_REQUEST_QUEUES` request queues, each served from the VMM's
//! device thread through the FUSE server in `request`.
//!
//! Trust: chains are guest-controlled and go through `request::serve`, which answers
//! every malformed one with a FUSE error; every chain popped goes back to the used ring,
//! so the queue never stalls. Each wakeup serves at most `MAX_REQUESTS_PER_WAKEUP`
//! requests per queue and then yields to the other devices.

use std::io;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BackendError, GuardedFs};
use super::config::{ConfigError, SharedDirConfig, TAG_MAX_LEN};
use super::request;
use crate::devices::virtio::{
    ignore_config_write, kick_queues, read_config_space, ActivateError, GuestWarnings, Interrupt, InterruptKind, Queue,
    QueuePosition, QueueT, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};

/// Size of each request queue. Linux caps a request at the queue size minus 4 pages, so
/// this leaves the full 1 MiB (256 pages) FUSE requests fuse-backend-rs negotiates.
pub const QUEUE_SIZE: u16 = 1024;
/// Size of the hiprio queue (FORGET, BATCH_FORGET: one small descriptor each).
pub const HIPRIO_QUEUE_SIZE: u16 = 256;
/// Most requests served per queue and wakeup of the device thread (each moves at most
/// about 1 MiB); the rest wait for the next turn of the event loop.
pub const MAX_REQUESTS_PER_WAKEUP: usize = 32;
/// Index of the hiprio queue; request queues follow it.
pub const HIPRIO_QUEUE: usize = 0;

/// tag (36 bytes, NUL padded), num_request_queues (le32).
const CONFIG_SIZE: usize = TAG_MAX_LEN + 4;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("virtio-fs share '{tag}': cannot create a queue eventfd: {source}")]
    QueueEventFd { tag: String, source: io::Error },
}

/// What the device needs once the driver has set it up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    /// The hiprio queue and the request queues the driver set up (it uses at most one
    /// per vCPU, so possibly fewer than offered).
    queues: Vec<Queue>,
}

/// The virtio-fs device model for one shared directory.
pub struct SharedDir {
    tag: String,
    config: [u8; CONFIG_SIZE],
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    acked_features: u64,
    fs: Arc<GuardedFs>,
    server: Server<Arc<GuardedFs>>,
    active: Option<Active>,
    warnings: GuestWarnings,
}

impl SharedDir {
    /// Checks `config` and prepares the passthrough file system; nothing of the share is
    /// opened until the guest mounts it (FUSE INIT).
    pub fn new(config: &SharedDirConfig) -> Result<Self, FsError> {
        config.validate()?;
        let fs = Arc::new(GuardedFs::new(config)?);
        super::backend::raise_open_file_limit(u64::from(config.max_inodes) + u64::from(config.max_handles));
        let queues = 1 + usize::from(config.request_queues);
        let queue_events = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| FsError::QueueEventFd { tag: config.tag.clone(), source })?;
        let mut queue_max_sizes = vec![QUEUE_SIZE; queues];
        queue_max_sizes[HIPRIO_QUEUE] = HIPRIO_QUEUE_SIZE;
        Ok(Self {
            tag: config.tag.clone(),
            config: config_space(&config.tag, config.request_queues),
            queue_max_sizes,
            queue_events,
            acked_features: 0,
            server: Server::new(fs.clone()),
            fs,
            active: None,
            warnings: GuestWarnings::new(),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// (distinct inodes, open handles) the passthrough holds for the guest.
    #[cfg(test)]
    pub fn holdings(&self) -> (usize, usize) {
        self.fs.holdings()
    }

    /// The guest kicked queue `index`: consume the kick and, once activated, serve the
    /// queue. Before activation the kick is only drained.
    pub fn handle_queue_event(&mut self, index: usize) {
        let Some(event) = self.queue_events.get(index) else {
            return;
        };
        match event.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::error!("virtio-fs {}: cannot read the eventfd of queue {index}: {e}", self.tag),
        }
        self.process_queue(index);
    }

    /// Serves queue `index` until it is empty or this wakeup's budget is spent, then
    /// interrupts the guest if anything was returned.
    fn process_queue(&mut self, index: usize) {
        let Self { active: Some(active), server, warnings, queue_events, tag, .. } = self else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            // A kick on a queue the driver did not set up.
            return;
        };
        let mem = &active.mem;
        let mut budget = MAX_REQUESTS_PER_WAKEUP;
        let mut returned = false;
        let mut out_of_budget = false;

        'serve: loop {
            if let Err(e) = queue.disable_notification(mem) {
                log::error!("virtio-fs {tag}: queue {index}: cannot update the used ring flags: {e}");
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let served = request::serve(server, mem, chain);
                if let Some(problem) = served.problem {
                    warnings.warn(format_args!("virtio-fs {tag}: queue {index}: {problem}"));
                }
                match queue.add_used(mem, head, served.used_len) {
                    Ok(()) => returned = true,
                    Err(e) => warnings.warn(format_args!("virtio-fs {tag}: cannot return request {head}: {e}")),
                }
                budget -= 1;
                if budget == 0 {
                    out_of_budget = true;
                    break 'serve;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) if popped > 0 => continue,
                // The avail index claims requests that cannot be popped (a corrupt
                // ring): stop instead of spinning; the next kick tries again.
                Ok(true) => {
                    warnings.warn(format_args!(
                        "virtio-fs {tag}: queue {index}: the avail ring index is inconsistent; waiting for a kick"
                    ));
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::error!("virtio-fs {tag}: queue {index}: cannot re-enable notifications: {e}");
                    break;
                }
            }
        }

        if returned {
            match queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                        log::error!("virtio-fs {tag}: cannot interrupt the guest: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => log::error!("virtio-fs {tag}: queue {index}: cannot read the avail ring's event index: {e}"),
            }
        }
        if out_of_budget {
            // Come back on the next turn of the event loop for the rest.
            if let Some(Err(e)) = queue_events.get(index).map(|ev| ev.write(1)) {
                log::error!("virtio-fs {tag}: cannot re-arm queue {index}: {e}");
            }
        }
    }
}

/// The configuration space: the tag, NUL padded, then the number of request queues.
fn config_space(tag: &str, request_queues: u16) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    // `tag` was validated to fit.
    for (dst, src) in config.iter_mut().zip(tag.bytes().take(TAG_MAX_LEN)) {
        *dst = src;
    }
    let queues = u32::from(request_queues).to_le_bytes();
    config[TAG_MAX_LEN..].copy_from_slice(&queues);
    config
}

impl VirtioDevice for SharedDir {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        ignore_config_write(&mut self.warnings, &format!("virtio-fs {}", self.tag), offset, data.len());
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Device(format!("virtio-fs {} is already active", self.tag)));
        }
        // The driver uses min(num_request_queues, vCPUs) request queues, at least one.
        let (got, most) = (queues.len(), self.queue_events.len());
        if !(2..=most).contains(&got) {
            return Err(ActivateError::QueueCount { got, want: most });
        }
        self.active = Some(Active { mem, interrupt, queues });
        kick_queues(&format!("virtio-fs {}", self.tag), &self.queue_events[..got]);
        Ok(())
    }

    /// Drops the queues and everything the old driver had open or looked up (file
    /// handles, inode references), so a new driver starts from a fresh FUSE session.
    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.fs.destroy();
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Every queue the driver set up: requests are served whole on the device thread.
    /// Only before the guest mounts the share (a VM template is taken then): once it
    /// has, the inodes and open files of its FUSE session live in this VMM and a
    /// snapshot does not carry them.
    fn queue_positions(&self) -> Result<Vec<QueuePosition>, String> {
        if self.fs.session_live() {
            return Err(format!(
                "the guest has virtio-fs share '{}' mounted; its FUSE session's inodes and open files live in this VMM",
                self.tag
            ));
        }
        Ok(self.active.as_ref().map(|a| a.queues.iter().map(QueuePosition::of).collect()).unwrap_or_default())
    }
}
