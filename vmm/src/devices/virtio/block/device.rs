//! The virtio-blk device model: one request queue, served from a `DiskImage`.
//!
//! Trust: requests are guest-controlled and go through `Request::parse`. Every chain the
//! device pops goes back to the used ring: answered with a status byte when the chain has
//! one, with length 0 when it has none, so a malformed request never stalls the queue.

use std::io;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{DiskError, DiskImage, IoError};
use super::request::{BadRequest, Request, RequestType, Segment};
use super::SEG_MAX;
use crate::devices::virtio::{
    exact_queues, ignore_config_write, kick_queues, read_config_space, ActivateError, GuestWarnings, Interrupt,
    InterruptKind, Queue, QueuePosition, QueueT, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most requests served per wakeup of the device thread; the rest wait for the next turn
/// of the event loop, so other devices are served in between.
pub const MAX_REQUESTS_PER_WAKEUP: usize = 64;

const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];
/// capacity (le64), size_max (le32, not offered), seg_max (le32).
const CONFIG_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("virtio-blk: cannot create the request queue eventfd: {0}")]
    QueueEventFd(#[source] io::Error),
}

/// What the device needs once the driver has set it up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: Queue,
}

/// The virtio-blk device model.
pub struct Block {
    disk: DiskImage,
    config: [u8; CONFIG_SIZE],
    avail_features: u64,
    acked_features: u64,
    queue_events: [EventFd; 1],
    active: Option<Active>,
    warnings: GuestWarnings,
}

impl Block {
    /// A disk backed by the raw image at `path`. `id` is what the guest reads as the
    /// disk's serial (at most 20 bytes; default: from the image's device and inode).
    pub fn new(path: impl AsRef<Path>, read_only: bool, id: Option<String>) -> Result<Self, BlockError> {
        let disk = DiskImage::open(path.as_ref(), read_only, id)?;
        let config = config_space(disk.capacity());
        let mut avail_features = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            disk,
            config,
            avail_features,
            acked_features: 0,
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::QueueEventFd)?],
            active: None,
            warnings: GuestWarnings::new(),
        })
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
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
            Err(e) => log::error!("virtio-blk {}: cannot read the queue eventfd: {e}", self.disk.path().display()),
        }
        if self.active.is_some() {
            self.process_queue();
        }
    }

    /// Serves requests until the queue is empty or this wakeup's budget is spent, then
    /// interrupts the guest if anything was returned.
    fn process_queue(&mut self) {
        let Self { active: Some(active), disk, warnings, queue_events, .. } = self else {
            return;
        };
        let mem = &active.mem;
        let mut budget = MAX_REQUESTS_PER_WAKEUP;
        let mut returned = false;
        let mut out_of_budget = false;

        'serve: loop {
            if let Err(e) = active.queue.disable_notification(mem) {
                log::error!("virtio-blk {}: cannot update the used ring flags: {e}", disk.path().display());
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let used_len = serve_request(disk, mem, chain, warnings);
                match active.queue.add_used(mem, head, used_len) {
                    Ok(()) => returned = true,
                    Err(e) => warnings
                        .warn(format_args!("virtio-blk {}: cannot return request {head}: {e}", disk.path().display())),
                }
                budget -= 1;
                if budget == 0 {
                    out_of_budget = true;
                    break 'serve;
                }
            }
            match active.queue.enable_notification(mem) {
                Ok(true) if popped > 0 => continue,
                // The avail index claims requests that cannot be popped (a corrupt
                // ring): stop instead of spinning; the next kick tries again.
                Ok(true) => {
                    warnings.warn(format_args!(
                        "virtio-blk {}: the avail ring index is inconsistent; waiting for a kick",
                        disk.path().display()
                    ));
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::error!("virtio-blk {}: cannot re-enable queue notifications: {e}", disk.path().display());
                    break;
                }
            }
        }

        if returned {
            match active.queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                        log::error!("virtio-blk {}: cannot interrupt the guest: {e}", disk.path().display());
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    log::error!("virtio-blk {}: cannot read the avail ring's event index: {e}", disk.path().display())
                }
            }
        }
        if out_of_budget {
            // Come back on the next turn of the event loop for the rest.
            if let Err(e) = queue_events[0].write(1) {
                log::error!("virtio-blk {}: cannot re-arm the request queue: {e}", disk.path().display());
            }
        }
    }
}

/// The configuration space: capacity in sectors, no size_max, seg_max.
fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let fields = capacity.to_le_bytes().into_iter().chain(0u32.to_le_bytes()).chain(SEG_MAX.to_le_bytes());
    let mut config = [0u8; CONFIG_SIZE];
    config.iter_mut().zip(fields).for_each(|(dst, src)| *dst = src);
    config
}

/// Parses and executes one request and writes its status. Returns the used length: the
/// bytes written into device-writable buffers, status byte included (0 if there was no
/// status byte to write).
fn serve_request<M>(
    disk: &mut DiskImage,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    warnings: &mut GuestWarnings,
) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let (status, status_addr, data_written) = match Request::parse(chain, mem) {
        Ok(request) => {
            let (status, written) = execute(disk, mem, &request, head, warnings);
            (status, request.status, written)
        }
        Err(BadRequest { error, status }) => {
            warnings.warn(format_args!("virtio-blk {}: request {head} rejected: {error}", disk.path().display()));
            match status {
                Some(addr) => (VIRTIO_BLK_S_IOERR as u8, addr, 0),
                None => return 0,
            }
        }
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => data_written.saturating_add(1),
        Err(e) => {
            warnings.warn(format_args!(
                "virtio-blk {}: request {head}: cannot write the status: {e}",
                disk.path().display()
            ));
            0
        }
    }
}

/// Runs a parsed request against the disk. Returns the status and how many data bytes
/// went into device-writable buffers.
fn execute(
    disk: &mut DiskImage,
    mem: &GuestMemoryMmap,
    request: &Request,
    head: u16,
    warnings: &mut GuestWarnings,
) -> (u8, u32) {
    let result = match request.request_type {
        // `data_len` is part of one chain, whose total length fits in u32.
        RequestType::In => {
            disk.read(mem, request.sector, &request.data).map(|()| u32::try_from(request.data_len).unwrap_or(u32::MAX))
        }
        RequestType::Out => disk.write(mem, request.sector, &request.data).map(|()| 0),
        RequestType::Flush => disk.flush().map(|()| 0),
        RequestType::GetId => write_id(mem, disk.id(), &request.data).map_err(IoError::GuestMemory),
        RequestType::Unsupported(t) => {
            warnings
                .warn(format_args!("virtio-blk {}: request {head} has unsupported type {t}", disk.path().display()));
            return (VIRTIO_BLK_S_UNSUPP as u8, 0);
        }
    };
    match result {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(IoError::Disk(e)) => {
            log::error!(
                "virtio-blk {}: {:?} of {} bytes at sector {} failed: {e}",
                disk.path().display(),
                request.request_type,
                request.data_len,
                request.sector
            );
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
        Err(e) => {
            warnings.warn(format_args!("virtio-blk {}: request {head} failed: {e}", disk.path().display()));
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

/// Copies as much of the ID as fits into the buffers; returns the bytes written.
fn write_id(mem: &GuestMemoryMmap, id: &[u8], data: &[Segment]) -> Result<u32, vm_memory::GuestMemoryError> {
    let mut rest = id;
    let mut written = 0u32;
    for seg in data {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(rest.len().min(seg.len as usize));
        mem.write_slice(now, seg.addr)?;
        written += now.len() as u32;
        rest = later;
    }
    Ok(written)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in the configuration space is writable without CONFIG_WCE.
        let device = format!("virtio-blk {}", self.disk.path().display());
        ignore_config_write(&mut self.warnings, &device, offset, data.len());
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Device("virtio-blk is already active".into()));
        }
        let [queue] = exact_queues(queues)?;
        self.active = Some(Active { mem, interrupt, queue });
        kick_queues(&format!("virtio-blk {}", self.disk.path().display()), &self.queue_events);
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
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{
        guest_memory, GuestQueue, RecordingInterrupt, DATA_BASE, MEM_SIZE, NEXT, READ, WRITE,
    };

    const H: u64 = DATA_BASE;
    const D: u64 = DATA_BASE + 0x1000;
    const S: u64 = DATA_BASE + 0x8_0000;
    const SECTORS: u64 = 16;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    /// A disk image of `SECTORS` sectors, sector n filled with byte n.
    fn image() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..SECTORS as u8).flat_map(|n| [n; 512]).collect();
        std::fs::write(file.path(), data).unwrap();
        file
    }

    fn header(request_type: u32, sector: u64) -> Vec<u8> {
        let mut h = request_type.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    struct Rig<'a> {
        gq: GuestQueue<'a>,
        block: Block,
        irq: Arc<RecordingInterrupt>,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, image: &tempfile::NamedTempFile, read_only: bool) -> Self {
            let gq = GuestQueue::new(mem, QUEUE_SIZE);
            let mut block = Block::new(image.path(), read_only, Some("wisp-test-disk".into())).unwrap();
            let irq = RecordingInterrupt::new();
            block.activate(mem.clone(), irq.clone(), vec![gq.queue()]).unwrap();
            Self { gq, block, irq }
        }

        /// Submits one request like Linux does (header, data, status) and returns
        /// (status byte, used len).
        fn submit(&mut self, request_type: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
            self.gq.write(H, &header(request_type, sector));
            self.gq.write(S, &[0xee]);
            let mut chain = vec![(H, 16, READ)];
            chain.extend_from_slice(data);
            chain.push((S, 1, WRITE));
            self.submit_chain(&chain);
            (self.gq.read(S, 1)[0], self.last_used().1)
        }

        fn submit_chain(&mut self, chain: &[(u64, u32, u16)]) {
            let before = self.gq.used_idx();
            self.gq.add_chain(chain);
            self.block.handle_queue_event();
            assert_eq!(self.gq.used_idx(), before.wrapping_add(1), "every chain is returned");
        }

        fn last_used(&self) -> (u32, u32) {
            self.gq.used(self.gq.used_idx().wrapping_sub(1))
        }
    }

    #[test]
    fn a_corrupt_avail_index_does_not_spin_the_device() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = guest_memory();
            let image = tempfile::NamedTempFile::new().unwrap();
            image.as_file().set_len(4096).unwrap();
            let mut rig = Rig::new(&mem, &image, false);
            rig.gq.set_avail_idx(1000);
            rig.block.handle_queue_event();
            let _ = tx.send(rig.gq.used_idx());
        });
        let used = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the device spins on a corrupt ring");
        assert_eq!(used, 0);
    }

    #[test]
    fn config_space_and_features() {
        let image = image();
        let block = Block::new(image.path(), false, None).unwrap();
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), SECTORS);
        let mut seg_max = [0u8; 4];
        block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut beyond = [0xffu8; 4];
        block.read_config(14, &mut beyond);
        assert_eq!(beyond, [0, 0, 0, 0]);
        block.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        assert_eq!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(block.avail_features() & VIRTIO_F_VERSION_1, 0);
        let ro = Block::new(image.path(), true, None).unwrap();
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn write_read_flush_roundtrip() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, false);

        rig.gq.write(D, &[0x5a; 512]);
        rig.gq.write(D + 0x1000, &[0xa5; 1024]);
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, 2, &[(D, 512, READ), (D + 0x1000, 1024, READ)]), (OK, 1));
        assert_eq!(rig.irq.take(), vec![InterruptKind::Queue]);

        let on_disk = std::fs::read(image.path()).unwrap();
        assert_eq!(&on_disk[2 * 512..3 * 512], &[0x5a; 512]);
        assert_eq!(&on_disk[3 * 512..5 * 512], &[0xa5; 1024]);
        assert_eq!(&on_disk[5 * 512..6 * 512], &[5; 512], "the next sector is untouched");

        let out = D + 0x4_0000;
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, 1, &[(out, 1024, WRITE), (out + 0x1000, 1536, WRITE)]), (OK, 2561));
        assert_eq!(rig.gq.read(out, 512), vec![1; 512]);
        assert_eq!(rig.gq.read(out + 512, 512), vec![0x5a; 512]);
        assert_eq!(rig.gq.read(out + 0x1000, 1024), vec![0xa5; 1024]);
        assert_eq!(rig.gq.read(out + 0x1000 + 1024, 512), vec![5; 512]);

        assert_eq!(rig.submit(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    }

    #[test]
    fn large_transfers_go_through_the_bounce_buffer_in_pieces() {
        let mem = guest_memory();
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1024 * 1024).unwrap();
        let mut rig = Rig::new(&mem, &file, false);
        let pattern: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
        rig.gq.write(D, &pattern);
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, 8, &[(D, pattern.len() as u32, READ)]), (OK, 1));
        let out = D + 0x10_0000;
        assert_eq!(
            rig.submit(VIRTIO_BLK_T_IN, 8, &[(out, pattern.len() as u32, WRITE)]),
            (OK, pattern.len() as u32 + 1)
        );
        assert_eq!(rig.gq.read(out, pattern.len()), pattern);
    }

    #[test]
    fn get_id_returns_the_padded_id_and_truncates_to_the_buffer() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, true);
        assert_eq!(rig.submit(VIRTIO_BLK_T_GET_ID, 0, &[(D, 20, WRITE)]), (OK, 21));
        assert_eq!(rig.gq.read(D, 20), b"wisp-test-disk\0\0\0\0\0\0".to_vec());
        rig.gq.write(D + 0x100, &[0xff; 8]);
        assert_eq!(rig.submit(VIRTIO_BLK_T_GET_ID, 0, &[(D + 0x100, 4, WRITE)]), (OK, 5));
        assert_eq!(rig.gq.read(D + 0x100, 8), b"wisp\xff\xff\xff\xff".to_vec());
    }

    #[test]
    fn writes_to_a_read_only_disk_fail() {
        let mem = guest_memory();
        let image = image();
        let before = std::fs::read(image.path()).unwrap();
        let mut rig = Rig::new(&mem, &image, true);
        rig.gq.write(D, &[0x77; 512]);
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, 0, &[(D, 512, READ)]), (IOERR, 1));
        assert_eq!(std::fs::read(image.path()).unwrap(), before);
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, 0, &[(D, 512, WRITE)]), (OK, 513), "reads still work");
        assert_eq!(rig.submit(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    }

    #[test]
    fn out_of_range_sectors_fail() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, false);
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, SECTORS - 1, &[(D, 512, WRITE)]), (OK, 513));
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, SECTORS - 1, &[(D, 1024, WRITE)]), (IOERR, 1));
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, SECTORS, &[(D, 512, WRITE)]), (IOERR, 1));
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, u64::MAX, &[(D, 512, READ)]), (IOERR, 1));
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, &[(D, 512, READ)]), (IOERR, 1));
    }

    #[test]
    fn unsupported_requests_get_unsupp() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, false);
        assert_eq!(rig.submit(11 /* DISCARD */, 0, &[(D, 16, READ)]), (UNSUPP, 1));
        assert_eq!(rig.submit(0xdead_beef, 0, &[]), (UNSUPP, 1));
    }

    #[test]
    fn malformed_chains_are_answered_or_dropped_and_the_queue_keeps_working() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, false);
        let outside = MEM_SIZE as u64 + 0x1000;
        rig.gq.write(H, &header(VIRTIO_BLK_T_IN, 0));

        // Header too short: IOERR through the status byte.
        rig.gq.write(S, &[0xee]);
        rig.submit_chain(&[(H, 8, READ), (S, 1, WRITE)]);
        assert_eq!((rig.gq.read(S, 1)[0], rig.last_used().1), (IOERR, 1));

        // Status descriptor device-readable: nowhere to answer, returned with length 0.
        rig.gq.write(S, &[0xee]);
        rig.submit_chain(&[(H, 16, READ), (D, 512, WRITE), (S, 1, READ)]);
        assert_eq!(rig.last_used().1, 0);
        assert_eq!(rig.gq.read(S, 1)[0], 0xee, "a device-readable status is never written");

        // Data outside guest memory, and an absurd length: IOERR.
        for data in [(outside, 512, WRITE), (D, 0xffff_fe00, WRITE)] {
            rig.gq.write(S, &[0xee]);
            rig.submit_chain(&[(H, 16, READ), data, (S, 1, WRITE)]);
            assert_eq!((rig.gq.read(S, 1)[0], rig.last_used().1), (IOERR, 1));
        }

        // Status outside guest memory: dropped.
        rig.submit_chain(&[(H, 16, READ), (D, 512, WRITE), (outside, 1, WRITE)]);
        assert_eq!(rig.last_used().1, 0);

        // Data in the wrong direction: IOERR.
        rig.gq.write(S, &[0xee]);
        rig.submit_chain(&[(H, 16, READ), (D, 512, READ), (S, 1, WRITE)]);
        assert_eq!((rig.gq.read(S, 1)[0], rig.last_used().1), (IOERR, 1));

        // A chain that loops back on itself ends after QUEUE_SIZE descriptors, none a
        // status byte: dropped.
        rig.gq.set_desc(200, H, 16, READ | NEXT, 201);
        rig.gq.set_desc(201, D, 512, READ | NEXT, 200);
        rig.gq.offer(200);
        rig.block.handle_queue_event();
        assert_eq!(rig.last_used(), (200, 0));

        // A head index beyond the queue: nothing to return, skipped without a stall.
        rig.gq.offer(QUEUE_SIZE + 5);
        rig.block.handle_queue_event();

        // The queue still serves good requests.
        assert_eq!(rig.submit(VIRTIO_BLK_T_IN, 3, &[(D, 512, WRITE)]), (OK, 513));
        assert_eq!(rig.gq.read(D, 512), vec![3; 512]);
    }

    #[test]
    fn each_wakeup_has_a_budget_and_rearms_itself() {
        let mem = guest_memory();
        let image = image();
        let mut rig = Rig::new(&mem, &image, false);
        rig.block.queue_event().read().unwrap(); // the kick activation arms
        rig.gq.write(H, &header(VIRTIO_BLK_T_FLUSH, 0));
        for _ in 0..MAX_REQUESTS_PER_WAKEUP + 3 {
            rig.gq.add_chain(&[(H, 16, READ), (S, 1, WRITE)]);
        }
        rig.block.handle_queue_event();
        assert_eq!(usize::from(rig.gq.used_idx()), MAX_REQUESTS_PER_WAKEUP);
        assert_eq!(rig.block.queue_event().read().unwrap(), 1, "re-armed for the rest");
        rig.block.handle_queue_event();
        assert_eq!(usize::from(rig.gq.used_idx()), MAX_REQUESTS_PER_WAKEUP + 3);
    }

    #[test]
    fn kicks_before_activation_are_only_drained() {
        let mem = guest_memory();
        let image = image();
        let mut gq = GuestQueue::new(&mem, QUEUE_SIZE);
        let mut block = Block::new(image.path(), false, None).unwrap();
        gq.write(H, &header(VIRTIO_BLK_T_FLUSH, 0));
        gq.add_chain(&[(H, 16, READ), (S, 1, WRITE)]);
        block.queue_event().write(1).unwrap();
        block.handle_queue_event();
        assert!(block.queue_event().read().is_err(), "drained");
        assert_eq!(gq.used_idx(), 0);
        assert!(matches!(
            block.activate(mem.clone(), RecordingInterrupt::new(), vec![]),
            Err(ActivateError::QueueCount { got: 0, want: 1 })
        ));
    }

    /// The whole path a guest takes: registers through the transport, a request through
    /// the event manager, the interrupt through the transport's irqfd and status.
    #[test]
    fn driven_through_the_mmio_transport_and_the_event_manager() {
        use virtio_bindings::bindings::virtio_mmio::*;

        let mem = guest_memory();
        let image = image();
        let block = Arc::new(Mutex::new(Block::new(image.path(), false, None).unwrap()));
        let mut transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
        let mut events = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        events.add_subscriber(block.clone());

        let w = |t: &mut MmioTransport, reg: u32, v: u32| t.write(u64::from(reg), &v.to_le_bytes());
        let r = |t: &mut MmioTransport, reg: u32| {
            let mut b = [0u8; 4];
            t.read(u64::from(reg), &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(r(&mut transport, VIRTIO_MMIO_DEVICE_ID), TYPE_BLOCK);
        w(&mut transport, VIRTIO_MMIO_STATUS, 1);
        w(&mut transport, VIRTIO_MMIO_STATUS, 3);
        let mut features = 0u64;
        for sel in 0..2 {
            w(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            features |= u64::from(r(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
        }
        for sel in 0..2 {
            w(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            w(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        w(&mut transport, VIRTIO_MMIO_STATUS, 11);
        assert_eq!(r(&mut transport, VIRTIO_MMIO_STATUS), 11);
        let mut capacity = [0u8; 8];
        transport.read(0x100, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), SECTORS);

        let mut gq = GuestQueue::new(&mem, 128);
        w(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        w(&mut transport, VIRTIO_MMIO_QUEUE_NUM, 128);
        for (reg, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, gq.desc_table_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, gq.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, gq.used_addr()),
        ] {
            w(&mut transport, reg, addr.0 as u32);
            w(&mut transport, reg + 4, (addr.0 >> 32) as u32);
        }
        w(&mut transport, VIRTIO_MMIO_QUEUE_READY, 1);
        w(&mut transport, VIRTIO_MMIO_STATUS, 15);
        assert_eq!(r(&mut transport, VIRTIO_MMIO_STATUS), 15);
        assert!(block.lock().unwrap().is_activated());

        gq.write(H, &header(VIRTIO_BLK_T_IN, 4));
        gq.add_chain(&[(H, 16, READ), (D, 512, WRITE), (S, 1, WRITE)]);
        // No ioeventfd in a unit test: the QueueNotify write reaches the transport.
        w(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        events.run_with_timeout(1000).unwrap();
        assert_eq!(gq.used(0), (0, 513));
        assert_eq!(gq.read(D, 512), vec![4; 512]);
        assert_eq!(gq.read(S, 1), vec![OK]);
        assert!(transport.irq_event().read().unwrap() >= 1);
        assert_eq!(r(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w(&mut transport, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Reset: the device stops, and a kick is only drained.
        w(&mut transport, VIRTIO_MMIO_STATUS, 0);
        assert!(!block.lock().unwrap().is_activated());
        gq.add_chain(&[(H, 16, READ), (D, 512, WRITE), (S, 1, WRITE)]);
        w(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        events.run_with_timeout(1000).unwrap();
        assert_eq!(gq.used_idx(), 1);
    }
}
